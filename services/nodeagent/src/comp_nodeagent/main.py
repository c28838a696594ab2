"""Composition root of the node agent: settings, logging, tracing, broker, driver, agent."""

from __future__ import annotations

import asyncio
import logging
import sys

from faststream import FastStream

from comp_common import subjects
from comp_common.broker import make_broker
from comp_common.kv import get_model, open_bucket
from comp_common.logs import configure_logging
from comp_common.messages import NodeAssignments
from comp_common.telemetry import setup_tracing

from .agent import Agent
from .driver import make_driver
from .handlers import make_router
from .settings import NodeAgentSettings

SERVICE = "nodeagent"


def build_app(settings: NodeAgentSettings) -> FastStream:
    logger = configure_logging(SERVICE, settings.log)
    provider = setup_tracing(SERVICE, settings.telemetry)
    broker = make_broker(settings.nats, SERVICE, provider)
    node_id = settings.nodeagent.node_id

    async def load_assignments() -> NodeAssignments | None:
        kv = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
        found = await get_model(kv, node_id, NodeAssignments)
        return found[0] if found else None

    agent = Agent(
        settings=settings.nodeagent,
        heartbeat_seconds=settings.liveness.heartbeat_seconds,
        driver=make_driver(settings),
        load_assignments=load_assignments,
        publish=broker.publish,
    )
    broker.include_router(make_router(agent))

    app = FastStream(broker, logger=logger)

    @app.after_startup
    async def start_agent() -> None:
        await agent.start()

    @app.on_shutdown
    async def stop_agent() -> None:
        # Loops and watchers only: the containers stay up for the next agent to adopt.
        await agent.stop()

    @app.after_shutdown
    async def flush_spans() -> None:
        provider.shutdown()

    return app


def run() -> None:
    try:
        app = build_app(NodeAgentSettings())
    except Exception as exc:
        # Bad settings or no engine to talk to: one clear line rather than a traceback.
        logging.getLogger(SERVICE).error("node agent cannot start: %s", exc)
        sys.exit(1)
    asyncio.run(app.run())


if __name__ == "__main__":
    run()
