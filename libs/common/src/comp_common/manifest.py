"""Manifest v1: what a user writes.

The shape follows Kubernetes (``apiVersion``, ``kind``, ``metadata``, ``spec``) with
Compose's short spellings (``env`` as a mapping, ``64Mi`` memory, published ports).
Every model forbids unknown fields: a typo is an error, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .quantities import parse_cpu, parse_duration, parse_memory

API_VERSION = "comp/v1"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_MANIFEST_BYTES = 1024 * 1024
DEFAULT_CPU = 0.1
DEFAULT_MEMORY = 128 * 1024**2

# Node label keys as agents publish them: "zone", "comp.io/gpu", "topology.kubernetes.io/zone".
LABEL_KEY = r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$"
MAX_PRIORITY = 1_000_000

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
LabelKey = Annotated[str, Field(min_length=1, max_length=253, pattern=LABEL_KEY)]


def _env_value(value: Any) -> str:
    # Compose accepts numbers and booleans as environment values; keep that.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if value is None:
        # `FOO:` in YAML is null, not an empty string; say how to write the empty string.
        raise ValueError("environment value is empty (null); write '' for an empty string")
    raise ValueError(f"environment values must be strings or numbers, not {type(value).__name__}")


EnvValue = Annotated[str, BeforeValidator(_env_value)]


def _label_value(value: Any) -> str:
    # `value: 3` in YAML is a number; node labels are strings, so compare as the user wrote it.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ValueError(f"label values must be strings or numbers, not {type(value).__name__}")


LabelValue = Annotated[str, BeforeValidator(_label_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: Name
    namespace: Name = "default"
    labels: dict[str, str] = Field(default_factory=dict)


class Resources(_Strict):
    """What one replica reserves on its node and is limited to."""

    cpu: float = Field(default=DEFAULT_CPU, description="cores, e.g. 0.5 or '500m'")
    memory: int = Field(default=DEFAULT_MEMORY, description="bytes, or a quantity like '64Mi'")

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> float:
        cores = parse_cpu(value)
        if cores <= 0:
            raise ValueError("cpu must be more than 0 cores")
        return cores

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        n_bytes = parse_memory(value)
        if n_bytes < 6 * 1024**2:
            # Docker refuses limits under 6 MiB; say so here rather than at container start.
            raise ValueError("memory must be at least 6Mi (the engine's minimum)")
        return n_bytes


class Port(_Strict):
    """A container port published on the node: on ``host_port`` if given, else on a free one."""

    container_port: int = Field(ge=1, le=65535)
    host_port: int | None = Field(default=None, ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"
    name: Name | None = None


ConstraintOp = Literal["=", "!=", "in", "not_in", "exists", "not_exists"]


class LabelExpression(_Strict):
    """A test on one node label: ``zone = b``, ``zone in (a, b)``, ``gpu exists``."""

    label: LabelKey
    op: ConstraintOp = "="
    value: LabelValue | None = None
    values: list[LabelValue] | None = None

    @model_validator(mode="after")
    def _operands_match_op(self) -> "LabelExpression":
        if self.op in ("=", "!="):
            if self.value is None or self.values is not None:
                raise ValueError(f"op '{self.op}' takes one 'value' (and no 'values')")
        elif self.op in ("in", "not_in"):
            if not self.values or self.value is not None:
                raise ValueError(f"op '{self.op}' takes 'values', a non-empty list (and no 'value')")
        elif self.value is not None or self.values is not None:
            raise ValueError(f"op '{self.op}' takes no 'value' or 'values'")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        found = labels.get(self.label)
        op = self.op
        if op == "=":
            return found == self.value
        if op == "!=":
            # A node without the label is not equal to the value (as Nomad and Kubernetes read it).
            return found != self.value
        if op == "in":
            return found is not None and found in self.values  # type: ignore[operator]
        if op == "not_in":
            return found is None or found not in self.values  # type: ignore[operator]
        if op == "exists":
            return found is not None
        return found is None

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.label}{self.op}{self.value}"
        if self.op in ("in", "not_in"):
            return f"{self.label} {self.op.replace('_', ' ')} ({', '.join(self.values or ())})"
        return f"{self.label} {'exists' if self.op == 'exists' else 'does not exist'}"


class Constraint(LabelExpression):
    """A hard rule: a node whose labels fail it is never chosen."""


class Preference(LabelExpression):
    """A soft rule: nodes whose labels pass it score higher, by ``weight`` against the others."""

    weight: int = Field(default=1, ge=1, le=100)


class Toleration(_Strict):
    """Allows nodes with a matching taint; ``value`` left out matches any value of ``key``."""

    key: LabelKey
    value: LabelValue | None = None
    effect: Literal["NoSchedule"] = "NoSchedule"

    def tolerates(self, key: str, value: str, effect: str) -> bool:
        return self.key == key and self.effect == effect and (self.value is None or self.value == value)


class Placement(_Strict):
    """Where replicas may run (``constraints``, ``tolerations``, ``max_per_node``) and
    where they would rather run (``spread_by``, ``strategy``, ``affinity``)."""

    constraints: list[Constraint] = Field(default_factory=list)
    tolerations: list[Toleration] = Field(default_factory=list)
    # Spread replicas evenly over the values of this node label (e.g. zone).
    spread_by: LabelKey | None = None
    # None: the cluster's default strategy (COMP_SCHEDULER__DEFAULT_STRATEGY).
    strategy: Literal["spread", "binpack"] | None = None
    affinity: list[Preference] = Field(default_factory=list)
    # Hard anti-affinity: at most this many replicas of the deployment on one node.
    max_per_node: int | None = Field(default=None, ge=1)

    def hard_rules(self) -> dict[str, Any]:
        """The parts that decide which nodes may run a replica (the rest only rank them)."""
        return self.model_dump(mode="json", include={"constraints", "tolerations", "max_per_node"})


def _seconds(value: Any) -> float:
    if isinstance(value, (list, dict)) or value is None:
        # Say what a duration looks like rather than naming a Python type.
        raise ValueError(f"a duration must be like '10s', '500ms' or a number of seconds, not {value!r}")
    return parse_duration(value)


# Seconds, written as ``10s``, ``500ms``, ``2m`` or a bare number.
Duration = Annotated[float, BeforeValidator(_seconds)]
PERCENT = r"^([0-9]|[1-9][0-9]|100)%$"


def _amount(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and re.match(PERCENT, value.strip()):
        return value.strip()
    raise ValueError(f"{value!r} is neither a count of replicas (0 or more) nor a percentage from 0% to 100%")


# A count of replicas or a share of the replica count: ``2`` or ``"25%"``.
Amount = Annotated[int | str, BeforeValidator(_amount)]


def _port_ref(value: Any) -> int | str:
    # One validator rather than a union: a union reports a bad value once per member, at
    # paths like `port.int`, and lax int parsing would take YAML's `true` as port 1.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise ValueError(f"port {value} is not between 1 and 65535")
        return value
    if isinstance(value, str) and len(value) <= 63 and re.match(DNS_LABEL, value):
        return value
    raise ValueError(f"{value!r} is neither a port number (1 to 65535) nor the name of a port in 'ports'")


# A container port: its number, or the name given to it in ``ports``.
PortRef = Annotated[int | str, BeforeValidator(_port_ref)]


class HttpCheck(_Strict):
    """Healthy when GET ``path`` on the container's ``port`` answers ``status``."""

    path: str = Field(default="/", pattern=r"^/")
    port: PortRef
    status: int = Field(default=200, ge=100, le=599)


class TcpCheck(_Strict):
    """Healthy when a TCP connection to the container's ``port`` opens."""

    port: PortRef


class ExecCheck(_Strict):
    """Healthy when ``command`` run inside the container exits 0."""

    command: list[str] = Field(min_length=1)


class HealthCheck(_Strict):
    """One probe (exactly one of ``http``, ``tcp``, ``exec``) and how to judge its results."""

    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    exec: ExecCheck | None = None
    interval: Duration = Field(default=10.0, gt=0)
    timeout: Duration = Field(default=1.0, gt=0)
    # Consecutive results that flip the state: failures to unhealthy, successes to healthy.
    failure_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=1, ge=1)
    # Failures within this time after a start do not count: the process is still coming up.
    start_period: Duration = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _one_probe(self) -> "HealthCheck":
        given = [name for name in ("http", "tcp", "exec") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'http', 'tcp' or 'exec' (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return "http" if self.http else "tcp" if self.tcp else "exec"

    @property
    def port(self) -> int | str | None:
        probe = self.http or self.tcp
        return probe.port if probe is not None else None


class Health(_Strict):
    """``liveness``: an unhealthy task is restarted.  ``readiness``: only a ready task counts
    as healthy (for rollouts, start order and, later, traffic)."""

    liveness: HealthCheck | None = None
    readiness: HealthCheck | None = None


class RestartPolicy(_Strict):
    """When a replica whose process ended is started again, and how long to wait.

    The first exit is restarted at once; each further one within ``reset_after`` of the
    last start waits twice as long as the one before (1 s, 2 s, 4 s...), up to ``max_delay``.
    """

    condition: Literal["always", "on-failure", "never"] = "always"
    max_delay: Duration = Field(default=60.0, gt=0)
    reset_after: Duration = Field(default=60.0, gt=0)


class UpdatePolicy(_Strict):
    """How a change of what replicas run is rolled out.

    At most ``replicas + max_surge`` tasks exist and at least ``replicas - max_unavailable``
    are healthy at any time.  A new task counts as healthy once it has been ready for
    ``min_healthy_time``; one not healthy within ``healthy_deadline`` of its start fails
    the rollout, which ``auto_revert`` rolls back to the last version that was healthy.
    ``canary: N`` starts N new tasks beside the old ones and waits for ``comp rollout promote``.
    """

    max_surge: Amount = "25%"
    max_unavailable: Amount = 0
    min_healthy_time: Duration = Field(default=0.0, ge=0)
    healthy_deadline: Duration = Field(default=300.0, gt=0)
    canary: int = Field(default=0, ge=0)
    auto_revert: bool = True

    @model_validator(mode="after")
    def _can_progress(self) -> "UpdatePolicy":
        if self.max_surge in (0, "0%") and self.max_unavailable in (0, "0%"):
            raise ValueError("max_surge and max_unavailable cannot both be 0: the rollout could never start a task")
        return self


class ScalingRules(_Strict):
    """How fast one direction of autoscaling may go (Kubernetes HPA's ``behavior``).

    ``stabilization``: a change in this direction follows the most conservative
    recommendation of this window (scale-down: the highest; scale-up: the lowest), so a
    brief dip or spike does not move the replica count.  Within any ``period``, the count
    moves by at most the larger of ``max_replicas`` and ``max_percent`` of the count at the
    period's start."""

    stabilization: Duration = Field(default=0.0, ge=0, le=3600)
    max_replicas: int = Field(default=4, ge=1)
    max_percent: float = Field(default=100.0, gt=0)
    period: Duration = Field(default=15.0, gt=0, le=3600)


def _scale_down_rules() -> ScalingRules:
    return ScalingRules(stabilization=300.0, max_replicas=1, max_percent=100.0)


# Built-in metrics; any other name is a custom metric published for the deployment.
BUILTIN_METRICS = ("cpu", "memory", "rps")


class Autoscale(_Strict):
    """Replicas follow a metric: desired = ceil(current x observed / target), within
    [min, max], unless observed/target is within ``tolerance`` of 1.

    ``metric``: ``cpu`` or ``memory`` (target: the average share of each replica's limit,
    0.5 = 50%), ``rps`` (target: connections a second per replica, from the lb's counters),
    or the name of a custom metric (target: its value per replica)."""

    min: int = Field(default=1, ge=0, le=100_000)
    max: int = Field(ge=1, le=100_000)
    metric: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] = "cpu"
    target: float = Field(gt=0)
    tolerance: float = Field(default=0.1, ge=0, lt=1)
    scale_up: ScalingRules = ScalingRules()
    scale_down: ScalingRules = Field(default_factory=_scale_down_rules)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscale":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        if self.metric in ("cpu", "memory") and self.target > 10:
            raise ValueError(f"a {self.metric} target is a share of the limit (0.5 = 50%), not {self.target}")
        return self


def _dependency(value: Any) -> Any:
    # Compose's short form: a bare name waits for that deployment to be healthy.
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"a dependency is a deployment name or {{name, condition}}, not {value!r}")
    return value


class Dependency(_Strict):
    """Start this deployment's replicas only once ``name`` (same namespace) is ``started``
    (its replicas run) or ``healthy`` (they are ready)."""

    name: Name
    condition: Literal["started", "healthy"] = "healthy"


SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGWINCH")


class DeploymentSpec(_Strict):
    replicas: int = Field(default=1, ge=0, le=100_000)
    image: str = Field(min_length=1, max_length=512)
    command: list[str] | None = None
    args: list[str] | None = None
    env: dict[str, EnvValue] = Field(default_factory=dict)
    resources: Resources = Resources()
    ports: list[Port] = Field(default_factory=list)
    placement: Placement = Placement()
    # A replica that cannot fit may stop replicas of lower priority to make room.
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    health: Health = Health()
    restart: RestartPolicy = RestartPolicy()
    # Sent first on stop; SIGKILL follows once the grace period has passed.
    stop_signal: Literal[SIGNALS] = "SIGTERM"  # type: ignore[valid-type]
    stop_grace_period: Duration = Field(default=10.0, ge=0, le=3600)
    update: UpdatePolicy = UpdatePolicy()
    depends_on: list[Annotated[Dependency, BeforeValidator(_dependency)]] = Field(default_factory=list)
    # Replicas follow a metric between min and max (the autoscaler writes `replicas`).
    autoscale: Autoscale | None = None

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if any(char.isspace() for char in value):
            raise ValueError(f"image {value!r} must not contain spaces")
        return value

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, ports: list[Port]) -> list[Port]:
        seen: set[tuple[int, str]] = set()
        for port in ports:
            key = (port.container_port, port.protocol)
            if key in seen:
                raise ValueError(f"container port {port.container_port}/{port.protocol} is listed twice")
            seen.add(key)
        return ports

    @model_validator(mode="after")
    def _checks_name_known_ports(self) -> "DeploymentSpec":
        names = {p.name for p in self.ports if p.name}
        for which in ("liveness", "readiness"):
            check = getattr(self.health, which)
            if check is not None and isinstance(check.port, str) and check.port not in names:
                known = ", ".join(sorted(names)) or "none are named"
                raise ValueError(f"health.{which}: port {check.port!r} is not the name of a port in 'ports' ({known})")
        return self

    @field_validator("depends_on")
    @classmethod
    def _unique_dependencies(cls, deps: list[Dependency]) -> list[Dependency]:
        names = [d.name for d in deps]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"depends_on lists {', '.join(twice)} more than once")
        return deps

    def task_hash(self) -> str:
        """Identity of what a replica runs and where it may run; replicas are replaced when it changes.

        ``replicas`` is left out: scaling must not restart anything; so is ``priority``, and so
        are the soft placement preferences, which only rank nodes for new replicas.  The hard
        placement rules are in, as Nomad treats a constraint change, so that replicas move
        off nodes they may no longer use; they are added only when set, so a deployment
        without them keeps the identity it had before placement rules existed.
        """
        body = self.model_dump(mode="json", exclude={"replicas", "priority", "placement", *_RUN_FIELDS, *_ROLLOUT_FIELDS})
        hard = {k: v for k, v in self.placement.hard_rules().items() if v}
        if hard:
            body["placement"] = hard
        # How a replica is checked, restarted and stopped is part of what it runs; these are
        # added only when not the default, for the same reason as the placement rules.
        body.update(self.model_dump(mode="json", include=_RUN_FIELDS, exclude_defaults=True))
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# Part of a replica's identity, but only when set (see ``task_hash``).
_RUN_FIELDS = {"health", "restart", "stop_signal", "stop_grace_period"}
# How a change is rolled out and when replicas may start: never a reason to replace one.
_ROLLOUT_FIELDS = {"update", "depends_on", "autoscale"}


class _Object(_Strict):
    """What every kind has: ``apiVersion``, ``metadata``, and its key ``namespace.name``."""

    api_version: Literal["comp/v1"] = Field(default=API_VERSION, alias="apiVersion")
    metadata: Metadata

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}.{self.metadata.name}"


class Deployment(_Object):
    kind: Literal["Deployment"] = "Deployment"
    spec: DeploymentSpec


def _port_number(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError(f"{value!r} is not a port number (1 to 65535)")


PortNumber = Annotated[int, BeforeValidator(_port_number)]


class ServicePort(_Strict):
    """A port of a service: clients use ``port`` on the service's virtual IP (and
    ``published`` on every host's own addresses); ``target_port`` is the replica's port, a
    number or the name of one of the deployment's ``ports`` (default: ``port``)."""

    name: Name | None = None
    port: PortNumber
    target_port: PortRef | None = None
    protocol: Literal["tcp", "udp"] = "tcp"
    published: PortNumber | None = None

    @property
    def key(self) -> str:
        """The port's name, or ``<protocol>-<port>`` for an unnamed one: unique in its service."""
        return self.name or f"{self.protocol}-{self.port}"

    @property
    def target(self) -> int | str:
        return self.port if self.target_port is None else self.target_port


class Selector(_Strict):
    """The replicas a service sends traffic to: one deployment of its namespace by name, or
    every deployment of its namespace whose metadata labels include all of ``labels``."""

    deployment: Name | None = None
    labels: dict[str, LabelValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_way(self) -> Selector:
        if (self.deployment is None) == (not self.labels):
            raise ValueError("give either 'deployment' or 'labels', not both and not neither")
        return self

    def selects(self, deployment: Deployment) -> bool:
        if self.deployment is not None:
            return deployment.metadata.name == self.deployment
        return all(deployment.metadata.labels.get(k) == v for k, v in self.labels.items())


ServiceMode = Literal["vip", "dnsrr"]


class ServiceSpec(_Strict):
    selector: Selector
    ports: list[ServicePort] = Field(min_length=1, max_length=64)
    # vip: one stable virtual IP, balanced by each host's lb; dnsrr: DNS answers with the
    # ready replicas' own addresses and no virtual IP is allocated (Swarm's two modes).
    mode: ServiceMode = "vip"

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServiceSpec:
        seen: dict[tuple[int, str], int] = {}
        names: set[str] = set()
        published: set[tuple[int, str]] = set()
        for index, port in enumerate(self.ports):
            if (port.port, port.protocol) in seen:
                raise ValueError(f"ports[{index}]: {port.port}/{port.protocol} is already ports[{seen[port.port, port.protocol]}]")
            seen[port.port, port.protocol] = index
            if port.name is not None:
                if port.name in names:
                    raise ValueError(f"ports[{index}]: the name {port.name!r} is used twice")
                names.add(port.name)
            if port.published is not None:
                if (port.published, port.protocol) in published:
                    raise ValueError(f"ports[{index}]: published {port.published}/{port.protocol} is used twice")
                published.add((port.published, port.protocol))
                if self.mode == "dnsrr":
                    raise ValueError(f"ports[{index}]: a dnsrr service has no virtual IP to publish; use mode vip")
        if len(self.ports) > 1 and any(port.name is None for port in self.ports):
            raise ValueError("a service with more than one port must name each of them (for SRV records)")
        return self


class Service(_Object):
    kind: Literal["Service"] = "Service"
    spec: ServiceSpec


KINDS = ("Deployment", "Service")


class ManifestError(ValueError):
    """A manifest that cannot be accepted; ``errors`` lists each problem with its field path."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['path']}: {e['message']}" if e["path"] else e["message"] for e in errors))


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == DNS_LABEL:
        # pydantic would show the regular expression; say what it means instead.
        return (
            f"{error['input']!r} is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    if error["type"] == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == LABEL_KEY:
        return (
            f"{error['input']!r} is not a valid label key: use letters, digits, '-', '_', '.' and '/', "
            "starting and ending with a letter or digit"
        )
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def errors_from_validation(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, str]]:
    return [
        {"path": _path(prefix + tuple(e["loc"])), "message": _message(e)}  # type: ignore[arg-type]
        for e in exc.errors()
    ]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping.

    YAML parsers keep the last value silently, which would drop what the user wrote first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateJsonKey(ValueError):
    pass


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJsonKey(f"found duplicate key {key!r}")
        out[key] = value
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.problem}{where}"
    return str(exc)


def _load_documents(text: str | bytes) -> list[tuple[int, Any]]:
    """The non-empty documents of a YAML or JSON text, each with its position in the text."""
    try:
        # JSON first: YAML refuses tabs, which pretty-printed JSON may be indented with.
        document = json.loads(text, object_pairs_hook=_unique_json_object)
        return [] if document is None else [(0, document)]
    except _DuplicateJsonKey as exc:
        raise ManifestError([{"path": "", "message": f"not valid JSON: {exc}"}]) from None
    except ValueError:
        pass
    try:
        documents = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except yaml.YAMLError as exc:
        raise ManifestError([{"path": "", "message": f"not valid YAML or JSON: {_yaml_problem(exc)}"}]) from None
    return [(index, document) for index, document in enumerate(documents) if document is not None]


def parse_deployments(text: str | bytes) -> list[Deployment]:
    """Every Deployment in a YAML or JSON text (several YAML documents allowed).

    Raises :class:`ManifestError` listing every problem; returns nothing partial.
    Errors in a text of several documents are prefixed with ``document[i]``, ``i``
    counting every document in the text, empty ones included.
    """
    return [deployment for _, deployment in parse_documents(text)]


def parse_documents(text: str | bytes) -> list[tuple[str, Deployment]]:
    """``parse_deployments``, each deployment with the path prefix its errors take
    (``document[i]``, or "" in a text of one document), for checks made after parsing
    (such as depends_on cycles against what is stored) to point at the right document.
    A Service in the text is an error here: use :func:`parse_objects`."""
    objects = parse_objects(text)
    others = [(path, obj) for path, obj in objects if not isinstance(obj, Deployment)]
    if others:
        raise ManifestError([{"path": path, "message": f"kind {obj.kind} is not accepted here"} for path, obj in others])
    return [(path, obj) for path, obj in objects if isinstance(obj, Deployment)]


def parse_objects(text: str | bytes) -> list[tuple[str, Deployment | Service]]:
    """Every Deployment and Service in a YAML or JSON text, each with the path prefix its
    errors take.  ``kind`` chooses the model (absent: Deployment).  Raises
    :class:`ManifestError` listing every problem; returns nothing partial."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError([{"path": "", "message": f"manifest is larger than {MAX_MANIFEST_BYTES} bytes"}])
    documents = _load_documents(text)
    if not documents:
        raise ManifestError([{"path": "", "message": "manifest is empty"}])
    objects: list[tuple[str, Deployment | Service]] = []
    errors: list[dict[str, str]] = []
    for index, document in documents:
        prefix: tuple[Any, ...] = (f"document[{index}]",) if len(documents) > 1 else ()
        if not isinstance(document, dict):
            errors.append({"path": _path(prefix), "message": "a manifest must be a mapping"})
            continue
        kind = document.get("kind", "Deployment")
        model: type[Deployment] | type[Service]
        if kind == "Service":
            model = Service
        elif kind == "Deployment":
            model = Deployment
        else:
            errors.append({"path": _path((*prefix, "kind")), "message": f"kind {kind!r} is not one of {', '.join(KINDS)}"})
            continue
        try:
            objects.append((_path(prefix), model.model_validate(document)))
        except ValidationError as exc:
            errors.extend(errors_from_validation(exc, prefix))
    if errors:
        raise ManifestError(errors)
    keys = [(obj.kind, obj.key) for _, obj in objects]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ManifestError([{"path": "", "message": f"{kind.lower()} {k} appears twice"} for kind, k in duplicates])
    return objects


def dependency_cycle(graph: Mapping[str, Iterable[str]], start: str | None = None) -> list[str] | None:
    """A cycle in ``graph`` (deployment name -> the names it depends on) as the names along
    it, the first repeated at the end (``[a, b, a]``; ``[a, a]`` for a self-dependency), or
    None when there is none.

    With ``start``, only a cycle through ``start``, beginning there.  The shortest such cycle
    is returned, so that an error names as few deployments as it can.  A name that is not a
    key of ``graph`` depends on nothing (it may not have been applied yet).
    """
    if start is not None:
        return _shortest_cycle_through(graph, start)
    return _any_cycle(graph)


def _any_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    # Depth first, iterative so that a long chain cannot exhaust the stack; O(names + edges).
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path, on_path = [root], {root}
        pending = [iter(graph.get(root, ()))]
        while pending:
            child = next(pending[-1], None)
            if child is None:
                pending.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
            elif child in on_path:
                return [*path[path.index(child):], child]
            elif child not in done:
                path.append(child)
                on_path.add(child)
                pending.append(iter(graph.get(child, ())))
    return None


def _shortest_cycle_through(graph: Mapping[str, Iterable[str]], start: str) -> list[str] | None:
    # Breadth first from start's dependencies: the first way back to start is the shortest.
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for dep in graph.get(node, ()):
            if dep == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if dep not in parent:
                parent[dep] = node
                queue.append(dep)
    return None
