"""Node agent settings: the common ones plus the ``COMP_NODEAGENT__...`` group."""

from __future__ import annotations

import re
import socket

from pydantic import BaseModel, Field, field_validator, model_validator

from comp_common.manifest import DNS_LABEL
from comp_common.quantities import parse_optional_cpu, parse_optional_memory
from comp_common.settings import CommonSettings


def sanitise_node_id(name: str) -> str:
    """A DNS label from a hostname: node ids are subject tokens and container label values."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "node"


def default_node_id() -> str:
    return sanitise_node_id(socket.gethostname())


class NodeAgentGroup(BaseModel):
    node_id: str = Field(default_factory=default_node_id)
    # Name of the runtime driver in comp_nodeagent.driver.DRIVERS.
    driver: str = "docker"
    # Period of the level-triggered pass that repairs whatever nudges and events missed.
    resync_seconds: float = Field(default=5.0, gt=0)
    # Engine operations (pull, create, start, stop) running at once.
    parallelism: int = Field(default=8, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    # Overrides of what the engine reports, e.g. to reserve part of the host for itself.
    cpu: float | None = None
    memory: int | None = None
    # Where this node's published ports are reachable, as told to the rest of the cluster.
    address: str = "127.0.0.1"
    stop_grace_seconds: float = Field(default=10.0, ge=0)
    restart_backoff_max_seconds: float = Field(default=30.0, gt=0)
    # Agents in this process.  Above 1 (hollow driver only, for scale tests) the nodes are
    # ``<node_id>-1`` ... ``<node_id>-<count>``, all sharing one NATS connection.
    count: int = Field(default=1, ge=1)
    # Simulated engine time to start one task, in the hollow driver.
    hollow_start_seconds: float = Field(default=0.0, ge=0)

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if not re.match(DNS_LABEL, value) or len(value) > 63:
            raise ValueError(f"node_id {value!r} must be a DNS label (lowercase letters, digits and '-')")
        return value

    @model_validator(mode="after")
    def _fleet(self) -> NodeAgentGroup:
        if self.count > 1:
            if self.driver != "hollow":
                # N agents on one real engine would each report the whole host as theirs.
                raise ValueError(f"count {self.count} needs the hollow driver (driver is {self.driver!r})")
            longest = f"{self.node_id}-{self.count}"
            if len(longest) > 63:
                raise ValueError(f"node id {longest!r} would be longer than 63 characters; use a shorter node_id")
        return self

    def node_ids(self) -> list[str]:
        """The ids of the nodes this process runs."""
        if self.count == 1:
            return [self.node_id]
        return [f"{self.node_id}-{i}" for i in range(1, self.count + 1)]

    _cpu = field_validator("cpu", mode="before")(parse_optional_cpu)
    _memory = field_validator("memory", mode="before")(parse_optional_memory)


class NodeAgentSettings(CommonSettings):
    nodeagent: NodeAgentGroup = Field(default_factory=NodeAgentGroup)
