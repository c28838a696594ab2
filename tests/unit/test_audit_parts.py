"""The audit's parts outside the chain: how a request is described (resource, namespace,
name), how `comp audit log --since` reads a time, how an answer is cut to fit one NATS
message, where a delivery's stream sequence is read from; the api's middleware never
failing nor delaying a request (a fake JetStream); and the files (segments rotating, the
tail read back, a torn line cut, the key made once and private)."""

from __future__ import annotations

import json

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from comp_api.audit_middleware import describe_route
from comp_audit.handlers import fit
from comp_audit.service import stream_sequence
from comp_cli.audit_cmd import parse_since, record_line


@pytest.mark.parametrize(
    "template, path, params, query_namespace, expected",
    [
        ("/v1/deployments", "/v1/deployments", {}, None, ("deployments", None, None)),
        ("/v1/deployments", "/v1/deployments", {}, "team-a", ("deployments", "team-a", None)),
        ("/v1/deployments/{namespace}/{name}", "/v1/deployments/default/web", {"namespace": "default", "name": "web"}, None,
         ("deployments", "default", "web")),
        ("/v1/deployments/{namespace}/{name}/rollout/abort", "/v1/deployments/a/b/rollout/abort", {"namespace": "a", "name": "b"}, None,
         ("deployments", "a", "b")),
        ("/v1/namespaces/{namespace}/services/{name}", "/v1/namespaces/a/services/s", {"namespace": "a", "name": "s"}, None,
         ("services", "a", "s")),
        ("/v1/namespaces/{name}", "/v1/namespaces/team-a", {"name": "team-a"}, None, ("namespaces", None, "team-a")),
        ("/v1/nodes/{node_id}/{action}", "/v1/nodes/n1/drain", {"node_id": "n1", "action": "drain"}, None, ("nodes", None, "n1")),
        ("/v1/apply", "/v1/apply", {}, None, ("apply", None, None)),
        (None, "/v1/nothing/here", {}, None, ("nothing", None, None)),
        (None, "/", {}, None, ("", None, None)),
    ],
)
def test_a_request_is_described_by_the_route_it_matched(template, path, params, query_namespace, expected):
    described = describe_route(template, path, params, query_namespace)
    assert (described["resource"], described["namespace"], described["name"]) == expected


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("1h30m", NOW - 5400),
        ("45s", NOW - 45),
        ("2026-12-01T10:00:00Z", 1796119200.0),
        ("2026-12-01T11:00:00+01:00", 1796119200.0),
        ("2026-12-01T10:00:00", 1796119200.0),  # no zone: UTC
    ],
)
def test_since_is_a_time_or_a_duration_ago(text, expected):
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "10x", "m", "2026-13-01"])
def test_a_since_that_is_neither_is_refused(text):
    with pytest.raises(click.BadParameter):
        parse_since(text, NOW)


@given(st.lists(st.text(max_size=300), max_size=60), st.integers(min_value=600, max_value=20_000))
def test_an_answer_always_fits_and_keeps_the_newest_records(texts, max_bytes):
    records = [{"seq": i, "body": t} for i, t in enumerate(texts)]
    answer = json.loads(fit({"records": records, "head_seq": len(records)}, max_bytes))
    assert len(fit({"records": records, "head_seq": len(records)}, max_bytes)) <= max_bytes
    kept = answer["records"]
    assert kept == records[len(records) - len(kept):]
    assert answer.get("truncated", 0) == len(records) - len(kept)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("$JS.ACK.COMP_EVENTS.abc.1.42.7.1764590000000000000.0", 42),
        ("$JS.ACK.hub.ACCHASH.COMP_EVENTS.abc.1.43.7.1764590000000000000.0.xyz", 43),
        ("_INBOX.abc", None),
        ("", None),
        ("$JS.ACK.COMP_EVENTS.abc.1.notanumber.7.1.0", None),
    ],
)
def test_the_stream_sequence_is_read_from_the_reply_subject(reply, expected):
    assert stream_sequence(reply) == expected


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"seq": 3, "time": 0, "kind": "request", "body": {"actor": "ann@h", "verb": "POST", "path": "/v1/apply", "status": 200,
                                                           "resource": "apply", "operation_id": "ab"}},
         "     3 1970-01-01T00:00:00.000Z request ann@h POST /v1/apply -> 200  apply  op ab"),
        ({"seq": 4, "time": 0, "kind": "event", "subject": "comp.evt.task.n1", "stream_seq": 9, "raw": "x", "malformed": "not JSON"},
         "     4 1970-01-01T00:00:00.000Z event   comp.evt.task.n1 #9  [malformed: not JSON]"),
    ],
)
def test_a_record_reads_as_one_line(record, expected):
    assert record_line(record) == expected


# ---- the api's audit middleware never fails nor delays a request ------------------------------
import asyncio  # noqa: E402
import logging  # noqa: E402

import httpx  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from comp_api.audit_middleware import AuditMiddleware  # noqa: E402
from comp_api.settings import ApiGroup, ApiSettings  # noqa: E402


class FakeJetStream:
    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.published: list[tuple[str, dict]] = []
        self.release = asyncio.Event()

    async def publish(self, subject: str, data: bytes, timeout: float) -> None:
        if self.behaviour == "hang":
            await self.release.wait()
        if self.behaviour == "fail":
            raise OSError("connection reset")
        self.published.append((subject, json.loads(data)))


class FakeBackends:
    """What the middleware uses of the api's Backends: the connection check and JetStream."""

    def __init__(self, connected: bool, js: FakeJetStream):
        self.settings = ApiSettings()
        self._connected = connected
        self.broker = type("Broker", (), {"connection": type("Connection", (), {"jetstream": lambda _self: js})()})()

    def nats_connected(self) -> bool:
        return self._connected


def served(backends: FakeBackends, level: str = "Metadata") -> tuple[httpx.AsyncClient, AuditMiddleware]:
    async def thing(request):
        await request.body()  # the record holds the body as the api read it
        return JSONResponse({"name": request.path_params["name"]}, status_code=201)

    app = Starlette(routes=[Route("/v1/things/{name}", thing, methods=["POST"])])
    middleware = AuditMiddleware(app, backends=backends, settings=ApiGroup(audit_level=level))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://api"), middleware


async def test_a_request_is_answered_while_its_record_cannot_be_published(caplog):
    js = FakeJetStream("fail")
    http, middleware = served(FakeBackends(True, js))
    with caplog.at_level(logging.WARNING, logger="api.audit"):
        response = await http.post("/v1/things/a", headers={"x-comp-actor": "ann@h"})
        await middleware.drain()
    assert response.status_code == 201 and response.json() == {"name": "a"}
    (warning,) = [r for r in caplog.records if r.name == "api.audit"]
    assert warning.getMessage() == "the audit record of a request was not published"
    assert "connection reset" in warning.error and warning.path == "/v1/things/a" and warning.status == 201


async def test_without_nats_the_request_is_answered_and_the_lost_record_logged(caplog):
    http, middleware = served(FakeBackends(False, FakeJetStream("ok")))
    with caplog.at_level(logging.WARNING, logger="api.audit"):
        response = await http.post("/v1/things/a")
        await middleware.drain()
    assert response.status_code == 201
    assert "not connected to NATS" in caplog.text


async def test_a_hanging_publish_does_not_hold_the_response():
    js = FakeJetStream("hang")
    http, middleware = served(FakeBackends(True, js))
    response = await http.post("/v1/things/a")
    assert response.status_code == 201 and js.published == []  # answered, the record still on its way
    js.release.set()
    await middleware.drain()
    ((subject, record),) = js.published
    assert subject == "comp.audit.request"
    assert (record["actor"], record["verb"], record["resource"], record["name"], record["status"]) == ("anonymous", "POST", "things", "a", 201)


@pytest.mark.parametrize(
    "level, has_request, has_response",
    [("Metadata", False, False), ("Request", True, False), ("RequestResponse", True, True)],
)
async def test_bodies_are_kept_by_level_and_cut_at_the_limit(level, has_request, has_response):
    js = FakeJetStream("ok")
    backends = FakeBackends(True, js)
    http, middleware = served(backends, level)
    middleware.max_body = 4
    await http.post("/v1/things/a", content=b"0123456789")
    await middleware.drain()
    ((_, record),) = js.published
    assert ("request_body" in record, "response_body" in record) == (has_request, has_response)
    if has_request:
        assert (record["request_body"], record["request_body_truncated_from"]) == ("0123", 10)
    if has_response:
        assert (record["response_body"], record["response_body_truncated_from"]) == ('{"na', 12)


async def test_level_none_records_nothing():
    js = FakeJetStream("ok")
    http, middleware = served(FakeBackends(True, js), "None")
    assert (await http.post("/v1/things/a")).status_code == 201
    await middleware.drain()
    assert js.published == [] and not middleware._publishing


# ---- the files: segments, the tail, the key ---------------------------------------------------
import os  # noqa: E402

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from comp_audit import store  # noqa: E402
from comp_audit.chain import Entry, Head, extend, sign_checkpoint, verify  # noqa: E402


def write_log(data_dir, batches, segment_bytes=4096):
    writer = store.SegmentWriter(data_dir, segment_bytes)
    writer.open()
    head = Head()
    for entries in batches:
        first = head.seq + 1
        head, lines, _ = extend(head, 1.0, entries)
        writer.append(lines, first)
    writer.close()
    return head


def test_segments_rotate_and_the_tail_gives_the_head_and_each_streams_position(tmp_path):
    # A request body with a nested "stream" key naming the other stream must not be taken
    # for a record of that stream.
    decoy = json.dumps({"verb": "GET", "path": "/", "status": 200, "x": {"stream": "EVENTS"}}).encode()
    batches = [[Entry("event", "EVENTS", n, "comp.evt.a", b'{"pad": "' + b"x" * 300 + b'"}') for n in range(b * 5 + 1, b * 5 + 6)]
               for b in range(6)]
    batches.insert(1, [Entry("request", "REQUESTS", 1, "comp.audit.request", decoy)])
    batches.append([Entry("request", "REQUESTS", 2, "comp.audit.request", decoy)])
    head = write_log(tmp_path, batches)
    assert len(store.segments(tmp_path)) > 1  # rotated at 4 KiB
    assert [p.name for p in store.segments(tmp_path)][0] == "000000000001.jsonl"
    tail = store.read_tail(tmp_path, ("EVENTS", "REQUESTS", "NEVER"))
    assert tail.head == head and head.seq == 32
    assert tail.positions == {"EVENTS": 30, "REQUESTS": 2}
    lines = store.read_records(tmp_path)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 33))
    assert verify(lines, [], None).ok


def test_a_reopened_writer_cuts_a_torn_line_and_appends_after_it(tmp_path):
    head = write_log(tmp_path, [[Entry("event", "EVENTS", 1, "comp.evt.a", b"{}")]])
    (segment,) = store.segments(tmp_path)
    with open(segment, "ab") as out:
        out.write(b'{"seq":2,"ti')
    writer = store.SegmentWriter(tmp_path, 1 << 20)
    writer.open()
    head2, lines, _ = extend(head, 2.0, [Entry("event", "EVENTS", 2, "comp.evt.a", b"{}")])
    writer.append(lines, 2)
    writer.close()
    assert verify(store.read_records(tmp_path), [], None).ok
    assert store.read_tail(tmp_path, ("EVENTS",)).head == head2


def test_the_key_is_made_once_private_and_its_public_half_verifies_checkpoints(tmp_path):
    key_path, public_path = tmp_path / "audit.key", tmp_path / "checkpoints" / "audit.pub"
    key = store.load_or_create_key(key_path, public_path)
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    again = store.load_or_create_key(key_path, public_path)
    assert again.private_bytes_raw() == key.private_bytes_raw()
    checkpoint = sign_checkpoint(key, Head(1, "ab" * 32), 5.0)
    (tmp_path / "checkpoints" / "checkpoints.jsonl").write_bytes(checkpoint.to_line())
    assert store.read_public_key(tmp_path).public_bytes_raw() == key.public_key().public_bytes_raw()


def test_a_key_file_that_is_not_a_key_is_refused(tmp_path):
    (tmp_path / "audit.key").write_bytes(b"not a key")
    with pytest.raises(store.StoreError, match="not a usable signing key"):
        store.load_or_create_key(tmp_path / "audit.key", tmp_path / "audit.pub")


@given(st.data())
def test_any_flipped_byte_of_a_checkpoint_signature_is_reported(data):
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    head, text, _ = extend(Head(), 1.0, [Entry("event", "S", 1, "comp.evt.a", b"{}")])
    checkpoint = sign_checkpoint(key, head, 2.0)
    signature = bytearray(bytes.fromhex(checkpoint.signature))
    i = data.draw(st.integers(0, len(signature) - 1))
    signature[i] ^= data.draw(st.integers(1, 255))
    forged = type(checkpoint)(checkpoint.seq, checkpoint.head, checkpoint.time, signature.hex())
    verdict = verify(text.splitlines(), [forged.to_line()], key.public_key())
    assert verdict.problem is not None and verdict.problem.kind == "bad-checkpoint" and verdict.problem.seq == 1
