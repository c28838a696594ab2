"""Composition root: settings, logging, tracing, broker, the log on disk, the sources."""

from __future__ import annotations

import asyncio
import json
import logging

from faststream import FastStream
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from comp_common import subjects
from comp_common.broker import ensure_event_stream, make_app, make_broker
from comp_common.logs import configure_logging
from comp_common.metrics import serve_metrics
from comp_common.streams import ensure_stream
from comp_common.telemetry import setup_tracing

from . import instruments
from .handlers import subscribe_requests, subscribe_sources
from .service import AuditService
from .settings import AuditGroup, AuditSettings

log = logging.getLogger("audit")


def build_app(settings: AuditSettings) -> tuple[FastStream, AuditService]:
    configure_logging("audit", settings.log)
    provider = setup_tracing("audit", settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, "audit", provider)
    audit = AuditService(settings.audit)
    instruments.track(audit)
    app = make_app(broker)
    inputs: list[Subscription] = []

    @app.on_startup
    async def starting() -> None:
        await audit.open()
        await broker.connect()
        js = broker.connection.jetstream()
        await ensure_event_stream(broker, settings.events)
        await ensure_request_stream(js, settings.audit)
        inputs.extend(await subscribe_requests(broker.connection, audit))
        if audit.damage is not None:
            log.error(
                "NOT RECORDING: the audit log fails its last signed checkpoint; move it aside to start a new one",
                extra={"data_dir": str(audit.data_dir), "problem": audit.damage},
            )
            return
        for stream in (subjects.EVENTS_STREAM, subjects.API_REQUESTS_STREAM):
            stream_last = (await js.stream_info(stream)).state.last_seq
            if stream_last < audit.start_seq(stream) - 1:
                await audit.note_stream_reset(stream, stream_last)
        audit.start_writing()
        inputs.extend(await subscribe_sources(js, audit))
        log.info("recording", extra={"head_seq": audit.head.seq, "data_dir": str(audit.data_dir), "resumed_from": json.dumps(audit.resumed_from)})

    @app.on_shutdown
    async def stopping() -> None:
        for subscription in inputs:
            await subscription.unsubscribe()
        await audit.close()
        provider.shutdown()

    return app, audit


async def ensure_request_stream(js: JetStreamContext, settings: AuditGroup) -> None:
    """The stream the api's request records wait in, with the audit's retention for it."""
    await ensure_stream(
        js, subjects.API_REQUESTS_STREAM, subjects.API_REQUEST_SUBJECT, settings.requests_max_age_seconds, settings.requests_max_bytes
    )


def run() -> None:
    settings = AuditSettings()
    app, _ = build_app(settings)
    serve_metrics(settings.metrics)
    asyncio.run(app.run())
