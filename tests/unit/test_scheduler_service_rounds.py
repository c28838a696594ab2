"""The scheduler service's pure helpers: one round for many asks, and when liveness is checked."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from comp_scheduler.service import _round_origin, next_check_in


def traced(trace_id: int, span_id: int) -> otel_context.Context:
    ctx = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def test_a_burst_is_one_round_that_continues_the_first_trace_and_links_the_others():
    wanted = [
        ("deployment default.a applied", traced(1, 11)),
        ("cluster changed", None),
        ("deployment default.b applied", traced(2, 22)),
        ("cluster changed", None),
        ("deployment default.c applied", traced(3, 33)),
    ]
    why, parent, links = _round_origin(wanted)
    assert why == "deployment default.a applied, cluster changed, deployment default.b applied, deployment default.c applied"
    assert trace.get_current_span(parent).get_span_context().trace_id == 1, "joins the first event's trace"
    assert [(link.context.trace_id, link.context.span_id) for link in links] == [(2, 22), (3, 33)]


def test_a_round_nobody_traced_is_a_trace_of_its_own():
    why, parent, links = _round_origin([("cluster changed", None), ("resync", otel_context.Context())])
    assert why == "cluster changed, resync"
    assert not trace.get_current_span(parent).get_span_context().is_valid and links == []


def test_many_reasons_are_counted_not_listed():
    why, _, _ = _round_origin([(f"deployment default.d{i} applied", None) for i in range(20)])
    assert why.endswith("deployment default.d4 applied and 15 more")


@pytest.mark.parametrize(
    "deadline, now, expected",
    [
        (None, 100.0, 3.0),  # no node: a grace, within which no new node can be due
        (101.5, 100.0, 1.5),  # at the earliest deadline
        (100.01, 100.0, 0.05),  # but no sooner than the gap
        (99.0, 100.0, 0.05),  # already passed (a check ran late): again after the gap
    ],
)
def test_liveness_is_checked_at_the_earliest_deadline(deadline, now, expected):
    assert next_check_in(deadline, now, gap=0.05, grace=3.0) == pytest.approx(expected)
