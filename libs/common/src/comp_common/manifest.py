"""Manifest v1: what a user writes.

The shape follows Kubernetes (``apiVersion``, ``kind``, ``metadata``, ``spec``) with
Compose's short spellings (``env`` as a mapping, ``64Mi`` memory, published ports).
Every model forbids unknown fields: a typo is an error, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .quantities import parse_cpu, parse_memory

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

    def task_hash(self) -> str:
        """Identity of what a replica runs and where it may run; replicas are replaced when it changes.

        ``replicas`` is left out: scaling must not restart anything; so is ``priority``, and so
        are the soft placement preferences, which only rank nodes for new replicas.  The hard
        placement rules are in, as Nomad treats a constraint change, so that replicas move
        off nodes they may no longer use; they are added only when set, so a deployment
        without them keeps the identity it had before placement rules existed.
        """
        body = self.model_dump(mode="json", exclude={"replicas", "priority", "placement"})
        hard = {k: v for k, v in self.placement.hard_rules().items() if v}
        if hard:
            body["placement"] = hard
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class Deployment(_Strict):
    api_version: Literal["comp/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["Deployment"] = "Deployment"
    metadata: Metadata
    spec: DeploymentSpec

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}.{self.metadata.name}"


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
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError([{"path": "", "message": f"manifest is larger than {MAX_MANIFEST_BYTES} bytes"}])
    documents = _load_documents(text)
    if not documents:
        raise ManifestError([{"path": "", "message": "manifest is empty"}])
    deployments: list[Deployment] = []
    errors: list[dict[str, str]] = []
    for index, document in documents:
        prefix: tuple[Any, ...] = (f"document[{index}]",) if len(documents) > 1 else ()
        if not isinstance(document, dict):
            errors.append({"path": _path(prefix), "message": "a manifest must be a mapping"})
            continue
        try:
            deployments.append(Deployment.model_validate(document))
        except ValidationError as exc:
            errors.extend(errors_from_validation(exc, prefix))
    if errors:
        raise ManifestError(errors)
    keys = [d.key for d in deployments]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ManifestError([{"path": "", "message": f"deployment {k} appears twice"} for k in duplicates])
    return deployments
