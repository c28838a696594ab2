"""Prometheus metrics: the families every service shares, and serving them on ``/metrics``.

One registry per process: prometheus-client's default ``REGISTRY``, which also carries the
process's own ``process_*`` and ``python_*`` families.  A service's own families live in
its ``instruments`` module, on the same registry.

Messages are counted by the subject *pattern* they belong to (``comp.evt.task.*``), never
by the concrete subject: node ids, namespaces and names in a label would make one series
per node or deployment, which is what Prometheus' cardinality rules forbid.
:func:`subject_pattern` finds the pattern from :mod:`comp_common.subjects` itself, so a
subject added there is labelled by its own pattern without a change here.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ParamSpec, TypeVar

from faststream import BaseMiddleware
from faststream.message import SourceType
from faststream.response import PublishType
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from pydantic import ValidationError

from . import subjects
from .settings import MetricsSettings

__all__ = [
    "REGISTRY",
    "MessageMetricsMiddleware",
    "MetricsServer",
    "MetricsUnavailable",
    "known_patterns",
    "serve_metrics",
    "subject_pattern",
    "timed",
]

P = ParamSpec("P")
T = TypeVar("T")

# Seconds, from a heartbeat's half millisecond to a handler stuck on a slow dependency.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Rounds, passes and syncs: a few milliseconds to a minute.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

MESSAGES_RECEIVED = Counter(
    "comp_messages_received_total", "NATS messages received, by the subject pattern they came on", ["subject"]
)
MESSAGES_PUBLISHED = Counter(
    "comp_messages_published_total", "NATS messages published, by the subject pattern they went to", ["subject"]
)
PUBLISH_ERRORS = Counter(
    "comp_message_publish_errors_total", "NATS publishes that failed (no connection, payload too large)", ["subject"]
)
HANDLER_SECONDS = Histogram(
    "comp_message_handler_seconds",
    "Time from a message's arrival to its handler's return, decoding included",
    ["subject"],
    buckets=LATENCY_BUCKETS,
)
HANDLER_ERRORS = Counter(
    "comp_message_handler_errors_total", "Handlers that raised, by subject pattern and exception type", ["subject", "error"]
)
MESSAGES_DROPPED = Counter(
    "comp_messages_dropped_total", "Messages dropped unhandled, by subject pattern and why (invalid: not the expected model)",
    ["subject", "reason"],
)

# A subject that matches no pattern COMP knows keeps only this many leading tokens.
_FALLBACK_TOKENS = 2
_INBOX_PREFIX = "_INBOX."


def _patterns_of_module() -> tuple[str, ...]:
    """Every subject pattern in :mod:`subjects`: its wildcard constants (what services
    subscribe to), and each subject function called with ``*`` for each of its tokens."""
    constants: set[str] = set()
    made: set[str] = set()
    for name, value in vars(subjects).items():
        if name.startswith("_"):
            continue
        if isinstance(value, str) and value.startswith("comp."):
            constants.add(value)
        elif inspect.isfunction(value) and value.__module__ == subjects.__name__:
            params = inspect.signature(value).parameters.values()
            if params and all(p.annotation in ("str", str) for p in params):
                subject = value(*["*"] * len(params))
                if isinstance(subject, str) and subject.startswith("comp."):
                    made.add(subject)
    ranked = [(_specificity(p, derived=False), p) for p in constants]
    ranked += [(_specificity(p, derived=True), p) for p in made - constants]
    return tuple(p for _, p in sorted(ranked))


def _specificity(pattern: str, derived: bool) -> tuple[int, bool, bool, int, str]:
    """Sort key: most literal tokens first; among equals a constant of :mod:`subjects` (the
    name the READMEs use: ``comp.evt.deployment.>``) before one made from a function, then
    without ``>``, then longer; ties by name."""
    tokens = pattern.split(".")
    literals = sum(1 for t in tokens if t not in ("*", ">"))
    return (-literals, derived, tokens[-1] == ">", -len(tokens), pattern)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


_PATTERNS = _patterns_of_module()


def known_patterns() -> tuple[str, ...]:
    """The patterns :func:`subject_pattern` chooses among, most specific first."""
    return _PATTERNS


@lru_cache(maxsize=16384)
def subject_pattern(subject: str) -> str:
    """The label for ``subject``: the most specific known pattern it matches; a reply inbox
    is ``_INBOX.>``; anything else its first two tokens and ``>``."""
    if subject.startswith(_INBOX_PREFIX):
        return "_INBOX.>"
    for pattern in _PATTERNS:
        if matches(pattern, subject):
            return pattern
    tokens = subject.split(".")
    if len(tokens) <= 1:
        return subject
    return ".".join(tokens[: min(_FALLBACK_TOKENS, len(tokens) - 1)]) + ".>"


@dataclass(frozen=True)
class SubjectInstruments:
    """The shared families' series for one subject pattern, looked up once."""

    pattern: str
    received: Counter
    published: Counter
    handled: Histogram

    def dropped(self, reason: str) -> None:
        MESSAGES_DROPPED.labels(self.pattern, reason).inc()

    def failed(self, exc: BaseException) -> None:
        HANDLER_ERRORS.labels(self.pattern, type(exc).__name__).inc()

    def publish_failed(self) -> None:
        PUBLISH_ERRORS.labels(self.pattern).inc()


@lru_cache(maxsize=None)  # keyed by pattern, of which there are few
def _instruments_of_pattern(pattern: str) -> SubjectInstruments:
    return SubjectInstruments(
        pattern, MESSAGES_RECEIVED.labels(pattern), MESSAGES_PUBLISHED.labels(pattern), HANDLER_SECONDS.labels(pattern)
    )


@lru_cache(maxsize=16384)  # one lookup per message on the hot paths, not two
def for_subject(subject: str) -> SubjectInstruments:
    return _instruments_of_pattern(subject_pattern(subject))


class MessageMetricsMiddleware(BaseMiddleware):
    """FastStream's side of the shared families: every message a subscriber takes and every
    publish and request through the broker.

    Not FastStream's own ``NatsPrometheusMiddleware``: it labels by the concrete subject
    (one series per node and deployment) and cannot tell a message that failed validation
    from a handler that failed.  Here a pydantic ``ValidationError`` out of the handler call
    is the message not being its model (FastStream validates the body there), counted as
    dropped; any other exception is a handler error.  Replies are left out on both sides:
    their subjects are one-off inboxes and the request was counted already.
    """

    async def consume_scope(self, call_next: Callable[[Any], Any], msg: Any) -> Any:
        subject = getattr(msg.raw_message, "subject", None)
        if subject is None or msg.source_type is SourceType.RESPONSE:
            return await call_next(msg)
        instruments = for_subject(subject)
        instruments.received.inc()
        began = time.perf_counter()
        try:
            result = await call_next(msg)
        except ValidationError:
            instruments.dropped("invalid")
            raise
        except Exception as exc:
            instruments.failed(exc)
            instruments.handled.observe(time.perf_counter() - began)
            raise
        instruments.handled.observe(time.perf_counter() - began)
        return result

    async def publish_scope(self, call_next: Callable[[Any], Any], cmd: Any) -> Any:
        if cmd.publish_type is PublishType.REPLY:
            return await call_next(cmd)
        instruments = for_subject(cmd.destination)
        try:
            result = await call_next(cmd)
        except Exception:
            instruments.publish_failed()
            raise
        instruments.published.inc()
        return result


def timed(histogram: Any) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Observe each call of a coroutine function into ``histogram``, from the call to its
    return or raise (prometheus-client's own ``time()`` would time only making the coroutine)."""

    def decorate(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(function)
        async def timed_call(*args: P.args, **kwargs: P.kwargs) -> T:
            began = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - began)

        return timed_call

    return decorate


class MetricsUnavailable(SystemExit):
    """The metrics port cannot be listened on: a setting to fix, said in one line at start."""


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: Any

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(settings: MetricsSettings, registry: CollectorRegistry = REGISTRY) -> MetricsServer | None:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread (so a busy
    event loop still answers scrapes); nothing when the port is 0."""
    if settings.port == 0:
        return None
    try:
        server, _thread = start_http_server(settings.port, settings.host, registry)
    except OSError as exc:
        raise MetricsUnavailable(
            f"metrics: cannot listen on {settings.host}:{settings.port} (COMP_METRICS__HOST, COMP_METRICS__PORT): {exc.strerror or exc}"
        ) from exc
    return MetricsServer(settings.host, settings.port, server)
