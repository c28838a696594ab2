"""Spans go to an OTLP/HTTP endpoint when one is configured (what Jaeger and Tempo accept),
the same spans that go to COMP_SPANS: a real HTTP receiver on loopback decodes what the
exporter posts.  An endpoint that is down costs the service nothing but a log line."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nats
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from waiting import eventually

from comp_api.trace_routes import TraceNotFound, read_trace
from comp_cli.local import free_port
from comp_common.settings import TelemetrySettings
from comp_common.telemetry import setup_tracing


class OtlpReceiver:
    """What an OTLP/HTTP collector does with ``POST /v1/traces``: decode the protobuf body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, ExportTraceServiceRequest]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append((self.path, self.headers["content-type"], request))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[str, dict, object]]:
        """(service.name, resource attributes, span) for every span received."""
        found = []
        for _, _, request in self.requests:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found.extend((attributes.get("service.name"), attributes, span) for span in scope_spans.spans)
        return found


@pytest.fixture
def receiver():
    otlp = OtlpReceiver()
    otlp.thread.start()
    yield otlp
    otlp.server.shutdown()
    otlp.server.server_close()


def test_spans_reach_an_otlp_endpoint_with_their_tree_and_service(receiver):
    provider = setup_tracing("scheduler", TelemetrySettings(otlp_endpoint=receiver.url, spans_to_nats=False))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("reconcile round") as round_:
        round_.set_attribute("deployment", "default/web")
        with tracer.start_as_current_span("place"):
            pass
    assert provider.force_flush(10_000)
    provider.shutdown()

    (path, content_type, _), *_ = receiver.requests
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    spans = {span.name: (service, span) for service, _, span in receiver.spans()}
    assert set(spans) == {"reconcile round", "place"}
    assert {service for service, _ in spans.values()} == {"scheduler"}
    (_, parent), (_, child) = spans["reconcile round"], spans["place"]
    context = round_.get_span_context()
    assert parent.trace_id == context.trace_id.to_bytes(16, "big") == child.trace_id
    assert child.parent_span_id == parent.span_id == context.span_id.to_bytes(8, "big")
    assert {a.key: a.value.string_value for a in parent.attributes} == {"deployment": "default/web"}
    assert parent.end_time_unix_nano >= child.end_time_unix_nano > child.start_time_unix_nano >= parent.start_time_unix_nano


async def test_the_same_spans_go_to_comp_spans_and_to_otlp(nats_url, receiver):
    provider = setup_tracing("api", TelemetrySettings(otlp_endpoint=receiver.url, span_batch_seconds=0.05), nats_url)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /v1/apply") as request:
        with tracer.start_as_current_span("kv put"):
            pass
    trace_id = f"{request.get_span_context().trace_id:032x}"
    connection = await nats.connect(nats_url)
    try:
        async def kept_spans():
            try:
                spans, _, _ = await read_trace(connection, trace_id)
            except TraceNotFound:
                return None
            return spans if len(spans) == 2 else None

        kept = await eventually(kept_spans, timeout=15.0, what="both spans in COMP_SPANS")
    finally:
        await connection.close()
    assert await asyncio.to_thread(provider.force_flush, 10_000)
    await asyncio.to_thread(provider.shutdown)

    sent = receiver.spans()
    assert sorted(span.span_id for span in kept) == sorted(span.span_id.hex() for _, _, span in sent)
    assert {span.name for span in kept} == {span.name for _, _, span in sent} == {"POST /v1/apply", "kv put"}
    assert {service for service, _, _ in sent} == {"api"}


def test_an_otlp_endpoint_that_is_down_costs_only_a_log_line(tmp_path, caplog):
    """The other span outputs still get every span, and shutting down ends."""
    nobody = f"http://127.0.0.1:{free_port()}/v1/traces"
    span_file = tmp_path / "spans.jsonl"
    provider = setup_tracing("lb", TelemetrySettings(otlp_endpoint=nobody, spans_to_nats=False, span_file=span_file))
    tracer = provider.get_tracer("test")
    for n in range(200):
        with tracer.start_as_current_span(f"sync {n}"):
            pass
    provider.force_flush(15_000)  # returns though the OTLP export fails
    provider.shutdown()
    written = [json.loads(line)["name"] for line in span_file.read_text().splitlines()]
    assert written == [f"sync {n}" for n in range(200)]
    assert any(r.name.startswith("opentelemetry.exporter") for r in caplog.records), "the refused export is logged"
