"""Composition root: settings, logging, tracing, broker, store, routers, DNS."""

from __future__ import annotations

import asyncio
import logging

from faststream import FastStream
from nats.aio.subscription import Subscription

from comp_common.broker import ensure_event_stream, make_app, make_broker
from comp_common.logs import configure_logging
from comp_common.metrics import serve_metrics
from comp_common.observed import ObservedStore, connect
from comp_common.telemetry import setup_tracing

from . import instruments
from .dns import DnsServer
from .handlers import build_router, subscribe_observations
from .service import Discovery
from .settings import DiscoverySettings

log = logging.getLogger("discovery")


def build_app(settings: DiscoverySettings) -> tuple[FastStream, Discovery]:
    configure_logging("discovery", settings.log)
    provider = setup_tracing("discovery", settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, "discovery", provider)
    store = ObservedStore(connect(settings.redis.url), settings.cluster)
    discovery = Discovery(settings, broker, store)
    instruments.track(discovery)
    broker.include_router(build_router(discovery))
    app = make_app(broker)
    group = settings.discovery
    dns = (
        DnsServer(discovery.lookup, group.dns_host, group.dns_port, group.cluster_domain, vip_ttl=group.dns_ttl_seconds)
        if group.dns_port is not None
        else None
    )
    discovery.dns = dns
    inputs: list[Subscription] = []

    @app.on_startup
    async def starting() -> None:
        await broker.connect()
        await ensure_event_stream(broker, settings.events)
        await discovery.start()
        inputs.extend(await subscribe_observations(broker.connection, discovery))
        if dns is not None:
            await dns.start()
            log.info("serving DNS", extra={"host": group.dns_host, "port": dns.port, "domain": group.cluster_domain})

    @app.on_shutdown
    async def stopping() -> None:
        for subscription in inputs:
            await subscription.unsubscribe()
        if dns is not None:
            await dns.stop()
        await discovery.stop()

    return app, discovery


def run() -> None:
    settings = DiscoverySettings()
    app, _ = build_app(settings)
    serve_metrics(settings.metrics)
    asyncio.run(app.run())
