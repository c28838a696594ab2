"""``reconcile(desired, observed, now) -> Plan``: the scheduler's pure core.

No I/O, no clock, no global randomness: the same inputs and seed give the same plan.
Stops are decided before placements so that freed room is usable in the same round.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Mapping

from comp_common.messages import TaskState

from .model import Desired, Node, NodeStatus, Observed, Pending, Place, Plan, Stop, Task
from .placement import DEFAULT_FILTERS, DEFAULT_SCORERS, Filter, Placer, Request, Scorer, Usage

# When scaling down, tasks that are not doing useful work go first, then the newest.
_STOP_PREFERENCE = {
    TaskState.FAILED: 0,
    TaskState.EXITED: 1,
    TaskState.PENDING: 2,
    TaskState.STARTING: 3,
    TaskState.RUNNING: 4,
    TaskState.STOPPED: 0,
}


def new_task_id(name: str, rng: random.Random) -> str:
    return f"{name}-{rng.getrandbits(40):010x}"


def reconcile(
    desired: Mapping[str, Desired],
    observed: Observed,
    now: float,
    rng: random.Random,
    filters: tuple[Filter, ...] = DEFAULT_FILTERS,
    scorers: tuple[Scorer, ...] = DEFAULT_SCORERS,
) -> Plan:
    stops: list[Stop] = []
    kept: dict[str, list[Task]] = defaultdict(list)
    # Tasks on down nodes may well still be running: each is given up only once a
    # replacement is placed, so losing touch with a node never lowers availability.
    lost: dict[str, list[Task]] = defaultdict(list)

    for task in sorted(observed.tasks.values(), key=lambda t: t.task_id):
        want = desired.get(task.deployment)
        node = observed.nodes.get(task.node_id)
        if want is None:
            stops.append(Stop(task.task_id, task.deployment, task.node_id, "deployment deleted"))
        elif task.spec_hash != want.spec_hash:
            stops.append(
                Stop(task.task_id, task.deployment, task.node_id, f"spec changed (generation {want.generation}); replacing")
            )
        elif node is None or node.status is NodeStatus.DOWN:
            lost[task.deployment].append(task)
        else:
            kept[task.deployment].append(task)

    for key in sorted(desired):
        want = desired[key]
        tasks = kept.get(key, [])
        extra = len(tasks) - want.spec.replicas
        if extra > 0:
            tasks.sort(key=lambda t: (_STOP_PREFERENCE.get(t.state, 0), -t.created_at, t.task_id))
            for task in tasks[:extra]:
                stops.append(Stop(task.task_id, key, task.node_id, f"scaled down to {want.spec.replicas}"))
            kept[key] = tasks[extra:]

    usage = Usage()
    for tasks in kept.values():
        for task in tasks:
            usage.add(task.node_id, Request(task.deployment, task.cpu, task.memory, task.host_ports))
    placer = Placer(list(observed.nodes.values()), usage, filters, scorers)

    places: list[Place] = []
    pending: list[Pending] = []
    for key in sorted(desired):
        want = desired[key]
        missing = want.spec.replicas - len(kept.get(key, []))
        orphans = lost.get(key, [])
        # Lost tasks beyond what is missing are surplus whatever happens.
        for task in orphans[max(missing, 0):]:
            stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is down; not needed"))
        orphans = orphans[: max(missing, 0)]
        request = Request(key, want.spec.resources.cpu, want.spec.resources.memory, want.host_ports)
        for placed in range(max(missing, 0)):
            decision = placer.place(request)
            if decision.node_id is None:
                reason = decision.reason
                if orphans:
                    reason += f"; keeping {len(orphans)} task(s) on down nodes until they can be replaced"
                pending.append(Pending(key, missing - placed, reason))
                break
            task_id = new_task_id(want.name, rng)
            if orphans:
                orphan = orphans.pop(0)
                stops.append(Stop(orphan.task_id, key, orphan.node_id, f"node {orphan.node_id} is down; replaced by {task_id}"))
            places.append(Place(task_id, key, decision.node_id, decision.reason))

    return Plan(places=tuple(places), stops=tuple(stops), pending=tuple(pending))


def node_status(last_heartbeat: float | None, known_since: float, now: float, grace: float) -> NodeStatus:
    """READY within the grace of a heartbeat; UNKNOWN while a node never heard from is within
    the grace of when the scheduler learnt of it; DOWN after that."""
    if last_heartbeat is not None and now - last_heartbeat <= grace:
        return NodeStatus.READY
    if last_heartbeat is None and now - known_since <= grace:
        return NodeStatus.UNKNOWN
    return NodeStatus.DOWN


__all__ = ["reconcile", "node_status", "new_task_id", "Node"]
