"""What the scheduler service knows, and the snapshots it hands to ``reconcile``."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from pydantic import TypeAdapter

from comp_common.messages import (
    DeploymentRecord,
    Heartbeat,
    NamespaceRecord,
    NodeAssignments,
    NodeControl,
    TaskSpec,
    TaskState,
    TaskStatus,
)
from comp_common.observed import DeploymentStatus, NodeRecord

from .model import Desired, Node, NodeStatus, Observed, Taint, Task
from .reconcile import node_status


@dataclass(frozen=True)
class DisruptionPolicy:
    """When at least ``fraction`` of the ready nodes (and ``min_nodes`` or more are ready)
    would go down within one grace period (a stall makes nodes late one heartbeat slot after
    another, so a wave spans many checks), no more do, for up to ``hold_seconds``: that many is
    likelier the network, NATS or this scheduler than the nodes, and replacing their tasks
    would only move load onto nodes just as unreachable.  Kubernetes' node lifecycle
    controller stops evicting for the same reason (its threshold is 0.55).  After the hold
    they go down as usual, so a real mass failure is only delayed."""

    fraction: float = 0.55
    min_nodes: int = 20
    hold_seconds: float = 30.0


@dataclass
class NodeEntry:
    known_since: float
    record: NodeRecord | None = None  # None until the first heartbeat
    status: NodeStatus = NodeStatus.UNKNOWN
    answers_pings: bool = False  # as its last heartbeat said
    # The heartbeat time it was last pinged after: one ping per silence.
    pinged_after: float | None = None


@dataclass
class ClusterState:
    grace_seconds: float
    # How late a node that answers pings is pinged (0: never); see NodeLivenessSettings.
    ping_after_seconds: float = 0.0
    disruption: DisruptionPolicy = DisruptionPolicy()
    # Since when nodes are held up by the disruption policy (None: none are).
    holding_since: float | None = None
    # When each node that went down from ready within the last grace period did.
    _recent_downs: deque[float] = field(init=False, repr=False, default_factory=deque)
    desired: dict[str, DeploymentRecord] = field(default_factory=dict)
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    # node id -> (assignments, KV revision or None when the key does not exist yet)
    assignments: dict[str, tuple[NodeAssignments, int | None]] = field(default_factory=dict)
    statuses: dict[str, TaskStatus] = field(default_factory=dict)
    # Removed from assignments; kept visible until its node confirms it is gone.
    stopping: dict[str, str] = field(default_factory=dict)
    pending_reasons: dict[str, str] = field(default_factory=dict)
    # What operators asked of nodes (cordon, drain), from the node-controls bucket.
    node_controls: dict[str, NodeControl] = field(default_factory=dict)
    # Namespace name -> its record (quota), from the namespaces bucket.
    namespaces: dict[str, NamespaceRecord] = field(default_factory=dict)
    # Deployment -> (generation, whether that generation's revision ran healthy, or has no
    # revision record).  Read from the revisions bucket on deployment events and resyncs,
    # never per round; a generation once settled stays so (healthy_at is never unset).
    settled: dict[str, tuple[int, bool]] = field(default_factory=dict)
    # Deployment -> (generation, task ids a rollout step of that generation counted healthy).
    seen_healthy: dict[str, tuple[int, frozenset[str]]] = field(default_factory=dict)
    # Deployment -> (generation, rollout state, message) as last planned or acted on: shown
    # in the deployment's summary.
    rollout_status: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # Deployments whose summary may differ from the one last taken by deployment_statuses().
    touched: set[str] = field(default_factory=set)
    # deployment -> its assigned task ids, kept with ``assignments`` (set_assignments) so
    # that a summary counts one deployment's tasks, not every task in the cluster.
    _assigned: dict[str, set[str]] = field(init=False, repr=False, default_factory=dict)
    # (deadline, node id), at most one entry per node that can still go down: the liveness
    # check looks only at nodes whose deadline has passed, and knows when the next one is.
    _deadlines: list[tuple[float, str]] = field(init=False, repr=False, default_factory=list)
    _queued: set[str] = field(init=False, repr=False, default_factory=set)
    # The same, for when a node that answers pings is late enough to be pinged.
    _ping_deadlines: list[tuple[float, str]] = field(init=False, repr=False, default_factory=list)
    _ping_queued: set[str] = field(init=False, repr=False, default_factory=set)
    # node id -> (its assignments value, Task values built from it), reused by snapshot()
    # while the value is the same object.
    _tasks_of: dict[str, tuple[NodeAssignments, dict[str, Task]]] = field(init=False, repr=False, default_factory=dict)
    # node id -> (record, status, control, the Node built from them): see snapshot.
    _node_of: dict[str, tuple[NodeRecord | None, NodeStatus, NodeControl | None, Node]] = field(init=False, repr=False, default_factory=dict)
    # node id -> its assigned task ids, asked for on every heartbeat
    _ids_of: dict[str, frozenset[str]] = field(init=False, repr=False, default_factory=dict)

    # ---- inputs --------------------------------------------------------------------
    def set_assignments(self, node_id: str, value: NodeAssignments, revision: int | None) -> None:
        """The one way ``assignments`` changes: keeps the per-deployment index and marks
        the deployments whose task set changed."""
        old = self.assignments.get(node_id)
        old_ids = {(t.task_id, t.deployment) for t in old[0].tasks} if old else set()
        new_ids = {(t.task_id, t.deployment) for t in value.tasks}
        for task_id, deployment in old_ids - new_ids:
            self._assigned.get(deployment, set()).discard(task_id)
            self.touched.add(deployment)
        for task_id, deployment in new_ids - old_ids:
            self._assigned.setdefault(deployment, set()).add(task_id)
            self.touched.add(deployment)
        self.assignments[node_id] = (value, revision)
        self._ids_of[node_id] = frozenset(t for t, _ in new_ids)

    def drop_assignments(self, node_id: str) -> None:
        if node_id in self.assignments:
            self.set_assignments(node_id, NodeAssignments(node_id=node_id), None)
            del self.assignments[node_id]
            del self._ids_of[node_id]

    def node_entry(self, node_id: str, now: float) -> NodeEntry:
        entry = self.nodes.get(node_id)
        if entry is None:
            entry = self.nodes[node_id] = NodeEntry(known_since=now)
            self._queue_deadline(node_id, now + self.grace_seconds)
        return entry

    def load_assignments(self, node_id: str, value: NodeAssignments, revision: int | None, now: float) -> None:
        self.set_assignments(node_id, value, revision)
        self.node_entry(node_id, now)
        for spec in value.tasks:
            if spec.task_id not in self.statuses:
                self.statuses[spec.task_id] = _pending(spec, node_id, now)
                self.touched.add(spec.deployment)

    def replace_assignments(self, found: Mapping[str, tuple[NodeAssignments, int]], now: float) -> None:
        """Take every node's assignments as the bucket holds them: another scheduler may have
        written them since this one last looked (it is becoming leader, or standing by).

        A task this state knew that is no longer assigned anywhere is kept visible as
        stopping until its node confirms it gone, as if this scheduler had removed it.
        """
        for node_id in set(self.assignments) - set(found):
            self.drop_assignments(node_id)
        for node_id, (value, revision) in found.items():
            self.load_assignments(node_id, value, revision, now)
        assigned = {spec.task_id for value, _ in self.assignments.values() for spec in value.tasks}
        for task_id in [t for t in self.stopping if t in assigned]:
            del self.stopping[task_id]
        for task_id, status in self.statuses.items():
            if task_id not in assigned and task_id not in self.stopping:
                self.stopping[task_id] = status.node_id

    def record_heartbeat(
        self, hb: Heartbeat, now: float, before: dict[str, TaskStatus | None] | None = None
    ) -> tuple[bool, list[TaskStatus], list[str]]:
        """Returns (node became ready, statuses that changed, stopping tasks now gone: only a
        full heartbeat says which are); with
        ``before``, fills it with what each changed status replaced (None: there was none)."""
        entry = self.node_entry(hb.node_id, now)
        was_ready = entry.status is NodeStatus.READY
        if entry.record is not None and entry.record.describes(hb):
            # The same record, a new time: its identity stays, which the snapshot's cache of
            # Node values relies on, and only the time is written to Redis.
            entry.record.last_heartbeat = now
        else:
            entry.record = NodeRecord.from_heartbeat(hb, now)
        entry.status = NodeStatus.READY
        if hb.node_id not in self._queued:  # it was down: it can go down again
            self._queue_deadline(hb.node_id, now + self.grace_seconds)
        entry.answers_pings = hb.answers_pings
        if hb.answers_pings and self.ping_after_seconds > 0 and hb.node_id not in self._ping_queued:
            heapq.heappush(self._ping_deadlines, (now + self.ping_after_seconds, hb.node_id))
            self._ping_queued.add(hb.node_id)
        assigned = self.assigned_ids(hb.node_id)
        changed = []
        for status in hb.tasks:
            if status.task_id in assigned:
                old = self.statuses.get(status.task_id)
                if self._update_status(status):
                    changed.append(status)
                    if before is not None:
                        before[status.task_id] = old
        gone = []
        if self.stopping and hb.full:
            reported = {s.task_id for s in hb.tasks}
            gone = [t for t, n in self.stopping.items() if n == hb.node_id and t not in reported]
            for task_id in gone:
                del self.stopping[task_id]
                self._forget_status(task_id)
        return not was_ready, changed, gone

    def record_status(self, status: TaskStatus) -> str:
        """'changed', 'gone' (a stopped task to forget), or 'ignored'."""
        assigned = status.task_id in self.assigned_ids(status.node_id)
        if status.state is TaskState.STOPPED and not assigned:
            self.stopping.pop(status.task_id, None)
            return "gone" if self._forget_status(status.task_id) else "ignored"
        if not assigned or status.task_id in self.stopping:
            return "ignored"
        return "changed" if self._update_status(status) else "ignored"

    def _update_status(self, status: TaskStatus) -> bool:
        old = self.statuses.get(status.task_id)
        if old is status:  # the same parsed status again (HeartbeatParser)
            return False
        # Every field but updated_at, compared directly: a heartbeat repeats each status every
        # second, and two model_dumps per status were most of the cost of a heartbeat.
        if old is not None and _status_key(old) == _status_key(status):
            # Keep the heartbeat's own object: its next heartbeat (parsed once, reused) then
            # matches by identity, without comparing fields again.
            self.statuses[status.task_id] = status
            return False
        self.statuses[status.task_id] = status
        self.touched.add(status.deployment)
        if old is not None and old.deployment != status.deployment:
            self.touched.add(old.deployment)
        return True

    def _forget_status(self, task_id: str) -> bool:
        old = self.statuses.pop(task_id, None)
        if old is None:
            return False
        self.touched.add(old.deployment)
        return True

    # ---- liveness --------------------------------------------------------------------
    def _deadline_of(self, entry: NodeEntry) -> float:
        last = entry.record.last_heartbeat if entry.record else None
        return (last if last is not None else entry.known_since) + self.grace_seconds

    def _queue_deadline(self, node_id: str, deadline: float) -> None:
        heapq.heappush(self._deadlines, (deadline, node_id))
        self._queued.add(node_id)

    def next_deadline(self) -> float | None:
        """When the next node would go down if no heartbeat comes from it first; None: no node can."""
        return self._deadlines[0][0] if self._deadlines else None

    def overdue(self, now: float) -> list[str]:
        """Nodes past their deadline (heartbeats included) whose status is not DOWN yet."""
        due, requeue = [], []
        while self._deadlines and self._deadlines[0][0] < now:
            _, node_id = heapq.heappop(self._deadlines)
            entry = self.nodes.get(node_id)
            if entry is None or entry.status is NodeStatus.DOWN:
                self._queued.discard(node_id)
                continue
            deadline = self._deadline_of(entry)
            requeue.append((deadline, node_id))
            if deadline < now:
                due.append(node_id)
        for item in requeue:
            heapq.heappush(self._deadlines, item)
        return due

    def next_ping(self) -> float | None:
        """When the next node would be late enough to ping; None: none would."""
        return self._ping_deadlines[0][0] if self._ping_deadlines else None

    def due_for_ping(self, now: float) -> list[str]:
        """Ready nodes that answer pings and whose last heartbeat is ``ping_after_seconds``
        old, each once per silence: the next heartbeat makes it eligible again."""
        due, requeue = [], []
        while self._ping_deadlines and self._ping_deadlines[0][0] < now:
            _, node_id = heapq.heappop(self._ping_deadlines)
            entry = self.nodes.get(node_id)
            last = entry.record.last_heartbeat if entry and entry.record else None
            if entry is None or last is None or entry.status is not NodeStatus.READY or not entry.answers_pings:
                self._ping_queued.discard(node_id)
            elif last + self.ping_after_seconds >= now:
                requeue.append((last + self.ping_after_seconds, node_id))
            elif entry.pinged_after != last:
                entry.pinged_after = last
                due.append(node_id)
                self._ping_queued.discard(node_id)
            else:
                self._ping_queued.discard(node_id)
        for item in requeue:
            heapq.heappush(self._ping_deadlines, item)
        return due

    def still_silent(self, node_ids: Iterable[str]) -> list[str]:
        """Those of ``node_ids`` (from due_for_ping) with no heartbeat since."""
        return [
            n for n in node_ids
            if (e := self.nodes.get(n)) and e.record and e.status is NodeStatus.READY and e.record.last_heartbeat == e.pinged_after
        ]

    def mark_unreachable(self, node_ids: Iterable[str], asked_at: float, now: float) -> list[str]:
        """The server had no subscriber for these nodes' pings at ``asked_at``: each is down,
        unless a heartbeat came in since (its agent reconnected) or the disruption policy
        holds them.  Returns those that went down."""
        down = [
            n for n in node_ids
            if (e := self.nodes.get(n)) is not None and e.record is not None
            and e.status is NodeStatus.READY and e.record.last_heartbeat < asked_at
        ]
        if not down or self._hold(len(down), now):
            return []
        for node_id in down:
            self.nodes[node_id].status = NodeStatus.DOWN
        self._went_down(down)
        return down

    def refresh_liveness(self, now: float) -> tuple[list[str], list[str]]:
        """Re-derive the status of each node whose deadline has passed; returns (went down,
        came up).  Only those: every other node heard from within the grace is as it was."""
        down, up = [], []
        for node_id in self.overdue(now):
            entry = self.nodes[node_id]
            last = entry.record.last_heartbeat if entry.record else None
            status = node_status(last, entry.known_since, now, self.grace_seconds)
            if status is not entry.status:
                (down if status is NodeStatus.DOWN else up).append(node_id)
        for node_id in up:
            self.nodes[node_id].status = NodeStatus.READY
        ready_down = [n for n in down if self.nodes[n].status is NodeStatus.READY]
        if not ready_down:
            self.holding_since = None  # whatever was held has been heard from, or is down
        elif self._hold(len(ready_down), now):
            held = set(ready_down)
            down = [n for n in down if n not in held]  # the held stay as they were
        for node_id in down:
            self.nodes[node_id].status = NodeStatus.DOWN
        self._went_down(down)
        return down, up

    def _hold(self, going: int, now: float) -> bool:
        """Whether ``going`` ready nodes going down at once are held (DisruptionPolicy)."""
        policy = self.disruption
        recent = self._recent_downs
        while recent and recent[0] < now - self.grace_seconds:
            recent.popleft()
        ready = sum(1 for e in self.nodes.values() if e.status is NodeStatus.READY)
        wave, base = going + len(recent), ready + len(recent)
        if base < policy.min_nodes or wave < policy.fraction * base:
            self.holding_since = None
            recent.extend([now] * going)
            return False
        if self.holding_since is None:
            self.holding_since = now
        if now - self.holding_since < policy.hold_seconds:
            return True
        recent.extend([now] * going)
        return False

    def _went_down(self, down: list[str]) -> None:
        if down:
            # A down node has no deadline until its next heartbeat queues one again.
            gone = set(down)
            self._deadlines = [(d, n) for d, n in self._deadlines if n not in gone]
            heapq.heapify(self._deadlines)
            self._queued.difference_update(gone)
        for node_id in down:
            for task_id in [t for t, n in self.stopping.items() if n == node_id]:
                del self.stopping[task_id]
                self._forget_status(task_id)

    # ---- views -----------------------------------------------------------------------
    def shown_record(self, entry: NodeEntry) -> NodeRecord:
        """The node as Redis shows it: its last heartbeat, and whether it was declared down
        before its grace ran out (a reader derives the rest of "down" from the time)."""
        assert entry.record is not None
        down = entry.status is NodeStatus.DOWN
        return entry.record if entry.record.down == down else entry.record.model_copy(update={"down": down})

    def assigned_ids(self, node_id: str) -> frozenset[str]:
        return self._ids_of.get(node_id, frozenset())

    def assigned_count(self, deployment: str) -> int:
        return len(self._assigned.get(deployment, ()))

    def draining_nodes(self) -> set[str]:
        return {node_id for node_id, control in self.node_controls.items() if control.draining}

    def desired_view(self) -> dict[str, Desired]:
        return {key: self._desired_of(key, rec) for key, rec in self.desired.items()}

    def _desired_of(self, key: str, rec: DeploymentRecord) -> Desired:
        generation = rec.generation
        settled = self.settled.get(key)
        seen = self.seen_healthy.get(key)
        return Desired(
            key=key,
            name=rec.deployment.metadata.name,
            spec=rec.deployment.spec,
            spec_hash=rec.deployment.spec.task_hash(),
            generation=generation,
            promoted=rec.promoted_generation == generation,
            # Not known (its revision could not be read yet): as if it had no record, so no
            # rollout step is planned on a guess; the next refresh says.
            settled=settled[1] if settled is not None and settled[0] == generation else True,
            seen_healthy=seen[1] if seen is not None and seen[0] == generation else frozenset(),
        )

    def remember_healthy(self, key: str, generation: int, healthy: Iterable[str]) -> None:
        """Add a rollout step's healthy tasks to what its generation has seen healthy; another
        generation's memory goes."""
        seen = self.seen_healthy.get(key)
        known = seen[1] if seen is not None and seen[0] == generation else frozenset()
        ids = known.union(healthy)
        if seen is None or seen[0] != generation or ids != known:
            self.seen_healthy[key] = (generation, ids)

    def set_rollout_status(self, key: str, generation: int, state: str, message: str) -> bool:
        """True when it changed (the deployment's summary is then touched)."""
        value = (generation, state, message)
        if self.rollout_status.get(key) == value:
            return False
        self.rollout_status[key] = value
        self.touched.add(key)
        return True

    def forget_deployment(self, key: str) -> None:
        """Drop what is kept about a deployment beside its record, once it is deleted."""
        self.settled.pop(key, None)
        self.seen_healthy.pop(key, None)
        self.rollout_status.pop(key, None)

    def snapshot(self) -> Observed:
        nodes = {}
        node_of = self._node_of
        for node_id, entry in self.nodes.items():
            record, control = entry.record, self.node_controls.get(node_id)
            cached = node_of.get(node_id)
            # A record is replaced when anything but its time changes (record_heartbeat), and
            # a control when it is set: by identity, the Node of an unchanged node is reused.
            if cached is not None and cached[0] is record and cached[1] is entry.status and cached[2] is control:
                nodes[node_id] = cached[3]
                continue
            node = nodes[node_id] = Node(
                node_id=node_id,
                status=entry.status,
                cpu=record.capacity.cpu if record else 0.0,
                memory=record.capacity.memory if record else 0,
                labels=MappingProxyType(dict(record.labels)) if record else MappingProxyType({}),
                taints=frozenset(Taint(t.key, t.value, t.effect) for t in record.taints) if record else frozenset(),
                cordoned=control.cordoned if control else False,
                draining=control.draining if control else False,
            )
            node_of[node_id] = (record, entry.status, control, node)
        for node_id in [n for n in node_of if n not in self.nodes]:
            del node_of[node_id]
        tasks: dict[str, Task] = {}
        statuses = self.statuses
        for node_id, (value, _) in self.assignments.items():
            cached = self._tasks_of.get(node_id)
            if cached is not None and cached[0] is value:
                # Task values are immutable: the ones of an unchanged assignments value are
                # reused, rebuilt only where the state moved.
                built = cached[1]
                for task_id, task in built.items():
                    status = statuses.get(task_id)
                    if status is None:
                        if task.state is not TaskState.PENDING or task.ready or task.crash_loop:
                            task = built[task_id] = replace(task, **_NO_STATUS)
                    elif (
                        task.state is not status.state
                        or task.ready is not status.ready
                        or task.ready_since != status.ready_since
                        or task.crash_loop is not status.crash_loop
                        or task.exit_code != status.exit_code
                    ):
                        task = built[task_id] = replace(task, **_observed_fields(status))
                    tasks[task_id] = task
                continue
            built = {}
            for spec in value.tasks:
                status = statuses.get(spec.task_id)
                tasks[spec.task_id] = built[spec.task_id] = Task(
                    task_id=spec.task_id,
                    deployment=spec.deployment,
                    node_id=node_id,
                    spec_hash=spec.spec_hash,
                    cpu=spec.cpu,
                    memory=spec.memory,
                    host_ports=frozenset((p.host_port, p.protocol) for p in spec.ports if p.host_port),
                    created_at=spec.created_at,
                    readiness_check=spec.health.readiness is not None,
                    restart=spec.restart.condition,
                    generation=spec.generation,
                    **(_observed_fields(status) if status is not None else _NO_STATUS),
                )
            self._tasks_of[node_id] = (value, built)
        for node_id in [n for n in self._tasks_of if n not in self.assignments]:
            del self._tasks_of[node_id]
        return Observed(nodes=MappingProxyType(nodes), tasks=MappingProxyType(tasks))

    def deployment_statuses(self, now: float, keys: Iterable[str] | None = None) -> list[DeploymentStatus]:
        """Summaries of ``keys`` (default: every desired deployment), counted from the
        assignments and statuses as they are now; only desired deployments have one."""
        wanted = self.desired.keys() if keys is None else [k for k in keys if k in self.desired]
        statuses = self.statuses
        out = []
        for key in wanted:
            assigned = self._assigned.get(key, ())
            running = 0
            for task_id in assigned:
                status = statuses.get(task_id)
                if status is not None and status.state is TaskState.RUNNING:
                    running += 1
            record = self.desired[key]
            rollout = self.rollout_status.get(key)
            shown = rollout is not None and rollout[0] == record.generation
            out.append(
                DeploymentStatus(
                    deployment=key,
                    desired=record.deployment.spec.replicas,
                    placed=len(assigned),
                    running=running,
                    pending_reason=self.pending_reasons.get(key, ""),
                    updated_at=now,
                    generation=record.generation,
                    rollout_state=rollout[1] if shown else "",
                    rollout_message=rollout[2] if shown else "",
                )
            )
        return out

    def take_touched(self) -> set[str]:
        """The deployments touched since the last call; the caller summarises them."""
        touched, self.touched = self.touched, set()
        return touched


_TASKS_FIELD = b',"tasks":['
_TASK_LIST = TypeAdapter(list[TaskStatus])


class HeartbeatParser:
    """Parses heartbeats, validating a node's full task list only when it differs from the
    last full one.

    A full heartbeat carries every task's status, and between changes it carries the very
    same bytes for them: at 20 tasks a node, validating those was most of what 5,000 full
    heartbeats a second cost.  The list is the body's last field (as the agents serialise a
    Heartbeat); when its bytes equal that node's previous full list, the previous parse is
    reused.  A partial heartbeat's list (the changes, mostly none) is validated.  Anything
    else (another field order, a malformed body) takes the full validation, whose error is
    the one raised.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[bytes, list[TaskStatus]]] = {}

    def parse(self, data: bytes) -> Heartbeat:
        cut = data.rfind(_TASKS_FIELD)
        if cut < 0 or not data.endswith(b"}"):
            return Heartbeat.model_validate_json(data)
        tasks_json = data[cut + len(_TASKS_FIELD) - 1 : -1]
        try:
            head = Heartbeat.model_validate_json(data[:cut] + b"}")
            last = self._last.get(head.node_id) if head.full else None
            if last is not None and last[0] == tasks_json:
                tasks = last[1]
            else:
                # Exactly a list, or not this shape at all (then the full validation decides).
                tasks = _TASK_LIST.validate_json(tasks_json)
                if head.full:  # partial lists (mostly empty) come and go between full ones
                    self._last[head.node_id] = (tasks_json, tasks)
        except ValueError:
            return Heartbeat.model_validate_json(data)
        head.tasks = tasks
        return head


def _status_key(s: TaskStatus) -> tuple:
    # Health is part of it: a readiness flip moves rollouts and start order, and must reach
    # Redis and the rounds like a state change does.
    return (
        s.state, s.node_id, s.deployment, s.message, s.container_id, s.restarts, s.exit_code, s.host_ports,
        s.ready, s.ready_since, s.readiness, s.liveness, s.crash_loop,
    )


# The Task fields a TaskStatus decides, for a task no status has been heard of yet.
_NO_STATUS = {"state": TaskState.PENDING, "ready": False, "ready_since": None, "crash_loop": False, "exit_code": None}


def _observed_fields(status: TaskStatus) -> dict:
    return {
        "state": status.state,
        "ready": status.ready,
        "ready_since": status.ready_since,
        "crash_loop": status.crash_loop,
        "exit_code": status.exit_code,
    }


def _pending(spec: TaskSpec, node_id: str, now: float) -> TaskStatus:
    return TaskStatus(task_id=spec.task_id, node_id=node_id, deployment=spec.deployment, state=TaskState.PENDING, updated_at=now)
