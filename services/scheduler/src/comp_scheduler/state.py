"""What the scheduler service knows, and the snapshots it hands to ``reconcile``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from comp_common.messages import NodeControl, DeploymentRecord, Heartbeat, NodeAssignments, TaskSpec, TaskState, TaskStatus
from comp_common.observed import DeploymentStatus, NodeRecord

from .model import Desired, Node, NodeStatus, Observed, Taint, Task
from .reconcile import node_status


@dataclass
class NodeEntry:
    known_since: float
    record: NodeRecord | None = None  # None until the first heartbeat
    status: NodeStatus = NodeStatus.UNKNOWN


@dataclass
class ClusterState:
    grace_seconds: float
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

    # ---- inputs --------------------------------------------------------------------
    def load_assignments(self, node_id: str, value: NodeAssignments, revision: int | None, now: float) -> None:
        self.assignments[node_id] = (value, revision)
        self.nodes.setdefault(node_id, NodeEntry(known_since=now))
        for spec in value.tasks:
            self.statuses.setdefault(spec.task_id, _pending(spec, node_id, now))

    def replace_assignments(self, found: Mapping[str, tuple[NodeAssignments, int]], now: float) -> None:
        """Take every node's assignments as the bucket holds them: another scheduler may have
        written them since this one last looked (it is becoming leader, or standing by).

        A task this state knew that is no longer assigned anywhere is kept visible as
        stopping until its node confirms it gone, as if this scheduler had removed it.
        """
        for node_id in set(self.assignments) - set(found):
            del self.assignments[node_id]
        for node_id, (value, revision) in found.items():
            self.load_assignments(node_id, value, revision, now)
        assigned = {spec.task_id for value, _ in self.assignments.values() for spec in value.tasks}
        for task_id in [t for t in self.stopping if t in assigned]:
            del self.stopping[task_id]
        for task_id, status in self.statuses.items():
            if task_id not in assigned and task_id not in self.stopping:
                self.stopping[task_id] = status.node_id

    def record_heartbeat(self, hb: Heartbeat, now: float) -> tuple[bool, list[TaskStatus], list[str]]:
        """Returns (node became ready, statuses that changed, stopping tasks now gone)."""
        entry = self.nodes.setdefault(hb.node_id, NodeEntry(known_since=now))
        was_ready = entry.status is NodeStatus.READY
        entry.record = NodeRecord.from_heartbeat(hb, now)
        entry.status = NodeStatus.READY
        assigned = self.assigned_ids(hb.node_id)
        changed = []
        for status in hb.tasks:
            if status.task_id in assigned and self._update_status(status):
                changed.append(status)
        reported = {s.task_id for s in hb.tasks}
        gone = [t for t, n in self.stopping.items() if n == hb.node_id and t not in reported]
        for task_id in gone:
            del self.stopping[task_id]
            self.statuses.pop(task_id, None)
        return not was_ready, changed, gone

    def record_status(self, status: TaskStatus) -> str:
        """'changed', 'gone' (a stopped task to forget), or 'ignored'."""
        assigned = status.task_id in self.assigned_ids(status.node_id)
        if status.state is TaskState.STOPPED and not assigned:
            self.stopping.pop(status.task_id, None)
            return "gone" if self.statuses.pop(status.task_id, None) is not None else "ignored"
        if not assigned or status.task_id in self.stopping:
            return "ignored"
        return "changed" if self._update_status(status) else "ignored"

    def _update_status(self, status: TaskStatus) -> bool:
        old = self.statuses.get(status.task_id)
        if old is not None and old.model_dump(exclude={"updated_at"}) == status.model_dump(exclude={"updated_at"}):
            return False
        self.statuses[status.task_id] = status
        return True

    def refresh_liveness(self, now: float) -> tuple[list[str], list[str]]:
        """Re-derive each node's status; returns (went down, came up)."""
        down, up = [], []
        for node_id, entry in self.nodes.items():
            last = entry.record.last_heartbeat if entry.record else None
            status = node_status(last, entry.known_since, now, self.grace_seconds)
            if status is not entry.status:
                (down if status is NodeStatus.DOWN else up).append(node_id)
                entry.status = status
        for node_id in down:
            for task_id in [t for t, n in self.stopping.items() if n == node_id]:
                del self.stopping[task_id]
                self.statuses.pop(task_id, None)
        return down, up

    # ---- views -----------------------------------------------------------------------
    def assigned_ids(self, node_id: str) -> set[str]:
        found = self.assignments.get(node_id)
        return {t.task_id for t in found[0].tasks} if found else set()

    def draining_nodes(self) -> set[str]:
        return {node_id for node_id, control in self.node_controls.items() if control.draining}

    def desired_view(self) -> dict[str, Desired]:
        return {
            key: Desired(
                key=key,
                name=rec.deployment.metadata.name,
                spec=rec.deployment.spec,
                spec_hash=rec.deployment.spec.task_hash(),
                generation=rec.generation,
            )
            for key, rec in self.desired.items()
        }

    def snapshot(self) -> Observed:
        nodes = {}
        for node_id, entry in self.nodes.items():
            record = entry.record
            nodes[node_id] = Node(
                node_id=node_id,
                status=entry.status,
                cpu=record.capacity.cpu if record else 0.0,
                memory=record.capacity.memory if record else 0,
                labels=MappingProxyType(dict(record.labels)) if record else MappingProxyType({}),
                taints=frozenset(Taint(t.key, t.value, t.effect) for t in record.taints) if record else frozenset(),
                cordoned=control.cordoned if (control := self.node_controls.get(node_id)) else False,
                draining=control.draining if control else False,
            )
        tasks = {}
        for node_id, (value, _) in self.assignments.items():
            for spec in value.tasks:
                status = self.statuses.get(spec.task_id)
                tasks[spec.task_id] = Task(
                    task_id=spec.task_id,
                    deployment=spec.deployment,
                    node_id=node_id,
                    spec_hash=spec.spec_hash,
                    cpu=spec.cpu,
                    memory=spec.memory,
                    host_ports=frozenset((p.host_port, p.protocol) for p in spec.ports if p.host_port),
                    created_at=spec.created_at,
                    state=status.state if status else TaskState.PENDING,
                )
        return Observed(nodes=MappingProxyType(nodes), tasks=MappingProxyType(tasks))

    def deployment_statuses(self, now: float) -> list[DeploymentStatus]:
        placed: dict[str, int] = {}
        running: dict[str, int] = {}
        for node_id, (value, _) in self.assignments.items():
            for spec in value.tasks:
                placed[spec.deployment] = placed.get(spec.deployment, 0) + 1
                status = self.statuses.get(spec.task_id)
                if status is not None and status.state is TaskState.RUNNING:
                    running[spec.deployment] = running.get(spec.deployment, 0) + 1
        return [
            DeploymentStatus(
                deployment=key,
                desired=rec.deployment.spec.replicas,
                placed=placed.get(key, 0),
                running=running.get(key, 0),
                pending_reason=self.pending_reasons.get(key, ""),
                updated_at=now,
            )
            for key, rec in self.desired.items()
        ]


def _pending(spec: TaskSpec, node_id: str, now: float) -> TaskStatus:
    return TaskStatus(task_id=spec.task_id, node_id=node_id, deployment=spec.deployment, state=TaskState.PENDING, updated_at=now)
