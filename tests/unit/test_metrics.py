"""The metric families every service shares (comp_common.metrics): messages counted by
subject pattern (bounded label values whatever the node ids and names), handler latency,
handler errors and garbage counted by the plain nats-py callback, and /metrics served over
HTTP in the text format Prometheus' own parser reads."""

from __future__ import annotations

import inspect
import socket

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ValidationError

from comp_cli.local import free_port
from comp_common import metrics, subjects
from comp_common.broker import typed_callback
from comp_common.metrics import MetricsUnavailable, matches, serve_metrics, subject_pattern
from comp_common.settings import CommonSettings, MetricsSettings

DNS_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    "subject, pattern",
    [
        (subjects.task_event("node-1"), "comp.evt.task.*"),
        (subjects.node_heartbeat("node-7"), "comp.node.*.heartbeat"),
        (subjects.node_nudge("node-7"), "comp.node.*.nudge"),
        (subjects.node_ping("n"), "comp.node.*.ping"),
        # The constant services subscribe to, not the function's two-wildcard form.
        (subjects.deployment_event("default", "web"), subjects.DEPLOYMENT_EVENTS),
        (subjects.placement_event("team-a", "api"), subjects.PLACEMENT_EVENTS),
        (subjects.lb_counters("default", "web"), subjects.LB_COUNTERS),
        (subjects.CAPACITY_EVENTS, "comp.evt.capacity"),
        (subjects.SCHEDULER_LEADER_EVENTS, "comp.evt.scheduler.leader"),
        (subjects.DISCOVERY_LOOKUP, "comp.discovery.lookup"),
        # An event subject with no pattern of its own is still in the event log's.
        ("comp.evt.something-new.x", subjects.EVENT_SUBJECTS),
        ("_INBOX.Gx9Kf2.17", "_INBOX.>"),
        ("comp.unknown.a.b.c", "comp.unknown.>"),
        ("other.x", "other.>"),
        ("single", "single"),
    ],
)
def test_subject_pattern(subject: str, pattern: str) -> None:
    assert subject_pattern(subject) == pattern


@pytest.mark.parametrize(
    "pattern, subject, expected",
    [
        ("comp.evt.task.*", "comp.evt.task.n1", True),
        ("comp.evt.task.*", "comp.evt.task.n1.x", False),
        ("comp.evt.task.*", "comp.evt.task", False),
        ("comp.evt.>", "comp.evt.task.n1", True),
        ("comp.evt.>", "comp.evt", False),
        ("comp.node.*.heartbeat", "comp.node.n1.heartbeat", True),
        ("comp.node.*.heartbeat", "comp.node.n1.nudge", False),
        ("comp.evt.capacity", "comp.evt.capacity", True),
        ("comp.evt.capacity", "comp.evt.capacityx", False),
    ],
)
def test_matches_follows_nats_wildcards(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


def _subject_functions() -> list:
    """The functions of comp_common.subjects that build a subject from string tokens."""
    found = []
    for name, function in vars(subjects).items():
        if name.startswith("_") or not inspect.isfunction(function):
            continue
        params = inspect.signature(function).parameters.values()
        if params and all(p.annotation in ("str", str) for p in params):
            if function(*["x"] * len(params)).startswith("comp."):
                found.append(function)
    return found


SUBJECT_FUNCTIONS = _subject_functions()


def test_every_subject_function_is_covered() -> None:
    # The property below is only as good as the functions it walks.
    names = {f.__name__ for f in SUBJECT_FUNCTIONS}
    assert {"task_event", "node_heartbeat", "node_nudge", "deployment_event", "lb_counters"} <= names


@given(data=st.data())
def test_the_label_never_depends_on_the_ids_in_a_subject(data: st.DataObject) -> None:
    """Bounded cardinality: two subjects from one subject function, with any tokens, get one
    label, a pattern COMP knows, that the subject matches."""
    make = data.draw(st.sampled_from(SUBJECT_FUNCTIONS))
    arity = len(inspect.signature(make).parameters)
    first = make(*data.draw(st.lists(DNS_LABEL, min_size=arity, max_size=arity)))
    second = make(*data.draw(st.lists(DNS_LABEL, min_size=arity, max_size=arity)))
    assert subject_pattern(first) == subject_pattern(second)
    assert subject_pattern(first) in metrics.known_patterns()
    assert matches(subject_pattern(first), first)


@given(st.lists(st.text(alphabet="abcdefghij-_0123456789", min_size=1, max_size=12), min_size=1, max_size=6))
def test_an_unknown_subject_keeps_at_most_two_tokens(tokens: list[str]) -> None:
    subject = "zz" + ".".join(tokens)
    pattern = subject_pattern(subject)
    literal = [t for t in pattern.split(".") if t != ">"]
    assert len(literal) <= 2 and subject.startswith(".".join(literal))


class Reading(BaseModel):
    value: int


def _msg(subject: str, data: bytes) -> Msg:
    return Msg(_client=None, subject=subject, data=data)  # type: ignore[arg-type]


async def test_a_handled_message_counts_in_and_its_latency_under_its_pattern() -> None:
    subject, pattern = subjects.node_metrics("node-a1"), "comp.metrics.node.*"
    handled: list[Reading] = []
    callback = typed_callback(Reading, handled.append)
    received = sample("comp_messages_received_total", subject=pattern)
    observed = sample("comp_message_handler_seconds_count", subject=pattern)

    await callback(_msg(subject, b'{"value": 3}'))
    await callback(_msg(subjects.node_metrics("node-b2"), b'{"value": 4}'))

    assert [r.value for r in handled] == [3, 4]
    assert sample("comp_messages_received_total", subject=pattern) == received + 2
    assert sample("comp_message_handler_seconds_count", subject=pattern) == observed + 2
    assert sample("comp_message_handler_seconds_sum", subject=pattern) > 0
    # The concrete subjects never become label values.
    assert sample("comp_messages_received_total", subject=subject) == 0


@pytest.mark.parametrize("garbage", [b"not json", b'{"value": "three"}', b"\xff\xfe", b"", b"[" * 10_000])
async def test_garbage_is_dropped_and_counted_and_the_handler_never_called(garbage: bytes) -> None:
    subject, pattern = subjects.node_metrics("node-g"), "comp.metrics.node.*"
    handled: list[Reading] = []
    callback = typed_callback(Reading, handled.append)
    dropped = sample("comp_messages_dropped_total", subject=pattern, reason="invalid")
    received = sample("comp_messages_received_total", subject=pattern)
    observed = sample("comp_message_handler_seconds_count", subject=pattern)

    await callback(_msg(subject, garbage))

    assert handled == []
    assert sample("comp_messages_dropped_total", subject=pattern, reason="invalid") == dropped + 1
    assert sample("comp_messages_received_total", subject=pattern) == received + 1
    assert sample("comp_message_handler_seconds_count", subject=pattern) == observed, "no handler ran"


async def test_a_failing_handler_is_counted_by_error_type_and_the_next_message_still_handled() -> None:
    subject, pattern = subjects.service_rate("default", "web"), "comp.metrics.service.*.*"
    handled: list[int] = []

    def handle(reading: Reading) -> None:
        if reading.value < 0:
            raise LookupError("no such deployment")
        handled.append(reading.value)

    callback = typed_callback(Reading, handle)
    errors = sample("comp_message_handler_errors_total", subject=pattern, error="LookupError")
    observed = sample("comp_message_handler_seconds_count", subject=pattern)

    await callback(_msg(subject, b'{"value": -1}'))
    await callback(_msg(subject, b'{"value": 5}'))

    assert handled == [5]
    assert sample("comp_message_handler_errors_total", subject=pattern, error="LookupError") == errors + 1
    assert sample("comp_message_handler_seconds_count", subject=pattern) == observed + 2


def _scrape(url: str) -> dict[str, list]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def test_metrics_are_served_over_http_in_the_text_format() -> None:
    registry = CollectorRegistry()
    requests = Counter("comp_test_requests_total", "test", ["route"], registry=registry)
    requests.labels("/v1/x").inc(3)
    server = serve_metrics(MetricsSettings(port=free_port()), registry)
    assert server is not None
    try:
        families = _scrape(server.url)
        # The parser names a counter's family without _total; its sample keeps it.
        (value,) = [s.value for s in families["comp_test_requests"] if s.name == "comp_test_requests_total"]
        assert value == 3
        requests.labels("/v1/x").inc()
        families = _scrape(server.url)
        (value,) = [s.value for s in families["comp_test_requests"] if s.name == "comp_test_requests_total"]
        assert value == 4, "each scrape reads the current values"
        # A query the exposition does not understand filters nothing out and breaks nothing.
        assert "comp_test_requests" in _scrape(server.url + "?name[]=&x=%ff&&=")
    finally:
        server.close()


def test_the_process_registry_carries_the_shared_families() -> None:
    server = serve_metrics(MetricsSettings(port=free_port()))
    assert server is not None
    try:
        families = _scrape(server.url)
    finally:
        server.close()
    for family in ("comp_messages_received", "comp_messages_published", "comp_message_handler_seconds",
                   "comp_message_handler_errors", "comp_messages_dropped", "comp_message_publish_errors"):
        assert family in families
    assert "process_cpu_seconds" in families, "one registry per process: the process collector is on it"


def test_port_zero_serves_nothing() -> None:
    assert MetricsSettings().port == 0
    assert serve_metrics(MetricsSettings()) is None


def test_a_port_in_use_is_a_clear_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsUnavailable) as raised:
            serve_metrics(MetricsSettings(port=port))
    assert f"127.0.0.1:{port}" in str(raised.value) and "COMP_METRICS__PORT" in str(raised.value)


def test_metrics_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMP_METRICS__PORT", "9464")
    monkeypatch.setenv("COMP_METRICS__HOST", "0.0.0.0")
    settings = CommonSettings()
    assert (settings.metrics.host, settings.metrics.port) == ("0.0.0.0", 9464)


@pytest.mark.parametrize("port", [-1, 65536, "http"])
def test_a_bad_metrics_port_is_refused(port: object) -> None:
    with pytest.raises(ValidationError, match="port"):
        MetricsSettings(port=port)
