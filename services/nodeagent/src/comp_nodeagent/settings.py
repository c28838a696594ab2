"""Node agent settings: the common ones plus the ``COMP_NODEAGENT__...`` group."""

from __future__ import annotations

import json
import re
import socket
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from comp_common.manifest import DNS_LABEL, LABEL_KEY
from comp_common.messages import Taint
from comp_common.quantities import parse_memory, parse_optional_cpu, parse_optional_memory
from comp_common.settings import CommonSettings


def sanitise_node_id(name: str) -> str:
    """A DNS label from a hostname: node ids are subject tokens and container label values."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "node"


def default_node_id() -> str:
    return sanitise_node_id(socket.gethostname())


# Effects the scheduler acts on.  Others are refused here rather than sent: an operator who
# writes NoExecute expects running tasks to be evicted, and nothing would do that.
TAINT_EFFECTS = ("NoSchedule",)
# A label value's characters: neither ':' nor '=' nor ',', so "key=value:effect" lists
# read back unambiguously.
TAINT_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
TAINT_FORMAT = "key=value:NoSchedule or key:NoSchedule"
DEFAULT_METRICS_SECONDS = 2.0


def parse_taints(raw: Any) -> list[Taint]:
    """Taints from a setting: ``"key=value:Effect,key:Effect"``, a JSON list of such strings or of
    ``{"key", "value", "effect"}`` objects, or a list of either.  An error names the bad entry."""
    if raw is None:
        return []
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            try:
                raw = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"taints {text!r} is not a JSON list: {exc}") from None
        else:
            raw = [part.strip() for part in text.split(",")] if text else []
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"taints must be a comma-separated string or a list, not {type(raw).__name__}")
    taints: list[Taint] = []
    seen: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(raw, start=1):
        taint = _taint(entry, index)
        where = (taint.key, taint.effect)
        if where in seen:
            # One value per key and effect: which one a toleration should match would be a guess.
            raise ValueError(
                f"taints entry {index} ({taint}) repeats key {taint.key!r} with effect {taint.effect} of entry {seen[where]}"
            )
        seen[where] = index
        taints.append(taint)
    return taints


def _taint(entry: Any, index: int) -> Taint:
    what = f"taints entry {index} ({entry!r})"
    if isinstance(entry, Taint):
        key, value, effect = entry.key, entry.value, entry.effect
    elif isinstance(entry, dict):
        unknown = set(entry) - {"key", "value", "effect"}
        if unknown or "key" not in entry:
            raise ValueError(f"{what}: an object needs \"key\" and may have \"value\" and \"effect\" only")
        key, value, effect = entry["key"], entry.get("value", ""), entry.get("effect", "NoSchedule")
        if not all(isinstance(part, str) for part in (key, value, effect)):
            raise ValueError(f"{what}: key, value and effect must be strings")
    elif isinstance(entry, str):
        if not entry:
            raise ValueError(f"taints entry {index} is empty; write {TAINT_FORMAT}, entries separated by commas")
        head, colon, effect = entry.partition(":")
        if not colon:
            effect = "NoSchedule"
        key, _, value = head.partition("=")
    else:
        raise ValueError(f"{what}: must be a string ({TAINT_FORMAT}) or an object, not {type(entry).__name__}")
    if not key or len(key) > 253 or not re.match(LABEL_KEY, key):
        raise ValueError(f"{what}: key {key!r} is not a label key (letters, digits, '-', '_', '.', '/'); write {TAINT_FORMAT}")
    if len(value) > 63 or not re.match(TAINT_VALUE, value):
        raise ValueError(f"{what}: value {value!r} is not a label value (letters, digits, '-', '_', '.', at most 63)")
    if effect not in TAINT_EFFECTS:
        raise ValueError(f"{what}: effect {effect!r} is not supported (only {', '.join(TAINT_EFFECTS)})")
    return Taint(key=key, value=value, effect=effect)


class NodeAgentGroup(BaseModel):
    node_id: str = Field(default_factory=default_node_id)
    # Name of the runtime driver in comp_nodeagent.driver.DRIVERS.
    driver: str = "docker"
    # Period of the level-triggered pass that repairs whatever nudges and events missed.
    resync_seconds: float = Field(default=5.0, gt=0)
    # Every Nth heartbeat carries every task's status; the others only those that changed
    # since the heartbeat before (each change also went out as an event).  A full one is
    # what repairs a lost event and tells the scheduler which tasks are gone.
    full_heartbeat_every: int = Field(default=10, ge=1)
    # Engine operations (pull, create, start, stop) running at once.
    parallelism: int = Field(default=8, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    # Sent in every heartbeat: the scheduler places on this node only replicas that tolerate
    # them.  NoDecode: the environment value is "key=value:NoSchedule,..." (or a JSON list),
    # which parse_taints reads, not JSON that pydantic-settings would decode first.
    taints: Annotated[list[Taint], NoDecode] = Field(default_factory=list)
    # Overrides of what the engine reports, e.g. to reserve part of the host for itself.
    cpu: float | None = None
    memory: int | None = None
    # Where this node's published ports are reachable, as told to the rest of the cluster.
    address: str = "127.0.0.1"
    # Each task stops with its own grace (its deployment's stop_grace_period); this caps it
    # on this node, e.g. for tests or a host that must drain fast.  None: no cap.
    stop_grace_seconds: float | None = Field(default=None, ge=0)
    # Cap of the backoff between failed starts (the engine could not start the container).
    # Exits back off by the task's own restart policy (max_delay, reset_after).
    restart_backoff_max_seconds: float = Field(default=30.0, gt=0)
    # Agents in this process.  Above 1 (hollow driver only, for scale tests) the nodes are
    # ``<node_id>-1`` ... ``<node_id>-<count>``, all sharing one NATS connection.
    count: int = Field(default=1, ge=1)
    # Simulated engine time to start one task, in the hollow driver.
    hollow_start_seconds: float = Field(default=0.0, ge=0)
    # Period of the per-task usage published on comp.metrics.node.<node>; 0 turns it off.
    # None: DEFAULT_METRICS_SECONDS for a single agent, off for a hollow fleet, whose
    # thousands of messages a period would cost the scale bench for nothing it measures.
    metrics_seconds: float | None = Field(default=None, ge=0)
    # Where the host's cgroup hierarchy is mounted (the docker driver reads containers'
    # counters there, and asks the engine for those it does not find).
    cgroup_root: str = "/sys/fs/cgroup"
    # Synthetic load of every running hollow task, for scale tests of what reads metrics.
    hollow_task_cpu: float = Field(default=0.0, ge=0)
    hollow_task_memory: int = Field(default=0, ge=0)

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

    @property
    def metrics_period(self) -> float:
        """Seconds between two metrics messages; 0: none are sent."""
        if self.metrics_seconds is not None:
            return self.metrics_seconds
        return 0.0 if self.count > 1 else DEFAULT_METRICS_SECONDS

    def node_ids(self) -> list[str]:
        """The ids of the nodes this process runs."""
        if self.count == 1:
            return [self.node_id]
        return [f"{self.node_id}-{i}" for i in range(1, self.count + 1)]

    _cpu = field_validator("cpu", mode="before")(parse_optional_cpu)
    _taints = field_validator("taints", mode="before")(parse_taints)
    _memory = field_validator("memory", mode="before")(parse_optional_memory)
    _hollow_task_memory = field_validator("hollow_task_memory", mode="before")(parse_memory)


class NodeAgentSettings(CommonSettings):
    nodeagent: NodeAgentGroup = Field(default_factory=NodeAgentGroup)
