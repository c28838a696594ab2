"""The one way a service gets a NATS broker: telemetry wired, reconnecting forever."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from typing import Any, TypeVar

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from . import metrics, subjects
from .settings import EventLogSettings, NatsSettings
from .streams import ensure_stream


def make_broker(settings: NatsSettings, service: str, tracer_provider: TracerProvider | None = None) -> NatsBroker:
    return NatsBroker(
        settings.url,
        name=service,
        connect_timeout=int(max(1, settings.connect_timeout)),
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        middlewares=[NatsTelemetryMiddleware(tracer_provider=tracer_provider), metrics.MessageMetricsMiddleware],
        logger=logging.getLogger(f"{service}.broker"),
    )


_TRACE_CONTEXT = TraceContextTextMapPropagator()
M = TypeVar("M", bound=BaseModel)
_log = logging.getLogger("comp.broker")

RawPublish = Callable[[BaseModel, str], Awaitable[None]]


def trace_headers() -> dict[str, str]:
    """The headers a FastStream publish would carry for a consumer to decode the body and
    join the current trace: the JSON content type and, inside a trace, ``traceparent``."""
    headers = {"content-type": "application/json"}
    _TRACE_CONTEXT.inject(headers)
    return headers


def raw_publisher(broker: NatsBroker) -> RawPublish:
    """Publish straight on the broker's connection, for messages sent by the thousand.

    Through the broker a message costs ~300 us of CPU (encoding, middlewares, a span of its
    own); here it is its JSON body and ``trace_headers()``, which is what a consumer
    (FastStream or a plain subscription) reads, trace included.  Each publish is counted by
    its subject pattern, as the broker's metrics middleware counts its own.
    """

    async def publish(message: BaseModel, subject: str) -> None:
        instruments = metrics.for_subject(subject)
        try:
            await broker.connection.publish(subject, message.model_dump_json().encode(), headers=trace_headers())
        except Exception:
            instruments.publish_failed()
            raise
        instruments.published.inc()

    return publish


async def ensure_event_stream(broker: NatsBroker, retention: EventLogSettings | None = None) -> None:
    """Create the event-log stream with ``retention``, or bring an existing one to it.

    ``None`` creates it with the default retention but leaves an existing stream as it is:
    a caller that has no settings of its own must not undo an operator's choice.
    """
    wanted = retention or EventLogSettings()
    await ensure_stream(
        broker.connection.jetstream(), subjects.EVENTS_STREAM, subjects.EVENT_SUBJECTS,
        wanted.max_age_seconds, wanted.max_bytes, adjust=retention is not None,
    )


def typed_callback(
    model: type[M], handle: Callable[[M], None], parse: Callable[[bytes], M] | None = None
) -> Callable[[Msg], Awaitable[None]]:
    """A plain nats-py subscription callback that validates each message as ``model`` and
    hands it to ``handle``: for subjects too busy for FastStream's per-message pipeline.
    A message that is not a ``model`` is logged and dropped, and a failing handler is
    logged; either way the subscription goes on.  Each is counted by its subject pattern
    (:mod:`comp_common.metrics`): received, handled (with its latency), dropped or failed."""
    parse = parse or model.model_validate_json

    async def on_message(msg: Msg) -> None:
        instruments = metrics.for_subject(msg.subject)
        instruments.received.inc()
        began = time.perf_counter()
        try:
            value = parse(msg.data)
        except ValidationError as exc:
            instruments.dropped("invalid")
            _log.warning(
                "dropped a message that is not a %s", model.__name__,
                extra={"subject": msg.subject, "error": str(exc)[:300]},
            )
            return
        try:
            handle(value)
        except Exception as exc:
            instruments.failed(exc)
            _log.exception("handling a message failed", extra={"subject": msg.subject})
        instruments.handled.observe(time.perf_counter() - began)

    return on_message


async def server_caught_up(connection: Client, timeout: float = 5.0) -> None:
    """Return once the server has processed everything ``connection`` has sent so far
    (its subscriptions above all).

    ``Client.flush`` is not that barrier: nats-py writes its PING straight to the socket
    while SUBs may still sit in the pending buffer, so the PONG can come back before the
    server has seen them and a request sent right then gets "no responders" (2 in 300 on
    this machine).  A message the connection sends to itself goes through that same
    buffer, after the SUBs, so its arrival proves the server has them.
    """
    probe = connection.new_inbox()
    subscription = await connection.subscribe(probe)
    try:
        await connection.publish(probe, b"")
        await subscription.next_msg(timeout=timeout)
    finally:
        await subscription.unsubscribe()


def make_app(broker: NatsBroker, **options: Any) -> FastStream:
    """A service's FastStream app whose start ends only once the server has the broker's
    subscriptions, so a request sent the moment the service is up finds its handler."""
    app = FastStream(broker, **options)

    @app.after_startup
    async def subscriptions_in_place() -> None:
        await server_caught_up(broker.connection)

    return app
