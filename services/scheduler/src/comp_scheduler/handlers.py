"""Subscriptions only: each handler validates its message (by type) and delegates.

The low-rate subjects (deployment and control events) go through FastStream, which
validates, logs and traces each message.  Heartbeats (one per node a second) and task
statuses (every start of a large deploy) come straight off the connection: FastStream's
pipeline costs ~0.4 ms a message, more than 5,000 heartbeats a second can afford, and
these messages join no trace the scheduler continues.  Either way a message that fails
validation is logged and dropped; the service goes on serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from faststream.nats import NatsRouter
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from comp_common import subjects
from comp_common.messages import ControlEvent, DeploymentEvent, Heartbeat, TaskStatus

from .service import Scheduler
from .state import HeartbeatParser

log = logging.getLogger("scheduler.handlers")
# A backlog of this many messages is held rather than dropped: at 5,000 nodes a stall of a
# few seconds queues tens of thousands of heartbeats, each needed to keep its node up.
_PENDING_MESSAGES = 1_000_000
_PENDING_BYTES = 1024**3
M = TypeVar("M", bound=BaseModel)


def build_router(scheduler: Scheduler) -> NatsRouter:
    router = NatsRouter()

    # One at a time.  FastStream's max_workers was tried here (each handler reads its record
    # back), and a scheduler's shutdown then hung once in CI in the subscriber's stop.
    @router.subscriber(subjects.DEPLOYMENT_EVENTS)
    async def deployment_changed(event: DeploymentEvent) -> None:
        await scheduler.on_deployment_event(event)

    @router.subscriber(subjects.CONTROL_EVENTS)
    async def control_changed(event: ControlEvent) -> None:
        await scheduler.on_control_event(event)

    return router


async def subscribe_observations(connection: Client, scheduler: Scheduler) -> list[Subscription]:
    """Heartbeats and task statuses, on the broker's own connection."""
    return [
        await connection.subscribe(
            subjects.NODE_HEARTBEATS, cb=_typed(Heartbeat, scheduler.on_heartbeat, HeartbeatParser().parse),
            pending_msgs_limit=_PENDING_MESSAGES, pending_bytes_limit=_PENDING_BYTES,
        ),
        await connection.subscribe(
            subjects.TASK_EVENTS, cb=_typed(TaskStatus, scheduler.on_task_status),
            pending_msgs_limit=_PENDING_MESSAGES, pending_bytes_limit=_PENDING_BYTES,
        ),
    ]


def _typed(
    model: type[M], handle: Callable[[M], None], parse: Callable[[bytes], M] | None = None
) -> Callable[[Msg], Awaitable[None]]:
    parse = parse or model.model_validate_json

    async def on_message(msg: Msg) -> None:
        try:
            value = parse(msg.data)
        except ValidationError as exc:
            log.warning(
                "dropped a message that is not a %s", model.__name__,
                extra={"subject": msg.subject, "error": str(exc)[:300]},
            )
            return
        try:
            handle(value)
        except Exception:
            log.exception("handling a message failed", extra={"subject": msg.subject})

    return on_message
