"""The event history: reading back what the ``COMP_EVENTS`` stream kept, and following it.

Two halves.  The pure one turns a query (where to start, what it is about) into
JetStream filter subjects plus a body rule, and a stream message into an
:class:`EventRecord`; it does no I/O and takes the clock as an argument.  The other
one, :class:`EventReader`, runs a query on a NATS connection with an ordered consumer.

Why a body rule: task and health events are published per node
(``comp.evt.task.<node>``), so the subject cannot say which deployment or task they
are about; their JSON body can (``deployment``, ``task_id``).  The server narrows by
subject, the reader by body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel

from . import subjects
from .manifest import DNS_LABEL

log = logging.getLogger("comp.events")

# At most this much of a body that is not JSON is shown, so that one odd message cannot
# make a listing line megabytes long.
RAW_LIMIT = 4096
# A body nested deeper than this is shown raw: the JSON encoder gives up somewhere past 250,
# and no COMP message comes near it.
MAX_DEPTH = 100

_EVT = "comp.evt."
# Subjects ``comp.evt.<kind>.<namespace>.<name>``.
NAMESPACED_KINDS = ("deployment", "placement", "rollout", "autoscale", "service", "endpoints")
DEPLOYMENT_KINDS = ("deployment", "placement", "rollout", "autoscale")
SERVICE_KINDS = ("service", "endpoints")
# Subjects ``comp.evt.<kind>.<node>`` whose bodies name the deployment and the task.
PER_NODE_KINDS = ("task", "health")

# What ``for=KIND/NAME`` accepts, and the kind each spelling means.
TARGET_KINDS = {
    "deployment": "deployment", "deployments": "deployment", "deploy": "deployment",
    "service": "service", "services": "service", "svc": "service",
    "node": "node", "nodes": "node",
    "task": "task", "tasks": "task",
    "namespace": "namespace", "namespaces": "namespace", "ns": "namespace",
}
# Node ids and task ids are subject tokens, not necessarily DNS labels.
_TOKEN = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_]{0,252}$")
_LABEL = re.compile(DNS_LABEL)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


class QueryError(ValueError):
    """A query parameter that cannot be used; ``parameter`` names it as the API does."""

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        self.message = message
        super().__init__(f"{parameter}: {message}")


# ---- the query ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a query is about: ``kind`` is one of the values of TARGET_KINDS; ``namespace``
    only matters for deployments and services."""

    kind: str
    name: str
    namespace: str = "default"


def parse_target(text: str, namespace: str | None = None) -> Target:
    """``KIND/NAME`` (``deployment/web``, ``node/n1``, ``task/web-0a1b``) in ``namespace``."""
    kind_text, slash, name = text.partition("/")
    if not slash or not kind_text or not name:
        raise QueryError("for", f"expected KIND/NAME (e.g. deployment/web), got {text!r}")
    kind = TARGET_KINDS.get(kind_text.lower())
    if kind is None:
        known = ", ".join(sorted(set(TARGET_KINDS.values())))
        raise QueryError("for", f"unknown kind {kind_text!r}; one of {known}")
    pattern = _TOKEN if kind in ("node", "task") else _LABEL
    if len(name) > 253 or not pattern.fullmatch(name) or (pattern is _LABEL and len(name) > 63):
        raise QueryError("for", f"{name!r} is not a valid {kind} name")
    return Target(kind, name, parse_namespace(namespace) if namespace is not None else "default")


def parse_namespace(text: str) -> str:
    if len(text) > 63 or not _LABEL.fullmatch(text):
        raise QueryError("namespace", f"{text!r} is not a valid namespace name (a DNS label)")
    return text


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d``, ``1h30m``, ``500ms``."""
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(f"{text!r} is not a duration like 90s, 10m, 2h, 1d or 1h30m")
    return timedelta(seconds=seconds)


def parse_since(text: str, now: datetime) -> datetime:
    """An RFC 3339 time (``2026-12-01T10:00:00Z``) or a duration before ``now`` (``10m``)."""
    text = text.strip()
    if not text:
        raise QueryError("since", "empty; expected an RFC 3339 time or a duration like 10m")
    if _DURATION.fullmatch(text):
        try:
            return now - parse_duration(text)
        except (ValueError, OverflowError):
            raise QueryError("since", f"{text!r} reaches back before the year 1") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(
            "since", f"{text!r} is neither an RFC 3339 time (2026-12-01T10:00:00Z) nor a duration (10m, 2h)"
        ) from None
    if when.tzinfo is None:
        raise QueryError("since", f"{text!r} has no UTC offset; add Z or +hh:mm")
    try:
        return when.astimezone(timezone.utc)
    except OverflowError:
        raise QueryError("since", f"{text!r} is out of range") from None


@dataclass(frozen=True)
class BodyRule:
    """Events on subjects starting with ``subject_prefix`` match only when the body's
    ``field`` equals ``value`` (or, with ``prefix``, starts with it)."""

    subject_prefix: str
    field: str
    value: str
    prefix: bool = False

    def accepts(self, data: Any) -> bool:
        found = data.get(self.field) if isinstance(data, dict) else None
        if not isinstance(found, str):
            return False
        return found.startswith(self.value) if self.prefix else found == self.value


@dataclass(frozen=True)
class EventFilter:
    """JetStream filter subjects (never overlapping, as the server requires) and the body
    rules that narrow the per-node subjects further."""

    subjects: tuple[str, ...] = (subjects.EVENT_SUBJECTS,)
    rules: tuple[BodyRule, ...] = ()

    def matches(self, subject: str, data: Any) -> bool:
        return all(rule.accepts(data) for rule in self.rules if subject.startswith(rule.subject_prefix))


def _per_node_rules(field_name: str, value: str, prefix: bool = False) -> tuple[BodyRule, ...]:
    return tuple(BodyRule(f"{_EVT}{kind}.", field_name, value, prefix) for kind in PER_NODE_KINDS)


def _per_node_subjects() -> tuple[str, ...]:
    return tuple(f"{_EVT}{kind}.*" for kind in PER_NODE_KINDS)


def plan_filter(target: Target | None, namespace: str | None = None) -> EventFilter:
    """The filter for ``target``; without one, everything in ``namespace`` (or everything)."""
    if target is None:
        if namespace is None:
            return EventFilter()
        return plan_filter(Target("namespace", namespace))
    ns, name = target.namespace, target.name
    if target.kind == "deployment":
        key = subjects.deployment_key(ns, name)
        return EventFilter(
            tuple(f"{_EVT}{kind}.{ns}.{name}" for kind in DEPLOYMENT_KINDS) + _per_node_subjects(),
            _per_node_rules("deployment", key),
        )
    if target.kind == "service":
        return EventFilter(tuple(f"{_EVT}{kind}.{ns}.{name}" for kind in SERVICE_KINDS))
    if target.kind == "node":
        return EventFilter(
            tuple(f"{_EVT}{kind}.{name}" for kind in PER_NODE_KINDS) + (subjects.control_event("node", name),)
        )
    if target.kind == "task":
        return EventFilter(_per_node_subjects(), _per_node_rules("task_id", name))
    if target.kind == "namespace":
        return EventFilter(
            tuple(f"{_EVT}{kind}.{name}.*" for kind in NAMESPACED_KINDS)
            + (subjects.control_event("namespace", name),)
            + _per_node_subjects(),
            _per_node_rules("deployment", f"{name}.", prefix=True),
        )
    raise ValueError(f"unknown target kind {target.kind!r}")


@dataclass(frozen=True)
class EventQuery:
    """Where to start (after a stream sequence, from a time, or both: the later wins), what
    to keep, how many at most; ``follow`` keeps delivering past the present end."""

    filter: EventFilter = field(default_factory=EventFilter)
    after: int | None = None
    since: datetime | None = None
    limit: int | None = None
    follow: bool = False


def start_sequence(after: int | None, first_at_since: int | None, last: int, since_given: bool) -> int:
    """The first stream sequence to deliver.

    ``first_at_since`` is the first sequence stored at or after the query's time (None: no
    event that recent, so the start is past ``last``), ``last`` the stream's last sequence.
    """
    start = 1
    if after is not None:
        start = max(start, after + 1)
    if since_given:
        start = max(start, first_at_since if first_at_since is not None else last + 1)
    return start


# ---- one event ---------------------------------------------------------------------


class EventRecord(BaseModel):
    """One kept event as the history shows it.

    ``kind``, ``namespace`` and ``name`` come from the subject, or for task and health
    events from the body's deployment key.  ``data`` is the body as JSON; a body that is
    not JSON has ``data`` null and ``raw`` (its text, cut at RAW_LIMIT characters).
    """

    seq: int
    time: datetime
    subject: str
    kind: str
    namespace: str | None = None
    name: str | None = None
    data: Any = None
    raw: str | None = None
    trace_id: str | None = None


def describe_subject(subject: str, data: Any) -> tuple[str, str | None, str | None]:
    """``(kind, namespace, name)`` of an event."""
    tokens = subject.split(".")
    rest = tokens[2:] if subject.startswith(_EVT) else tokens
    if not rest:
        return subject, None, None
    kind = rest[0]
    if kind in NAMESPACED_KINDS and len(rest) == 3:
        return kind, rest[1], rest[2]
    if kind in PER_NODE_KINDS:
        deployment = data.get("deployment") if isinstance(data, dict) else None
        if isinstance(deployment, str) and deployment:
            namespace, dot, name = deployment.partition(".")
            return kind, (namespace if dot else None), (name if dot else deployment)
        return kind, None, None
    if kind == "control" and len(rest) == 3:
        # A namespace's control event belongs to that namespace; a node's to no namespace.
        return kind, (rest[2] if rest[1] == "namespace" else None), f"{rest[1]}/{rest[2]}"
    if len(rest) == 2 and rest[1] == "leader":
        return f"{kind}.leader", None, kind
    return kind, None, ".".join(rest[1:]) or None


def trace_id_of(headers: dict[str, str] | None) -> str | None:
    value = (headers or {}).get("traceparent")
    match = _TRACEPARENT.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None or set(match.group(1)) == {"0"}:
        return None
    return match.group(1)


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (without recursing: the point is to
    refuse what would exhaust the serializer's stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def record_from_message(
    seq: int, time: datetime, subject: str, body: bytes | None, headers: dict[str, str] | None
) -> EventRecord:
    data: Any = None
    raw: str | None = None
    try:
        data = json.loads(body or b"")
        if _depth(data) > MAX_DEPTH:
            raise ValueError("nested too deep")
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
        raw = (body or b"").decode("utf-8", errors="replace")[:RAW_LIMIT]
    kind, namespace, name = describe_subject(subject, data)
    return EventRecord(
        seq=seq, time=time, subject=subject, kind=kind, namespace=namespace, name=name,
        data=data, raw=raw, trace_id=trace_id_of(headers),
    )


# ---- reading the stream -------------------------------------------------------------


class EventReadError(RuntimeError):
    """The stream stopped answering partway through a read (NATS away or too slow)."""


class EventCursor:
    """The events of one query, in stream order, none twice; close it when done (the
    consumer on the server is deleted then)."""

    def __init__(self, reader: "EventReader", query: EventQuery, sub: Any, start: int, end: int):
        self._reader = reader
        self._query = query
        self._sub = sub
        self._end = end  # a range stops here; a follow never does
        self._last_seq = start - 1
        self._count = 0
        self.done = sub is None or (query.limit is not None and query.limit <= 0)

    @property
    def last_seq(self) -> int:
        """The last stream sequence delivered (or passed over by the filter)."""
        return self._last_seq

    async def next(self, idle: float | None = None) -> EventRecord | None:
        """The next event; None once the range is over (``done``) or, when following, after
        ``idle`` seconds with none (``done`` stays False)."""
        waited = stalled = 0.0
        while not self.done:
            step = self._reader.poll_seconds if idle is None else min(self._reader.poll_seconds, max(idle - waited, 0.01))
            try:
                msg = await self._sub.next_msg(timeout=step)
            except nats.errors.TimeoutError:
                waited += step
                if self._query.follow:
                    if idle is not None and waited >= idle:
                        return None
                    continue
                if await self._nothing_left():
                    self.done = True
                    return None
                stalled += step
                if stalled >= self._reader.stall_seconds:
                    raise EventReadError(
                        f"reading {self._reader.stream}: nothing arrived for {self._reader.stall_seconds:g}s "
                        f"after sequence {self._last_seq}, with the end at {self._end}"
                    ) from None
                continue
            stalled = 0.0
            record = self._record(msg)
            if record is not None:
                return record
        return None

    def _record(self, msg: Msg) -> EventRecord | None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self._last_seq:
            return None  # redelivered after the ordered consumer reset itself
        if not self._query.follow and seq > self._end:
            self.done = True
            return None
        self._last_seq = seq
        if not self._query.follow and seq >= self._end:
            self.done = True
        record = record_from_message(seq, _stored_at(msg), msg.subject, msg.data, msg.headers)
        if not self._query.filter.matches(record.subject, record.data):
            return None
        self._count += 1
        if self._query.limit is not None and self._count >= self._query.limit:
            self.done = True
        return record

    async def _nothing_left(self) -> bool:
        """Whether the server has nothing more for this consumer: the last matching event
        was removed (retention) after the end was read, so it will never come."""
        try:
            info = await self._sub.consumer_info()
        except (nats.errors.Error, nats.js.errors.Error):
            return False
        return info.num_pending == 0 and self._sub.pending_msgs == 0

    async def close(self) -> None:
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        self.done = True
        consumer = sub._consumer  # noqa: SLF001 (the name after any reset; nats-py keeps it private)
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError):
            await sub.unsubscribe()
        # Without this the server keeps the consumer until its inactivity threshold.
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError):
            await self._reader.js.delete_consumer(self._reader.stream, consumer)

    async def __aenter__(self) -> "EventCursor":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_V1_ACK_TOKENS = 9
_LAST_NANOSECOND_TIME = _EPOCH + timedelta(microseconds=(2**63 - 1) // 1000)


def _stored_at(msg: Msg) -> datetime:
    """When the server stored the message, cut (not rounded) to the microsecond.

    nats-py's ``metadata.timestamp`` divides the nanoseconds as a float, which can round up
    to the next microsecond; a record's time given back as ``since`` would then miss it.
    """
    tokens = Msg.Metadata._get_metadata_fields(msg.reply)  # noqa: SLF001
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending> (v1), or the v2
    # form with a domain and account hash in front.
    nanoseconds = int(tokens[7] if len(tokens) == _V1_ACK_TOKENS else tokens[Msg.Ack.Timestamp])
    return _EPOCH + timedelta(microseconds=nanoseconds // 1000)


class EventReader:
    """Runs :class:`EventQuery` against the event stream on ``nc``.

    A range ends at the last sequence of the query's subjects when it was opened, not at
    a timeout: ``stall_seconds`` only bounds a server that stopped delivering (an error).
    """

    def __init__(
        self, nc: NATS, stream: str = subjects.EVENTS_STREAM, poll_seconds: float = 0.5, stall_seconds: float = 10.0,
        request_timeout: float = 5.0,
    ):
        self.nc = nc
        self.js = nc.jetstream(timeout=request_timeout)
        self.stream = stream
        self.poll_seconds = poll_seconds
        self.stall_seconds = stall_seconds
        self.request_timeout = request_timeout

    async def last_sequence(self, filter_subjects: tuple[str, ...]) -> int:
        """The last sequence stored under any of ``filter_subjects`` (0 when none is)."""
        if filter_subjects == (subjects.EVENT_SUBJECTS,):
            info = await self.js.stream_info(self.stream)
            return info.state.last_seq if info.state.messages else 0
        last = 0
        for subject in filter_subjects:
            try:
                last = max(last, (await self.js.get_last_msg(self.stream, subject)).seq or 0)
            except nats.js.errors.NotFoundError:
                pass
        return last

    async def first_sequence_at(self, when: datetime) -> int | None:
        """The first sequence stored at or after ``when``; None when there is none."""
        # The server compares Unix nanoseconds, which an int64 holds only between 1678 and
        # 2262: a time past that wraps around to the first message.
        if when >= _LAST_NANOSECOND_TIME:
            return None
        when = max(when, _EPOCH)
        request = json.dumps({"start_time": when.astimezone(timezone.utc).isoformat()}).encode()
        reply = await self.nc.request(
            f"$JS.API.STREAM.MSG.GET.{self.stream}", request, timeout=self.request_timeout
        )
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error:
            if error.get("code") == 404:
                return None
            raise nats.js.errors.APIError(
                code=error.get("code"), err_code=error.get("err_code"), description=error.get("description")
            )
        return int(answer["message"]["seq"])

    async def open(self, query: EventQuery) -> EventCursor:
        """A cursor over ``query``'s events; raises NotFoundError when there is no stream."""
        last = await self.last_sequence(query.filter.subjects)
        first_at = await self.first_sequence_at(query.since) if query.since is not None else None
        start = start_sequence(query.after, first_at, last, query.since is not None)
        if start > last and not query.follow:
            return EventCursor(self, query, None, start, last)
        config = ConsumerConfig(
            filter_subjects=list(query.filter.subjects),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            # A reader that vanished (its process killed) leaves nothing behind for long.
            inactive_threshold=30.0,
        )
        sub = await self.js.subscribe("", stream=self.stream, ordered_consumer=True, config=config)
        return EventCursor(self, query, sub, start, last)

    async def read(self, query: EventQuery) -> list[EventRecord]:
        """Every event of a range query (``follow`` must be False)."""
        if query.follow:
            raise ValueError("read() is for a range; open() a cursor to follow")
        records: list[EventRecord] = []
        async with await self.open(query) as cursor:
            while not cursor.done:
                record = await cursor.next()
                if record is not None:
                    records.append(record)
        return records
