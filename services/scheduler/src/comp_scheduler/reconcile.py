"""``reconcile(desired, observed, now, rng) -> Plan``: the scheduler's pure core.

No I/O, no clock, no global randomness: the same inputs and seed give the same plan.
Stops are decided before placements so that freed room is usable in the same round.

Order of placement.  Priority levels highest first; one that cannot fit may preempt (stop)
tasks of strictly lower priority, each such stop saying by whom and why.  Within a level,
tasks are interleaved across namespaces by dominant resource fairness (Mesos DRF): the
next task goes to the namespace with the lowest dominant share -- the larger of its cpu and
its memory over the capacity of the ready, uncordoned nodes -- ties by namespace name, so a
namespace with a huge deployment cannot starve another when the cluster is short of room.
Within a namespace, its deployments go one after another in key order.

Namespace quotas (``namespaces``) are checked again at placement time, as they may have been
lowered since the deployments were applied.  A namespace's usage is what its deployments
hold in steady state: per deployment, ``min(replicas, tasks it holds)`` times the task's
cpu and memory (tasks held: kept, still serving on draining nodes, or on down nodes until
replaced).  A placement that would raise that past a bound stays pending, saying which
("namespace team-a quota: cpu 4/4 cores used, a task needs 0.5").  Placements that replace
a task (on a down or draining node, or a rebalancing move) do not raise it and are not held
back.  Nothing already running is stopped for a lowered quota: the namespace just gets no
new placements until it is back under.  Mid-rollout a deployment's every task counts, old
ones and the surge alike (the room is really taken), so a namespace at its quota rolls
only by ``max_unavailable``: a surge start stays pending with the quota reason while the
rollout step still says progressing.

Rolling updates (``rollout.plan_rollout``).  A task of another spec hash than its
deployment's is *old*, whichever generation it was (a change mid-rollout makes both older
specs old).  Each round, a deployment with old tasks, or whose generation is not yet
``settled``, gets a rollout step, reported in ``Plan.rollouts``.  With old tasks, the step
decides: its stops are made, and the deployment holds its kept current tasks plus the
step's starts instead of ``replicas`` (scale down and placement both follow that count).
Without old tasks (a first deploy, or once the old ones are gone) the step only watches
deadlines and completion; the replicas are placed and scaled as ever, a failed verdict
included: there is nothing older to keep.  Old tasks:

- on a down node: stopped at once, not kept until replaced as a current task is;
- on a draining node: old like the rest, and passed to the step first, so that where it
  has a choice it stops those;
- otherwise they hold their room, host ports and replica counts in the placement ledger
  until stopped, and lower-priority ones may be preempted (the replica one was is then
  started as the new version, room allowing).

Current tasks on draining nodes are not given to the step: they leave as drained tasks do,
stopped once enough run elsewhere (old ones included).  A deployment with a rollout step
is never rebalanced.

Start order (``startorder``).  A deployment with ``depends_on`` and no running task (of any
generation) is placed only once its dependencies in the same namespace are met; until then
its missing replicas are pending with the reason ("waiting for db to be healthy: 1/2
ready").  A cycle among the desired deployments is pending as "depends_on cycle: a -> b ->
a" (the shortest through the deployment) rather than waited on.  Dependencies are counted
from the observed tasks not on down nodes, every generation.

Finished tasks.  A task that exited and will not be started again by its agent (restart
condition ``never``, or ``on-failure`` with exit code 0; ``Task.finished``) is done, not
missing: it stays counted as one of the replicas wherever its node is (down or draining
included) and is not replaced, as a replacement would only run again what its restart
policy said not to.  It goes first on a scale down, and a spec change replaces it like
any old task.  In a rollout a finished new task counts as healthy when it exited 0 and
fails the rollout otherwise; for start order, one that exited 0 counts as running and
ready, so a one-shot dependency (a migration) is met once it has succeeded.

Rebalancing (``rebalance``, a :class:`RebalancePolicy`).  When nodes join or recover, a
deployment with the spread strategy (a binpack deployment is never moved for spread) is
spread back out by moves: a new copy is placed on an under-used node first, and a copy on
the busiest node is stopped only once the new one is RUNNING, so the deployment never has
fewer running than before.  reconcile keeps no memory between rounds; a move is seen in
the observed tasks alone:

- Starting a move: a deployment is eligible when it holds exactly its replicas, all
  RUNNING, none on draining or down nodes, and it has no rollout step.  Its *crowding*
  per node is its replicas there plus, with ``spread_by``, its replicas in that node's
  domain.  A move from node s to a
  feasible node t (every placement filter passes: constraints, taints, max_per_node, room)
  is made only when it strictly improves the spread by the policy's margin (>= 2):
  s holds >= margin more replicas than t and, with spread_by, t is in s's domain or in
  one holding fewer; or, with spread_by, s's domain holds >= margin more than t's and s
  more than t.  A node without the spread_by label is never a target.  Either way the
  potential sum(node count^2) + sum(domain count^2) drops by at least 2 per move, which
  is why moves cannot ping-pong and always stop.  The biggest drop wins; ties go to the
  target's placement score, then node order.  At most ``max_moves_per_deployment`` per
  deployment, and ``max_moves`` in flight cluster-wide.
- In flight: the deployment then holds replicas + 1.  Surplus of a spread deployment of two
  replicas or more first waits for its newest tasks still PENDING or STARTING (at most
  max_moves_per_deployment, and only for ``start_timeout`` seconds after creation): they
  are never scaled away, and each counts against ``max_moves``.  One still not running
  after that is stopped as surplus, and the deployment starts no new move in that round.
  There is no telling a move's copy from a replica a user scaled away while it started,
  so such a scale-down also waits for it to start.
- Completing: surplus that is stopped goes by state first as ever (failed, exited,
  pending, starting before running), then from where the deployment is most crowded,
  then newest first.  For a finished move this is the old copy on the busy node, stopped
  with "rebalanced to node X" (X the new copy's node).  The same rule serves a user's
  scale-down of a spread deployment: it scales down from the most crowded nodes.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from itertools import groupby
from types import MappingProxyType
from typing import Mapping, Sequence, Union

from comp_common.manifest import dependency_cycle
from comp_common.messages import NamespaceRecord, TaskState
from comp_common.quantities import format_memory
from comp_common.quota import Quota
from comp_common.subjects import deployment_key

from .model import Desired, Node, NodeStatus, Observed, Pending, Place, Plan, RebalancePolicy, Stop, Task
from .placement import DEFAULT_STRATEGY, PlacementSession, Placer, Request, Resident, Usage
from .rollout import RolloutStep, RolloutTask, plan_rollout
from .startorder import DependencyStatus, start_blocked

# When scaling down, tasks that are not doing useful work go first, then the newest.
_STOP_PREFERENCE = {
    TaskState.FAILED: 0,
    TaskState.EXITED: 1,
    TaskState.PENDING: 2,
    TaskState.STARTING: 3,
    TaskState.RUNNING: 4,
    TaskState.STOPPED: 0,
}
_STARTING = frozenset({TaskState.PENDING, TaskState.STARTING})
DEFAULT_REBALANCE = RebalancePolicy()
_NO_NAMESPACES: Mapping[str, Quota] = MappingProxyType({})
_EVERY_TASK = 1 << 62  # a count no deployment reaches

NamespaceQuota = Union[Quota, NamespaceRecord]

def new_task_id(name: str, rng: random.Random) -> str:
    return f"{name}-{rng.getrandbits(40):010x}"


def reconcile(
    desired: Mapping[str, Desired],
    observed: Observed,
    now: float,
    rng: random.Random,
    default_strategy: str = DEFAULT_STRATEGY,
    *,
    namespaces: Mapping[str, NamespaceQuota] = _NO_NAMESPACES,
    rebalance: RebalancePolicy = DEFAULT_REBALANCE,
) -> Plan:
    """Stops (rollout steps among them), then placements (priority levels highest first,
    namespaces interleaved by dominant resource fairness within a level, start order
    gating), then rebalancing moves.

    ``default_strategy`` ranks nodes for deployments that do not name a strategy.
    ``namespaces`` maps a namespace name to its quota (a :class:`Quota` or the stored
    :class:`NamespaceRecord`); a namespace not in it has no quota.
    """
    quotas = {name: q.quota if isinstance(q, NamespaceRecord) else q for name, q in namespaces.items()}
    stops: list[Stop] = []
    kept: dict[str, list[Task]] = defaultdict(list)
    # Tasks on down nodes may well still be running: each is given up only once a
    # replacement is placed, so losing touch with a node never lowers availability.
    lost: dict[str, list[Task]] = defaultdict(list)

    # Tasks of another spec than their deployment's: replaced by a rolling update.
    outdated: dict[str, list[Task]] = defaultdict(list)

    for task in sorted(observed.tasks.values(), key=lambda t: t.task_id):
        want = desired.get(task.deployment)
        node = observed.nodes.get(task.node_id)
        if want is None:
            stops.append(Stop(task.task_id, task.deployment, task.node_id, "deployment deleted"))
        elif task.spec_hash == want.spec_hash:
            if node is not None and node.status is not NodeStatus.DOWN:
                kept[task.deployment].append(task)
            elif task.finished:
                # Done as its restart policy asked: nothing runs that a down node could
                # have lost, and a replacement would only run it again.
                kept[task.deployment].append(task)
            else:
                lost[task.deployment].append(task)
        elif node is None or node.status is NodeStatus.DOWN:
            # Not kept until replaced, as a current task would be: the rollout replaces it
            # anyway, and counting it would hold back stopping old tasks that do serve.
            stops.append(
                Stop(task.task_id, task.deployment, task.node_id, f"node {task.node_id} is down; outdated (generation {want.generation} rolling out)")
            )
        else:
            outdated[task.deployment].append(task)

    def on_draining_node(task: Task) -> bool:
        node = observed.nodes.get(task.node_id)
        return node is not None and node.draining and not task.finished

    # Draining: a task on a draining node keeps serving but is not counted, so a replacement
    # is placed elsewhere; it is stopped only once enough replacements run that the
    # deployment never drops below its replica count (scaling down included).
    leaving: dict[str, list[Task]] = defaultdict(list)
    still_serving: dict[str, int] = defaultdict(int)  # tasks left running on draining nodes
    for key in list(kept):
        if any(on_draining_node(t) for t in kept[key]):
            leaving[key] = [t for t in kept[key] if on_draining_node(t)]
            kept[key] = [t for t in kept[key] if not on_draining_node(t)]

    def rebalanced(want: Desired) -> bool:
        return rebalance.enabled and (want.spec.placement.strategy or default_strategy) == "spread"

    moves_in_flight = 0
    settling: set[str] = set()  # stopped surplus that had not come up: no new move this round
    rollouts: list[tuple[str, RolloutStep]] = []
    rolling: set[str] = set()  # a rollout is planned: never rebalanced meanwhile
    # Deployments whose step replaced the plain count: how many of the current spec they
    # should hold after this round (kept plus the step's starts), and the old tasks it left.
    target: dict[str, int] = {}
    still_old: dict[str, list[Task]] = {}
    for key in sorted(desired):
        want = desired[key]
        old = outdated.get(key)
        if old or not want.settled:
            rolling.add(key)
            step = _rollout_step(want, old or [], kept.get(key, []), on_draining_node, now)
            rollouts.append((key, step))
            if old:
                # Without old tasks the step only watches (deadlines, completion): the
                # replicas are placed and scaled as ever below.
                _apply_step(key, step, old, kept, stops)
                still_old[key] = [t for t in old if t.task_id not in _stopped_ids(step)]
                target[key] = len(kept.get(key, ())) + step.start
        tasks = kept.get(key, [])
        extra = len(tasks) - target.get(key, want.spec.replicas)
        if extra > 0:
            if rebalanced(want):
                victims, waiting, reason = _surplus_to_stop(tasks, extra, want, observed.nodes, now, rebalance)
                moves_in_flight += waiting
                if any(t.state is not TaskState.RUNNING for t in victims):
                    settling.add(key)
                stopped = {t.task_id for t in victims}
                for task in victims:
                    stops.append(Stop(task.task_id, key, task.node_id, reason))
                kept[key] = [t for t in tasks if t.task_id not in stopped]
            else:
                tasks.sort(key=lambda t: (_STOP_PREFERENCE.get(t.state, 0), -t.created_at, t.task_id))
                for task in tasks[:extra]:
                    stops.append(Stop(task.task_id, key, task.node_id, f"scaled down to {want.spec.replicas}"))
                kept[key] = tasks[extra:]
        if key in leaving:
            running_elsewhere = sum(t.state is TaskState.RUNNING for t in kept.get(key, []))
            # Old tasks still serving elsewhere stand in as well as new ones.
            running_elsewhere += sum(t.state is TaskState.RUNNING and not on_draining_node(t) for t in still_old.get(key, ()))
            can_stop = running_elsewhere + len(leaving[key]) - want.spec.replicas
            for task in sorted(leaving[key], key=lambda t: (_STOP_PREFERENCE.get(t.state, 0), t.task_id))[: max(0, can_stop)]:
                stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is draining; replacements run elsewhere"))
            still_serving[key] = len(leaving[key]) - max(0, can_stop)

    schedulable = [n for n in observed.nodes.values() if n.status is NodeStatus.READY and not n.cordoned]
    move_budget = rebalance.max_moves - moves_in_flight if rebalance.enabled else 0
    candidates: list[str] = []
    if move_budget > 0 and rebalance.max_moves_per_deployment > 0:
        candidates = [
            key
            for key in _rebalance_candidates(
                desired, kept, leaving, lost, observed.nodes, schedulable, rebalance.margin, rebalanced
            )
            if key not in settling and key not in rolling
        ]

    missing_any = any(target.get(key, want.spec.replicas) > len(kept.get(key, ())) for key, want in desired.items())
    if not missing_any and not candidates:
        # Converged: the common round. Nothing to place, so no ledger and no placer to build;
        # what is lost is all surplus.
        for key in sorted(lost, key=lambda k: (-desired[k].spec.priority, k)):
            for task in lost[key]:
                stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is down; not needed"))
        return Plan(stops=tuple(stops), rollouts=tuple(rollouts))

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
    old_ids = {task.task_id for tasks in still_old.values() for task in tasks}
    # Old tasks a rollout has not stopped yet hold their room and ports like any replica
    # (and count for max_per_node and spread, being replicas on those nodes until stopped).
    for key, tasks in itertools.chain(kept.items(), still_old.items()):
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

    # Steady-state usage per namespace, for quotas and fair shares (see the module docstring).
    held = {
        key: len(kept.get(key, ())) + still_serving.get(key, 0) + len(lost.get(key, ())) + len(still_old.get(key, ()))
        for key in desired
    }
    # Up to how many of what a deployment holds count: its replicas, except mid-rollout,
    # where the surge is real room taken, and every task counts.
    counted = {key: want.spec.replicas for key, want in desired.items()}
    for key in target:
        counted[key] = _EVERY_TASK
    namespace_usage: dict[str, _NamespaceUsage] = defaultdict(_NamespaceUsage)
    for key, want in desired.items():
        namespace_usage[want.namespace].add(requests[key], min(held[key], counted[key]))
    capacity_cpu = sum(n.cpu for n in schedulable)
    capacity_memory = sum(n.memory for n in schedulable)

    def dominant_share(namespace: str) -> float:
        used = namespace_usage[namespace]
        return max(
            used.cpu / capacity_cpu if capacity_cpu > 0 else 0.0,
            used.memory / capacity_memory if capacity_memory > 0 else 0.0,
        )

    places: list[Place] = []
    pending: list[Pending] = []
    preempted: set[str] = set()  # deployments that lost tasks to preemption in this round

    def fill(filling: _Filling, rival: tuple[float, str] | None, placed_in_level: set[str], contended: bool) -> bool:
        """Place tasks of ``filling`` for as long as its namespace's turn lasts: True once it is
        done (all placed, or the rest pending), False when the namespace's (dominant share,
        name) passes ``rival``, the next namespace's, whose turn it then is."""
        key, want, request = filling.key, filling.want, filling.request
        namespace, replicas = want.namespace, counted[key]
        quota = quotas.get(namespace)
        used = namespace_usage[namespace]
        orphans = filling.orphans
        session = filling.session
        if session is None:
            session = filling.session = placer.session(request)
        while True:
            if quota is not None and not orphans and held[key] < replicas:
                over = used.exceeded(quota, request)
                if over is not None:
                    pending.append(Pending(key, filling.missing - filling.placed, f"namespace {namespace} quota: {over}"))
                    return True
            decision = session.place()
            victims: tuple[Resident, ...] = ()
            if decision.node_id is None and filling.preemptible:
                preemption = session.preempt(residents)
                if preemption is not None:
                    decision, victims = preemption.decision, preemption.victims
            node_id = decision.node_id
            if node_id is None:
                reason = decision.reason
                if filling.preemptible and decision.rejections:
                    reason += "; stopping lower-priority tasks would not make room"
                if contended and placed_in_level - {namespace}:
                    reason += (
                        f"; room shared across namespaces by dominant resource fairness "
                        f"(namespace {namespace} at {dominant_share(namespace):.0%})"
                    )
                if orphans:
                    reason += f"; keeping {len(orphans)} task(s) on down nodes until they can be replaced"
                pending.append(Pending(key, filling.missing - filling.placed, reason, decision.rejections))
                return True
            task_id = new_task_id(want.name, rng)
            for victim in victims:
                preempt(victim, key, request, node_id)
            if orphans:
                orphan = orphans.popleft()
                stops.append(Stop(orphan.task_id, key, orphan.node_id, f"node {orphan.node_id} is down; replaced by {task_id}"))
            else:
                if held[key] < replicas:
                    used.cpu += request.cpu
                    used.memory += request.memory
                    used.tasks += 1
                held[key] += 1
            places.append(Place(task_id, key, node_id, decision.reason, decision.parts))
            placed_in_level.add(namespace)
            filling.placed += 1
            if filling.placed >= filling.missing:
                return True
            if rival is not None and (dominant_share(namespace), namespace) > rival:
                return False

    dependency_views: dict[str, DependencyStatus] | None = None
    graphs: dict[str, dict[str, list[str]]] = {}

    def start_gate(key: str, want: Desired) -> str | None:
        """Why ``want``'s replicas may not start yet (start order), or None."""
        nonlocal dependency_views
        if dependency_views is None:
            dependency_views = _dependency_views(desired, observed)
        own = dependency_views.get(key)
        if own is not None and own.running > 0:
            return None  # the gate is for a start from nothing (see startorder)
        namespace = want.namespace
        graph = graphs.get(namespace)
        if graph is None:
            graph = graphs[namespace] = {
                d.name: [dep.name for dep in d.spec.depends_on] for d in desired.values() if d.namespace == namespace and d.spec.depends_on
            }
        cycle = dependency_cycle(graph, want.name)
        if cycle:
            return "depends_on cycle: " + " -> ".join(cycle)
        views = dependency_views
        return start_blocked(want.spec.depends_on, lambda name: views.get(deployment_key(namespace, name)), running=0)

    def preempt(victim: Resident, key: str, request: Request, node_id: str) -> None:
        loser = victim.request
        stops.append(Stop(victim.task_id, loser.deployment, node_id, f"preempted by {key} (priority {request.priority} > {loser.priority})"))
        del residents[node_id][victim.task_id]
        loser_want = desired[loser.deployment]
        if victim.task_id in old_ids:
            # The rollout counted it as serving: the replica it was is now for the new version.
            target[loser.deployment] = min(target[loser.deployment] + 1, loser_want.spec.replicas)
        else:
            running[loser.deployment] -= 1
        preempted.add(loser.deployment)
        if held[loser.deployment] <= counted[loser.deployment]:
            namespace_usage[loser_want.namespace].add(requests[loser.deployment], -1)
        held[loser.deployment] -= 1

    # Highest priority first: what it takes is not there for lower ones, and anything it
    # preempts is of a deployment still to come in this round, which may re-place it.
    by_priority = sorted(desired, key=lambda k: (-requests[k].priority, k))
    for priority, level in groupby(by_priority, key=lambda k: requests[k].priority):
        queues: dict[str, deque[_Filling]] = {}
        for key in level:
            want = desired[key]
            missing = target.get(key, want.spec.replicas) - running.get(key, 0)
            orphans = lost.get(key, [])
            # Lost tasks beyond what is missing are surplus whatever happens; so are those that
            # tasks still serving on draining nodes already stand in for.
            keep_orphans = max(missing - still_serving.get(key, 0), 0)
            for task in orphans[keep_orphans:]:
                stops.append(Stop(task.task_id, key, task.node_id, f"node {task.node_id} is down; not needed"))
                held[key] -= 1
            if missing <= 0:
                continue
            if want.spec.depends_on:
                blocked = start_gate(key, want)
                if blocked is not None:
                    pending.append(Pending(key, missing, blocked))
                    continue
            # Preemption needs someone of lower priority to stop; none is lower than the lowest.
            filling = _Filling(key, want, requests[key], missing, deque(orphans[:keep_orphans]), priority > lowest_priority)
            queues.setdefault(want.namespace, deque()).append(filling)
        contended = len(queues) > 1
        placed_in_level: set[str] = set()
        # Lowest dominant share first; the name breaks ties so the order is deterministic.
        # A namespace keeps its turn while it stays below the next one: the same order as
        # handing out one task at a time, without a heap operation per task.
        turns = [(dominant_share(namespace), namespace) for namespace in queues]
        heapq.heapify(turns)
        while turns:
            _, namespace = heapq.heappop(turns)
            queue = queues[namespace]
            if fill(queue[0], turns[0] if turns else None, placed_in_level, contended):
                queue.popleft()
            if queue:
                heapq.heappush(turns, (dominant_share(namespace), namespace))

    moved = 0
    for key in candidates:
        if moved >= move_budget:
            break
        if key in preempted:
            continue  # it is short of replicas now: placing them comes before spreading them
        want = desired[key]
        moves = _plan_moves(
            key, want, kept[key], observed.nodes, placer, requests[key], rng,
            min(rebalance.max_moves_per_deployment, move_budget - moved), rebalance.margin,
        )
        places.extend(moves)
        moved += len(moves)

    return Plan(places=tuple(places), stops=tuple(stops), pending=tuple(pending), rollouts=tuple(rollouts))


def _rollout_task(task: Task, generation: int, seen_healthy: frozenset[str]) -> RolloutTask:
    return RolloutTask(
        task.task_id,
        generation,
        task.state,
        task.created_at,
        ready=task.ready,
        ready_since=task.ready_since,
        readiness_check=task.readiness_check,
        crash_loop=task.crash_loop,
        was_healthy=task.task_id in seen_healthy,
        finished=task.finished,
        exit_code=task.exit_code,
    )


def _rollout_step(want: Desired, old: list[Task], new: list[Task], on_draining_node, now: float) -> RolloutStep:
    # Old tasks on draining nodes first: where the rollout has a choice, it empties those.
    old_first = sorted(old, key=lambda t: not on_draining_node(t))
    return plan_rollout(
        want.spec.update,
        want.spec.replicas,
        want.generation,
        want.promoted,
        [_rollout_task(t, t.generation, frozenset()) for t in old_first],
        [_rollout_task(t, want.generation, want.seen_healthy) for t in new],
        now,
    )


def _stopped_ids(step: RolloutStep) -> set[str]:
    return {s.task_id for s in step.stops}


def _apply_step(key: str, step: RolloutStep, old: list[Task], kept: dict[str, list[Task]], stops: list[Stop]) -> None:
    """Add the step's stops (in its order) and take them out of ``kept``."""
    if not step.stops:
        return
    by_id = {t.task_id: t for t in old}
    by_id.update((t.task_id, t) for t in kept.get(key, ()))
    for stop in step.stops:
        task = by_id[stop.task_id]
        stops.append(Stop(task.task_id, key, task.node_id, stop.reason))
    gone = _stopped_ids(step)
    kept[key] = [t for t in kept.get(key, ()) if t.task_id not in gone]


def _dependency_views(desired: Mapping[str, Desired], observed: Observed) -> dict[str, DependencyStatus]:
    """Each desired deployment's replicas, and its tasks running and ready (every generation,
    on nodes not down), as start order reads them: one pass over the tasks."""
    running: Counter[str] = Counter()
    ready: Counter[str] = Counter()
    for task in observed.tasks.values():
        if task.deployment not in desired:
            continue
        node = observed.nodes.get(task.node_id)
        if node is None or node.status is NodeStatus.DOWN:
            continue
        # A task that finished with exit 0 and is never run again (a one-shot job such as a
        # migration) has done what its dependants waited for.
        done = task.succeeded
        if task.state is TaskState.RUNNING or done:
            running[task.deployment] += 1
        if task.serving or done:
            ready[task.deployment] += 1
    return {key: DependencyStatus(want.spec.replicas, running[key], ready[key]) for key, want in desired.items()}


@dataclass(slots=True)
class _Filling:
    """One deployment's placements in this round, taken a task at a time."""

    key: str
    want: Desired
    request: Request
    missing: int
    orphans: deque[Task]  # tasks on down nodes, each stopped as a replacement is placed
    preemptible: bool
    placed: int = 0
    session: PlacementSession | None = None


@dataclass(slots=True)
class _NamespaceUsage:
    cpu: float = 0.0
    memory: int = 0
    tasks: int = 0

    def add(self, request: Request, count: int) -> None:
        self.cpu += count * request.cpu
        self.memory += count * request.memory
        self.tasks += count

    def exceeded(self, quota: Quota, request: Request) -> str | None:
        """Which bound one more ``request`` would break, said plainly; None when it fits."""
        # The same hair of tolerance as at apply time, so 10 x 0.1 cores fits 1 core.
        if quota.cpu is not None and self.cpu + request.cpu > quota.cpu + 1e-9:
            return f"cpu {round(self.cpu, 6):g}/{quota.cpu:g} cores used, a task needs {request.cpu:g}"
        if quota.memory is not None and self.memory + request.memory > quota.memory:
            return (
                f"memory {format_memory(self.memory)}/{format_memory(quota.memory)} used, "
                f"a task needs {format_memory(request.memory)}"
            )
        if quota.tasks is not None and self.tasks + 1 > quota.tasks:
            return f"tasks {self.tasks}/{quota.tasks} used"
        return None


def _crowding_of(tasks: Sequence[Task], nodes: Mapping[str, Node], spread_by: str | None):
    """One deployment's replicas per node and per ``spread_by`` domain, and node id -> domain."""
    per_node = Counter(t.node_id for t in tasks)
    per_domain: Counter[str | None] = Counter()

    def domain_of(node_id: str) -> str | None:
        node = nodes.get(node_id)
        return node.labels.get(spread_by) if spread_by and node is not None else None

    if spread_by:
        for node_id, count in per_node.items():
            per_domain[domain_of(node_id)] += count
    return per_node, per_domain, domain_of


def _surplus_to_stop(
    tasks: list[Task], extra: int, want: Desired, nodes: Mapping[str, Node], now: float, policy: RebalancePolicy
) -> tuple[list[Task], int, str]:
    """For a rebalanced deployment holding ``extra`` too many: (tasks to stop, how many
    starting tasks are waited for as moves in flight, the stop reason)."""
    starting = sorted(
        (t for t in tasks if t.state in _STARTING and now - t.created_at <= policy.start_timeout),
        key=lambda t: (-t.created_at, t.task_id),
    )
    # Moves are only ever made for two replicas or more: below that nothing is waited for.
    wait_for = min(extra, policy.max_moves_per_deployment) if want.spec.replicas >= 2 else 0
    waited = {t.task_id for t in starting[:wait_for]}
    candidates = [t for t in tasks if t.task_id not in waited]
    count = extra - len(waited)
    spread_by = want.spec.placement.spread_by
    per_node, per_domain, domain_of = _crowding_of(tasks, nodes, spread_by)

    def crowding(t: Task) -> int:
        return per_node[t.node_id] + (per_domain[domain_of(t.node_id)] if spread_by else 0)

    # Crowding only falls as tasks are taken, so a stale heap key is never too late: pop,
    # and take it if its key still holds, else push it back with the fresh one.
    heap = [(_STOP_PREFERENCE.get(t.state, 0), -crowding(t), -t.created_at, t.task_id, i) for i, t in enumerate(candidates)]
    heapq.heapify(heap)
    victims: list[Task] = []
    while len(victims) < count:
        entry = heapq.heappop(heap)
        task = candidates[entry[4]]
        fresh = -crowding(task)
        if fresh != entry[1]:
            heapq.heappush(heap, (entry[0], fresh, *entry[2:]))
            continue
        victims.append(task)
        per_node[task.node_id] -= 1
        if spread_by:
            per_domain[domain_of(task.node_id)] -= 1

    reason = f"scaled down to {want.spec.replicas}"
    if extra == 1 and not waited and victims:
        plain = min(candidates, key=lambda t: (_STOP_PREFERENCE.get(t.state, 0), -t.created_at, t.task_id))
        newest = max(tasks, key=lambda t: (t.created_at, t.task_id))
        if victims[0] is not plain and newest.node_id != victims[0].node_id:
            reason = f"rebalanced to node {newest.node_id}"
    return victims, len(waited), reason


def _rebalance_candidates(
    desired, kept, leaving, lost, nodes: Mapping[str, Node], schedulable: list[Node], margin: int, rebalanced
) -> list[str]:
    """Deployments that may have a move to make, by key: a cheap test on counts alone (no
    filters), so a converged round builds no placer unless some deployment is skewed enough."""
    domains: dict[str, set[str]] = {}
    schedulable_ids = {n.node_id for n in schedulable}
    if not schedulable_ids:
        return []
    out = []
    for key in sorted(desired):
        want = desired[key]
        tasks = kept.get(key, ())
        replicas = want.spec.replicas
        if (
            replicas < 2
            or len(tasks) != replicas
            or key in leaving
            or lost.get(key)
            or not rebalanced(want)
            or any(t.state is not TaskState.RUNNING for t in tasks)
        ):
            continue
        per_node = Counter(t.node_id for t in tasks)
        on_schedulable = [count for node_id, count in per_node.items() if node_id in schedulable_ids]
        least = min(on_schedulable) if len(on_schedulable) == len(schedulable_ids) else 0
        if max(per_node.values()) - least >= margin:
            out.append(key)
            continue
        spread_by = want.spec.placement.spread_by
        if spread_by:
            if spread_by not in domains:
                domains[spread_by] = {d for n in schedulable if (d := n.labels.get(spread_by)) is not None}
            per_domain: Counter[str | None] = Counter()
            for t in tasks:
                node = nodes.get(t.node_id)
                per_domain[node.labels.get(spread_by) if node is not None else None] += 1
            least_domain = min((per_domain[d] for d in domains[spread_by]), default=0)
            if max(per_domain.values()) - least_domain >= margin:
                out.append(key)
    return out


def _plan_moves(
    key: str,
    want: Desired,
    tasks: list[Task],
    nodes: Mapping[str, Node],
    placer: Placer,
    request: Request,
    rng: random.Random,
    limit: int,
    margin: int,
) -> list[Place]:
    """Up to ``limit`` moves for one deployment, each the best by the rule in the module
    docstring; the new copies are placed, their old ones are left to a later round."""
    spread_by = want.spec.placement.spread_by
    per_node, per_domain, domain_of = _crowding_of(tasks, nodes, spread_by)
    session = placer.session(request)
    moves: list[Place] = []
    while len(moves) < limit:
        best: tuple[tuple[int, int, str], str, int] | None = None
        targets: list[tuple[str | None, int, int, str]] = []  # (domain, count, node index, node id)
        groups = set()
        for rank, (_, index) in enumerate(session.feasible_nodes()):
            node = placer.nodes[index]
            domain = node.labels.get(spread_by) if spread_by else None
            if spread_by and domain is None:
                continue  # no domain: topology spread would not count it as spreading
            group = (domain, per_node[node.node_id])
            if group not in groups:  # the best-scored node of each kind is enough
                groups.add(group)
                targets.append((domain, per_node[node.node_id], rank, node.node_id))
        for source in sorted((n for n, c in per_node.items() if c > 0), key=lambda n: (-per_node[n], n)):
            count_s, domain_s = per_node[source], domain_of(source)
            for domain_t, count_t, rank, target in targets:
                if target == source:
                    continue
                if spread_by:
                    same = domain_s == domain_t
                    gap = per_domain[domain_s] - per_domain[domain_t]
                    by_node = count_s - count_t >= margin and (same or gap >= 1)
                    by_domain = not same and gap >= margin and count_s - count_t >= 1
                    if not (by_node or by_domain):
                        continue
                    gain = 2 * (count_s - count_t - 1) + (0 if same else 2 * (gap - 1))
                else:
                    if count_s - count_t < margin:
                        continue
                    gain = 2 * (count_s - count_t - 1)
                order = (-gain, rank, source)
                if best is None or order < best[0]:
                    best = (order, source, placer.index_of[target])
        if best is None:
            break
        _, source, index = best
        target = placer.nodes[index].node_id
        detail = f"{source} holds {per_node[source]}, {target} {per_node[target]}"
        if spread_by:
            domain_s, domain_t = domain_of(source), domain_of(target)
            detail += f"; {spread_by} {domain_s} holds {per_domain[domain_s]}, {domain_t} {per_domain[domain_t]}"
        decision = session.place_at(index)
        moves.append(Place(new_task_id(want.name, rng), key, target, f"rebalancing: {detail}", decision.parts))
        per_node[source] -= 1
        per_node[target] += 1
        if spread_by:
            per_domain[domain_of(source)] -= 1
            per_domain[domain_of(target)] += 1
    return moves


def node_status(last_heartbeat: float | None, known_since: float, now: float, grace: float) -> NodeStatus:
    """READY within the grace of a heartbeat; UNKNOWN while a node never heard from is within
    the grace of when the scheduler learnt of it; DOWN after that."""
    if last_heartbeat is not None and now - last_heartbeat <= grace:
        return NodeStatus.READY
    if last_heartbeat is None and now - known_since <= grace:
        return NodeStatus.UNKNOWN
    return NodeStatus.DOWN


__all__ = ["reconcile", "node_status", "new_task_id", "Node", "RebalancePolicy", "DEFAULT_REBALANCE"]
