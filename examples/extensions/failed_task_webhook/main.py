"""Composition root: settings, logging, tracing, broker, notifier, router."""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream import FastStream
from pydantic import ValidationError

from comp_common.broker import ensure_event_stream, make_broker
from comp_common.logs import configure_logging
from comp_common.telemetry import setup_tracing

from .core import backoff_delays
from .handlers import build_router
from .notifier import HttpWebhook, Notifier
from .settings import WebhookSettings

SERVICE = "failed-task-webhook"
log = logging.getLogger("failed_task_webhook")


def build_app(settings: WebhookSettings) -> FastStream:
    configure_logging(SERVICE, settings.log)
    provider = setup_tracing(SERVICE, settings.telemetry)
    broker = make_broker(settings.nats, SERVICE, provider)
    group = settings.webhook
    webhook = HttpWebhook(str(group.url), group.timeout_seconds)
    notifier = Notifier(
        webhook, backoff_delays(group.attempts, group.backoff_seconds, group.backoff_max_seconds),
        max_bytes=settings.nats.max_message_bytes,
    )
    broker.include_router(build_router(notifier, group.durable, group.deliver))
    app = FastStream(broker)

    @app.on_startup
    async def starting() -> None:
        # The broker retries an unreachable NATS forever, silently: say so meanwhile.
        waiting = asyncio.create_task(_say_while_unreachable(settings.nats.url))
        try:
            await broker.connect()
        finally:
            waiting.cancel()
        log.info("connected to NATS at %s; posting failed tasks to %s", settings.nats.url, group.url)
        # The stream is the cluster's; creating it when absent lets the extension start first.
        await ensure_event_stream(broker)

    @app.on_shutdown
    async def stopping() -> None:
        await webhook.close()
        provider.shutdown()

    return app


async def _say_while_unreachable(url: str, every_seconds: float = 5.0) -> None:
    while True:
        await asyncio.sleep(every_seconds)
        log.warning("NATS at %s does not answer; still trying", url)


def run() -> None:
    try:
        settings = WebhookSettings()
    except ValidationError as exc:
        sys.exit(f"failed-task-webhook: bad settings (COMP_WEBHOOK__URL is required):\n{exc}")
    asyncio.run(build_app(settings).run())
