"""The event history on real servers: events kept in COMP_EVENTS are read back (by time, by
sequence, by what they are about), followed, resumed, and still there after nats-server and
COMP's services restart; retention settings reach an existing stream; bad queries and odd
messages get clear answers.

A known sequence of events is published straight to JetStream, so each test knows exactly
which records a query must return, in which order."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import nats
import pytest
from click.testing import CliRunner
from processes import stop_process
from served_api import serve_api
from waiting import eventually, wait_until

from comp_cli import main as comp_main
from comp_cli.local import ClusterConfig, LocalCluster, SERVICES, NETWORKING_SERVICES, _bin, free_port, wait_for_port
from comp_common import subjects
from comp_common.broker import ensure_event_stream, make_broker
from comp_common.events import EventQuery, EventReader, Target, plan_filter
from comp_common.messages import (
    DeploymentEvent,
    HealthEvent,
    HealthState,
    PlacementEvent,
    ServiceEvent,
    TaskState,
    TaskStatus,
)
from comp_common.settings import CommonSettings, EventLogSettings, NatsSettings

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- the known sequence ---------------------------------------------------------------


def _task(node: str, deployment: str, task_id: str, state: TaskState) -> tuple[str, bytes]:
    status = TaskStatus(task_id=task_id, node_id=node, deployment=deployment, state=state)
    return subjects.task_event(node), status.model_dump_json().encode()


def _health(node: str, deployment: str, task_id: str) -> tuple[str, bytes]:
    event = HealthEvent(task_id=task_id, node_id=node, deployment=deployment, check="readiness",
                        state=HealthState.HEALTHY, previous=HealthState.STARTING, at=1.0)
    return subjects.health_event(node), event.model_dump_json().encode()


def _applied(namespace: str, name: str, revision: int) -> tuple[str, bytes]:
    event = DeploymentEvent(action="applied", namespace=namespace, name=name, revision=revision, generation=1)
    return subjects.deployment_event(namespace, name), event.model_dump_json().encode()


def _placed(namespace: str, name: str, task_id: str, node: str) -> tuple[str, bytes]:
    event = PlacementEvent(deployment=f"{namespace}.{name}", placed=[{"task_id": task_id, "node_id": node, "reason": "most free memory"}])
    return subjects.placement_event(namespace, name), event.model_dump_json().encode()


def _service(namespace: str, name: str) -> tuple[str, bytes]:
    return subjects.service_event(namespace, name), ServiceEvent(action="applied", namespace=namespace, name=name, revision=1).model_dump_json().encode()


# Published in this order: stream sequences 1..len(HISTORY).
HISTORY: list[tuple[str, bytes]] = [
    _applied("shop", "web", 1),                                   # 1
    _applied("default", "web", 2),                                # 2
    _placed("shop", "web", "web-aa", "n1"),                       # 3
    _task("n1", "shop.web", "web-aa", TaskState.STARTING),        # 4
    _task("n2", "default.web", "web-bb", TaskState.STARTING),     # 5
    _service("shop", "api"),                                      # 6
    _task("n1", "shop.web", "web-aa", TaskState.RUNNING),         # 7
    _health("n1", "shop.web", "web-aa"),                          # 8
    _task("n2", "shop.db", "db-cc", TaskState.RUNNING),           # 9
    (subjects.control_event("node", "n2"), b'{"kind": "node", "name": "n2", "action": "cordon"}'),  # 10
    _task("n2", "default.web", "web-bb", TaskState.RUNNING),      # 11
    (subjects.CAPACITY_EVENTS, b'{"fits": true, "pending": {}, "at": 1.0}'),  # 12
]


async def publish(js, events: list[tuple[str, bytes]], headers: dict[str, str] | None = None) -> list[int]:
    return [(await js.publish(subject, body, headers=headers)).seq for subject, body in events]


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[nats.NATS]:
    """A connection to a server whose COMP_EVENTS stream exists, made as the services make it."""
    broker = make_broker(NatsSettings(url=nats_url), "test")
    await broker.connect()
    await ensure_event_stream(broker, EventLogSettings())
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()
    await broker.stop()


@pytest.fixture
async def history(stream: nats.NATS) -> list[int]:
    return await publish(stream.jetstream(), HISTORY, headers={"traceparent": TRACEPARENT})


def seqs(records: list[dict]) -> list[int]:
    return [r["seq"] for r in records]


async def get_lines(client: httpx.AsyncClient, url: str, **params) -> list[dict]:
    response = await client.get(f"{url}/v1/events", params=params, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


# ---- reading a range ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, list(range(1, 13))),
        ({"after": "7"}, [8, 9, 10, 11, 12]),
        ({"after": "12"}, []),
        ({"since": "1h"}, list(range(1, 13))),
        ({"for": "deployment/web", "namespace": "shop"}, [1, 3, 4, 7, 8]),
        ({"for": "deployment/web"}, [2, 5, 11]),  # namespace default
        ({"for": "deployment/db", "namespace": "shop"}, [9]),
        ({"for": "service/api", "namespace": "shop"}, [6]),
        ({"for": "node/n2"}, [5, 9, 10, 11]),
        ({"for": "task/web-aa"}, [4, 7, 8]),
        ({"namespace": "shop"}, [1, 3, 4, 6, 7, 8, 9]),
        ({"for": "deployment/web", "namespace": "shop", "after": "4"}, [7, 8]),
        ({"for": "deployment/web", "namespace": "shop", "limit": "2"}, [1, 3]),
        ({"for": "deployment/nothing"}, []),
    ],
)
async def test_a_query_returns_exactly_its_events_in_order(nats_url, redis_url, history, params, expected):
    assert history == list(range(1, 13))
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient() as client:
            records = await get_lines(client, url, **params)
    assert seqs(records) == expected
    for record in records:
        subject, body = HISTORY[record["seq"] - 1]
        assert record["subject"] == subject
        assert record["data"] == json.loads(body)
        assert record["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_since_a_time_starts_at_the_first_event_kept_at_or_after_it(nats_url, redis_url, stream, history):
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient() as client:
            everything = await get_lines(client, url)
            # The stream's own times, as the records carry them: each one is a valid start.
            for index in (0, 5, 11):
                since = everything[index]["time"]
                records = await get_lines(client, url, since=since)
                starts_at = min(r["seq"] for r in everything if _at(r) >= _at(everything[index]))
                assert seqs(records) == list(range(starts_at, 13)), since
                assert starts_at <= index + 1
            later = await get_lines(client, url, since="2999-01-01T00:00:00Z")
    assert later == []


def _at(record: dict) -> datetime:
    return datetime.fromisoformat(record["time"])


async def test_a_range_ends_at_the_last_event_present_not_at_a_timeout(stream, history):
    # Poll and stall periods far longer than the test's timeout: a read that waited for
    # silence would never return.
    reader = EventReader(stream, poll_seconds=3600, stall_seconds=3600)
    query = EventQuery(plan_filter(Target("deployment", "web", "shop")))
    assert [r.seq for r in await reader.read(query)] == [1, 3, 4, 7, 8]
    assert [r.seq for r in await reader.read(EventQuery())] == list(range(1, 13))


async def test_events_published_during_a_range_read_end_it_after_the_present_ones(stream, history):
    js = stream.jetstream()
    reader = EventReader(stream)
    async with await reader.open(EventQuery()) as cursor:
        await publish(js, [_applied("shop", "late", 1)] * 5)
        seen = []
        while not cursor.done:
            record = await cursor.next()
            if record is not None:
                seen.append(record.seq)
    assert seen == list(range(1, 13))


async def test_a_message_that_is_not_json_is_listed_raw_and_the_listing_goes_on(nats_url, redis_url, stream, history):
    js = stream.jetstream()
    await publish(js, [(subjects.task_event("n1"), b"\x00garbage{"), (subjects.deployment_event("shop", "web"), b"not json"),
                       _task("n1", "shop.web", "web-aa", TaskState.EXITED)])
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient() as client:
            everything = await get_lines(client, url, after="12")
            about_web = await get_lines(client, url, **{"for": "deployment/web", "namespace": "shop", "after": "12"})
    assert seqs(everything) == [13, 14, 15]
    assert (everything[0]["data"], everything[0]["raw"], everything[0]["kind"]) == (None, "\x00garbage{", "task")
    assert (everything[1]["data"], everything[1]["raw"]) == (None, "not json")
    assert (everything[1]["kind"], everything[1]["namespace"], everything[1]["name"]) == ("deployment", "shop", "web")
    assert everything[2]["data"]["state"] == "exited"
    # A task event that cannot be read cannot be said to be web's; the deployment's own subject can.
    assert seqs(about_web) == [14, 15]


# ---- following and resuming -------------------------------------------------------------


async def consumer_count(nc: nats.NATS) -> int:
    return (await nc.jetstream().stream_info(subjects.EVENTS_STREAM)).state.consumer_count


async def test_follow_delivers_what_comes_after_it_started_in_order_none_twice(nats_url, redis_url, stream, history):
    js = stream.jetstream()
    later = [_task("n1", "shop.web", "web-aa", TaskState.EXITED), _applied("default", "web", 3),
             _task("n1", "shop.web", "web-aa", TaskState.RUNNING), _placed("shop", "web", "web-dd", "n2")]
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)) as client:
            params = {"follow": "true", "for": "deployment/web", "namespace": "shop"}
            async with client.stream("GET", f"{url}/v1/events", params=params) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                seen = [json.loads(await anext(lines))["seq"] for _ in range(5)]
                assert seen == [1, 3, 4, 7, 8]
                assert await consumer_count(stream) == 1
                published = await publish(js, later)
                # Only shop/web's three of the four new ones come, in order.
                for _ in range(3):
                    seen.append(json.loads(await anext(lines))["seq"])
            assert seen == [1, 3, 4, 7, 8, published[0], published[2], published[3]]
        # The client went away: the api deletes its consumer.
        await eventually(lambda: consumer_count_is(stream, 0), "the follow's consumer to be deleted", timeout=30)


async def consumer_count_is(nc: nats.NATS, n: int) -> bool:
    return await consumer_count(nc) == n


def sse_events(text: str) -> list[tuple[int, dict]]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "id" in fields:
            out.append((int(fields["id"]), json.loads(fields["data"])))
    return out


async def follow_sse(client: httpx.AsyncClient, url: str, headers: dict[str, str], count: int) -> list[tuple[int, dict]]:
    """The events of a followed server-sent event stream once at least ``count`` have come."""
    async with client.stream("GET", f"{url}/v1/events", params={"follow": "true"}, headers=headers) as response:
        buffer = ""
        async for chunk in response.aiter_text():
            buffer += chunk
            if len(sse_events(buffer)) >= count:
                break
    return sse_events(buffer)


async def test_sse_ids_are_sequences_and_last_event_id_resumes_right_after(nats_url, redis_url, history):
    sse = {"Accept": "text/event-stream"}
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            first = await client.get(f"{url}/v1/events", headers=sse)
            assert first.headers["content-type"].startswith("text/event-stream")
            events = sse_events(first.text)
            assert [i for i, _ in events] == list(range(1, 13))
            assert all(i == record["seq"] for i, record in events)
            # A reconnect carries the same URL (here since=1h, which alone would return all).
            resumed = await client.get(f"{url}/v1/events", params={"since": "1h"}, headers={**sse, "Last-Event-ID": "8"})
            assert [i for i, _ in sse_events(resumed.text)] == [9, 10, 11, 12]
            filtered = await client.get(f"{url}/v1/events", params={"for": "node/n2"}, headers={**sse, "Last-Event-ID": "5"})
            assert [i for i, _ in sse_events(filtered.text)] == [9, 10, 11]


async def test_a_followed_sse_stream_resumes_with_the_rest_after_a_reconnect(nats_url, redis_url, stream, history):
    js = stream.jetstream()
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)) as client:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": "10"}
            assert [i for i, _ in await follow_sse(client, url, headers, 2)] == [11, 12]
            # Gone: events kept meanwhile are what the resumed stream starts with.
            published = await publish(js, [_applied("shop", "web", 4), _applied("shop", "web", 5)])
            headers["Last-Event-ID"] = "12"
            assert [i for i, _ in await follow_sse(client, url, headers, 2)] == published
    await eventually(lambda: consumer_count_is(stream, 0), "the follows' consumers to be deleted", timeout=30)


# ---- bad input and an unreachable NATS ------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "headers", "where"),
    [
        ({"since": "yesterday"}, {}, ["query", "since"]),
        ({"since": "2026-12-01T10:00:00"}, {}, ["query", "since"]),
        ({"since": ""}, {}, ["query", "since"]),
        ({"after": "-1"}, {}, ["query", "after"]),
        ({"after": "ten"}, {}, ["query", "after"]),
        ({"for": "web"}, {}, ["query", "for"]),
        ({"for": "pod/web"}, {}, ["query", "for"]),
        ({"for": "deployment/a.>"}, {}, ["query", "for"]),
        ({"for": "deployment/web", "namespace": "A*"}, {}, ["query", "namespace"]),
        ({"namespace": "x" * 64}, {}, ["query", "namespace"]),
        ({"follow": "perhaps"}, {}, ["query", "follow"]),
        ({"limit": "0"}, {}, ["query", "limit"]),
        ({"limit": "many"}, {}, ["query", "limit"]),
        ({}, {"Last-Event-ID": "abc"}, ["header", "Last-Event-ID"]),
        ({}, {"Last-Event-ID": "-3"}, ["header", "Last-Event-ID"]),
        ({}, {"Last-Event-ID": str(2**64)}, ["header", "Last-Event-ID"]),
        ({"after": str(2**64), "follow": "true"}, {}, ["query", "after"]),
    ],
)
async def test_garbage_parameters_are_refused_naming_the_parameter(nats_url, redis_url, stream, params, headers, where):
    with serve_api(nats_url, redis_url) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{url}/v1/events", params=params, headers=headers)
            assert response.status_code == 422, response.text
            (problem,) = response.json()["detail"]
            assert problem["loc"][-2:] == where
            # The api goes on serving.
            assert (await client.get(f"{url}/v1/events")).status_code == 200
    assert await consumer_count(stream) == 0


def _start_nats(port: int, data: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for_port(port, 15, "nats-server", proc, log)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    stop_process(proc, grace=10)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[dict]:
    """A nats-server this test may stop and start again on the same port and data dir."""
    state = {"port": free_port(), "data": tmp_path / "own-nats", "log": tmp_path / "own-nats.log"}
    state["data"].mkdir()
    state["proc"] = _start_nats(state["port"], state["data"], state["log"])
    state["url"] = f"nats://127.0.0.1:{state['port']}"
    yield state
    _stop(state["proc"])


def test_nats_away_is_503_and_the_api_recovers(own_nats, redis_url):
    with serve_api(own_nats["url"], redis_url) as url:
        assert httpx.get(f"{url}/v1/events", timeout=30).status_code == 200
        _stop(own_nats["proc"])
        response = wait_until(lambda: _not_200(httpx.get(f"{url}/v1/events", timeout=30)), timeout=30, what="a 503")
        assert response.status_code == 503
        assert response.json()["detail"].startswith("NATS is unavailable")
        own_nats["proc"] = _start_nats(own_nats["port"], own_nats["data"], own_nats["log"])
        wait_until(lambda: httpx.get(f"{url}/v1/events", timeout=30).status_code == 200, timeout=60, what="the api back on NATS")


def _not_200(response: httpx.Response) -> httpx.Response | None:
    return response if response.status_code != 200 else None


# ---- durability -------------------------------------------------------------------------


async def test_events_survive_a_restart_of_nats_server(own_nats, redis_url):
    broker = make_broker(NatsSettings(url=own_nats["url"]), "test")
    await broker.connect()
    await ensure_event_stream(broker, EventLogSettings())
    await broker.stop()
    nc = await nats.connect(own_nats["url"])
    await publish(nc.jetstream(), HISTORY, headers={"traceparent": TRACEPARENT})
    before = [r.model_dump() for r in await EventReader(nc).read(EventQuery())]
    await nc.close()
    assert [r["seq"] for r in before] == list(range(1, 13))

    _stop(own_nats["proc"])
    own_nats["proc"] = _start_nats(own_nats["port"], own_nats["data"], own_nats["log"])

    nc = await nats.connect(own_nats["url"])
    try:
        after = [r.model_dump() for r in await EventReader(nc).read(EventQuery())]
    finally:
        await nc.close()
    assert after == before
    with serve_api(own_nats["url"], redis_url) as url:
        async with httpx.AsyncClient() as client:
            assert seqs(await get_lines(client, url)) == list(range(1, 13))


def _manifest(name: str, image: str) -> str:
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  image: {image}
  command: [sleep, "3600"]
  resources: {{cpu: 0.05, memory: 16Mi}}
"""


def _comp_events(api_url: str, *args: str) -> list[str]:
    result = CliRunner().invoke(comp_main.cli, ["--api", api_url, "events", *args])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


@pytest.mark.docker
def test_events_survive_a_restart_of_every_comp_service(tmp_path, docker_client, busybox_image):
    local = LocalCluster(ClusterConfig.private(tmp_path / "cluster", "evh", nodes=1))
    local.start()
    try:
        api = local.config.api_url
        response = httpx.post(f"{api}/v1/apply", content=_manifest("keep", busybox_image), timeout=30)
        assert response.status_code == 200, response.text

        def running_seen() -> list[dict] | None:
            records = [json.loads(line) for line in _comp_events(api, "--for", "deployment/keep", "-o", "json")]
            return records if any(r["kind"] == "task" and r["data"]["state"] == "running" for r in records) else None

        before = wait_until(running_seen, timeout=120, what="keep's task running in the event history")
        assert [r["kind"] for r in before][:1] == ["deployment"]
        assert "placement" in {r["kind"] for r in before}
        everything_before = httpx.get(f"{api}/v1/events", timeout=30).text.splitlines()

        services = [name for name in local.running() if name not in ("nats", "redis")]
        assert "api" in services and "scheduler" in services and any(n.startswith("nodeagent-") for n in services)
        for name in services:
            local.kill(name)
        for service in SERVICES:
            if service in NETWORKING_SERVICES and not local.config.networking:
                continue
            local.start_service(service)
        for node_id in local.config.node_ids():
            local.start_agent(node_id)
        local.wait_nodes()

        everything_after = httpx.get(f"{api}/v1/events", timeout=30).text.splitlines()
        assert everything_after[: len(everything_before)] == everything_before
        after = [json.loads(line) for line in _comp_events(api, "--for", "deployment/keep", "-o", "json")]
        assert after[: len(before)] == before
        text = _comp_events(api, "--for", "deployment/keep")
        assert any(" task " in line and "default/keep" in line and " running on " in line for line in text), text
    finally:
        local.stop(purge_workloads=True)


# ---- retention ----------------------------------------------------------------------------


async def test_retention_settings_are_applied_to_an_existing_stream(nats_url, caplog):
    broker = make_broker(NatsSettings(url=nats_url), "test")
    await broker.connect()
    js = broker.connection.jetstream()
    try:
        await ensure_event_stream(broker, EventLogSettings())
        await js.publish(subjects.deployment_event("shop", "web"), b"{}")
        config = (await js.stream_info(subjects.EVENTS_STREAM)).config
        assert (config.max_age, config.max_bytes) == (7 * 24 * 3600, 1024**3)

        with caplog.at_level(logging.INFO, logger="comp.broker"):
            await ensure_event_stream(broker, EventLogSettings(max_age_seconds=3600, max_bytes=10 * 1024**2))
        info = await js.stream_info(subjects.EVENTS_STREAM)
        assert (info.config.max_age, info.config.max_bytes) == (3600, 10 * 1024**2)
        assert info.config.subjects == [subjects.EVENT_SUBJECTS] and info.state.messages == 1  # the rest kept
        assert any("changed the retention" in r.getMessage() for r in caplog.records)

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="comp.broker"):
            # The same again changes nothing and says nothing; no settings leaves it as it is.
            await ensure_event_stream(broker, EventLogSettings(max_age_seconds=3600, max_bytes=10 * 1024**2))
            await ensure_event_stream(broker)
        info = await js.stream_info(subjects.EVENTS_STREAM)
        assert (info.config.max_age, info.config.max_bytes) == (3600, 10 * 1024**2)
        assert not any("changed the retention" in r.getMessage() for r in caplog.records)
    finally:
        await broker.stop()


def test_retention_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("COMP_EVENTS__MAX_AGE_SECONDS", "86400")
    monkeypatch.setenv("COMP_EVENTS__MAX_BYTES", "5000000")
    assert CommonSettings().events == EventLogSettings(max_age_seconds=86400, max_bytes=5_000_000)
    monkeypatch.setenv("COMP_EVENTS__MAX_BYTES", "0")
    with pytest.raises(ValueError, match="max_bytes"):
        CommonSettings()


async def test_a_service_started_with_other_retention_brings_the_stream_to_it(tmp_path, nats_url, redis_url, stream):
    """The api process, as `comp up` runs it, reads COMP_EVENTS__* and changes the stream."""
    port = free_port()
    config = ClusterConfig(tmp_path, "ret", nats_port=int(nats_url.rsplit(":", 1)[1]), redis_port=int(redis_url.rsplit(":", 1)[1].split("/")[0]),
                           api_port=port, extra_env={"COMP_EVENTS__MAX_AGE_SECONDS": "7200", "COMP_EVENTS__MAX_BYTES": "2000000"})
    local = LocalCluster(config)
    proc = await asyncio.to_thread(local.start_service, "api")
    try:
        async def retention() -> tuple | None:
            info = (await stream.jetstream().stream_info(subjects.EVENTS_STREAM)).config
            return (info.max_age, info.max_bytes) if info.max_bytes == 2_000_000 else None

        assert await eventually(retention, "the api to change the stream's retention", timeout=30) == (7200, 2_000_000)
        assert "changed the retention" in (tmp_path / "logs" / "api.log").read_text()
    finally:
        await asyncio.to_thread(local.kill, "api")
        assert proc.poll() is not None


def test_comp_events_follow_streams_until_ctrl_c(nats_url, redis_url):
    async def setup() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        broker = make_broker(NatsSettings(url=nats_url), "test")
        await broker.connect()
        await ensure_event_stream(broker, EventLogSettings())
        await broker.stop()
        await publish(js, HISTORY[:3])
        await nc.close()

    async def publish_late() -> list[int]:
        nc = await nats.connect(nats_url)
        try:
            return await publish(nc.jetstream(), [_task("n1", "shop.web", "web-aa", TaskState.FAILED)])
        finally:
            await nc.close()

    asyncio.run(setup())
    with serve_api(nats_url, redis_url) as url:
        proc = subprocess.Popen([_bin("comp"), "--api", url, "events", "--follow", "-o", "json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = [json.loads(proc.stdout.readline())["seq"] for _ in range(3)]
            late = asyncio.run(publish_late())
            seen.append(json.loads(proc.stdout.readline())["seq"])
            assert seen == [1, 2, 3, *late]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, proc.stderr.read()
            assert "Traceback" not in proc.stderr.read()
        finally:
            stop_process(proc)

        async def consumers() -> int:
            nc = await nats.connect(nats_url)
            try:
                return await consumer_count(nc)
            finally:
                await nc.close()

        wait_until(lambda: asyncio.run(consumers()) == 0, timeout=30, what="the follow's consumer to be deleted")
