"""Subscriptions only: counters requests, answered from this host's dataplane."""

from __future__ import annotations

from faststream.nats import NatsMessage, NatsRouter

from comp_common import subjects
from comp_common.messages import EndpointCounter

from .service import LoadBalancer


def build_router(lb: LoadBalancer) -> NatsRouter:
    router = NatsRouter()

    # Every host's lb answers the same request; the asker gathers the replies.
    @router.subscriber(subjects.LB_COUNTERS)
    async def counters(message: NatsMessage) -> list[dict[str, object]]:
        _, _, _, namespace, name = message.raw_message.subject.split(".")
        found: list[EndpointCounter] = await lb.counters(namespace, name)
        return [c.model_dump() for c in found]

    return router
