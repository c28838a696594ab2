"""The scheduler's view of the world: immutable values that ``reconcile`` reads.

Built fresh for every round from the service's state, so the pure core can never
mutate what the service holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Mapping

from comp_common.manifest import DeploymentSpec
from comp_common.messages import TaskState

from .rollout import RolloutStep


class NodeStatus(StrEnum):
    READY = "ready"
    # Known from assignments but not heard from yet since the scheduler started: nothing
    # new goes there, and its tasks are not declared lost until the grace has passed.
    UNKNOWN = "unknown"
    DOWN = "down"


@dataclass(frozen=True, slots=True, order=True)
class Taint:
    """New replicas stay off a node with a taint their deployment does not tolerate."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"


@dataclass(frozen=True, slots=True)
class Node:
    node_id: str
    status: NodeStatus
    cpu: float
    memory: int
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    taints: frozenset[Taint] = frozenset()
    # Set by an operator: nothing new is placed on a cordoned node; a draining node is also
    # cordoned, and its tasks move elsewhere, each stopped once its replacement runs.
    cordoned: bool = False
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Task:
    task_id: str
    deployment: str
    node_id: str
    spec_hash: str
    cpu: float
    memory: int
    host_ports: frozenset[tuple[int, str]] = frozenset()
    created_at: float = 0.0
    state: TaskState = TaskState.PENDING
    # Health, for rollouts and start order (TaskStatus.ready, ready_since, crash_loop).
    ready: bool = False
    ready_since: float | None = None
    # Whether the task's spec has a readiness check.  Without one, running is serving; the
    # default keeps a caller that never reports readiness rolling forward on RUNNING alone.
    readiness_check: bool = False
    crash_loop: bool = False
    # The generation the task was created for, where the caller knows it (0: unknown); only
    # ever shown in reasons, as which version a stopped task ran.
    generation: int = 0
    # The task's restart condition (TaskSpec.restart.condition) and, once it has exited, its
    # exit code (TaskStatus.exit_code): together they say whether the agent will run it again.
    restart: str = "always"
    exit_code: int | None = None

    @property
    def finished(self) -> bool:
        """Exited for good: the agent will not start it again (its restart condition is
        ``never``, or ``on-failure`` and it exited 0).  See reconcile on what that means."""
        if self.state is not TaskState.EXITED or self.crash_loop:
            return False
        return self.restart == "never" or (self.restart == "on-failure" and self.exit_code == 0)

    @property
    def succeeded(self) -> bool:
        """Finished, and with exit code 0: it did what it was run for."""
        return self.finished and self.exit_code == 0

    @property
    def serving(self) -> bool:
        """Running, and ready where its spec has a readiness check."""
        return self.state is TaskState.RUNNING and (self.ready or not self.readiness_check)


@dataclass(frozen=True, slots=True)
class Desired:
    """A deployment as the user last applied it."""

    key: str
    name: str
    spec: DeploymentSpec
    spec_hash: str
    generation: int = 1
    # The deployment record's promoted_generation is this generation: its canaries are released.
    promoted: bool = False
    # This generation's revision has healthy_at set: a rollout of it completed.  Until then
    # each round plans a rollout step even with no old task left, so that its deadlines are
    # watched and its completion is reported.  True by default: a caller that tracks no
    # revisions gets a step only while tasks of another spec remain.
    settled: bool = True
    # Task ids an earlier step of this generation's rollout reported healthy
    # (RolloutStep.healthy, remembered by the caller): their healthy_deadline no longer applies.
    seen_healthy: frozenset[str] = frozenset()

    @property
    def host_ports(self) -> frozenset[tuple[int, str]]:
        return frozenset((p.host_port, p.protocol) for p in self.spec.ports if p.host_port)

    @property
    def namespace(self) -> str:
        """The namespace part of ``key`` (``subjects.deployment_key`` is "namespace.name")."""
        suffix = "." + self.name
        if self.key.endswith(suffix) and len(self.key) > len(suffix):
            return self.key[: -len(suffix)]
        return self.key.partition(".")[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class RebalancePolicy:
    """How far reconcile goes, each round, to spread deployments back out (see reconcile)."""

    enabled: bool = True
    # Moves in flight at once, cluster-wide: each holds one extra task until it completes.
    max_moves: int = 4
    max_moves_per_deployment: int = 1
    # A move is made only when the busiest node (or zone, for spread_by) holds at least this
    # many more of the deployment's replicas than the target.  Below 2 a move could be undone
    # by the next one: the spread would ping-pong.
    margin: int = 2
    # A move's new task that has not reached RUNNING this long after it was created is no
    # longer waited for: it is surplus like any other, and the old copy stays.
    start_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.margin < 2:
            raise ValueError("rebalance margin below 2 would let moves undo each other")
        if self.max_moves < 0 or self.max_moves_per_deployment < 0:
            raise ValueError("rebalance move limits cannot be negative")


@dataclass(frozen=True, slots=True)
class Observed:
    nodes: Mapping[str, Node]
    tasks: Mapping[str, Task]  # every assigned task, by id


@dataclass(frozen=True, slots=True)
class Place:
    task_id: str
    deployment: str
    node_id: str
    reason: str
    # Each scorer's part of the chosen node's score, by scorer name, in [0, 1] before weights.
    scores: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    task_id: str
    deployment: str
    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Pending:
    deployment: str
    count: int
    reason: str
    # Filter reason -> how many nodes it rejected, most first; the exact counts behind ``reason``.
    rejections: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    places: tuple[Place, ...] = ()
    stops: tuple[Stop, ...] = ()
    pending: tuple[Pending, ...] = ()
    # (deployment key, the step planned for it this round) for each deployment with tasks of
    # another spec or a generation not yet settled, by key.  The step's stops and starts are
    # already among ``stops`` and ``places``; this is what the caller reports and acts on
    # (events, auto-revert, timers for wake_at, marking the revision healthy).
    rollouts: tuple[tuple[str, RolloutStep], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.places or self.stops)

    def nodes_touched(self) -> set[str]:
        return {p.node_id for p in self.places} | {s.node_id for s in self.stops}
