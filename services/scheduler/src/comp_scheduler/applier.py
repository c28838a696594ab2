"""Performs a plan: the only place the scheduler has side effects on desired state.

New assignments are written per node with compare-and-set, then the node is nudged.
The nudge and the placement events are published inside the caller's span, so they
carry the trace of the operation that caused them.

Fencing: only the leader writes.  Leadership is checked right before every KV write,
and every value written carries the leader's epoch.  A value found at a revision this
scheduler did not write is judged by its epoch: a newer one means this scheduler has
been deposed (stop); an older one is the late write of a deposed leader, which is void
(overwritten with this leader's own view, which agents accept since its epoch is newer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from faststream.nats import NatsBroker
from nats.js.kv import KeyValue

from comp_common import subjects
from comp_common.broker import RawPublish
from comp_common.kv import ConflictError, get_model, put_json
from comp_common.messages import DeploymentRecord, NodeAssignments, Nudge, PlacementEvent, TaskSpec, TaskState, TaskStatus

from .model import Place, Plan
from .state import ClusterState

log = logging.getLogger("scheduler.applier")
_CAS_ATTEMPTS = 5
# KV writes in flight at once.  Unbounded, a round touching 5,000 nodes sent all 5,000
# together and the last answers timed out behind megabytes of the first; at 64 a round's
# writes took 13-20 s at 5,000 nodes, each waiting its turn on a busy loop.
_WRITES_IN_FLIGHT = 256

# This scheduler's fencing epoch while it leads, None while it does not.
EpochSource = Callable[[], "int | None"]


class NotLeader(RuntimeError):
    """This scheduler does not, or no longer, lead: it must not write."""


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
        health=spec.health,
        restart=spec.restart,
        stop_signal=spec.stop_signal,
        stop_grace_seconds=spec.stop_grace_period,
        generation=record.generation,
    )


class Applier:
    def __init__(
        self,
        state: ClusterState,
        assignments: KeyValue,
        broker: NatsBroker,
        epoch: EpochSource,
        nudge: RawPublish | None = None,
    ):
        self.state = state
        self.kv = assignments
        self.broker = broker
        self._epoch = epoch
        # Nudges go out by the thousand: straight on the connection where the service says so.
        self._publish_nudge = nudge or broker.publish
        # task id -> (the TaskSpec as last written, its JSON): a node's value is written again
        # whenever a task is added or removed, and its other tasks are the same objects.
        self._task_json: dict[str, tuple[TaskSpec, bytes]] = {}

    def _require_epoch(self) -> int:
        epoch = self._epoch()
        if epoch is None:
            raise NotLeader("not the leader")
        return epoch

    async def apply(self, plan: Plan, now: float) -> None:
        adds: dict[str, list[TaskSpec]] = defaultdict(list)
        removes: dict[str, set[str]] = defaultdict(set)
        # One TaskSpec per deployment, copied per task: building one hashes the deployment's
        # spec, which at 100,000 placements was seconds of a round.
        templates: dict[str, TaskSpec] = {}
        for place in plan.places:
            template = templates.get(place.deployment)
            if template is None:
                template = templates[place.deployment] = task_spec(place, self.state.desired[place.deployment], now)
            adds[place.node_id].append(template.model_copy(update={"task_id": place.task_id}))
        for stop in plan.stops:
            removes[stop.node_id].add(stop.task_id)

        nodes = sorted(set(adds) | set(removes))
        began = time.perf_counter()
        failures = await self._write_and_nudge(nodes, adds, removes, now)
        written = [n for n in nodes if n not in failures]
        deposed = False
        for node_id, error in failures.items():
            if isinstance(error, NotLeader):
                deposed = True
            else:
                # The next round starts again from what is in the bucket; nothing is half-applied
                # per node because each node's assignments are one value.
                log.error("could not write assignments", extra={"node": node_id, "error": repr(error)})
        if deposed:
            log.warning("stopped applying: no longer the leader", extra={"written": len(written), "nodes": len(nodes)})
        if len(self._task_json) > 2 * len(self.state.statuses) + 1000:
            # Tasks that left by another way than this applier's writes (a takeover's reload).
            self._task_json = {t: v for t, v in self._task_json.items() if t in self.state.statuses}
        wrote = time.perf_counter()
        await self._publish_decisions(plan, set(written))
        log.info(
            "plan applied",
            extra={
                "nodes": len(nodes), "written": len(written),
                "seconds": {"write": round(wrote - began, 3), "events": round(time.perf_counter() - wrote, 3)},
            },
        )

    async def restamp(self, node_ids: Iterable[str]) -> list[str]:
        """Write each node's assignments again, unchanged but for this leader's epoch, and nudge.

        Run on becoming leader: once every node's value carries the new epoch, its agent
        refuses anything a deposed leader might still write.  Also repairs a value that
        differs from this leader's view (see the module docstring).  Returns the nodes written.
        """
        nodes = sorted(node_ids)
        failures = await self._write_and_nudge(nodes, {}, {}, now=0.0)  # nothing added: no status is stamped
        for node_id, error in failures.items():
            if not isinstance(error, NotLeader):
                log.error("could not restamp assignments", extra={"node": node_id, "error": repr(error)})
        return [n for n in nodes if n not in failures]

    async def _write_and_nudge(
        self, nodes: list[str], adds: Mapping[str, list[TaskSpec]], removes: Mapping[str, set[str]], now: float
    ) -> dict[str, Exception]:
        """Write each node's new value and nudge it as soon as it is written, so its agent starts
        while the other nodes are still being written.  Returns the nodes that failed, each
        with its error.

        ``_WRITES_IN_FLIGHT`` workers share the list: a task per node waiting on a semaphore
        cost a scan of every waiter per acquire (asyncio's ``Semaphore.locked``), seconds of
        CPU for a round that touches 5,000 nodes.
        """
        failures: dict[str, Exception] = {}
        queue = iter(nodes)

        async def worker() -> None:
            for node_id in queue:  # one shared iterator: each node is taken once
                try:
                    await self._write_node(node_id, adds.get(node_id, []), removes.get(node_id, set()), now)
                except Exception as exc:
                    failures[node_id] = exc
                    continue
                try:
                    await self._nudge(node_id)
                except Exception as exc:
                    # Written all the same: the agent's next resync finds the value.
                    log.warning("could not nudge a node", extra={"node": node_id, "error": repr(exc)})

        await asyncio.gather(*(worker() for _ in range(min(_WRITES_IN_FLIGHT, len(nodes)))))
        return failures

    async def _write_node(self, node_id: str, adds: list[TaskSpec], removes: set[str], now: float) -> None:
        mine = self.state.assignments.get(node_id, (NodeAssignments(node_id=node_id), None))
        current, revision = mine
        for _ in range(_CAS_ATTEMPTS):
            epoch = self._require_epoch()  # right before the write: a deposed leader stops here
            tasks = [t for t in current.tasks if t.task_id not in removes]
            have = {t.task_id for t in tasks}
            tasks += [t for t in adds if t.task_id not in have]
            updated = NodeAssignments(node_id=node_id, version=current.version + 1, tasks=tasks, epoch=epoch)
            try:
                new_revision = await put_json(self.kv, node_id, self._json(updated), revision)
            except TimeoutError:
                # No answer is no failure: the write may have landed.  Taken as failed, its
                # tasks were placed again next round and the node got both copies.
                new_revision = await self._landed(node_id, updated)
                if new_revision is None:
                    raise
            except ConflictError:
                # Someone else wrote this node's key since we read it: judge it by its epoch.
                found = await get_model(self.kv, node_id, NodeAssignments)
                if found is None:
                    current, revision = mine[0], None
                elif found[0].epoch > epoch:
                    raise NotLeader(f"assignments of {node_id} were written at epoch {found[0].epoch} > ours {epoch}")
                elif found[0].epoch < epoch:
                    # A deposed leader's late write: void. Ours goes over it, at its revision.
                    log.warning(
                        "overwriting assignments written by a deposed leader",
                        extra={"node": node_id, "their_epoch": found[0].epoch, "epoch": epoch},
                    )
                    version = max(mine[0].version, found[0].version)
                    current, revision = mine[0].model_copy(update={"version": version}), found[1]
                else:
                    current, revision = found  # ours, from a write whose answer we missed
                continue
            self.state.set_assignments(node_id, updated, new_revision)
            for task_id in removes:
                self._task_json.pop(task_id, None)
            for spec in adds:
                self.state.statuses[spec.task_id] = TaskStatus(
                    task_id=spec.task_id, node_id=node_id, deployment=spec.deployment, state=TaskState.PENDING, updated_at=now
                )
            for task_id in removes:
                if task_id in self.state.statuses:
                    self.state.stopping[task_id] = node_id
            return
        raise ConflictError(f"assignments of {node_id} kept changing under {_CAS_ATTEMPTS} attempts")

    def _json(self, value: NodeAssignments) -> bytes:
        """``value.model_dump_json()``, with each task's JSON reused while its TaskSpec is the
        one last written (at 20 tasks a node, serialising them again was most of a write)."""
        parts = []
        for spec in value.tasks:
            cached = self._task_json.get(spec.task_id)
            if cached is None or cached[0] is not spec:
                cached = self._task_json[spec.task_id] = (spec, spec.model_dump_json().encode())
            parts.append(cached[1])
        head = value.model_dump_json(exclude={"tasks"}).encode()
        return head[:-1] + b',"tasks":[' + b",".join(parts) + b"]}"

    async def _landed(self, node_id: str, written: NodeAssignments) -> int | None:
        """The revision of ``written`` if the key holds it now (a write whose answer timed
        out), else None."""
        try:
            found = await get_model(self.kv, node_id, NodeAssignments)
        except Exception:
            return None
        return found[1] if found is not None and found[0] == written else None

    async def _nudge(self, node_id: str) -> None:
        value = self.state.assignments[node_id][0]
        await self._publish_nudge(Nudge(node_id=node_id, version=value.version, epoch=value.epoch), subjects.node_nudge(node_id))

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
            e.rejections = dict(pending.rejections)
        for key, e in events.items():
            namespace, name = key.split(".", 1)
            await self.broker.publish(e, subjects.placement_event(namespace, name))
