"""Tracing: one user operation is one trace across every service.

Trace context crosses NATS in message headers (FastStream's telemetry middleware) and
HTTP in ``traceparent``.  Finished spans go to NATS (``comp.spans.<trace id>``, kept by
the ``COMP_SPANS`` stream: the platform's own record, which ``comp trace`` reads back,
across hosts), to an OTLP endpoint when one is set, and to a JSON lines file when
``span_file`` is set.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from nats.aio.client import Client as NatsClient
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from . import subjects
from .aio import within
from .settings import TelemetrySettings
from .streams import ensure_stream

_log = logging.getLogger("comp.telemetry")

SPANS_DROPPED = Counter(
    "comp_spans_dropped", "Finished spans not sent to NATS (NATS away or slow, or a span too large)", ["reason"]
)


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


class NatsSpanProcessor(SpanProcessor):
    """Publishes each finished span (``span_record``) on ``comp.spans.<trace id>``.

    ``on_end`` (on the service's thread) only appends the span to a bounded queue; a task on
    an event loop of the processor's own, in a daemon thread, sends the queue every
    ``span_batch_seconds`` over a nats-py connection of its own.  Not the service's broker
    or loop: ``setup_tracing`` runs before a service has a loop (the api hands its loop to
    uvicorn later), spans still have to go out while a service shuts its loop down (the
    provider is shut down after it), a connection without FastStream's telemetry
    middleware cannot make spans of its own publishes, and the service never waits on a
    span.  While NATS is away the queue holds up to ``span_queue_size`` spans (a short
    outage loses nothing); past that a span is dropped, counted and, once per outage,
    logged.
    """

    def __init__(self, url: str, service: str, settings: TelemetrySettings, send_timeout: float = 2.0):
        self.url = url
        self.service = service
        self.settings = settings
        self.send_timeout = send_timeout
        self.sent = 0
        self.dropped = 0
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._capacity = settings.span_queue_size
        self._early = min(512, self._capacity)  # this many waiting: send before the period ends
        self._counts = threading.Lock()
        self._dropping = False  # between the first drop of an outage and the next send
        self._dropped_in_outage = 0
        self._shutdown = False
        # Set once the stream was asked for: spans sent before it exists would be lost.
        self._stream_asked = False
        self._nc = NatsClient()
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"comp-spans-{service}", daemon=True)
        self._thread.start()
        self._sender = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        self._sender.add_done_callback(self._log_sender_end)

    @property
    def connected(self) -> bool:
        """Connected, and the stream asked for: sends go out."""
        return self._nc.is_connected and self._stream_asked

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- SpanProcessor (the service's threads) ------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown:
            return
        if len(self._queue) >= self._capacity:
            if self._nc.is_connected:
                self._drop(1, "queue_full", f"more than {self._capacity} spans waiting to be sent")
            else:
                self._drop(1, "nats_away", f"not connected to NATS at {self.url} and {self._capacity} spans waiting")
            return
        self._queue.append(span)
        if len(self._queue) == self._early:
            self._loop.call_soon_threadsafe(self._wake.set)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Send what waits now; False when NATS is away (it stays queued) or it took too long."""
        if self._shutdown or not self.connected:
            return False
        try:
            return asyncio.run_coroutine_threadsafe(self._send_queued(), self._loop).result(timeout_millis / 1000)
        except Exception:
            return False

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # ---- the processor's loop -----------------------------------------------------------
    async def _run(self) -> None:
        # max_reconnect_attempts=-1 retries the first connection forever too.
        await self._nc.connect(
            self.url,
            name=f"{self.service}-spans",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._ensure_stream,
        )
        await self._ensure_stream()
        self._stream_asked = True
        while True:
            try:
                await within(self._wake.wait(), self.settings.span_batch_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            await self._send_queued()

    def _log_sender_end(self, sender: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
        if not sender.cancelled() and sender.exception() is not None:
            _log.error("the span sender stopped; no more spans are sent", exc_info=sender.exception())

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed reconnect; the drops already say NATS is away.
        _log.debug("span connection error: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._shutdown:
            return  # our own close, at exit: the log may be gone already
        _log.info("span connection to NATS lost; spans wait (up to %d) until it is back", self._capacity, extra={"nats": self.url})

    async def _ensure_stream(self) -> None:
        """Create COMP_SPANS, or bring an existing one's retention to this service's settings
        (every service asks for the same unless an operator set them apart)."""
        s = self.settings
        try:
            await ensure_stream(
                self._nc.jetstream(), subjects.SPANS_STREAM, subjects.SPAN_SUBJECTS,
                s.span_stream_max_age_seconds, s.span_stream_max_bytes,
            )
        except Exception as exc:
            # Spans are still published; the next reconnect tries again.
            _log.warning("cannot create the %s stream: %r", subjects.SPANS_STREAM, exc)

    async def _send_queued(self) -> bool:
        """Send every span waiting; True once the server has seen them."""
        async with self._sending:
            if not self.connected:
                return False
            batch = [self._queue.popleft() for _ in range(len(self._queue))]
            if not batch:
                return True
            unsent = len(batch)
            try:
                for span in batch:
                    record = span_record(span)
                    data = json.dumps(record).encode()
                    if len(data) > self._nc.max_payload:
                        self._drop(1, "too_large", f"a span of {len(data)} bytes ({span.name}) is larger than NATS' max payload")
                    else:
                        await self._nc.publish(subjects.span_subject(record["trace_id"]), data)
                        self._count_sent(1)
                    unsent -= 1
                await self._nc.flush(timeout=max(1, round(self.send_timeout)))
                return True
            except Exception as exc:
                if unsent:
                    self._drop(unsent, "nats_error", f"sending failed: {exc!r}")
                return False

    async def _close(self) -> None:
        self._sender.cancel()
        try:
            await within(self._send_queued(), self.send_timeout)
        except Exception:
            pass
        if unsent := len(self._queue):
            # Counted, not logged: at exit the log's stream may be closed already.
            self._queue.clear()
            SPANS_DROPPED.labels("nats_away").inc(unsent)
            with self._counts:
                self.dropped += unsent
        try:
            await within(self._nc.close(), 2)
        except Exception:
            pass

    # ---- counting -----------------------------------------------------------------------
    def _count_sent(self, n: int) -> None:
        with self._counts:
            self.sent += n
            if not self._dropping:
                return
            self._dropping = False
            dropped, self._dropped_in_outage = self._dropped_in_outage, 0
        _log.warning("sending spans to NATS again; %d were dropped meanwhile", dropped, extra={"dropped_total": self.dropped})

    def _drop(self, n: int, reason: str, detail: str) -> None:
        SPANS_DROPPED.labels(reason).inc(n)
        with self._counts:
            self.dropped += n
            self._dropped_in_outage += n
            first = not self._dropping
            self._dropping = True
        if first or reason == "too_large":
            _log.warning("dropping finished spans: %s", detail, extra={"nats": self.url, "dropped": n})


def add_nats_export(provider: TracerProvider, service_name: str, nats_url: str, settings: TelemetrySettings) -> NatsSpanProcessor:
    processor = NatsSpanProcessor(nats_url, service_name, settings)
    provider.add_span_processor(processor)
    return processor


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
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links or ()
        ],
    }


def setup_tracing(service_name: str, settings: TelemetrySettings, nats_url: str | None = None) -> TracerProvider:
    """The service's tracer provider, set as the global one.  With ``nats_url`` (and
    ``spans_to_nats``), its finished spans are collected in the COMP_SPANS stream."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if settings.span_file:
        # Simple (synchronous) so a span is on disk the moment it ends.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(settings.span_file)))
    if nats_url and settings.spans_to_nats:
        add_nats_export(provider, service_name, nats_url, settings)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


_TRACE_CONTEXT = TraceContextTextMapPropagator()
# One span links at most this many other traces (the SDK keeps 128 links a span).
MAX_CAUSES = 32


def remote_span_context(carrier: Mapping[str, str] | None) -> SpanContext | None:
    """The span that NATS headers (or any W3C ``traceparent`` carrier) name, if any."""
    if not carrier:
        return None
    context = trace.get_current_span(_TRACE_CONTEXT.extract(dict(carrier))).get_span_context()
    return context if context.is_valid else None


def span_context_of_traceparent(traceparent: str | None) -> SpanContext | None:
    return remote_span_context({"traceparent": traceparent}) if traceparent else None


def traceparent_of(span: Span) -> str | None:
    """The W3C ``traceparent`` naming ``span``, to carry in a stored value."""
    carrier: dict[str, str] = {}
    _TRACE_CONTEXT.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent")


def distinct_causes(causes: Iterable[SpanContext | None], limit: int = MAX_CAUSES) -> list[SpanContext]:
    """The first span of each trace, in order, at most ``limit``."""
    seen: set[int] = set()
    out: list[SpanContext] = []
    for cause in causes:
        if cause is not None and cause.trace_id not in seen and len(out) < limit:
            seen.add(cause.trace_id)
            out.append(cause)
    return out


@contextmanager
def span_continuing(
    tracer: Tracer, name: str, causes: Iterable[SpanContext | None], attributes: dict[str, str | int] | None = None
) -> Iterator[Span | None]:
    """A span for work done on behalf of several traced inputs: a child of the first cause's
    span, linked to the other traces.  With no cause, no span (a periodic resync is no
    part of any operation)."""
    distinct = distinct_causes(causes)
    if not distinct:
        yield None
        return
    parent = trace.set_span_in_context(NonRecordingSpan(distinct[0]))
    links = [Link(cause) for cause in distinct[1:]]
    with tracer.start_as_current_span(name, context=parent, links=links, attributes=attributes) as span:
        yield span


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None
