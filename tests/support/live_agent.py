"""A node agent run in the test's own process over a real runtime driver, publishing on a
real nats-server, with assignments the test hands it: the test plays the scheduler and
reads back what the agent published."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel

from comp_common.broker import server_caught_up
from comp_common import subjects
from comp_common.messages import HealthEvent, HealthState, NodeAssignments, TaskSpec, TaskState, TaskStatus
from comp_nodeagent.agent import Agent
from comp_nodeagent.driver import RuntimeDriver
from comp_nodeagent.settings import NodeAgentGroup


class LiveAgent:
    def __init__(self, nc: NatsClient, driver: RuntimeDriver, node_id: str, **settings: Any):
        self.nc = nc
        self.node_id = node_id
        self.driver = driver
        self.tasks: list[TaskSpec] = []
        self.statuses: list[TaskStatus] = []
        self.events: list[HealthEvent] = []
        # Passes run when the test says, not on a timer of their own.
        self.agent = Agent(
            settings=NodeAgentGroup(node_id=node_id, resync_seconds=3600, **settings),
            heartbeat_seconds=3600,
            driver=driver,
            load_assignments=self._load,
            publish=self._publish,
        )

    async def _load(self) -> NodeAssignments:
        return NodeAssignments(node_id=self.node_id, tasks=self.tasks)

    async def _publish(self, message: BaseModel, subject: str) -> None:
        await self.nc.publish(subject, message.model_dump_json().encode())

    async def subscribe(self) -> None:
        async def on_status(msg: Any) -> None:
            self.statuses.append(TaskStatus.model_validate_json(msg.data))

        async def on_health(msg: Any) -> None:
            self.events.append(HealthEvent.model_validate_json(msg.data))

        await self.nc.subscribe(subjects.task_event(self.node_id), cb=on_status)
        await self.nc.subscribe(subjects.health_event(self.node_id), cb=on_health)
        await server_caught_up(self.nc)

    async def assign(self, *tasks: TaskSpec) -> None:
        self.tasks = list(tasks)
        await self.agent.reconcile("assigned")

    def of(self, task_id: str, state: TaskState | None = None) -> list[TaskStatus]:
        return [s for s in self.statuses if s.task_id == task_id and (state is None or s.state == state)]

    def latest(self, task_id: str, state: TaskState, **fields: Any) -> TaskStatus | None:
        """The task's latest status if it is in ``state`` with ``fields``; else None."""
        status = next((s for s in reversed(self.statuses) if s.task_id == task_id), None)
        if status and status.state == state and all(getattr(status, k) == v for k, v in fields.items()):
            return status
        return None

    def running(self, task_id: str, **fields: Any) -> TaskStatus | None:
        return self.latest(task_id, TaskState.RUNNING, **fields)

    def health(self, task_id: str) -> list[tuple[str, HealthState, HealthState]]:
        return [(e.check, e.previous, e.state) for e in self.events if e.task_id == task_id]


@asynccontextmanager
async def live_agent(nats_url: str, driver: RuntimeDriver, node_id: str, **settings: Any) -> AsyncIterator[LiveAgent]:
    nc = await nats.connect(nats_url)
    live = LiveAgent(nc, driver, node_id, **settings)
    await live.subscribe()
    await live.agent.start()
    try:
        yield live
    finally:
        await live.agent.stop()
        await nc.close()
