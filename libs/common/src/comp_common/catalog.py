"""The event catalog: every subject family COMP publishes, what travels on it, who sends and
who reads it, and whether the event stream keeps it.

Each entry names the :mod:`comp_common.subjects` constant (the wildcard a subscriber uses)
and builder (the function a publisher calls), so its subject pattern is computed from the
code rather than written twice; whether ``COMP_EVENTS`` keeps it is computed from
``subjects.EVENT_SUBJECTS``.  ``tests/unit/test_catalog.py`` fails when a subject in
``subjects.py`` has no entry, when an entry's model is not what its publishers send (read
from the publish call sites), or when the committed documents are not what this module
generates now; ``tests/integration/test_extension_webhook.py`` holds every event a real
cluster kept to its entry's model, field for field.  To regenerate::

    python -m comp_common.catalog --write docs/     # docs/asyncapi.json and docs/events.md

Versioning (``CATALOG_VERSION``, semantic): a removed or renamed subject, model or field,
a field whose type changed, or a field that became required is a new MAJOR (consumers
written against the old catalog may break); a new subject, model or optional field is a
new MINOR; wording only is a PATCH.  :func:`required_bump` compares two generated
documents by that rule and the test refuses a change whose version was not bumped enough.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticUndefined, to_jsonable_python

from . import messages, subjects

CATALOG_VERSION = "1.0.0"

ASYNCAPI_FILE = "asyncapi.json"
MARKDOWN_FILE = "events.md"
REGENERATE = "python -m comp_common.catalog --write docs/"

_SCHEMA_REF = "#/components/schemas/{model}"

# event: a state change or decision, kept by the event stream; control: traffic between
# services that only matters now; request: request/reply; record: kept by a stream of its
# own for one reader (spans, api request records).
Kind = Literal["event", "control", "request", "record"]

# What each named token of a subject holds.  Every builder parameter needs a line here
# (the catalog test says which is missing): a reader must know what to put in a token.
TOKENS: dict[str, str] = {
    "namespace": "the namespace (a DNS label)",
    "name": "the deployment's or service's name (a DNS label)",
    "deployment": "the deployment's name (a DNS label)",
    "node_id": "the node's id, as its agent announces it in heartbeats",
    "kind": "what was changed: namespace or node",
    "trace_id": "the trace's id, 32 hex digits",
}

# (stream, its subjects filter) as named in comp_common.subjects; a pair whose names are
# not there (yet) is skipped.
_STREAMS = (("EVENTS_STREAM", "EVENT_SUBJECTS"), ("SPANS_STREAM", "SPAN_SUBJECTS"), ("API_REQUESTS_STREAM", "API_REQUEST_SUBJECT"))


def streams() -> dict[str, str]:
    """JetStream stream name -> the subjects it keeps."""
    return {
        getattr(subjects, name): getattr(subjects, filter_)
        for name, filter_ in _STREAMS
        if hasattr(subjects, name) and hasattr(subjects, filter_)
    }


@dataclass(frozen=True)
class Payload:
    """A message body: one model of :mod:`comp_common.messages`, or a small inline schema
    (an empty ping, a list of models) that refers to models by ``$ref``."""

    name: str
    schema: dict[str, Any]
    models: tuple[type[BaseModel], ...] = ()
    description: str = ""

    @classmethod
    def of(cls, model: type[BaseModel]) -> "Payload":
        return cls(model.__name__, {"$ref": _SCHEMA_REF.format(model=model.__name__)}, (model,))

    @property
    def model(self) -> type[BaseModel] | None:
        """The model the whole body is (None for an inline schema)."""
        return self.models[0] if self.schema.get("$ref") and len(self.models) == 1 else None


@dataclass(frozen=True)
class Entry:
    id: str
    kind: Kind
    description: str
    payload: Payload
    publishers: tuple[str, ...]
    consumers: tuple[str, ...]
    # Names in comp_common.subjects: the wildcard constant a subscriber uses, and the
    # function a publisher calls; at least one of them.
    family: str | None = None
    builder: str | None = None
    reply: Payload | None = None
    # For readers: why a consumer one might expect is not listed (it watches a KV bucket
    # instead), or who else reads it and how.
    note: str = ""

    @property
    def pattern(self) -> str:
        """The subject with its tokens named: ``comp.evt.task.{node_id}``."""
        if self.builder is not None:
            build = getattr(subjects, self.builder)
            return build(*(f"{{{token}}}" for token in builder_tokens(build)))
        assert self.family is not None
        return getattr(subjects, self.family)

    @property
    def tokens(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.pattern)

    @property
    def subscribe(self) -> str:
        """What a subscriber to the whole family subscribes to."""
        if self.family is not None:
            return getattr(subjects, self.family)
        return wildcard(self.pattern)

    @property
    def kept(self) -> bool:
        """Whether the event stream (``COMP_EVENTS``) keeps what is published here."""
        return subject_covers(subjects.EVENT_SUBJECTS, wildcard(self.pattern))

    @property
    def stream(self) -> str | None:
        """The JetStream stream that keeps what is published here (None: none does)."""
        return next((name for name, kept in streams().items() if subject_covers(kept, wildcard(self.pattern))), None)

    @property
    def models(self) -> tuple[type[BaseModel], ...]:
        return self.payload.models + (self.reply.models if self.reply else ())


def builder_tokens(build: Any) -> list[str]:
    return list(inspect.signature(build).parameters)


def wildcard(pattern: str) -> str:
    """A pattern's tokens as NATS ``*`` wildcards."""
    return re.sub(r"\{\w+\}", "*", pattern)


def subject_covers(filter_subject: str, subject: str) -> bool:
    """Whether a subscription to ``filter_subject`` receives every message on ``subject``,
    which may itself hold wildcards (then only a wildcard of the filter covers them)."""
    wanted, given = filter_subject.split("."), subject.split(".")
    for position, token in enumerate(wanted):
        if token == ">":
            # Only valid as the last token; it stands for one or more.
            return position == len(wanted) - 1 and len(given) > position
        if position >= len(given):
            return False
        if token == "*":
            if given[position] == ">":
                return False
            continue
        if token != given[position]:
            return False
    return len(given) == len(wanted)


def _inline(name: str, schema: dict[str, Any], *models: type[BaseModel], description: str = "") -> Payload:
    return Payload(name, schema, models, description)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _SCHEMA_REF.format(model=model.__name__)}


# Code in comp_common that every service runs (its tracer, say).
EVERY_SERVICE = "every service"

_EMPTY = _inline("Empty", {"type": "string", "maxLength": 0, "description": "an empty body"})
_SERVICE_NAMED = _inline(
    "ServiceNamed",
    {
        "type": "object",
        "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}},
        "required": ["namespace", "name"],
        "description": "the service the subject already names, so that a JSON body is not empty",
    },
)

ENTRIES: tuple[Entry, ...] = (
    Entry(
        id="deployment", kind="event", family="DEPLOYMENT_EVENTS", builder="deployment_event",
        payload=Payload.of(messages.DeploymentEvent),
        publishers=("api", "scheduler", "autoscaler"), consumers=("scheduler",),
        description="A deployment was applied, scaled, reverted or deleted (its KV revision and generation).",
    ),
    Entry(
        id="control", kind="event", family="CONTROL_EVENTS", builder="control_event",
        payload=Payload.of(messages.ControlEvent),
        publishers=("api",), consumers=("scheduler",),
        description="A namespace's quota or a node's cordon/drain changed.",
    ),
    Entry(
        id="task", kind="event", family="TASK_EVENTS", builder="task_event",
        payload=Payload.of(messages.TaskStatus),
        publishers=("nodeagent",), consumers=("scheduler", "discovery"),
        description="A task's state changed on its node: pending, starting, running, exited, failed, stopped.",
    ),
    Entry(
        id="placement", kind="event", family="PLACEMENT_EVENTS", builder="placement_event",
        payload=Payload.of(messages.PlacementEvent),
        publishers=("scheduler",), consumers=("api",),
        description="One reconcile round's decisions for a deployment: placed, stopped, pending and why.",
        note="the api reads the last one from the stream for `comp describe deployment`",
    ),
    Entry(
        id="scheduler-leader", kind="event", family="SCHEDULER_LEADER_EVENTS",
        payload=Payload.of(messages.LeaderChange),
        publishers=("scheduler",), consumers=(),
        description="A scheduler started or stopped leading, with its fencing epoch.",
        note="the leader is also written to Redis, where `comp status` reads it",
    ),
    Entry(
        id="health", kind="event", family="HEALTH_EVENTS", builder="health_event",
        payload=Payload.of(messages.HealthEvent),
        publishers=("nodeagent",), consumers=(),
        description="A task's liveness or readiness verdict changed, with what the last probe saw.",
        note="the verdicts also travel in TaskStatus, which is what the scheduler acts on",
    ),
    Entry(
        id="rollout", kind="event", family="ROLLOUT_EVENTS", builder="rollout_event",
        payload=Payload.of(messages.RolloutEvent),
        publishers=("scheduler", "api"), consumers=("api",),
        description="A rollout step: progressing, paused, complete, failed, reverted, promoted or aborted.",
        note="the api reads the last one from the stream for a rollout's status",
    ),
    Entry(
        id="service", kind="event", family="SERVICE_EVENTS", builder="service_event",
        payload=Payload.of(messages.ServiceEvent),
        publishers=("api",), consumers=(),
        description="A service was applied or deleted.",
        note="discovery watches the comp-services bucket rather than these events",
    ),
    Entry(
        id="endpoints", kind="event", family="ENDPOINT_EVENTS", builder="endpoints_event",
        payload=Payload.of(messages.ServiceEndpoints),
        publishers=("discovery",), consumers=(),
        description="A service's VIP, ports and ready endpoints, whole (each value replaces the last).",
        note="every host's lb watches the comp-endpoints bucket rather than these events",
    ),
    Entry(
        id="autoscale", kind="event", family="AUTOSCALE_EVENTS", builder="autoscale_event",
        payload=Payload.of(messages.AutoscaleDecision),
        publishers=("autoscaler",), consumers=(),
        description="An autoscaler decision that changed a replica count or was held back, with its reason.",
    ),
    Entry(
        id="capacity", kind="event", family="CAPACITY_EVENTS",
        payload=Payload.of(messages.CapacityEvent),
        publishers=("scheduler",), consumers=(),
        description="The scheduler can no longer place everything desired (fits false, with each deployment's reason), or can again.",
    ),
    Entry(
        id="heartbeat", kind="control", family="NODE_HEARTBEATS", builder="node_heartbeat",
        payload=Payload.of(messages.Heartbeat),
        publishers=("nodeagent",), consumers=("scheduler", "discovery"),
        description="A node's periodic heartbeat: capacity, allocations, labels, taints and task statuses.",
    ),
    Entry(
        id="nudge", kind="control", builder="node_nudge",
        payload=Payload.of(messages.Nudge),
        publishers=("scheduler",), consumers=("nodeagent",),
        description="The node's assignments changed (version, fencing epoch): reconcile now.",
    ),
    Entry(
        id="ping", kind="request", builder="node_ping",
        payload=_EMPTY,
        reply=_inline("NodeId", {"type": "string", "description": "the answering agent's node id"}),
        publishers=("scheduler",), consumers=("nodeagent",),
        description="Is this node's agent still connected? NATS' 'no responders' means its connection is gone.",
    ),
    Entry(
        id="discovery-lookup", kind="request", family="DISCOVERY_LOOKUP",
        payload=Payload.of(messages.ServiceLookup),
        reply=_inline(
            "LookupReply",
            {"oneOf": [_ref(messages.ServiceEndpoints),
                       {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}]},
            messages.ServiceEndpoints,
            description="the service's endpoints, or an error naming what was not found",
        ),
        publishers=("clients",), consumers=("discovery",),
        description="A service's VIP, ports and ready endpoints, asked of discovery.",
    ),
    Entry(
        id="lb-counters", kind="request", family="LB_COUNTERS", builder="lb_counters",
        payload=_SERVICE_NAMED,
        reply=_inline("EndpointCounterList", {"type": "array", "items": _ref(messages.EndpointCounter)},
                      messages.EndpointCounter, description="one reply per host's lb"),
        publishers=("api",), consumers=("lb",),
        description="Connection counters of a service from every host's lb (many replies, gathered in a window).",
    ),
    Entry(
        id="node-metrics", kind="control", family="NODE_METRICS", builder="node_metrics",
        payload=Payload.of(messages.NodeMetrics),
        publishers=("nodeagent",), consumers=("autoscaler",),
        description="Every running task's CPU and memory use on a node over the last metrics period.",
    ),
    Entry(
        id="service-rate", kind="control", family="SERVICE_RATES", builder="service_rate",
        payload=Payload.of(messages.ServiceRate),
        publishers=("lb",), consumers=("autoscaler",),
        description="Connections a second to a service through one host's lb over the last period.",
    ),
    Entry(
        id="custom-metric", kind="control", family="CUSTOM_METRICS", builder="custom_metric",
        payload=Payload.of(messages.CustomMetric),
        publishers=("workloads",), consumers=("autoscaler",),
        description="A deployment's value of a custom autoscaling metric (a queue length, say), from anyone.",
    ),
    Entry(
        id="span", kind="record", family="SPAN_SUBJECTS", builder="span_subject",
        payload=_inline(
            "SpanRecord",
            {
                "type": "object",
                "description": "one finished span (comp_common.telemetry.span_record)",
                "properties": {
                    "trace_id": {"type": "string"}, "span_id": {"type": "string"},
                    "parent_id": {"type": ["string", "null"]}, "name": {"type": "string"},
                    "service": {"type": ["string", "null"]}, "kind": {"type": "string"},
                    "start_ns": {"type": "integer"}, "end_ns": {"type": ["integer", "null"]},
                    "status": {"type": "string"}, "attributes": {"type": "object"},
                    "links": {"type": "array", "items": {
                        "type": "object", "properties": {"trace_id": {"type": "string"}, "span_id": {"type": "string"}},
                    }},
                },
                "required": ["trace_id", "span_id", "name", "service", "kind", "start_ns", "end_ns", "status"],
            },
        ),
        publishers=(EVERY_SERVICE,), consumers=("api",),
        description="A finished span of any service's tracer, one subject per trace.",
        note="the api reads a trace's spans back for /v1/traces",
    ),
    Entry(
        id="api-request", kind="record", family="API_REQUEST_SUBJECT",
        payload=_inline(
            "ApiRequestRecord",
            {
                "type": "object",
                "description": "one api request, recorded after it was answered",
                "properties": {
                    "actor": {"type": ["string", "null"]}, "client": {"type": ["string", "null"]},
                    "verb": {"type": "string"}, "path": {"type": "string"},
                    "resource": {"type": ["string", "null"]}, "namespace": {"type": ["string", "null"]},
                    "name": {"type": ["string", "null"]}, "status": {"type": "integer"},
                    "operation_id": {"type": ["string", "null"]}, "at": {"type": "number"},
                    "duration_ms": {"type": "number"}, "level": {"type": "string"},
                    "request_body": {"type": ["string", "null"]}, "response_body": {"type": ["string", "null"]},
                },
                "required": ["verb", "path", "status", "at"],
            },
        ),
        publishers=("api",), consumers=("audit",),
        description="Who asked the api what, and its answer's status (the request body at higher audit levels).",
    ),
    Entry(
        id="audit-query", kind="request", family="AUDIT_QUERY",
        payload=_inline(
            "AuditQuery",
            {
                "type": "object",
                "description": "filters over the audit log, each optional (the audit service's AuditQuery)",
                "properties": {
                    "actor": {"type": ["string", "null"]}, "resource": {"type": ["string", "null"]},
                    "namespace": {"type": ["string", "null"]}, "name": {"type": ["string", "null"]},
                    "kind": {"enum": ["request", "event", "gap", None]}, "since": {"type": ["number", "null"]},
                    "limit": {"type": "integer", "minimum": 1},
                },
                "additionalProperties": False,
            },
        ),
        reply=_inline(
            "AuditRecords",
            {"oneOf": [
                {"type": "object", "properties": {"records": {"type": "array", "items": {"type": "object"}},
                                                  "head_seq": {"type": "integer"}, "truncated": {"type": "integer"}},
                 "required": ["records"]},
                {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
            ]},
            description="the matching records, newest kept, or an error saying what is wrong with the query",
        ),
        publishers=("api",), consumers=("audit",),
        description="Records of the audit log matching filters.",
    ),
    Entry(
        id="audit-verify", kind="request", family="AUDIT_VERIFY",
        payload=_inline("EmptyObject", {"type": "object", "description": "an empty JSON object"}),
        reply=_inline(
            "AuditVerdict",
            {"type": "object", "description": "the hash chain's verification, or an error"},
        ),
        publishers=("api",), consumers=("audit",),
        description="Verify the audit log's hash chain and signed checkpoints.",
    ),
)

# Services that read every kept subject through the stream (``comp.evt.>``), not listed
# on each entry.
STREAM_READERS: tuple[str, ...] = ("audit",)

# Publishers and consumers that are not one COMP service.
OUTSIDE = {"clients": "any NATS client of the cluster", "workloads": "any workload or service of the user's"}


def entry(entry_id: str) -> Entry:
    for found in ENTRIES:
        if found.id == entry_id:
            return found
    raise KeyError(f"no catalog entry {entry_id!r}; known: {', '.join(e.id for e in ENTRIES)}")


def models() -> dict[str, type[BaseModel]]:
    """Every model a catalog message is or contains, by name."""
    found: dict[str, type[BaseModel]] = {}
    for e in ENTRIES:
        for model in e.models:
            _collect(model, found)
    return found


def _collect(model: type[BaseModel], found: dict[str, type[BaseModel]]) -> None:
    if model.__name__ in found:
        return
    found[model.__name__] = model
    for info in model.model_fields.values():
        for nested in _models_in(info.annotation):
            _collect(nested, found)


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def model_schema(name: str) -> dict[str, Any]:
    """One model's JSON Schema, whole (its nested models under ``$defs``).  KeyError names
    the known models."""
    known = models()
    if name not in known:
        raise KeyError(f"no model {name!r} in the catalog; known: {', '.join(sorted(known))}")
    return known[name].model_json_schema()


def schemas() -> dict[str, Any]:
    """Every catalog model's JSON Schema, referring to each other as components."""
    _, top = models_json_schema(
        [(model, "validation") for _, model in sorted(models().items())], ref_template=_SCHEMA_REF
    )
    return dict(sorted(top.get("$defs", {}).items()))


def asyncapi_document() -> dict[str, Any]:
    """The catalog as an AsyncAPI 3.0 document."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages_: dict[str, Any] = {}
    for e in ENTRIES:
        payloads = [e.payload] + ([e.reply] if e.reply else [])
        for payload in payloads:
            message: dict[str, Any] = {"name": payload.name, "payload": payload.schema}
            if payload.description:
                message["summary"] = payload.description
            if payload.model is not None and payload.model.__doc__:
                message["summary"] = inspect.cleandoc(payload.model.__doc__)
            messages_[payload.name] = message
        channels[e.id] = {
            "address": e.pattern,
            "title": e.id,
            "description": e.description + (f" ({e.note})" if e.note else ""),
            "messages": {e.payload.name: {"$ref": f"#/components/messages/{e.payload.name}"}},
            "parameters": {token: {"description": TOKENS[token]} for token in e.tokens},
            "x-comp-kind": e.kind,
            "x-comp-kept": e.kept,
            "x-comp-stream": e.stream,
            "x-comp-subscribe": e.subscribe,
            "x-comp-publishers": list(e.publishers),
            "x-comp-consumers": list(e.consumers) + (list(STREAM_READERS) if e.kept else []),
        }
        if not e.tokens:
            del channels[e.id]["parameters"]
        send: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{e.id}"},
            "messages": [{"$ref": f"#/channels/{e.id}/messages/{e.payload.name}"}],
            "summary": f"published by {', '.join(e.publishers)}",
        }
        if e.reply is not None:
            reply_channel = f"{e.id}-reply"
            channels[reply_channel] = {
                "address": None,
                "description": f"the reply to {e.id}, on the requester's inbox",
                "messages": {e.reply.name: {"$ref": f"#/components/messages/{e.reply.name}"}},
            }
            send["reply"] = {
                "channel": {"$ref": f"#/channels/{reply_channel}"},
                "messages": [{"$ref": f"#/channels/{reply_channel}/messages/{e.reply.name}"}],
            }
        operations[f"{e.id}.send"] = send
        receivers = list(e.consumers) + (list(STREAM_READERS) if e.kept else [])
        if receivers:
            operations[f"{e.id}.receive"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{e.id}"},
                "messages": [{"$ref": f"#/channels/{e.id}/messages/{e.payload.name}"}],
                "summary": f"consumed by {', '.join(receivers)}",
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "COMP events",
            "version": CATALOG_VERSION,
            "description": (
                "Every NATS subject COMP publishes: events (kept by the COMP_EVENTS stream), "
                "control traffic and requests. Bodies are JSON. Generated by `" + REGENERATE + "`; "
                "a removed or renamed subject, model or field is a new major version."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "COMP_NATS__URL of the cluster"}
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages_, "schemas": schemas()},
    }


def render_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# -- the readable document ------------------------------------------------------------


def type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        values = " \\| ".join(str(m.value) for m in annotation)
        return f"{annotation.__name__} ({values})"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default is PydanticUndefined else info.default
    return f"`{json.dumps(to_jsonable_python(value))}`"


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comments written beside or above each field in the model's source, which are
    where this code base says what a field means."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    found: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#") and number in comments:
            above.append(comments[number])
            continue
        match = re.match(r"^    (\w+)\s*:", line)
        if match and match.group(1) in model.model_fields:
            said = above + ([comments[number]] if number in comments else [])
            if said:
                found[match.group(1)] = " ".join(said)
        above = []
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def events_markdown() -> str:
    out = [
        "# COMP event catalog",
        "",
        f"Catalog version **{CATALOG_VERSION}**. Generated from `libs/common/src/comp_common/catalog.py` "
        f"by `{REGENERATE}`; do not edit by hand. The same catalog is served as AsyncAPI 3.0 at "
        "`GET /v1/catalog` (and committed as `docs/asyncapi.json`); one model's JSON Schema at "
        "`GET /v1/catalog/models/{Name}`.",
        "",
        "Versioning: a removed or renamed subject, model or field, a changed field type, or a field "
        "that became required is a new **major** version; a new subject, model or optional field a "
        "new **minor**; wording a **patch**.",
        "",
        "Bodies are JSON. Messages ignore fields they do not know, so a newer publisher does not "
        "break an older consumer. `kept by`: the JetStream stream that keeps what is published there "
        f"(a new service can read it from the start, or from where it stopped); {', '.join(STREAM_READERS)} "
        f"reads everything `{subjects.EVENTS_STREAM}` keeps.",
        "",
        "## Subjects",
        "",
        "| subject | subscribe to | kind | body | reply | published by | consumed by | kept by | what |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ENTRIES:
        reply = f"[{e.reply.name}](#{e.reply.name.lower()})" if e.reply else ""
        what = e.description + (f" ({e.note})" if e.note else "")
        out.append(
            f"| `{e.pattern}` | `{e.subscribe}` | {e.kind} | [{e.payload.name}](#{e.payload.name.lower()}) | {reply} | "
            f"{', '.join(e.publishers)} | {', '.join(e.consumers) or '-'} | {e.stream or '-'} | {_cell(what)} |"
        )
    out += ["", "Tokens: " + "; ".join(f"`{{{t}}}` {d}" for t, d in TOKENS.items()) + ".", ""]
    out += ["Publishers that are not one service: " + "; ".join(f"{k}: {v}" for k, v in OUTSIDE.items())
            + f"; {EVERY_SERVICE}: code of comp_common that each service runs.", ""]
    out += ["## Bodies", ""]
    inline = {p.name: p for e in ENTRIES for p in (e.payload, e.reply) if p is not None and p.model is None}
    for name, payload in sorted(inline.items()):
        out += [f"### {name}", "", payload.description or payload.schema.get("description", ""), "",
                "```json", json.dumps(payload.schema, indent=2), "```", ""]
    for name, model in sorted(models().items()):
        out += [f"### {name}", ""]
        if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
            out += [" ".join(inspect.cleandoc(model.__doc__).split()), ""]
        comments = field_comments(model)
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for field_name, info in model.model_fields.items():
            out.append(
                f"| `{field_name}` | {type_name(info.annotation)} | {_default(info)} | {_cell(comments.get(field_name, ''))} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def generated() -> dict[str, str]:
    """File name -> the text the generator writes."""
    return {ASYNCAPI_FILE: render_json(asyncapi_document()), MARKDOWN_FILE: events_markdown()}


# -- versioning ----------------------------------------------------------------------

Bump = Literal["major", "minor", "patch"]


def _surface(document: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, tuple[str, bool]]]]:
    """A document's contract: channel id -> its address and messages; schema (and inline
    message body) -> field -> (its schema, required)."""
    channels = {
        cid: f"{c.get('address')} {sorted(c.get('messages', {}))}" for cid, c in document.get("channels", {}).items()
    }
    fields: dict[str, dict[str, tuple[str, bool]]] = {}
    components = document.get("components", {})
    shapes = dict(components.get("schemas", {}))
    shapes.update({f"message {n}": m.get("payload", {}) for n, m in components.get("messages", {}).items()})
    for name, schema in shapes.items():
        required = set(schema.get("required", []))
        props = schema.get("properties", {})
        fields[name] = {
            f: (json.dumps({k: v for k, v in s.items() if k not in ("default", "title", "description")}, sort_keys=True), f in required)
            for f, s in props.items()
        }
        if not props and "enum" in schema:
            fields[name] = {str(v): ("enum", False) for v in schema["enum"]}
    return channels, fields


def required_bump(old: dict[str, Any], new: dict[str, Any]) -> Bump | None:
    """The least version bump from document ``old`` to ``new`` (None: the same contract and text)."""
    old_channels, old_fields = _surface(old)
    new_channels, new_fields = _surface(new)
    for cid, address in old_channels.items():
        if new_channels.get(cid) != address:
            return "major"
    for model, fields in old_fields.items():
        if model not in new_fields:
            return "major"
        for name, (schema, required) in fields.items():
            if name not in new_fields[model]:
                return "major"
            new_schema, new_required = new_fields[model][name]
            if new_schema != schema or (new_required and not required):
                return "major"
    if set(new_channels) - set(old_channels) or set(new_fields) - set(old_fields):
        return "minor"
    for model, fields in new_fields.items():
        if set(fields) - set(old_fields[model]):
            return "minor"
    strip = lambda d: {**d, "info": {**d.get("info", {}), "version": None}}  # noqa: E731
    return None if strip(old) == strip(new) else "patch"


def _version(text: str) -> tuple[int, int, int]:
    major, minor, patch = (int(p) for p in text.split("."))
    return major, minor, patch


def version_problem(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What is wrong with ``new``'s version given ``old`` (None: bumped enough, or no change)."""
    bump = required_bump(old, new)
    if bump is None:
        return None
    before, after = _version(old["info"]["version"]), _version(new["info"]["version"])
    least = {
        "major": (before[0] + 1, 0, 0),
        "minor": (before[0], before[1] + 1, 0),
        "patch": (before[0], before[1], before[2] + 1),
    }[bump]
    if after >= least:
        return None
    return (
        f"the catalog changed in a way that needs a {bump} version bump: CATALOG_VERSION is "
        f"{new['info']['version']}, was {old['info']['version']}; make it at least {'.'.join(map(str, least))}"
    )


# -- the generator ---------------------------------------------------------------------


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generated().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """The generated files in ``directory`` that are missing or differ from what the
    catalog generates now."""
    return [
        name for name, text in generated().items()
        if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comp_common.catalog", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", type=Path, help=f"write {ASYNCAPI_FILE} and {MARKDOWN_FILE} into DIR")
    action.add_argument("--check", metavar="DIR", type=Path, help="exit 1 if DIR's files differ from what would be written")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(path)
        return 0
    differing = stale(args.check)
    if differing:
        print(f"out of date in {args.check}: {', '.join(differing)}; run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
