"""``reconcile(desired, observed, now) -> Plan``: the scheduler's pure core.

No I/O, no clock, no global randomness: the same inputs and seed give the same plan.
Stops are decided before placements so that freed room is usable in the same round.
Deployments are placed highest priority first; one that cannot fit may preempt (stop)
tasks of strictly lower priority, each such stop saying by whom and why.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Mapping

from comp_common.messages import TaskState

from .model import Desired, Node, NodeStatus, Observed, Pending, Place, Plan, Stop, Task
from .placement import DEFAULT_STRATEGY, Placer, Request, Resident, Usage

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
    default_strategy: str = DEFAULT_STRATEGY,
) -> Plan:
    """Stops, then placements in priority order (highest first, then by key).

    ``default_strategy`` ranks nodes for deployments that do not name a strategy.
    """
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

    def on_draining_node(task: Task) -> bool:
        node = observed.nodes.get(task.node_id)
        return node is not None and node.draining

    # Draining: a task on a draining node keeps serving but is not counted, so a replacement
    # is placed elsewhere; it is stopped only once enough replacements run that the
    # deployment never drops below its replica count (scaling down included).
    leaving: dict[str, list[Task]] = defaultdict(list)
    still_serving: dict[str, int] = defaultdict(int)  # tasks left running on draining nodes
    for key in list(kept):
        if any(on_draining_node(t) for t in kept[key]):
            leaving[key] = [t for t in kept[key] if on_draining_node(t)]
            kept[key] = [t for t in kept[key] if not on_draining_node(t)]

    for key in sorted(desired):
        want = desired[key]
        tasks = kept.get(key, [])
        extra = len(tasks) - want.spec.replicas
        if extra > 0:
            tasks.sort(key=lambda t: (_STOP_PREFERENCE.get(t.state, 0), -t.created_at, t.task_id))
            for task in tasks[:extra]:
                stops.append(Stop(task.task_id, key, task.node_id, f"scaled down to {want.spec.replicas}"))
            kept[key] = tasks[extra:]
        if key in leaving:
            running_elsewhere = sum(t.state is TaskState.RUNNING for t in kept.get(key, []))
            can_stop = running_elsewhere + len(leaving[key]) - want.spec.replicas
            for task in sorted(leaving[key], key=lambda t: (_STOP_PREFERENCE.get(t.state, 0), t.task_id))[: max(0, can_stop)]:
                stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is draining; replacements run elsewhere"))
            still_serving[key] = len(leaving[key]) - max(0, can_stop)

    missing_any = any(want.spec.replicas > len(kept.get(key, ())) for key, want in desired.items())
    if not missing_any:
        # Converged: the common round. Nothing to place, so no ledger and no placer to build;
        # what is lost is all surplus.
        for key in sorted(lost, key=lambda k: (-desired[k].spec.priority, k)):
            for task in lost[key]:
                stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is down; not needed"))
        return Plan(stops=tuple(stops))

    requests = {key: Request.of(want) for key, want in desired.items()}
    priorities = [r.priority for r in requests.values()]
    lowest_priority, highest_priority = min(priorities), max(priorities)
    usage = Usage()
    # What preemption may stop: node -> task id -> the task as a request at its deployment's
    # priority.  Only tasks kept from earlier rounds: one placed in this round is of a
    # priority at least that of every deployment placed after it.
    residents: dict[str, dict[str, Resident]] = defaultdict(dict)
    preemption_possible = lowest_priority < highest_priority
    running = {key: len(tasks) for key, tasks in kept.items()}
    for key, tasks in kept.items():
        wanted = requests[key]
        for task in tasks:
            request = wanted
            if (task.cpu, task.memory, task.host_ports) != (wanted.cpu, wanted.memory, wanted.host_ports):
                # The same spec hash means the same needs, but the ledger holds what the task has.
                request = Request(key, task.cpu, task.memory, task.host_ports, wanted.placement, wanted.priority)
            usage.add(task.node_id, request)
            if preemption_possible:
                residents[task.node_id][task.task_id] = Resident(task.task_id, request)
    placer = Placer(list(observed.nodes.values()), usage, default_strategy)

    places: list[Place] = []
    pending: list[Pending] = []
    # Highest priority first: what it takes is not there for lower ones, and anything it
    # preempts is of a deployment still to come in this round, which may re-place it.
    for key in sorted(desired, key=lambda k: (-requests[k].priority, k)):
        want = desired[key]
        request = requests[key]
        missing = want.spec.replicas - running.get(key, 0)
        orphans = lost.get(key, [])
        # Lost tasks beyond what is missing are surplus whatever happens; so are those that
        # tasks still serving on draining nodes already stand in for.
        keep_orphans = max(missing - still_serving.get(key, 0), 0)
        for task in orphans[keep_orphans:]:
            stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is down; not needed"))
        orphans = orphans[:keep_orphans]
        if missing <= 0:
            continue
        session = placer.session(request)
        # Preemption needs someone of lower priority to stop; none is lower than the lowest.
        preemptible = request.priority > lowest_priority
        for placed in range(missing):
            decision = session.place()
            victims: tuple[Resident, ...] = ()
            if decision.node_id is None and preemptible:
                preemption = session.preempt(residents)
                if preemption is not None:
                    decision, victims = preemption.decision, preemption.victims
            if decision.node_id is None:
                reason = decision.reason
                if preemptible and decision.rejections:
                    reason += "; stopping lower-priority tasks would not make room"
                if orphans:
                    reason += f"; keeping {len(orphans)} task(s) on down nodes until they can be replaced"
                pending.append(Pending(key, missing - placed, reason, decision.rejections))
                break
            node_id = decision.node_id
            task_id = new_task_id(want.name, rng)
            for victim in victims:
                loser = victim.request
                stops.append(
                    Stop(victim.task_id, loser.deployment, node_id, f"preempted by {key} (priority {request.priority} > {loser.priority})")
                )
                del residents[node_id][victim.task_id]
                running[loser.deployment] -= 1
            if orphans:
                orphan = orphans.pop(0)
                stops.append(Stop(orphan.task_id, key, orphan.node_id, f"node {orphan.node_id} is down; replaced by {task_id}"))
            places.append(Place(task_id, key, node_id, decision.reason, decision.parts))

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
