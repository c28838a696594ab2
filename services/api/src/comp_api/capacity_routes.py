"""What the cluster has, has promised and uses: ``comp top nodes|tasks`` and a capacity summary.

Capacity and reservations come from the nodes' heartbeats (Redis, written by the
scheduler); use from the agents' metrics (Redis, kept by the autoscaler's leader); what is
desired from the deployments bucket.  A node's or task's use is shown only while fresh.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from comp_common.messages import Capacity, NodeMetrics, TaskUsage

from .backends import NATS, REDIS, Backends
from .routes import get_backends

router = APIRouter()
# Usage older than this is not shown: the node's agent stopped reporting.
FRESH_SECONDS = 10.0


BackendsDep = Annotated[Backends, Depends(get_backends)]


class NodeTop(BaseModel):
    node_id: str
    state: str
    allocatable: Capacity
    allocated: Capacity
    used_cpu: float | None  # cores; None without fresh metrics
    used_memory: int | None
    tasks: int


class TaskTop(TaskUsage):
    node_id: str
    at: float


class CapacitySummary(BaseModel):
    nodes: int
    ready_nodes: int
    allocatable: Capacity  # of the ready nodes
    allocated: Capacity
    used_cpu: float
    used_memory: int
    desired: Capacity  # every deployment's replicas x resources
    desired_tasks: int
    fits: bool  # what is desired fits in what the ready nodes have
    shortfall: str = ""


async def _fresh_metrics(backends: Backends) -> dict[str, NodeMetrics]:
    now = time.time()
    async with backends.calling(REDIS):
        metrics = await backends.observed.list_node_metrics()
    return {m.node_id: m for m in metrics if now - m.at <= FRESH_SECONDS}


@router.get("/v1/top/nodes", response_model=list[NodeTop])
async def top_nodes(backends: BackendsDep) -> list[NodeTop]:
    metrics = await _fresh_metrics(backends)
    async with backends.calling(REDIS):
        nodes = await backends.observed.list_nodes()
    now = time.time()
    out = []
    for record in nodes:
        info = record.info(now, backends.settings.liveness.grace_seconds)
        used = metrics.get(info.node_id)
        out.append(NodeTop(
            node_id=info.node_id, state=info.state, allocatable=info.capacity, allocated=info.allocated,
            used_cpu=used.cpu_cores if used else None, used_memory=used.memory_bytes if used else None, tasks=info.tasks,
        ))
    return out


@router.get("/v1/top/tasks", response_model=list[TaskTop])
async def top_tasks(backends: BackendsDep) -> list[TaskTop]:
    metrics = await _fresh_metrics(backends)
    rows = [TaskTop(node_id=m.node_id, at=m.at, **u.model_dump()) for m in metrics.values() for u in m.tasks]
    return sorted(rows, key=lambda t: -t.cpu_cores)


@router.get("/v1/capacity", response_model=CapacitySummary)
async def capacity(backends: BackendsDep) -> CapacitySummary:
    nodes = await top_nodes(backends)
    ready = [n for n in nodes if n.state == "ready"]
    async with backends.calling(NATS):
        deployments = [s.deployment for s in await backends.deployments().list(None)]
    desired_cpu = sum(d.spec.replicas * d.spec.resources.cpu for d in deployments)
    desired_memory = sum(d.spec.replicas * d.spec.resources.memory for d in deployments)
    allocatable = Capacity(cpu=sum(n.allocatable.cpu for n in ready), memory=sum(n.allocatable.memory for n in ready))
    short = []
    if desired_cpu > allocatable.cpu + 1e-9:
        short.append(f"cpu: {desired_cpu:g} cores desired, {allocatable.cpu:g} on ready nodes")
    if desired_memory > allocatable.memory:
        short.append(f"memory: {desired_memory} bytes desired, {allocatable.memory} on ready nodes")
    return CapacitySummary(
        nodes=len(nodes), ready_nodes=len(ready), allocatable=allocatable,
        allocated=Capacity(cpu=sum(n.allocated.cpu for n in ready), memory=sum(n.allocated.memory for n in ready)),
        used_cpu=sum(n.used_cpu or 0.0 for n in ready), used_memory=sum(n.used_memory or 0 for n in ready),
        desired=Capacity(cpu=desired_cpu, memory=desired_memory), desired_tasks=sum(d.spec.replicas for d in deployments),
        fits=not short, shortfall="; ".join(short),
    )
