"""Subscriptions only: each one hands its message to the :class:`~comp_nodeagent.agent.Agent`."""

from __future__ import annotations

import logging

from faststream.nats import NatsRouter

from comp_common import subjects
from comp_common.messages import Nudge

from .agent import Agent

log = logging.getLogger(__name__)


def make_router(agent: Agent) -> NatsRouter:
    router = NatsRouter()

    # Typed: a body that is not a Nudge fails validation and FastStream logs and drops it.
    @router.subscriber(subjects.node_nudge(agent.node_id))
    async def on_nudge(nudge: Nudge) -> None:
        # The KV value is the truth, the nudge only says "look now".  The pass runs here,
        # inside this message's span, so the starts it causes join the scheduler's trace.
        await agent.reconcile(trigger=f"nudge version {nudge.version}")

    return router
