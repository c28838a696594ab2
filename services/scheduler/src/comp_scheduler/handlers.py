"""Subscriptions only: each handler validates its message (by type) and delegates.

The low-rate subjects (deployment and control events) go through FastStream, which
validates, logs and traces each message.  Heartbeats (one per node a second) and task
statuses (every start of a large deploy) come straight off the connection: FastStream's
pipeline costs ~0.4 ms a message, more than 5,000 heartbeats a second can afford, and
these messages join no trace the scheduler continues.  Either way a message that fails
validation is logged and dropped; the service goes on serving.
"""

from __future__ import annotations

from faststream.nats import NatsRouter
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from comp_common import subjects
from comp_common.broker import typed_callback
from comp_common.messages import ControlEvent, DeploymentEvent, Heartbeat, TaskStatus

from .service import Scheduler
from .state import HeartbeatParser

# A backlog of this many messages is held rather than dropped: at 5,000 nodes a stall of a
# few seconds queues tens of thousands of heartbeats, each needed to keep its node up.
_PENDING_MESSAGES = 1_000_000
_PENDING_BYTES = 1024**3


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
            subjects.NODE_HEARTBEATS, cb=typed_callback(Heartbeat, scheduler.on_heartbeat, HeartbeatParser().parse),
            pending_msgs_limit=_PENDING_MESSAGES, pending_bytes_limit=_PENDING_BYTES,
        ),
        await connection.subscribe(
            subjects.TASK_EVENTS, cb=typed_callback(TaskStatus, scheduler.on_task_status),
            pending_msgs_limit=_PENDING_MESSAGES, pending_bytes_limit=_PENDING_BYTES,
        ),
    ]
