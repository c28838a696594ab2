"""Performs a plan: the only place the scheduler has side effects on desired state.

New assignments are written per node with compare-and-set, then the node is nudged.
The nudge and the placement events are published inside the caller's span, so they
carry the trace of the operation that caused them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from faststream.nats import NatsBroker
from nats.js.kv import KeyValue

from comp_common import subjects
from comp_common.kv import ConflictError, get_model, put_model
from comp_common.messages import DeploymentRecord, NodeAssignments, Nudge, PlacementEvent, TaskSpec, TaskState, TaskStatus

from .model import Place, Plan
from .state import ClusterState

log = logging.getLogger("scheduler.applier")
_CAS_ATTEMPTS = 5


def task_spec(place: Place, record: DeploymentRecord, now: float) -> TaskSpec:
    deployment = record.deployment
    spec = deployment.spec
    return TaskSpec(
        task_id=place.task_id,
        deployment=place.deployment,
        namespace=deployment.metadata.namespace,
        name=deployment.metadata.name,
        spec_hash=spec.task_hash(),
        image=spec.image,
        command=spec.command,
        args=spec.args,
        env=dict(spec.env),
        cpu=spec.resources.cpu,
        memory=spec.resources.memory,
        ports=list(spec.ports),
        labels=dict(deployment.metadata.labels),
        created_at=now,
    )


class Applier:
    def __init__(self, state: ClusterState, assignments: KeyValue, broker: NatsBroker):
        self.state = state
        self.kv = assignments
        self.broker = broker

    async def apply(self, plan: Plan, now: float) -> None:
        adds: dict[str, list[TaskSpec]] = defaultdict(list)
        removes: dict[str, set[str]] = defaultdict(set)
        for place in plan.places:
            adds[place.node_id].append(task_spec(place, self.state.desired[place.deployment], now))
        for stop in plan.stops:
            removes[stop.node_id].add(stop.task_id)

        nodes = sorted(set(adds) | set(removes))
        results = await asyncio.gather(
            *(self._write_node(n, adds.get(n, []), removes.get(n, set()), now) for n in nodes), return_exceptions=True
        )
        written = []
        for node_id, result in zip(nodes, results):
            if isinstance(result, BaseException):
                # The next round starts again from what is in the bucket; nothing is half-applied
                # per node because each node's assignments are one value.
                log.error("could not write assignments", extra={"node": node_id, "error": repr(result)})
            else:
                written.append(node_id)

        await asyncio.gather(*(self._nudge(n) for n in written))
        await self._publish_decisions(plan, set(written))

    async def _write_node(self, node_id: str, adds: list[TaskSpec], removes: set[str], now: float) -> None:
        current, revision = self.state.assignments.get(node_id, (NodeAssignments(node_id=node_id), None))
        for _ in range(_CAS_ATTEMPTS):
            tasks = [t for t in current.tasks if t.task_id not in removes]
            have = {t.task_id for t in tasks}
            tasks += [t for t in adds if t.task_id not in have]
            updated = NodeAssignments(node_id=node_id, version=current.version + 1, tasks=tasks)
            try:
                new_revision = await put_model(self.kv, node_id, updated, revision)
            except ConflictError:
                # Someone else wrote this node's key (another scheduler, an operator): start from theirs.
                found = await get_model(self.kv, node_id, NodeAssignments)
                current, revision = found if found else (NodeAssignments(node_id=node_id), None)
                continue
            self.state.assignments[node_id] = (updated, new_revision)
            for spec in adds:
                self.state.statuses[spec.task_id] = TaskStatus(
                    task_id=spec.task_id, node_id=node_id, deployment=spec.deployment, state=TaskState.PENDING, updated_at=now
                )
            for task_id in removes:
                if task_id in self.state.statuses:
                    self.state.stopping[task_id] = node_id
            return
        raise ConflictError(f"assignments of {node_id} kept changing under {_CAS_ATTEMPTS} attempts")

    async def _nudge(self, node_id: str) -> None:
        version = self.state.assignments[node_id][0].version
        await self.broker.publish(Nudge(node_id=node_id, version=version), subjects.node_nudge(node_id))

    async def _publish_decisions(self, plan: Plan, written: set[str]) -> None:
        events: dict[str, PlacementEvent] = {}

        def event(key: str) -> PlacementEvent:
            return events.setdefault(key, PlacementEvent(deployment=key))

        for place in plan.places:
            if place.node_id in written:
                event(place.deployment).placed.append({"task_id": place.task_id, "node_id": place.node_id, "reason": place.reason})
        for stop in plan.stops:
            if stop.node_id in written:
                event(stop.deployment).stopped.append({"task_id": stop.task_id, "node_id": stop.node_id, "reason": stop.reason})
        for pending in plan.pending:
            e = event(pending.deployment)
            e.pending, e.pending_reason = pending.count, pending.reason
        for key, e in events.items():
            namespace, name = key.split(".", 1)
            await self.broker.publish(e, subjects.placement_event(namespace, name))
