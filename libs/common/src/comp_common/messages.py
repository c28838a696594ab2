"""Everything that crosses NATS or sits in a KV bucket or Redis, as pydantic models.

Messages ignore unknown fields so that a newer publisher does not break an older
consumer; manifests (see :mod:`comp_common.manifest`) forbid them instead.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .manifest import Deployment, Health, Port, RestartPolicy, Service, ServiceMode
from .quota import Quota


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TaskState(StrEnum):
    PENDING = "pending"  # assigned, not yet seen by the agent
    STARTING = "starting"  # the agent is creating or starting the container
    RUNNING = "running"
    EXITED = "exited"  # the process ended; the agent restarts it
    FAILED = "failed"  # could not start (e.g. image unavailable); the agent retries with backoff
    STOPPED = "stopped"  # removed because it is no longer assigned


class HealthState(StrEnum):
    NONE = "none"  # the deployment has no check of this kind
    STARTING = "starting"  # checked, no verdict yet (or within the start period)
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class DeploymentRecord(Message):
    """A deployment as stored in the deployments bucket."""

    deployment: Deployment
    # Bumped when what a replica runs changes (spec.task_hash(); not on replicas or labels);
    # it is also the revision number in the deployment's history.
    generation: int = 1
    created_at: float
    updated_at: float
    # Why this generation is the desired one: "applied", "undo to revision 2",
    # "auto-revert: task web-1 failed its readiness check", "rollout aborted".
    change_cause: str = "applied"
    # The generation whose canary `comp rollout promote` released; 0 while none is.
    promoted_generation: int = 0


class RevisionRecord(Message):
    """One version of a deployment as applied, in the revisions bucket (key: deployment key
    and generation), kept after newer ones so that `comp rollout undo` can return to it."""

    deployment: Deployment
    generation: int
    applied_at: float
    change_cause: str = "applied"
    # Set by the scheduler once a rollout of this generation completed with every task
    # healthy: the version auto-revert returns to.
    healthy_at: float | None = None


class DeploymentEvent(Message):
    action: Literal["applied", "deleted"]
    namespace: str
    name: str
    revision: int
    generation: int = 0


class TaskSpec(Message):
    """One replica as its node runs it."""

    task_id: str
    deployment: str  # deployment key, namespace.name
    namespace: str
    name: str
    spec_hash: str
    image: str
    command: list[str] | None = None
    args: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cpu: float
    memory: int
    ports: list[Port] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: float = 0.0
    health: Health = Health()
    restart: RestartPolicy = RestartPolicy()
    stop_signal: str = "SIGTERM"
    stop_grace_seconds: float = 10.0
    # The deployment generation the task was created for (0: written before it was carried);
    # rollout reasons name it, as which version an outdated task ran.
    generation: int = 0


class NodeAssignments(Message):
    """Desired state of one node: every task it should run.  Written only by the scheduler."""

    node_id: str
    version: int = 0
    tasks: list[TaskSpec] = Field(default_factory=list)
    # The fencing epoch of the scheduler that wrote this value (its lease's revision when it
    # became leader); an agent refuses a value older than one it has already accepted.
    # 0: written before epochs existed.
    epoch: int = 0


class Nudge(Message):
    node_id: str
    version: int
    epoch: int = 0  # of the scheduler that sent it


class TaskStatus(Message):
    task_id: str
    node_id: str
    deployment: str
    state: TaskState
    message: str = ""
    container_id: str | None = None
    restarts: int = 0
    exit_code: int | None = None
    # container port/protocol -> host port, as the engine published them
    host_ports: dict[str, int] = Field(default_factory=dict)
    updated_at: float = 0.0
    # Liveness and readiness verdicts; NONE when the deployment has no such check.
    liveness: HealthState = HealthState.NONE
    readiness: HealthState = HealthState.NONE
    # Running and, where there is a readiness check, passing it: what rollouts, start order
    # and (later) traffic count.
    ready: bool = False
    # Since when the task has been ready (None while not): rollouts wait min_healthy_time.
    ready_since: float | None = None
    # The process keeps ending: restarts wait, each longer than the last.
    crash_loop: bool = False
    # The container's address on its engine network, where a service's traffic reaches it
    # (None where the runtime has none, or before the task runs).
    address: str | None = None
    next_restart_at: float | None = None


class Capacity(Message):
    cpu: float  # cores
    memory: int  # bytes


class Taint(Message):
    """Keeps new replicas off a node unless their deployment tolerates it (``key=value:effect``)."""

    key: str
    value: str = ""
    # Only NoSchedule is acted on today; a plain string so that a newer agent's effect does
    # not make its whole heartbeat invalid (the scheduler treats an unknown effect as NoSchedule).
    effect: str = "NoSchedule"

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"


class Heartbeat(Message):
    node_id: str
    seq: int
    sent_at: float
    started_at: float
    driver: str
    address: str = "127.0.0.1"
    capacity: Capacity
    allocated: Capacity
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    # The agent answers requests on ``subjects.node_ping(node_id)``: when a heartbeat is
    # late, the scheduler asks, and "no responders" from the server means the agent's
    # connection is gone (a killed process), so the node need not wait out its grace.
    answers_pings: bool = False
    # True: ``tasks`` is every task the node has (a task it lacks is gone).  False: only the
    # statuses that changed since its previous heartbeat.
    full: bool = True
    # How many tasks the node has (a partial heartbeat lists only some); None from an agent
    # that predates partial heartbeats, whose list is every task.
    task_count: int | None = None
    # Last: the scheduler's HeartbeatParser reuses a node's parsed list while its bytes repeat.
    tasks: list[TaskStatus] = Field(default_factory=list)


class NodeInfo(Message):
    """A node as the API shows it."""

    node_id: str
    state: Literal["ready", "down"]
    last_heartbeat: float
    driver: str
    address: str
    capacity: Capacity
    allocated: Capacity
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    tasks: int = 0


class PlacementEvent(Message):
    """One reconcile round's decisions for one deployment."""

    deployment: str
    placed: list[dict[str, str]] = Field(default_factory=list)  # task_id, node_id, reason
    stopped: list[dict[str, str]] = Field(default_factory=list)  # task_id, node_id, reason
    pending: int = 0
    pending_reason: str = ""
    # Why no node would take the pending replicas: filter reason -> how many nodes it rejected
    # ("insufficient memory": 3, "constraint zone=b": 1).
    rejections: dict[str, int] = Field(default_factory=dict)


class HealthEvent(Message):
    """A task's liveness or readiness verdict changed."""

    task_id: str
    node_id: str
    deployment: str
    check: Literal["liveness", "readiness"]
    state: HealthState
    previous: HealthState
    # What the last probe saw: "GET /index.html on :80 answered 404", "exit 1: ...".
    detail: str = ""
    at: float


class RolloutEvent(Message):
    """A step of a rollout: what it started or stopped, and why; or its end."""

    deployment: str
    generation: int
    from_generation: int | None = None
    state: Literal["progressing", "paused", "complete", "failed", "reverted", "promoted", "aborted"]
    message: str = ""
    started: list[str] = Field(default_factory=list)  # task ids
    stopped: list[str] = Field(default_factory=list)
    at: float


class NamespaceRecord(Message):
    """A namespace as stored in the namespaces bucket; a namespace without one has no quota."""

    name: str
    quota: "Quota" = Field(default_factory=lambda: Quota())
    created_at: float
    updated_at: float


class NodeControl(Message):
    """What an operator asked of a node: cordoned (nothing new placed) and draining (its tasks
    move elsewhere, each stopped only once its replacement runs)."""

    node_id: str
    cordoned: bool = False
    draining: bool = False
    updated_at: float


class ControlEvent(Message):
    kind: Literal["namespace", "node"]
    name: str
    action: str


class LeaseRecord(Message):
    """The value of a leadership lease in the leases bucket (key = the role, e.g. ``scheduler``).

    The KV revision of the write that acquired the lease is the holder's fencing epoch.
    Expiry is judged by the revision not changing for ``lease_seconds`` on the reader's own
    monotonic clock; the wall-clock times here are for people and are never compared
    across hosts.
    """

    holder: str  # unique per process and start
    name: str  # the instance's name, e.g. scheduler-2
    host: str
    pid: int
    lease_seconds: float
    acquired_at: float
    renewed_at: float
    epoch: int = 0  # written from the first renewal on; the acquiring write cannot know its own revision


class LeaderChange(Message):
    """A contender started or stopped leading (``comp.evt.<role>.leader``)."""

    role: str
    holder: str
    name: str
    epoch: int
    state: Literal["leading", "stepped-down"]
    reason: str = ""
    at: float


def node_state(last_heartbeat: float, now: float, grace_seconds: float) -> Literal["ready", "down"]:
    return "ready" if now - last_heartbeat <= grace_seconds else "down"


class ServiceRecord(Message):
    """A service as applied (KV ``comp-services``, key ``namespace.name``)."""

    service: Service
    generation: int = 1
    created_at: float
    updated_at: float


class ServiceEvent(Message):
    """A service applied or deleted (``comp.evt.service.<namespace>.<name>``, api -> discovery)."""

    action: Literal["applied", "deleted"]
    namespace: str
    name: str
    revision: int = 0


class VipAllocation(Message):
    """Which service holds a virtual IP (KV ``comp-vips``, key the address).  Creating the
    key is the allocation: the KV's create-if-absent makes two holders impossible."""

    service: str  # namespace.name
    allocated_at: float


class EndpointPort(Message):
    """A service port as the dataplane programs it (see ``manifest.ServicePort``)."""

    name: str  # ServicePort.key: the user's name, or <protocol>-<port>
    port: int
    protocol: Literal["tcp", "udp"] = "tcp"
    published: int | None = None
    named: bool = False  # the user named it: it has an SRV record


class Endpoint(Message):
    """A ready replica of a service: where its traffic goes."""

    task_id: str
    node_id: str
    address: str
    # EndpointPort.name -> this replica's port for it (a named target port resolves per
    # replica; a port the replica does not have is absent).
    ports: dict[str, int] = Field(default_factory=dict)


class ServiceEndpoints(Message):
    """A service with its virtual IP and ready endpoints, whole (KV ``comp-endpoints``, key
    ``namespace.name``, and ``comp.evt.endpoints.<namespace>.<name>``): each value replaces
    the last, so a consumer that missed some is right again with the next."""

    namespace: str
    name: str
    mode: ServiceMode = "vip"
    vip: str | None = None
    ports: list[EndpointPort] = Field(default_factory=list)
    endpoints: list[Endpoint] = Field(default_factory=list)
    updated_at: float = 0.0
    # W3C traceparent of discovery's span that wrote this value, when a traced task event
    # caused it: the lb's sync continues that trace.  Not part of what the value means.
    trace_parent: str | None = Field(default=None, max_length=128)

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}"


class EndpointCounter(Message):
    """Connections counted by one host's lb (``comp.lb.counters.<namespace>.<name>``)."""

    node_id: str
    port: str  # EndpointPort.name
    target: str  # "" for the service port itself, else the endpoint's "address:port"
    packets: int
    bytes: int


class ServiceLookup(Message):
    """A request on ``comp.discovery.lookup``; the reply is a ServiceEndpoints, or an
    ``{"error": ...}`` object naming what was not found."""

    namespace: str = "default"
    name: str


class TaskUsage(Message):
    """One task's resource use over the last metrics period, from the runtime's counters."""

    task_id: str
    deployment: str
    cpu_cores: float  # average over the period
    cpu_share: float | None = None  # of the task's CPU limit; None without a limit
    memory_bytes: int
    memory_share: float | None = None  # of the task's memory limit


class NodeMetrics(Message):
    """Every running task's usage on a node, and the node's totals
    (``comp.metrics.node.<node>``, every ``COMP_NODEAGENT__METRICS_SECONDS``)."""

    node_id: str
    at: float
    period_seconds: float
    tasks: list[TaskUsage] = Field(default_factory=list)
    cpu_cores: float = 0.0  # sum over the tasks
    memory_bytes: int = 0
    capacity: Capacity | None = None
    allocated: Capacity | None = None


class CustomMetric(Message):
    """A value any service may publish for a deployment's autoscaling
    (``comp.metrics.custom.<namespace>.<deployment>``): ``value`` is the deployment's
    total (queue length, say); the autoscaler divides it by the replicas."""

    name: str  # the policy's ``metric``
    value: float
    at: float


class ServiceRate(Message):
    """Connections a second to a service's port on one host over the last period, from the
    lb's counters (``comp.metrics.service.<namespace>.<name>``)."""

    namespace: str
    name: str
    node_id: str
    at: float
    period_seconds: float
    connections_per_second: float


class AutoscaleDecision(Message):
    """One autoscaler decision with its inputs and reason (``comp.evt.autoscale.<ns>.<name>``;
    the last ones are kept in Redis for ``comp describe deployment``)."""

    deployment: str  # namespace.name
    at: float
    metric: str
    target: float
    observed: float | None
    samples: int  # replicas with a fresh sample
    current: int
    replicas: int
    reason: str
    changed: bool


class CapacityEvent(Message):
    """The set of deployments with tasks the scheduler cannot place changed
    (``comp.evt.capacity``): ``fits`` False while any has, with each one's count and reason
    (no node with enough free cpu, memory, or matching its constraints)."""

    fits: bool
    pending: dict[str, dict[str, str | int]] = Field(default_factory=dict)  # deployment -> {count, reason}
    at: float
