"""Composition root: settings, logging, tracing, broker, dataplane, routers."""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream import FastStream

from comp_common.broker import make_app, make_broker
from comp_common.logs import configure_logging
from comp_common.metrics import serve_metrics
from comp_common.telemetry import setup_tracing

from .dataplane import DATAPLANES
from .handlers import build_router
from .service import LoadBalancer
from .settings import LbSettings

log = logging.getLogger("lb")


class DataplaneUnavailable(SystemExit):
    pass


def build_app(settings: LbSettings) -> tuple[FastStream, LoadBalancer]:
    configure_logging("lb", settings.log)
    group = settings.lb
    if group.dataplane not in DATAPLANES:
        raise DataplaneUnavailable(f"lb: no dataplane named {group.dataplane!r}; there are {', '.join(sorted(DATAPLANES))}")
    dataplane = DATAPLANES[group.dataplane](node_id=group.node_id, table=group.table)
    why_not = dataplane.unavailable()
    if why_not is not None:
        # Swarm's routing mesh reports success and serves nothing without IPVS; say it.
        raise DataplaneUnavailable(f"lb: the {group.dataplane} dataplane cannot run here: {why_not}")
    provider = setup_tracing("lb", settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, "lb", provider)
    lb = LoadBalancer(settings, broker, dataplane)
    broker.include_router(build_router(lb))
    app = make_app(broker)

    @app.on_startup
    async def starting() -> None:
        await broker.connect()
        await lb.start()

    @app.on_shutdown
    async def stopping() -> None:
        await lb.stop()

    return app, lb


def run() -> None:
    settings = LbSettings()
    try:
        app, _ = build_app(settings)
    except DataplaneUnavailable as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    serve_metrics(settings.metrics)
    asyncio.run(app.run())
