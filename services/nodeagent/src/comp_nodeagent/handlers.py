"""Subscriptions only: each one hands its message to the :class:`~comp_nodeagent.agent.Agent`."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from faststream import Path
from faststream.nats import NatsRouter

from comp_common import subjects
from comp_common.messages import Nudge

from .agent import Agent

log = logging.getLogger(__name__)

# Passes that nudges run at once in a process of many agents.  One subscription delivers
# every node's nudges; run one at a time, a deploy touching thousands of nodes would wait
# for each node's KV read in turn.  Passes of one node still run one at a time (the
# agent's own lock).
FLEET_NUDGE_WORKERS = 64


def make_router(agent: Agent) -> NatsRouter:
    router = NatsRouter()

    # Typed: a body that is not a Nudge fails validation and FastStream logs and drops it.
    @router.subscriber(subjects.node_nudge(agent.node_id))
    async def on_nudge(nudge: Nudge) -> None:
        # Awaited here, inside this message's span, so the starts it causes join the
        # scheduler's trace.
        await agent.on_nudge(nudge)

    # The reply only says this connection lives; what the scheduler acts on is the server's
    # "no responders" once it is gone.  A fleet shares one connection and does not answer.
    @router.subscriber(subjects.node_ping(agent.node_id))
    async def on_ping() -> str:
        return agent.node_id

    agent.answers_pings = True
    return router


def make_fleet_router(agents: Mapping[str, Agent]) -> NatsRouter:
    """One wildcard subscription for the nudges of every agent in this process.

    N subscriptions would cost the server and the client N interests; one wildcard costs
    one, and the subject's node token says which agent the nudge is for.
    """
    router = NatsRouter()

    @router.subscriber(subjects.node_nudge("{node_id}"), max_workers=FLEET_NUDGE_WORKERS)
    async def on_nudge(nudge: Nudge, node_id: str = Path()) -> None:
        agent = agents.get(node_id)
        if agent is None:
            # Nudges of nodes run by other processes share the wildcard.
            return
        if nudge.node_id != node_id:
            log.warning("nudge body names another node than its subject; dropped", extra={"subject_node": node_id, "body_node": nudge.node_id})
            return
        await agent.on_nudge(nudge)

    return router
