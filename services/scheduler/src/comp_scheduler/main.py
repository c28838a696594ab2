"""Composition root: settings, logging, tracing, broker, store, routers."""

from __future__ import annotations

import asyncio
import logging

from faststream import FastStream

from comp_common.aio import contain_collections
from comp_common.broker import ensure_event_stream, make_app, make_broker
from comp_common.logs import configure_logging
from comp_common.metrics import serve_metrics
from comp_common.observed import ObservedStore, connect
from comp_common.telemetry import setup_tracing

from . import instruments
from .handlers import build_router, subscribe_observations
from .service import Scheduler
from .settings import SchedulerSettings


def build_app(settings: SchedulerSettings) -> tuple[FastStream, Scheduler]:
    configure_logging("scheduler", settings.log)
    provider = setup_tracing("scheduler", settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, "scheduler", provider)
    store = ObservedStore(connect(settings.redis.url), settings.cluster)
    scheduler = Scheduler(settings, broker, store)
    instruments.track(scheduler)
    broker.include_router(build_router(scheduler))
    app = make_app(broker)

    @app.on_startup
    async def starting() -> None:
        # Load state before the subscribers start delivering, so no event finds it empty.
        await broker.connect()
        await ensure_event_stream(broker, settings.events)
        await scheduler.start()
        scheduler.inputs = await subscribe_observations(broker.connection, scheduler)

    @app.on_shutdown
    async def stopping() -> None:
        for subscription in scheduler.inputs:
            await subscription.unsubscribe()
        await scheduler.stop()

    return app, scheduler


def run() -> None:
    settings = SchedulerSettings()
    app, _ = build_app(settings)
    serve_metrics(settings.metrics)
    contain_collections(logging.getLogger("scheduler"))
    asyncio.run(app.run())
