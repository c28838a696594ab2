"""The pure half of the event history (comp_common.events): queries into filter subjects and
body rules, stream messages into records.  tests/integration/test_event_history.py runs the
same queries against a real nats-server."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comp_common import subjects
from comp_common.events import (
    MAX_DEPTH,
    RAW_LIMIT,
    EventFilter,
    QueryError,
    Target,
    describe_subject,
    parse_duration,
    parse_since,
    parse_target,
    plan_filter,
    record_from_message,
    start_sequence,
    trace_id_of,
)

NOW = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---- parsing the parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW - timedelta(minutes=10)),
        ("2h", NOW - timedelta(hours=2)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("90s", NOW - timedelta(seconds=90)),
        ("1d", NOW - timedelta(days=1)),
        ("500ms", NOW - timedelta(milliseconds=500)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2026-12-01T09:00:00Z", datetime(2026, 12, 1, 9, tzinfo=timezone.utc)),
        ("2026-12-01T11:00:00+02:00", datetime(2026, 12, 1, 9, tzinfo=timezone.utc)),
        ("2026-12-01T09:00:00.250Z", datetime(2026, 12, 1, 9, 0, 0, 250000, tzinfo=timezone.utc)),
        (" 10m ", NOW - timedelta(minutes=10)),
    ],
)
def test_since_accepts_times_and_durations(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("yesterday", "neither an RFC 3339 time"),
        ("10", "neither an RFC 3339 time"),
        ("10x", "neither an RFC 3339 time"),
        ("-10m", "neither an RFC 3339 time"),
        ("2026-12-01T09:00:00", "no UTC offset"),
        ("2026-13-01T09:00:00Z", "neither an RFC 3339 time"),
        ("99999999999d", "before the year 1"),
    ],
)
def test_since_refuses_what_is_neither(text: str, says: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_since(text, NOW)
    assert caught.value.parameter == "since"
    assert says in caught.value.message


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h", "d"])), min_size=1, max_size=4))
def test_a_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == timedelta(seconds=sum(n * unit[u] for n, u in parts))


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)))
def test_an_rfc3339_time_reads_back_as_itself(when: datetime) -> None:
    assert parse_since(when.isoformat().replace("+00:00", "Z"), NOW) == when


@pytest.mark.parametrize(
    ("text", "namespace", "expected"),
    [
        ("deployment/web", None, Target("deployment", "web", "default")),
        ("deploy/web", "shop", Target("deployment", "web", "shop")),
        ("svc/api", "shop", Target("service", "api", "shop")),
        ("service/api", None, Target("service", "api", "default")),
        ("node/t1-node-1", None, Target("node", "t1-node-1", "default")),
        ("task/web-0a1b2c3d4e", None, Target("task", "web-0a1b2c3d4e", "default")),
        ("ns/shop", None, Target("namespace", "shop", "default")),
        ("Deployment/web", None, Target("deployment", "web", "default")),
    ],
)
def test_for_names_a_kind_and_a_name(text: str, namespace: str | None, expected: Target) -> None:
    assert parse_target(text, namespace) == expected


@pytest.mark.parametrize(
    ("text", "namespace", "parameter", "says"),
    [
        ("web", None, "for", "expected KIND/NAME"),
        ("deployment/", None, "for", "expected KIND/NAME"),
        ("/web", None, "for", "expected KIND/NAME"),
        ("pod/web", None, "for", "unknown kind 'pod'"),
        ("deployment/Web", None, "for", "not a valid deployment name"),
        ("deployment/a.b", None, "for", "not a valid deployment name"),
        ("deployment/web\n", None, "for", "not a valid deployment name"),
        ("node/n1.*", None, "for", "not a valid node name"),
        ("task/>", None, "for", "not a valid task name"),
        ("deployment/" + "a" * 64, None, "for", "not a valid deployment name"),
        ("deployment/web", "Shop", "namespace", "not a valid namespace name"),
        ("deployment/web", "a.b", "namespace", "not a valid namespace name"),
    ],
)
def test_for_refuses_what_cannot_be_a_subject_token(text: str, namespace: str | None, parameter: str, says: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_target(text, namespace)
    assert caught.value.parameter == parameter
    assert says in caught.value.message


# ---- the filter a query becomes ------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "namespace", "expected_subjects"),
    [
        (None, None, ("comp.evt.>",)),
        (Target("deployment", "web", "shop"), None, (
            "comp.evt.deployment.shop.web", "comp.evt.placement.shop.web", "comp.evt.rollout.shop.web",
            "comp.evt.autoscale.shop.web", "comp.evt.task.*", "comp.evt.health.*",
        )),
        (Target("service", "api", "shop"), None, ("comp.evt.service.shop.api", "comp.evt.endpoints.shop.api")),
        (Target("node", "n1"), None, ("comp.evt.task.n1", "comp.evt.health.n1", "comp.evt.control.node.n1")),
        (Target("task", "web-1"), None, ("comp.evt.task.*", "comp.evt.health.*")),
        (None, "shop", (
            "comp.evt.deployment.shop.*", "comp.evt.placement.shop.*", "comp.evt.rollout.shop.*",
            "comp.evt.autoscale.shop.*", "comp.evt.service.shop.*", "comp.evt.endpoints.shop.*",
            "comp.evt.control.namespace.shop", "comp.evt.task.*", "comp.evt.health.*",
        )),
    ],
)
def test_a_target_becomes_filter_subjects(target: Target | None, namespace: str | None, expected_subjects: tuple[str, ...]) -> None:
    assert plan_filter(target, namespace).subjects == expected_subjects


def _task_body(deployment: str, task_id: str = "web-1") -> dict:
    return {"task_id": task_id, "node_id": "n1", "deployment": deployment, "state": "running"}


# (target, namespace, subject, body, kept?)
MATCHES = [
    (Target("deployment", "web", "shop"), None, "comp.evt.task.n1", _task_body("shop.web"), True),
    (Target("deployment", "web", "shop"), None, "comp.evt.task.n1", _task_body("default.web"), False),
    (Target("deployment", "web", "shop"), None, "comp.evt.health.n2", _task_body("shop.web"), True),
    (Target("deployment", "web", "shop"), None, "comp.evt.health.n2", _task_body("shop.webx"), False),
    (Target("deployment", "web", "shop"), None, "comp.evt.task.n1", None, False),  # not JSON: cannot be attributed
    (Target("deployment", "web", "shop"), None, "comp.evt.task.n1", ["shop.web"], False),
    (Target("deployment", "web", "shop"), None, "comp.evt.task.n1", {"deployment": 5}, False),
    (Target("deployment", "web", "shop"), None, "comp.evt.placement.shop.web", None, True),  # the subject says it all
    (Target("task", "web-1"), None, "comp.evt.task.n1", _task_body("shop.web", "web-1"), True),
    (Target("task", "web-1"), None, "comp.evt.task.n1", _task_body("shop.web", "web-10"), False),
    (None, "shop", "comp.evt.task.n1", _task_body("shop.web"), True),
    (None, "shop", "comp.evt.task.n1", _task_body("shopping.web"), False),
    (None, "shop", "comp.evt.deployment.shop.web", None, True),
    (None, None, "comp.evt.task.n1", None, True),
]


@pytest.mark.parametrize(("target", "namespace", "subject", "body", "kept"), MATCHES)
def test_per_node_events_are_narrowed_by_their_body(target, namespace, subject, body, kept: bool) -> None:
    assert plan_filter(target, namespace).matches(subject, body) is kept


_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)


@given(_names, _names, _names, _names)
def test_a_deployment_filter_keeps_exactly_its_own_task_events(namespace: str, name: str, other_ns: str, other: str) -> None:
    kept = plan_filter(Target("deployment", name, namespace))
    assert kept.matches("comp.evt.task.n1", _task_body(f"{namespace}.{name}"))
    assert kept.matches("comp.evt.task.n1", _task_body(f"{other_ns}.{other}")) is ((other_ns, other) == (namespace, name))


@given(_names, _names)
def test_filter_subjects_never_overlap(namespace: str, name: str) -> None:
    # The server refuses overlapping filter subjects on one consumer.
    for target in (None, Target("deployment", name, namespace), Target("service", name, namespace),
                   Target("node", name), Target("task", name), Target("namespace", namespace)):
        found = plan_filter(target).subjects
        assert len(found) == len(set(found))
        for a in found:
            for b in found:
                assert a == b or not _overlap(a, b), (a, b)


def _overlap(a: str, b: str) -> bool:
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)


# ---- where a read starts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "first_at_since", "last", "since_given", "start"),
    [
        (None, None, 10, False, 1),  # everything
        (4, None, 10, False, 5),  # after a sequence
        (None, 7, 10, True, 7),  # from a time
        (None, None, 10, True, 11),  # a time after every kept event: nothing now, what comes next
        (8, 3, 10, True, 9),  # both: the later bound wins
        (2, 6, 10, True, 6),
        (0, None, 0, False, 1),
    ],
)
def test_start_sequence(after, first_at_since, last, since_given, start: int) -> None:
    assert start_sequence(after, first_at_since, last, since_given) == start


# ---- a stream message as a record ----------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "body", "expected"),
    [
        ("comp.evt.deployment.shop.web", {}, ("deployment", "shop", "web")),
        ("comp.evt.placement.shop.web", {}, ("placement", "shop", "web")),
        ("comp.evt.rollout.shop.web", {}, ("rollout", "shop", "web")),
        ("comp.evt.service.shop.api", {}, ("service", "shop", "api")),
        ("comp.evt.endpoints.shop.api", {}, ("endpoints", "shop", "api")),
        ("comp.evt.autoscale.shop.web", {}, ("autoscale", "shop", "web")),
        ("comp.evt.task.n1", {"deployment": "shop.web"}, ("task", "shop", "web")),
        ("comp.evt.health.n1", {"deployment": "shop.web"}, ("health", "shop", "web")),
        ("comp.evt.task.n1", None, ("task", None, None)),
        ("comp.evt.task.n1", {"deployment": "nodot"}, ("task", None, "nodot")),
        ("comp.evt.control.namespace.shop", {}, ("control", "shop", "namespace/shop")),
        ("comp.evt.control.node.n1", {}, ("control", None, "node/n1")),
        ("comp.evt.capacity", {}, ("capacity", None, None)),
        ("comp.evt.scheduler.leader", {}, ("scheduler.leader", None, "scheduler")),
        ("comp.evt.audit.chain.x.y", {}, ("audit", None, "chain.x.y")),  # a kind this reader predates
    ],
)
def test_kind_namespace_and_name_come_from_the_subject_or_the_body(subject: str, body, expected) -> None:
    assert describe_subject(subject, body) == expected


def test_a_record_carries_the_body_and_the_trace() -> None:
    body = {"task_id": "web-1", "node_id": "n1", "deployment": "shop.web", "state": "running"}
    record = record_from_message(7, NOW, "comp.evt.task.n1", json.dumps(body).encode(), {"traceparent": TRACEPARENT})
    assert (record.seq, record.time, record.kind, record.namespace, record.name) == (7, NOW, "task", "shop", "web")
    assert record.data == body and record.raw is None
    assert record.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert json.loads(record.model_dump_json())["time"] == "2026-12-01T10:00:00Z"


@pytest.mark.parametrize(
    ("body", "raw"),
    [
        (b"not json at all", "not json at all"),
        (b"\xff\xfe{", "\ufffd\ufffd{"),
        (b"", ""),
        (b"{" * (RAW_LIMIT + 10), "{" * RAW_LIMIT),
        (b"[" * 100_000 + b"]" * 100_000, "[" * RAW_LIMIT),  # deeper than the parser's stack
        (b"[" * 600 + b"]" * 600, "[" * 600 + "]" * 600),  # parses, but no encoder would take it
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))),
    ],
)
def test_a_body_that_is_not_json_is_kept_raw(body: bytes, raw: str) -> None:
    record = record_from_message(1, NOW, "comp.evt.task.n1", body, None)
    assert record.data is None
    assert record.raw == raw
    assert (record.kind, record.namespace, record.name) == ("task", None, None)
    assert json.loads(record.model_dump_json())["raw"] == raw


def test_a_body_nested_as_deep_as_allowed_is_kept_as_json() -> None:
    body = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    record = record_from_message(1, NOW, "comp.evt.task.n1", body.encode(), None)
    assert record.raw is None
    assert json.dumps(record.data, separators=(",", ":")) == body
    assert json.loads(record.model_dump_json())["data"] == record.data


@pytest.mark.parametrize(
    ("headers", "trace_id"),
    [
        ({"traceparent": TRACEPARENT}, "4bf92f3577b34da6a3ce929d0e0e4736"),
        ({"traceparent": TRACEPARENT.upper()}, "4bf92f3577b34da6a3ce929d0e0e4736"),
        ({"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}, None),  # the invalid all-zero id
        ({"traceparent": "garbage"}, None),
        ({"content-type": "application/json"}, None),
        (None, None),
    ],
)
def test_the_trace_id_is_read_from_traceparent(headers, trace_id) -> None:
    assert trace_id_of(headers) == trace_id


@given(st.binary(max_size=300), st.one_of(st.none(), st.dictionaries(st.text(max_size=12), st.text(max_size=60), max_size=3)))
def test_any_message_makes_a_record(body: bytes, headers) -> None:
    # A garbage message must never break a listing: it becomes a record like any other.
    record = record_from_message(3, NOW, "comp.evt.task.n1", body, headers)
    assert record.seq == 3 and record.subject == "comp.evt.task.n1" and record.kind == "task"
    assert (record.data is None) or (record.raw is None)
    assert json.loads(record.model_dump_json())["seq"] == 3
    assert EventFilter().matches(record.subject, record.data)
    assert isinstance(plan_filter(Target("deployment", "web")).matches(record.subject, record.data), bool)


def test_subject_constants_this_module_relies_on() -> None:
    # The reader spells per-node subjects itself for the filter; they must be the publishers'.
    assert subjects.task_event("n1") == "comp.evt.task.n1"
    assert subjects.health_event("n1") == "comp.evt.health.n1"
    assert subjects.control_event("node", "n1") == "comp.evt.control.node.n1"
