"""Work done for several traced inputs (discovery's write, the lb's sync) as one span: a child of
the first cause, linked to the other traces; traceparents carried in stored values."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from comp_common.telemetry import (
    MAX_CAUSES,
    distinct_causes,
    remote_span_context,
    span_context_of_traceparent,
    span_continuing,
    traceparent_of,
)


def cause(trace: int, span: int) -> SpanContext:
    return SpanContext(trace_id=trace, span_id=span, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


A1, A2, B, C = cause(0xA, 1), cause(0xA, 2), cause(0xB, 3), cause(0xC, 4)


@pytest.fixture
def tracing():
    provider = TracerProvider()
    recorded = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(recorded))
    return provider.get_tracer("test"), recorded


@pytest.mark.parametrize(
    ("causes", "parent", "links"),
    [
        pytest.param([A1], A1, [], id="one-cause"),
        pytest.param([A1, B, C], A1, [B, C], id="first-is-parent-others-linked"),
        pytest.param([A1, A2, B], A1, [B], id="one-per-trace"),
        pytest.param([None, B, None, A1], B, [A1], id="untraced-inputs-ignored"),
    ],
)
def test_span_continuing(tracing, causes, parent, links):
    tracer, recorded = tracing
    with span_continuing(tracer, "work", causes, {"comp.service": "default.web"}) as span:
        assert span is not None
    [finished] = recorded.get_finished_spans()
    assert (finished.context.trace_id, finished.parent.span_id) == (parent.trace_id, parent.span_id)
    assert [(link.context.trace_id, link.context.span_id) for link in finished.links] == [(c.trace_id, c.span_id) for c in links]
    assert finished.attributes["comp.service"] == "default.web"


def test_no_cause_no_span(tracing):
    tracer, recorded = tracing
    with span_continuing(tracer, "resync", [None]) as span:
        assert span is None
    assert recorded.get_finished_spans() == ()


def test_a_failure_inside_is_recorded_on_the_span_and_raised(tracing):
    tracer, recorded = tracing
    with pytest.raises(RuntimeError), span_continuing(tracer, "sync", [A1]):
        raise RuntimeError("nft refused")
    [finished] = recorded.get_finished_spans()
    assert finished.status.status_code.name == "ERROR"


def test_causes_are_bounded():
    many = [cause(t, 1) for t in range(1, 100)]
    assert distinct_causes(many) == many[:MAX_CAUSES]


def test_traceparent_round_trip(tracing):
    tracer, _ = tracing
    with tracer.start_as_current_span("written") as span:
        carried = traceparent_of(span)
    back = span_context_of_traceparent(carried)
    assert (back.trace_id, back.span_id) == (span.get_span_context().trace_id, span.get_span_context().span_id)


@pytest.mark.parametrize(
    "carrier",
    [None, {}, {"traceparent": "garbage"}, {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}, {"content-type": "application/json"}],
    ids=["none", "empty", "garbage", "all-zero-ids", "no-traceparent"],
)
def test_headers_without_a_valid_trace_name_no_cause(carrier):
    assert remote_span_context(carrier) is None
