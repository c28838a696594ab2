"""Tracing: one user operation is one trace across every service.

Trace context crosses NATS in message headers (FastStream's telemetry middleware) and
HTTP in ``traceparent``.  Spans go to an OTLP endpoint when one is set and to a JSON
lines file when ``span_file`` is set (the platform's own record, read back by tests).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult

from .settings import TelemetrySettings


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line; several processes may share the file."""

    def __init__(self, path: Path):
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s)) + "\n" for s in spans)
        with self._lock:
            # O_APPEND keeps lines from different processes whole.
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in (span.attributes or {}).items()},
    }


def setup_tracing(service_name: str, settings: TelemetrySettings) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if settings.span_file:
        # Simple (synchronous) so a span is on disk the moment it ends.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(settings.span_file)))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
