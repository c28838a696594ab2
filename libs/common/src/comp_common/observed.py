"""Observed state in Redis: nodes, task status, deployment summaries.

Everything here can be rebuilt from heartbeats and the event log, so Redis is never
the only copy of something a user asked for.  The scheduler writes, the API reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis
from typing import TypeVar

from pydantic import BaseModel

from .messages import AutoscaleDecision, Capacity, Heartbeat, LeaderChange, NodeMetrics, Message, NodeInfo, Taint, TaskStatus, node_state


M = TypeVar("M", bound=BaseModel)


class NodeRecord(Message):
    node_id: str
    last_heartbeat: float
    driver: str
    address: str
    capacity: Capacity
    allocated: Capacity
    labels: dict[str, str] = {}
    taints: list[Taint] = []
    tasks: int = 0
    # The scheduler declared it down before its grace ran out (its pings found no agent).
    down: bool = False

    def describes(self, hb: Heartbeat) -> bool:
        """Whether this record already says all ``hb`` says, but for the time: most
        heartbeats repeat the last one, and need only their time written."""
        return (
            self.driver == hb.driver
            and self.address == hb.address
            and self.capacity == hb.capacity
            and self.allocated == hb.allocated
            and self.labels == hb.labels
            and self.taints == hb.taints
            and self.tasks == (hb.task_count if hb.task_count is not None else len(hb.tasks))
        )

    @classmethod
    def from_heartbeat(cls, hb: Heartbeat, received_at: float) -> "NodeRecord":
        return cls(
            node_id=hb.node_id,
            last_heartbeat=received_at,
            driver=hb.driver,
            address=hb.address,
            capacity=hb.capacity,
            allocated=hb.allocated,
            labels=hb.labels,
            taints=hb.taints,
            tasks=hb.task_count if hb.task_count is not None else len(hb.tasks),
        )

    def info(self, now: float, grace_seconds: float) -> NodeInfo:
        state = "down" if self.down else node_state(self.last_heartbeat, now, grace_seconds)
        return NodeInfo(state=state, **self.model_dump(exclude={"down"}))


class DeploymentStatus(Message):
    deployment: str
    desired: int
    placed: int
    running: int
    pending_reason: str = ""
    updated_at: float
    # The deployment's generation and its rollout as the scheduler last planned it: state
    # (a RolloutEvent state; "" before any) and the step's message.
    generation: int = 0
    rollout_state: str = ""
    rollout_message: str = ""


def connect(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


class ObservedStore:
    def __init__(self, client: aioredis.Redis, cluster: str):
        self.r = client
        self._nodes = f"comp:{cluster}:nodes"
        # node id -> when its last heartbeat was handled: written for every heartbeat, where
        # a node's record is written only when something else about it changed.
        self._node_seen = f"comp:{cluster}:nodes:seen"
        self._tasks = f"comp:{cluster}:tasks"
        self._deployments = f"comp:{cluster}:deployments"
        self._scheduler_leader = f"comp:{cluster}:scheduler:leader"
        self._autoscale = f"comp:{cluster}:autoscale:"  # + deployment key: its last decisions
        self._node_metrics = f"comp:{cluster}:metrics:nodes"  # node -> its last NodeMetrics

    async def put_nodes(self, nodes: Iterable[NodeRecord]) -> None:
        mapping = {n.node_id: n.model_dump_json() for n in nodes}
        if mapping:
            await self.r.hset(self._nodes, mapping=mapping)

    async def put_node_seen(self, seen: Mapping[str, float]) -> None:
        if seen:
            await self.r.hset(self._node_seen, mapping={node: repr(at) for node, at in seen.items()})

    async def list_nodes(self) -> list[NodeRecord]:
        """Every node's record, with its latest heartbeat time."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._nodes)
            pipe.hgetall(self._node_seen)
            raw, seen = await pipe.execute()
        records = _decode(raw, NodeRecord)
        for record in records:
            at = seen.get(record.node_id.encode()) or seen.get(record.node_id)
            if at is not None and float(at) > record.last_heartbeat:
                record.last_heartbeat = float(at)
        return records

    async def put_tasks(self, statuses: Iterable[TaskStatus]) -> None:
        mapping = {s.task_id: s.model_dump_json() for s in statuses}
        if mapping:
            await self.r.hset(self._tasks, mapping=mapping)

    async def delete_tasks(self, task_ids: Iterable[str]) -> None:
        ids = list(task_ids)
        if ids:
            await self.r.hdel(self._tasks, *ids)

    async def list_tasks(self) -> list[TaskStatus]:
        return _decode(await self.r.hgetall(self._tasks), TaskStatus)

    async def put_deployment_statuses(self, statuses: Iterable[DeploymentStatus]) -> None:
        mapping = {s.deployment: s.model_dump_json() for s in statuses}
        if mapping:
            await self.r.hset(self._deployments, mapping=mapping)

    async def delete_deployment_statuses(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            await self.r.hdel(self._deployments, *keys)

    async def list_deployment_statuses(self) -> dict[str, DeploymentStatus]:
        return {s.deployment: s for s in _decode(await self.r.hgetall(self._deployments), DeploymentStatus)}

    async def put_scheduler_leader(self, change: LeaderChange) -> None:
        await self.r.set(self._scheduler_leader, change.model_dump_json())

    async def get_scheduler_leader(self) -> LeaderChange | None:
        raw = await self.r.get(self._scheduler_leader)
        return LeaderChange.model_validate_json(raw) if raw else None


    async def put_node_metrics(self, metrics: Iterable[NodeMetrics]) -> None:
        mapping = {m.node_id: m.model_dump_json() for m in metrics}
        if mapping:
            await self.r.hset(self._node_metrics, mapping=mapping)

    async def list_node_metrics(self) -> list[NodeMetrics]:
        return _decode(await self.r.hgetall(self._node_metrics), NodeMetrics)

    async def put_autoscale_decision(self, decision: AutoscaleDecision, keep: int = 20) -> None:
        key = self._autoscale + decision.deployment
        await self.r.lpush(key, decision.model_dump_json())
        await self.r.ltrim(key, 0, keep - 1)

    async def list_autoscale_decisions(self, deployment: str, count: int = 10) -> list[AutoscaleDecision]:
        """The deployment's last decisions, newest first."""
        return [AutoscaleDecision.model_validate_json(v) for v in await self.r.lrange(self._autoscale + deployment, 0, count - 1)]


def _decode(raw: dict, model: type[M]) -> list[M]:
    return [model.model_validate_json(v) for _, v in sorted(raw.items())]
