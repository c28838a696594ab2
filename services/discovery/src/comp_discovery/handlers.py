"""Subscriptions only: each handler validates its message (by type) and delegates.

Lookups go through FastStream (request/reply, traced).  Task statuses and heartbeats come
straight off the connection, as in the scheduler: they are many.  A task status names the
span that published it (its ``traceparent`` header), so that the endpoints it changes are
written in the same trace.
"""

from __future__ import annotations

from typing import Any

from faststream.nats import NatsRouter
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from comp_common import subjects
from comp_common.broker import typed_callback
from comp_common.messages import Heartbeat, ServiceLookup, TaskStatus
from comp_common.telemetry import remote_span_context

from .service import Discovery


def build_router(discovery: Discovery) -> NatsRouter:
    router = NatsRouter()

    @router.subscriber(subjects.DISCOVERY_LOOKUP)
    async def lookup(request: ServiceLookup) -> dict[str, Any]:
        found = discovery.lookup(request.namespace, request.name)
        if found is None:
            return {"error": f"service {request.namespace}/{request.name} not found"}
        return found.model_dump(mode="json")

    return router


async def subscribe_observations(connection: Client, discovery: Discovery) -> list[Subscription]:
    return [
        await connection.subscribe(subjects.NODE_HEARTBEATS, cb=typed_callback(Heartbeat, discovery.on_heartbeat)),
        await connection.subscribe(subjects.TASK_EVENTS, cb=_with_cause(discovery)),
    ]


def _with_cause(discovery: Discovery):  # type: ignore[no-untyped-def]
    async def on_task_event(msg: Msg) -> None:
        cause = remote_span_context(msg.headers)
        await typed_callback(TaskStatus, lambda status: discovery.on_task_status(status, cause))(msg)

    return on_task_event
