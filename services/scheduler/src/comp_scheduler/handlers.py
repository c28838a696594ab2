"""Subscriptions only: each handler validates its message (by type) and delegates.

A message that fails validation is logged and dropped by FastStream; the service
goes on serving.
"""

from __future__ import annotations

from faststream.nats import NatsRouter

from comp_common import subjects
from comp_common.messages import ControlEvent, DeploymentEvent, Heartbeat, TaskStatus

from .service import Scheduler


def build_router(scheduler: Scheduler) -> NatsRouter:
    router = NatsRouter()

    @router.subscriber(subjects.DEPLOYMENT_EVENTS)
    async def deployment_changed(event: DeploymentEvent) -> None:
        await scheduler.on_deployment_event(event)

    @router.subscriber(subjects.NODE_HEARTBEATS)
    async def heartbeat(hb: Heartbeat) -> None:
        scheduler.on_heartbeat(hb)

    @router.subscriber(subjects.CONTROL_EVENTS)
    async def control_changed(event: ControlEvent) -> None:
        await scheduler.on_control_event(event)

    @router.subscriber(subjects.TASK_EVENTS)
    async def task_status(status: TaskStatus) -> None:
        scheduler.on_task_status(status)

    return router
