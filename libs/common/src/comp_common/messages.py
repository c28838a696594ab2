"""Everything that crosses NATS or sits in a KV bucket or Redis, as pydantic models.

Messages ignore unknown fields so that a newer publisher does not break an older
consumer; manifests (see :mod:`comp_common.manifest`) forbid them instead.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .manifest import Deployment, Port


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TaskState(StrEnum):
    PENDING = "pending"  # assigned, not yet seen by the agent
    STARTING = "starting"  # the agent is creating or starting the container
    RUNNING = "running"
    EXITED = "exited"  # the process ended; the agent restarts it
    FAILED = "failed"  # could not start (e.g. image unavailable); the agent retries with backoff
    STOPPED = "stopped"  # removed because it is no longer assigned


class DeploymentRecord(Message):
    """A deployment as stored in the deployments bucket."""

    deployment: Deployment
    generation: int = 1  # bumped when what a replica runs changes (spec.task_hash(); not on replicas or labels)
    created_at: float
    updated_at: float


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


class NodeAssignments(Message):
    """Desired state of one node: every task it should run.  Written only by the scheduler."""

    node_id: str
    version: int = 0
    tasks: list[TaskSpec] = Field(default_factory=list)


class Nudge(Message):
    node_id: str
    version: int


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


class Capacity(Message):
    cpu: float  # cores
    memory: int  # bytes


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
    tasks: int = 0


class PlacementEvent(Message):
    """One reconcile round's decisions for one deployment."""

    deployment: str
    placed: list[dict[str, str]] = Field(default_factory=list)  # task_id, node_id, reason
    stopped: list[dict[str, str]] = Field(default_factory=list)  # task_id, node_id, reason
    pending: int = 0
    pending_reason: str = ""


def node_state(last_heartbeat: float, now: float, grace_seconds: float) -> Literal["ready", "down"]:
    return "ready" if now - last_heartbeat <= grace_seconds else "down"
