"""Span collection on a real nats-server: spans of two services in one trace read back whole
through the api and `comp trace`; NATS away: spans wait in a bounded queue, the rest are
dropped and counted, the tracer goes on, and the api's read answers 503; garbage and
oversized spans under comp.spans.* skipped; discovery's endpoint write and the lb's sync
continue the trace of the task event that caused them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from functools import partial

import httpx
import nats
import pytest
from faststream import TestApp
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from served_api import serve_api
from waiting import eventually, wait_until

from comp_api.main import create_app
from comp_api.settings import ApiSettings
from comp_cli.local import _bin, free_port, wait_for_port
from comp_common import subjects
from comp_common.broker import make_broker, trace_headers
from comp_common.kv import read_model
from comp_common.manifest import parse_objects
from comp_common.messages import DeploymentRecord, ServiceEndpoints, ServiceRecord, TaskState, TaskStatus
from comp_common.observed import ObservedStore, connect
from comp_common.settings import NatsSettings, RedisSettings, TelemetrySettings
from comp_common.telemetry import SPANS_DROPPED, NatsSpanProcessor, add_nats_export, span_context_of_traceparent
from comp_lb import dataplane as dataplanes
from comp_lb.dataplane import SyncReport

wait_for = partial(eventually, timeout=15.0)
FAST = TelemetrySettings(span_batch_seconds=0.05)


def service_provider(name: str, nats_url: str, settings: TelemetrySettings = FAST) -> tuple[TracerProvider, NatsSpanProcessor]:
    """What setup_tracing gives a service, without making it the process's global provider."""
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    processor = add_nats_export(provider, name, nats_url, settings)
    return provider, processor


def trace_id_of(span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def get_trace(url: str, trace_id: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/traces/{trace_id}", timeout=10)


def comp(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comp_cli.main", "--api", url, *args], capture_output=True, text=True, timeout=60)


def test_two_services_spans_in_one_trace_are_read_back_whole(nats_url, redis_url):
    alpha, alpha_out = service_provider("alpha", nats_url)
    beta, beta_out = service_provider("beta", nats_url)
    try:
        wait_until(lambda: alpha_out.connected and beta_out.connected, what="both span processors connected")
        with alpha.get_tracer("t").start_as_current_span("alpha.request") as root:
            carrier = trace_headers()  # what crosses NATS to the next service
            with alpha.get_tracer("t").start_as_current_span("alpha.publish"):
                pass
        with beta.get_tracer("t").start_as_current_span("beta.handle", context=extract(carrier)):
            with beta.get_tracer("t").start_as_current_span("beta.inner"):
                pass
        with alpha.get_tracer("t").start_as_current_span("another.operation") as other:
            pass
        assert alpha.force_flush() and beta.force_flush()
        trace_id = trace_id_of(root)

        with serve_api(nats_url, redis_url) as url:
            view = wait_until(
                lambda: (r := get_trace(url, trace_id)).status_code == 200 and len(r.json()["spans"]) == 4 and r.json(),
                what="the trace's 4 spans through the api",
            )
            assert view["services"] == ["alpha", "beta"] and view["skipped"] == 0 and not view["truncated"]
            assert {s["trace_id"] for s in view["spans"]} == {trace_id}
            [tree_root] = view["tree"]
            assert (tree_root["service"], tree_root["name"], tree_root["offset_ms"], tree_root["detached"]) == ("alpha", "alpha.request", 0.0, None)
            assert [c["name"] for c in tree_root["children"]] == ["alpha.publish", "beta.handle"]
            assert [c["name"] for c in tree_root["children"][1]["children"]] == ["beta.inner"]

            # Publishing spans makes no spans: the stream holds exactly the five made here.
            other_view = get_trace(url, trace_id_of(other)).json()
            assert [s["name"] for s in other_view["spans"]] == ["another.operation"]
            assert wait_until(lambda: _stream_messages(nats_url) == 5, what="5 spans kept")
            assert alpha_out.dropped == beta_out.dropped == 0 and alpha_out.sent + beta_out.sent == 5

            unknown = get_trace(url, "0" * 31 + "1")
            assert unknown.status_code == 404 and "no span of it is kept" in unknown.json()["detail"]
            for bad in ("xyz", "0" * 31, "g" * 32, "0" * 33):
                assert get_trace(url, bad).status_code == 422, bad

            shown = comp(url, "trace", trace_id.upper())
            assert shown.returncode == 0, shown.stderr
            lines = shown.stdout.splitlines()
            assert lines[0] == f"trace {trace_id}: 4 spans from 2 services"
            assert [line.split()[:2] for line in lines[1:]] == [
                ["alpha", "alpha.request"], ["alpha", "alpha.publish"], ["beta", "beta.handle"], ["beta", "beta.inner"],
            ]
            assert [len(line) - len(line.lstrip()) for line in lines[1:]] == [0, 2, 2, 4], "indented by depth"
            as_json = comp(url, "trace", trace_id, "-o", "json")
            assert as_json.returncode == 0 and json.loads(as_json.stdout)["trace_id"] == trace_id

            refused = comp(url, "trace", "not-a-trace")
            assert refused.returncode == 2 and "is not a trace id" in refused.stderr
            missing = comp(url, "trace", "0" * 31 + "1", "--wait", "0.5")
            assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        alpha.shutdown()
        beta.shutdown()


def _stream_messages(nats_url: str) -> int:
    async def count() -> int:
        nc = await nats.connect(nats_url)
        try:
            return (await nc.jetstream().stream_info(subjects.SPANS_STREAM)).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def test_nats_away_spans_wait_then_are_dropped_and_counted_and_the_tracer_goes_on(tmp_path, caplog):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    provider, processor = service_provider("lonely", url, TelemetrySettings(span_batch_seconds=0.05, span_queue_size=10))
    tracer = provider.get_tracer("t")
    dropped_before = SPANS_DROPPED.labels("nats_away")._value.get()
    try:
        with caplog.at_level("INFO", logger="comp.telemetry"):
            for i in range(30):
                with tracer.start_as_current_span(f"work-{i}") as span:
                    pass
                if i == 0:
                    first = span
            assert not provider.force_flush(), "nothing can be sent with NATS away"
            assert (processor.sent, processor.queued, processor.dropped) == (0, 10, 20), "the first 10 wait, the rest are dropped"
            assert SPANS_DROPPED.labels("nats_away")._value.get() - dropped_before == 20
            away = [r.getMessage() for r in caplog.records if r.name == "comp.telemetry"]
            assert away == [f"dropping finished spans: not connected to NATS at {url} and 10 spans waiting"], "one line an outage"

            # NATS comes: the processor connects by itself and sends what waited, then the rest.
            data = tmp_path / "nats"
            data.mkdir()
            with open(tmp_path / "nats.log", "wb") as log:
                server = subprocess.Popen([_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)],
                                          stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for_port(port, 15, "nats-server", server, tmp_path / "nats.log")
                wait_until(lambda: processor.connected, what="the processor connected")
                with tracer.start_as_current_span("after") as after:
                    pass
                assert provider.force_flush()
                assert (processor.sent, processor.queued, processor.dropped) == (11, 0, 20)
                back = [r.getMessage() for r in caplog.records if r.name == "comp.telemetry"][len(away):]
                assert "sending spans to NATS again; 20 were dropped meanwhile" in back
                with serve_api(url, "redis://127.0.0.1:1/0") as api:
                    for sent in (first, after):
                        view = wait_until(lambda: (r := get_trace(api, trace_id_of(sent))).status_code == 200 and r.json(), what="a span")
                        assert [s["name"] for s in view["spans"]] == [sent.name]
            finally:
                server.terminate()
                server.wait(10)
    finally:
        provider.shutdown()


def test_garbage_under_the_span_subjects_does_not_break_reading(nats_url, redis_url):
    provider, processor = service_provider("real", nats_url)
    try:
        wait_until(lambda: processor.connected, what="the span processor connected")
        tracer = provider.get_tracer("t")
        too_large_before = SPANS_DROPPED.labels("too_large")._value.get()
        with tracer.start_as_current_span("root") as root:
            with tracer.start_as_current_span("child"):
                pass
            with tracer.start_as_current_span("huge", attributes={"blob": "x" * 2 * 1024 * 1024}):
                pass
        provider.force_flush()
        assert (processor.sent, processor.dropped) == (2, 1), "a span over NATS' max payload is dropped, the others sent"
        assert SPANS_DROPPED.labels("too_large")._value.get() - too_large_before == 1
        trace_id = trace_id_of(root)
        subject = subjects.span_subject(trace_id)
        garbage_only = "ab" * 16

        async def publish_garbage() -> None:
            nc = await nats.connect(nats_url)
            js = nc.jetstream()
            other_trace = {"trace_id": "cd" * 16, "span_id": "1" * 16, "name": "x", "start_ns": 1}
            for data in (b"\x00\xff not json", b"{}", json.dumps(other_trace).encode(), b"[1, 2]"):
                await js.publish(subject, data)
            await js.publish(subjects.span_subject(garbage_only), b"garbage")
            await js.publish("comp.spans.not-a-trace-id", b"{}")
            await nc.close()

        asyncio.run(publish_garbage())
        with serve_api(nats_url, redis_url) as url:
            view = wait_until(lambda: (r := get_trace(url, trace_id)).status_code == 200 and len(r.json()["spans"]) == 2 and r.json(), what="2 spans")
            assert view["skipped"] == 4
            assert [(n["name"], [c["name"] for c in n["children"]]) for n in view["tree"]] == [("root", ["child"])]
            only_garbage = get_trace(url, garbage_only)
            assert only_garbage.status_code == 404 and "none of its 1 kept records is a span" in only_garbage.json()["detail"]
            shown = comp(url, "trace", trace_id)
            assert shown.returncode == 0 and "4 kept records under this trace were not spans" in shown.stdout
            # Still serving after all of it.
            assert get_trace(url, trace_id).status_code == 200
    finally:
        provider.shutdown()


async def test_nats_away_the_trace_read_is_503_naming_it(redis_url):
    settings = ApiSettings(nats=NatsSettings(url=f"nats://127.0.0.1:{free_port()}", connect_timeout=1), redis=RedisSettings(url=redis_url))
    provider = TracerProvider()
    app = create_app(settings, make_broker(settings.nats, "api", provider), ObservedStore(connect(redis_url), "t"), provider)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            answer = await http.get("/v1/traces/" + "ab" * 16)
            assert answer.status_code == 503 and answer.json()["detail"].startswith("NATS is unavailable")
            assert (await http.get("/v1/traces/nope")).status_code == 422, "a bad id is refused before NATS is asked"


# ---- discovery and lb continue the apply's trace -------------------------------------------------
MANIFEST = """
kind: Deployment
metadata: {name: web}
spec: {image: x, ports: [{container_port: 8080, name: http}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {deployment: web}, ports: [{name: http, port: 80, target_port: http}]}
"""


class RecordingDataplane:
    name = "recording"

    def __init__(self, node_id: str, table: str):
        self.synced: list[list[ServiceEndpoints]] = []
        self.lock = threading.Lock()

    def unavailable(self) -> None:
        return None

    def sync(self, services):
        with self.lock:
            self.synced.append(list(services))
        return SyncReport("full", len(services), len(services), 0.0)

    def counters(self, namespace, name):
        return []

    def cleanup(self) -> None:
        pass


@pytest.fixture
def recorded_spans():
    """Every span the process's global provider (the one discovery and lb trace with) ends from now."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def test_discovery_and_lb_continue_the_trace_of_the_task_event(nats_url, redis_url, cluster_name, recorded_spans, monkeypatch):
    from comp_discovery.main import build_app as discovery_app
    from comp_discovery.settings import DiscoverySettings
    from comp_lb.main import build_app as lb_app
    from comp_lb.settings import LbSettings

    monkeypatch.setitem(dataplanes.DATAPLANES, "recording", RecordingDataplane)
    common = {"cluster": cluster_name, "nats": {"url": nats_url}, "redis": {"url": redis_url}, "log": {"json": False}}
    discovery_settings = DiscoverySettings(**common, discovery={"vip_cidr": "10.124.0.0/29", "dns_port": None, "batch_seconds": 0.01})
    lb_settings = LbSettings(**common, lb={"node_id": "n1", "dataplane": "recording", "table": "t", "batch_seconds": 0.01})
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    deployments = await js.create_key_value(bucket=subjects.DEPLOYMENTS_BUCKET, history=10)
    services = await js.create_key_value(bucket=subjects.SERVICES_BUCKET, history=10)
    endpoints = await js.create_key_value(bucket=subjects.ENDPOINTS_BUCKET, history=1)
    await js.create_key_value(bucket=subjects.VIPS_BUCKET, history=1)
    now = time.time()
    for _, obj in parse_objects(MANIFEST):
        if obj.kind == "Deployment":
            await deployments.put(obj.key, DeploymentRecord(deployment=obj, created_at=now, updated_at=now).model_dump_json().encode())
        else:
            await services.put(obj.key, ServiceRecord(service=obj, created_at=now, updated_at=now).model_dump_json().encode())
    discovery_process, _ = discovery_app(discovery_settings)
    lb_process, lb = lb_app(lb_settings)
    agent = TracerProvider(resource=Resource.create({"service.name": "agent"}))
    try:
        async with TestApp(discovery_process), TestApp(lb_process):
            await wait_for(lambda: _read(endpoints), what="the service's first endpoints value (no endpoint yet)")
            status = TaskStatus(task_id="t1", node_id="n1", deployment="default.web", state=TaskState.RUNNING, ready=True,
                                address="172.17.0.5", updated_at=time.time())
            with agent.get_tracer("t").start_as_current_span("nodeagent.start_task") as started:
                await nc.publish(subjects.task_event("n1"), status.model_dump_json().encode(), headers=trace_headers())
            value = await wait_for(lambda: _read(endpoints, with_endpoint=True), what="the endpoint written")
            written_by = span_context_of_traceparent(value.trace_parent)
            assert written_by is not None and written_by.trace_id == started.get_span_context().trace_id

            def spans_named(name):
                return [s for s in recorded_spans.get_finished_spans() if s.name == name and s.context.trace_id == written_by.trace_id]

            [endpoint_span] = await wait_for(lambda: spans_named("discovery.endpoints"), what="discovery's span")
            assert endpoint_span.parent.span_id == started.get_span_context().span_id, "a child of the task event's span"
            assert endpoint_span.context.span_id == written_by.span_id, "the value names the span that wrote it"
            assert endpoint_span.attributes["comp.service"] == "default.web"

            [sync_span] = await wait_for(lambda: spans_named("lb.sync"), what="the lb's sync span")
            assert sync_span.parent.span_id == endpoint_span.context.span_id
            assert any(s and s[0].endpoints for s in lb.dataplane.synced)
    finally:
        await nc.close()


async def _read(kv, with_endpoint: bool = False) -> ServiceEndpoints | None:
    value, _ = await read_model(kv, "default.web", ServiceEndpoints)
    if value is None or (with_endpoint and not value.endpoints):
        return None
    return value
