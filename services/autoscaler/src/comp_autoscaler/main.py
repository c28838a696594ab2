"""Composition root: settings, logging, tracing, broker, store, subscriptions."""

from __future__ import annotations

import asyncio

from faststream import FastStream
from nats.aio.subscription import Subscription

from comp_common.broker import ensure_event_stream, make_app, make_broker
from comp_common.logs import configure_logging
from comp_common.metrics import serve_metrics
from comp_common.observed import ObservedStore, connect
from comp_common.telemetry import setup_tracing

from .handlers import subscribe_metrics
from .service import Autoscaler
from .settings import AutoscalerSettings


def build_app(settings: AutoscalerSettings) -> tuple[FastStream, Autoscaler]:
    configure_logging("autoscaler", settings.log)
    provider = setup_tracing("autoscaler", settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, "autoscaler", provider)
    autoscaler = Autoscaler(settings, broker, ObservedStore(connect(settings.redis.url), settings.cluster))
    app = make_app(broker)
    inputs: list[Subscription] = []

    @app.on_startup
    async def starting() -> None:
        await broker.connect()
        await ensure_event_stream(broker, settings.events)
        await autoscaler.start()
        inputs.extend(await subscribe_metrics(broker.connection, autoscaler))

    @app.on_shutdown
    async def stopping() -> None:
        for subscription in inputs:
            await subscription.unsubscribe()
        await autoscaler.stop()

    return app, autoscaler


def run() -> None:
    settings = AutoscalerSettings()
    app, _ = build_app(settings)
    serve_metrics(settings.metrics)
    asyncio.run(app.run())
