"""The audit service on a real nats-server: every event and api request recorded once and
in order, across restarts (a clean stop and a SIGKILL) and what was published while it was
down; tampering with the stored files named by verify (over NATS and offline); garbage
inputs recorded as what they are, bad queries answered with what is wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import nats
import pytest
from faststream import TestApp
from waiting import eventually, wait_until

from comp_audit import store
from comp_audit.main import build_app
from comp_audit.settings import AuditSettings
from comp_cli.local import _bin
from comp_common import subjects
from comp_common.streams import ensure_stream
from processes import stop_process

wait_for = partial(eventually, timeout=30.0)


def settings(nats_url: str, data_dir: Path, **audit) -> AuditSettings:
    return AuditSettings(
        nats={"url": nats_url},
        audit={"data_dir": str(data_dir), "checkpoint_every_seconds": 0.2, **audit},
        log={"json": False},
        telemetry={"spans_to_nats": False},
    )


def records(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in store.read_records(data_dir)]


def request_body(n: int, actor: str = "ann@host", **extra) -> bytes:
    return json.dumps({"actor": actor, "verb": "GET", "path": f"/v1/deployments/d{n}", "status": 200,
                       "resource": "deployments", "namespace": "default", "name": f"d{n}", **extra}).encode()


async def publish_events(js, first: int, count: int) -> None:
    for n in range(first, first + count):
        await js.publish(f"comp.evt.deployment.default.d{n}", json.dumps({"n": n}).encode())


async def publish_requests(js, first: int, count: int, **extra) -> None:
    for n in range(first, first + count):
        await js.publish(subjects.API_REQUEST_SUBJECT, request_body(n, **extra))


def assert_exactly_once(data_dir: Path, events: int, requests: int) -> list[dict]:
    """The log holds events 1..events and requests 1..requests once each, each stream in
    order, seq 1..total with no gap, and it verifies."""
    found = records(data_dir)
    assert [r["seq"] for r in found] == list(range(1, len(found) + 1))
    by_stream = {s: [r["stream_seq"] for r in found if r["stream"] == s] for s in (subjects.EVENTS_STREAM, subjects.API_REQUESTS_STREAM)}
    assert by_stream[subjects.EVENTS_STREAM] == list(range(1, events + 1))
    assert by_stream[subjects.API_REQUESTS_STREAM] == list(range(1, requests + 1))
    assert [r["body"]["n"] for r in found if r["kind"] == "event"] == list(range(1, events + 1))
    verdict = store.verify_dir(data_dir)
    assert verdict.ok, verdict.problem
    return found


async def streams_ready(nc) -> None:
    """The api's side of the contract: its stream exists before it publishes."""
    js = nc.jetstream()
    for name, subject in ((subjects.API_REQUESTS_STREAM, subjects.API_REQUEST_SUBJECT), (subjects.EVENTS_STREAM, subjects.EVENT_SUBJECTS)):
        await ensure_stream(js, name, subject, 3600, 1024**3, adjust=False)


@pytest.fixture
async def nc(nats_url):
    connection = await nats.connect(nats_url)
    await streams_ready(connection)
    yield connection
    await connection.close()


async def test_every_event_and_request_is_recorded_once_in_order(nats_url, nc, tmp_path):
    js = nc.jetstream()
    app, audit = build_app(settings(nats_url, tmp_path / "audit"))
    async with TestApp(app):
        for round_ in range(5):
            await publish_events(js, round_ * 10 + 1, 10)
            await publish_requests(js, round_ * 4 + 1, 4)
        await wait_for(lambda: audit.head.seq >= 70, "70 records")
    found = assert_exactly_once(tmp_path / "audit", events=50, requests=20)
    first_request = next(r for r in found if r["kind"] == "request")
    assert first_request["subject"] == subjects.API_REQUEST_SUBJECT
    assert first_request["body"]["actor"] == "ann@host" and "malformed" not in first_request
    assert audit.positions == {subjects.EVENTS_STREAM: 50, subjects.API_REQUESTS_STREAM: 20}
    # The key was made on first start, private to its owner; the public key sits beside the checkpoints.
    assert os.stat(tmp_path / "audit" / store.KEY_FILE).st_mode & 0o777 == 0o600
    assert (tmp_path / "audit" / store.CHECKPOINT_DIR / store.PUBLIC_KEY_FILE).exists()
    # Stopping signed a checkpoint at the head.
    last = json.loads(store.read_checkpoints(tmp_path / "audit")[-1])
    assert last["seq"] == 70 and last["head"] == found[-1]["hash"]


async def test_a_restarted_audit_records_what_came_while_it_was_down_once(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await publish_events(js, 1, 30)
        await wait_for(lambda: audit.head.seq >= 30, "the first 30 events")
    # Published while no audit runs: kept by the streams until it is back.
    await publish_events(js, 31, 30)
    await publish_requests(js, 1, 5)
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        # Read from where the log left each stream, not from the stream's start or end.
        assert audit.resumed_from == {subjects.EVENTS_STREAM: 31, subjects.API_REQUESTS_STREAM: 1}
        await publish_events(js, 61, 10)
        await wait_for(lambda: audit.head.seq >= 75, "75 records")
    assert_exactly_once(data_dir, events=70, requests=5)


async def test_a_torn_last_line_is_cut_off_and_its_messages_recorded_again(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await publish_events(js, 1, 10)
        await wait_for(lambda: audit.head.seq >= 10, "10 records")
    (segment,) = store.segments(data_dir)
    # What a crash in the middle of a batch's write leaves.
    with open(segment, "ab") as out:
        out.write(b'{"seq":11,"time":17645900')
    await publish_events(js, 11, 5)
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await wait_for(lambda: audit.head.seq >= 15, "15 records")
    assert_exactly_once(data_dir, events=15, requests=0)


async def test_a_failing_disk_write_is_retried_and_nothing_is_half_written(nats_url, nc, tmp_path, monkeypatch, capfd):
    from comp_audit import store as store_module

    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    real_fsync = os.fsync
    failures = []

    def failing_fsync(fd: int) -> None:
        # The batch is written, then the disk says no: it must not count, nor stay.
        if fd == audit.segments._fd and len(failures) < 2:
            failures.append(os.fstat(fd).st_size)
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    async with TestApp(app):
        await publish_events(js, 1, 3)
        await wait_for(lambda: audit.head.seq >= 3, "the first records")
        size_before = os.fstat(audit.segments._fd).st_size
        monkeypatch.setattr(store_module.os, "fsync", failing_fsync)
        await publish_events(js, 4, 5)
        await wait_for(lambda: audit.head.seq >= 8, "the records after two failed writes")
    assert len(failures) == 2 and failures[0] > size_before  # the failed batch had been written...
    assert "writing the audit log failed; retrying" in capfd.readouterr().err
    assert_exactly_once(data_dir, events=8, requests=0)  # ...and was cut off again


async def test_a_garbled_last_record_stops_recording_but_not_answering(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await publish_events(js, 1, 4)
        await wait_for(lambda: audit.head.seq >= 4, "4 records")
    (segment,) = store.segments(data_dir)
    lines = segment.read_bytes().splitlines()
    segment.write_bytes(b"\n".join(lines[:-1] + [b"garbage"]) + b"\n")
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        assert "unreadable" in audit.damage
        await publish_events(js, 5, 1)
        answer = json.loads((await nc.request(subjects.AUDIT_VERIFY, b"", timeout=10)).data)
        assert (answer["problem"]["kind"], answer["problem"]["seq"]) == ("altered", 4)
        listed = json.loads((await nc.request(subjects.AUDIT_QUERY, b"{}", timeout=10)).data)
        assert [r["seq"] for r in listed["records"]] == [1, 2, 3]
    assert segment.read_bytes().splitlines()[-1] == b"garbage"  # nothing appended after the damage


def start_process(nats_url: str, data_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "COMP_NATS__URL": nats_url, "COMP_AUDIT__DATA_DIR": str(data_dir),
           "COMP_AUDIT__CHECKPOINT_EVERY_RECORDS": "500", "COMP_TELEMETRY__SPANS_TO_NATS": "false"}
    with open(log, "ab") as out:
        return subprocess.Popen([_bin("comp-audit")], env=env, stdout=out, stderr=subprocess.STDOUT)


def head_seq(data_dir: Path) -> int:
    lines = store.read_records(data_dir)
    return json.loads(lines[-1])["seq"] if lines else 0


async def test_an_audit_killed_mid_stream_resumes_with_no_gap_and_no_duplicate(nats_url, nc, tmp_path):
    js = nc.jetstream(publish_async_max_pending=1000)
    data_dir = tmp_path / "audit"
    proc = start_process(nats_url, data_dir, tmp_path / "audit.log")
    try:
        await wait_for(lambda: _consumers(nc), "the audit process consuming")
        total = 20_000
        for n in range(1, total + 1):
            await js.publish_async(f"comp.evt.deployment.default.d{n}", json.dumps({"n": n}).encode())
            if n == total // 4:
                await js.publish_async_completed()
                await wait_for(lambda: head_seq(data_dir) > 0, "some records")
                # Killed while the rest is streaming in: no clean shutdown, no last checkpoint.
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        await js.publish_async_completed()
        recorded_before = head_seq(data_dir)
        assert recorded_before < total
        proc = start_process(nats_url, data_dir, tmp_path / "audit.log")
        await wait_for(lambda: head_seq(data_dir) >= total, f"all {total} records after the restart")
    finally:
        stop_process(proc)
    assert_exactly_once(data_dir, events=total, requests=0)


async def _consumers(nc) -> bool:
    info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
    return info.state.consumer_count >= 1


def tamper_alter(lines: list[bytes]) -> list[bytes]:
    assert b'"body":{"n": 5}' in lines[4]
    lines[4] = lines[4].replace(b'"body":{"n": 5}', b'"body":{"n": 6}')
    return lines


def tamper_delete(lines: list[bytes]) -> list[bytes]:
    return lines[:6] + lines[7:]


def tamper_reorder(lines: list[bytes]) -> list[bytes]:
    lines[9], lines[10] = lines[10], lines[9]
    return lines


def tamper_truncate(lines: list[bytes]) -> list[bytes]:
    return lines[:15]


@pytest.mark.parametrize(
    "tamper, kind, seq",
    [(tamper_alter, "altered", 5), (tamper_delete, "removed", 7), (tamper_reorder, "reordered", 10), (tamper_truncate, "truncated", 16)],
    ids=["altered", "removed", "reordered", "truncated"],
)
async def test_tampering_with_the_stored_log_is_named_over_nats_and_offline(nats_url, nc, tmp_path, tamper, kind, seq):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await publish_events(js, 1, 20)
        await wait_for(lambda: audit.head.seq >= 20, "20 records")
        answer = json.loads((await nc.request(subjects.AUDIT_VERIFY, b"", timeout=10)).data)
        assert answer["ok"] is True and answer["records"] == 20 and answer["problem"] is None
    (segment,) = store.segments(data_dir)
    lines = segment.read_bytes().splitlines()
    segment.write_bytes(b"".join(line + b"\n" for line in tamper(lines)))

    offline = subprocess.run([sys.executable, "-m", "comp_audit.verify", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert offline.returncode == 1, offline.stdout + offline.stderr
    assert f"{kind} at record {seq}" in offline.stdout

    # Through the service as well; a truncated log is not appended to (it would bury the evidence).
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        answer = json.loads((await nc.request(subjects.AUDIT_VERIFY, b"", timeout=10)).data)
        assert (audit.damage is not None) is (kind == "truncated")
    assert answer["ok"] is False
    assert (answer["problem"]["kind"], answer["problem"]["seq"]) == (kind, seq)


async def test_offline_verify_of_an_untouched_log_and_of_no_log(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await publish_events(js, 1, 3)
        await wait_for(lambda: audit.head.seq >= 3, "3 records")
    ok = subprocess.run([sys.executable, "-m", "comp_audit.verify", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 3 records"), ok.stdout + ok.stderr
    missing = subprocess.run([sys.executable, "-m", "comp_audit.verify", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "holds no audit log" in missing.stderr


async def test_garbage_inputs_are_recorded_flagged_and_bad_queries_answered(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await js.publish("comp.evt.task.n1", b"\xff\x00 not json")
        await js.publish(subjects.API_REQUEST_SUBJECT, b"{half a json")
        await js.publish(subjects.API_REQUEST_SUBJECT, b'{"verb": "GET"}')
        await js.publish("comp.evt.task.n1", b'{"ok": true}')
        await wait_for(lambda: audit.head.seq >= 4, "4 records")

        for bad, error in [
            (b"{not json", "bad audit query"),
            (b'{"limit": 0}', "limit"),
            (b'{"limit": 1000000}', "over the maximum"),
            (b'{"since": "yesterday"}', "since"),
            (b'{"colour": "red"}', "colour"),
        ]:
            answer = json.loads((await nc.request(subjects.AUDIT_QUERY, bad, timeout=10)).data)
            assert error in answer["error"], answer
        # Still serving, and still recording.
        await js.publish("comp.evt.task.n1", b'{"after": 1}')
        await wait_for(lambda: audit.head.seq >= 5, "the record after the garbage")
        answer = json.loads((await nc.request(subjects.AUDIT_QUERY, b'{"kind": "event"}', timeout=10)).data)
        assert [r["stream_seq"] for r in answer["records"]] == [1, 2, 3]

    found = records(data_dir)
    assert found[0]["raw"] and found[0]["encoding"] == "base64" and found[0]["malformed"].startswith("not JSON")
    assert found[1]["raw"] == "{half a json" and found[1]["malformed"].startswith("not JSON")
    assert found[2]["body"] == {"verb": "GET"} and "missing path, status" in found[2]["malformed"]
    assert found[3]["body"] == {"ok": True} and "malformed" not in found[3]
    assert store.verify_dir(data_dir).ok


async def test_queries_filter_by_actor_resource_namespace_and_since(nats_url, nc, tmp_path):
    js = nc.jetstream()
    clock = iter(range(1000, 2000))
    app, audit = build_app(settings(nats_url, tmp_path / "audit"))
    audit.clock = lambda: float(next(clock))
    async with TestApp(app):
        await publish_requests(js, 1, 3, actor="ann@a")
        await wait_for(lambda: audit.head.seq >= 3, "ann's requests")
        since = audit.clock() + 0.5  # later than every record so far
        await publish_requests(js, 4, 2, actor="bob@b", namespace="team-b", resource="services")
        await publish_events(js, 1, 2)
        await wait_for(lambda: audit.head.seq >= 7, "all records")

        async def ask(**query):
            answer = json.loads((await nc.request(subjects.AUDIT_QUERY, json.dumps(query).encode(), timeout=10)).data)
            return [(r["kind"], r["stream_seq"]) for r in answer["records"]]

        assert await ask(actor="ann@a") == [("request", 1), ("request", 2), ("request", 3)]
        assert await ask(actor="ann@a", limit=2) == [("request", 2), ("request", 3)]
        assert await ask(actor="bob@b") == [("request", 4), ("request", 5)]
        # Across the two streams the order of arrival is not fixed; within each it is.
        assert sorted(await ask(since=since)) == [("event", 1), ("event", 2), ("request", 4), ("request", 5)]
        assert await ask(namespace="team-b") == [("request", 4), ("request", 5)]
        assert sorted(await ask(resource="deployment")) == [("event", 1), ("event", 2), ("request", 1), ("request", 2), ("request", 3)]
        assert await ask(actor="nobody") == []


async def test_a_reset_stream_is_noted_and_read_again_from_its_start(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await publish_events(js, 1, 5)
        await wait_for(lambda: audit.head.seq >= 5, "5 records")
    # The event log deleted and made again (a purged cluster): its sequences start over.
    await js.delete_stream(subjects.EVENTS_STREAM)
    await streams_ready(nc)
    await publish_events(js, 1, 2)
    app, audit = build_app(settings(nats_url, data_dir))
    async with TestApp(app):
        await wait_for(lambda: audit.head.seq >= 8, "the reset and the new events")
    found = records(data_dir)
    assert found[5]["kind"] == "gap" and "stream reset" in found[5]["body"]["reason"]
    assert [(r["kind"], r["stream_seq"]) for r in found[6:]] == [("event", 1), ("event", 2)]
    assert store.verify_dir(data_dir).ok


# ---- through the api and the cli --------------------------------------------------------------
MANIFEST = "metadata: {name: web}\nspec: {image: x, replicas: 0}\n"


async def api_records(http, **params) -> list[dict]:
    response = await http.get("/v1/audit/log", params={"kind": "request", **params})
    assert response.status_code == 200, response.text
    # The listing's own requests are recorded too; they are not what these tests look for.
    return [r for r in response.json()["records"] if r["body"]["path"] != "/v1/audit/log"]


@pytest.mark.parametrize("level", ["None", "Metadata", "Request", "RequestResponse"])
async def test_api_requests_are_recorded_at_each_body_level(nats_url, nc, redis_url, tmp_path, monkeypatch, level):
    import httpx
    from served_api import serve_api

    monkeypatch.setenv("COMP_API__AUDIT_LEVEL", level)
    with serve_api(nats_url, redis_url) as api:
        app, audit = build_app(settings(nats_url, tmp_path / "audit"))
        async with TestApp(app), httpx.AsyncClient(base_url=api, timeout=30) as http:
            applied = await http.post("/v1/apply", content=MANIFEST, headers={"content-type": "application/yaml", "x-comp-actor": "ann@laptop"})
            assert applied.status_code == 200, applied.text
            missing = await http.get("/v1/deployments/default/nope")
            assert missing.status_code == 404
            if level == "None":
                # The apply's own event is recorded; no request is, then or later.
                await wait_for(lambda: any(r.startswith(b'{"seq"') and b'"kind":"event"' in r for r in store.read_records(audit.data_dir)), "the apply's event")
                assert await api_records(http) == []
                assert all(json.loads(r)["kind"] != "request" for r in store.read_records(audit.data_dir))
                return
            found = await wait_for(lambda: _two(api_records(http)), "both requests recorded")

    apply_record, missing_record = (r["body"] for r in found)
    assert apply_record["actor"] == "ann@laptop" and apply_record["client"] == "127.0.0.1"
    assert (apply_record["verb"], apply_record["path"], apply_record["resource"], apply_record["status"]) == ("POST", "/v1/apply", "apply", 200)
    assert apply_record["operation_id"] == applied.headers["x-comp-operation-id"]
    assert apply_record["level"] == level
    assert missing_record["actor"] == "anonymous"
    assert (missing_record["resource"], missing_record["namespace"], missing_record["name"], missing_record["status"]) == ("deployments", "default", "nope", 404)
    if level == "Metadata":
        assert "request_body" not in apply_record and "response_body" not in apply_record
    if level in ("Request", "RequestResponse"):
        assert apply_record["request_body"] == MANIFEST and "request_body_truncated_from" not in apply_record
    if level == "Request":
        assert "response_body" not in apply_record
    if level == "RequestResponse":
        assert json.loads(apply_record["response_body"]) == applied.json()
        assert json.loads(missing_record["response_body"]) == missing.json()


async def _two(pending):
    records = await pending
    return records if len(records) >= 2 else None


async def test_the_api_says_when_no_audit_service_answers_and_refuses_bad_parameters(nats_url, nc, redis_url):
    import httpx
    from served_api import serve_api

    with serve_api(nats_url, redis_url) as api:
        async with httpx.AsyncClient(base_url=api, timeout=30) as http:
            for path in ("/v1/audit/log", "/v1/audit/verify"):
                response = await http.get(path)
                assert response.status_code == 503 and "no audit service answers" in response.json()["detail"]
            for bad in ({"limit": 0}, {"limit": 10_001}, {"since": "yesterday"}, {"kind": "other"}):
                response = await http.get("/v1/audit/log", params=bad)
                assert response.status_code == 422, (bad, response.text)
            # Still answering.
            assert (await http.get("/healthz")).status_code == 200


async def test_comp_audit_log_filters_and_verify_names_a_tampered_record(nats_url, nc, redis_url, tmp_path):
    import asyncio

    from click.testing import CliRunner
    from comp_cli import main as cli_main
    from comp_cli.audit_cmd import actor
    from served_api import serve_api

    async def comp(api, *args):
        return await asyncio.to_thread(CliRunner().invoke, cli_main.cli, ["--api", api, *args])

    data_dir = tmp_path / "audit"
    with serve_api(nats_url, redis_url) as api:
        app, audit = build_app(settings(nats_url, data_dir))
        async with TestApp(app):
            assert (await comp(api, "get", "deployments")).exit_code == 0
            assert (await comp(api, "events", "--limit", "1")).exit_code == 0
            await publish_requests(nc.jetstream(), 1, 2, actor="someone-else@elsewhere")

            async def mine():
                result = await comp(api, "audit", "log", "--actor", actor(), "--kind", "request", "-o", "json")
                assert result.exit_code == 0, result.output
                # The log's own reads are recorded under this actor too.
                found = sorted((r["body"]["verb"], r["body"]["path"]) for r in map(json.loads, result.output.splitlines())
                               if r["body"]["path"] != "/v1/audit/log")
                return found if len(found) == 2 else None

            # Every command names its actor, the streamed `comp events` too.
            assert await wait_for(mine, "the cli's own requests recorded under its actor") == [("GET", "/v1/deployments"), ("GET", "/v1/events")]
            others = await comp(api, "audit", "log", "--actor", "someone-else@elsewhere")
            assert others.exit_code == 0 and len(others.output.splitlines()) == 2
            assert all("someone-else@elsewhere GET /v1/deployments/d" in line for line in others.output.splitlines())
            recent = await comp(api, "audit", "log", "--since", "1h", "--kind", "request", "-o", "json")
            assert len(recent.output.splitlines()) >= 4
            future = await comp(api, "audit", "log", "--since", "2099-01-01T00:00:00Z")
            assert future.exit_code == 0 and future.output == ""
            bad_since = await comp(api, "audit", "log", "--since", "last tuesday")
            assert bad_since.exit_code != 0 and "neither a time" in bad_since.output
            verified = await comp(api, "audit", "verify")
            assert verified.exit_code == 0 and verified.output.startswith("ok: "), verified.output

        (segment,) = store.segments(data_dir)
        lines = segment.read_bytes().splitlines()
        at = next(i for i, line in enumerate(lines) if b"someone-else" in line)
        lines[at] = lines[at].replace(b"someone-else", b"someone-nice")
        segment.write_bytes(b"".join(line + b"\n" for line in lines))
        app, audit = build_app(settings(nats_url, data_dir))
        async with TestApp(app):
            failed = await comp(api, "audit", "verify")
    assert failed.exit_code == 1
    assert f"FAILED verification: altered at record {at + 1}" in failed.output


def test_a_local_cluster_runs_the_audit_with_its_log_in_the_state_dir(tmp_path):
    from click.testing import CliRunner
    from comp_cli import main as cli_main
    from comp_cli.audit_cmd import actor
    from comp_cli.local import ClusterConfig, LocalCluster

    local = LocalCluster(ClusterConfig.private(tmp_path / "cluster", "audit", nodes=0))
    local.start()
    try:
        assert local.running().get("audit")
        api = local.config.api_url
        assert CliRunner().invoke(cli_main.cli, ["--api", api, "get", "deployments"]).exit_code == 0

        def recorded():
            result = CliRunner().invoke(cli_main.cli, ["--api", api, "audit", "log", "--actor", actor(), "--resource", "deployments"])
            return result.output if result.exit_code == 0 and "GET /v1/deployments" in result.output else None

        wait_until(recorded, timeout=30, what="the cli's request in the cluster's audit log")
        verified = CliRunner().invoke(cli_main.cli, ["--api", api, "audit", "verify"])
        assert verified.exit_code == 0 and verified.output.startswith("ok: "), verified.output
        assert (tmp_path / "cluster" / "audit" / "log").is_dir()
    finally:
        local.stop()


async def test_the_audit_counts_what_it_records_for_prometheus(nats_url, nc, tmp_path):
    from prometheus_client import generate_latest

    from comp_common.metrics import REGISTRY

    def sample(name: str, labels: str = "") -> float:
        for line in generate_latest(REGISTRY).decode().splitlines():
            if line.startswith(f"{name}{labels} "):
                return float(line.split()[-1])
        return 0.0

    events_before = sample("comp_audit_records_total", '{kind="event"}')
    app, audit = build_app(settings(nats_url, tmp_path / "audit"))
    async with TestApp(app):
        await publish_events(nc.jetstream(), 1, 6)
        await wait_for(lambda: audit.head.seq >= 6, "6 records")
        assert sample("comp_audit_head_seq") == 6
        assert sample("comp_audit_records_total", '{kind="event"}') == events_before + 6
        assert sample("comp_audit_batch_write_seconds_count") >= 1
        assert sample("comp_audit_not_recording") == 0


async def test_a_trickle_of_records_is_still_checkpointed_in_time(nats_url, nc, tmp_path):
    js = nc.jetstream()
    # Far more records per checkpoint than will come, and never a pause as long as the
    # checkpoint period: only the time rule can sign these.
    app, audit = build_app(settings(nats_url, tmp_path / "audit", checkpoint_every_records=1_000_000, checkpoint_every_seconds=0.3))
    async with TestApp(app):
        for n in range(1, 31):
            await publish_events(js, n, 1)
            await wait_for(lambda: audit.head.seq >= n, f"record {n}")
            if audit.checkpointed_seq > 0:
                break
        assert 0 < audit.checkpointed_seq <= audit.head.seq
        assert len(store.read_checkpoints(tmp_path / "audit")) >= 1


async def test_large_bodies_are_written_in_batches_bounded_by_bytes_and_nothing_is_lost(nats_url, nc, tmp_path):
    js = nc.jetstream()
    data_dir = tmp_path / "audit"
    # Room for about two bodies per batch and three waiting: the sources are held back,
    # never dropped.
    app, audit = build_app(settings(nats_url, data_dir, max_batch_bytes=250_000, max_pending_bytes=300_000))
    written: list[int] = []
    real_append = audit.segments.append
    audit.segments.append = lambda lines, first: (written.append(len(lines)), real_append(lines, first))[1]
    async with TestApp(app):
        body = json.dumps({"pad": "x" * 100_000}).encode()
        for _ in range(12):
            await js.publish("comp.evt.task.big", body)
        await wait_for(lambda: audit.head.seq >= 12, "12 large records")
    assert max(written) < 3 * 100_200
    assert [r["stream_seq"] for r in records(data_dir)] == list(range(1, 13))
    assert store.verify_dir(data_dir).ok
