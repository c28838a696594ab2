"""`comp trace`'s pure core: a trace's spans as a tree (orphans, loops, ordering) and as text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comp_common.traces import SpanRecord, build_tree, flatten, format_trace, node_view, origin_ns

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
MS = 1_000_000


def sid(n: int) -> str:
    return f"{n:016x}"


def span(n: int, parent: int | None, start_ms: float, dur_ms: float = 1.0, service: str = "svc", name: str | None = None,
         status: str = "UNSET") -> SpanRecord:
    start = int(1_700_000_000_000 * MS + start_ms * MS)
    return SpanRecord(
        trace_id=TRACE, span_id=sid(n), parent_id=None if parent is None else sid(parent), name=name or f"s{n}",
        service=service, start_ns=start, end_ns=start + int(dur_ms * MS), status=status,
    )


def shape(spans: list[SpanRecord]) -> list[tuple[int, str, str | None]]:
    """(depth, span name, why detached) in display order."""
    return [(line.depth, line.node.span.name, line.node.detached) for line in flatten(build_tree(spans))]


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param([span(1, None, 0)], [(0, "s1", None)], id="one-root"),
        pytest.param(
            # Given out of order: children by start, each under its parent.
            [span(3, 1, 5), span(2, 1, 2), span(1, None, 0), span(4, 2, 3)],
            [(0, "s1", None), (1, "s2", None), (2, "s4", None), (1, "s3", None)],
            id="nested-ordered-by-start",
        ),
        pytest.param(
            [span(2, 1, 1), span(3, 1, 1), span(1, None, 0)],
            [(0, "s1", None), (1, "s2", None), (1, "s3", None)],
            id="same-start-by-span-id",
        ),
        pytest.param(
            [span(1, None, 0), span(2, 1, 1), span(2, 1, 1)],
            [(0, "s1", None), (1, "s2", None)],
            id="duplicate-shown-once",
        ),
        pytest.param(
            # s5's parent (9) never arrived: an extra root after the true one, with its subtree.
            [span(1, None, 0), span(5, 9, 3), span(6, 5, 4), span(2, 1, 10)],
            [(0, "s1", None), (1, "s2", None), (0, "s5", f"parent {sid(9)} is not in the trace"), (1, "s6", None)],
            id="orphan-extra-root",
        ),
        pytest.param(
            [span(5, 9, 3), span(7, 8, 1)],
            [(0, "s7", f"parent {sid(8)} is not in the trace"), (0, "s5", f"parent {sid(9)} is not in the trace")],
            id="no-true-root",
        ),
        pytest.param(
            [span(1, 2, 0), span(2, 1, 1)],
            [(0, "s1", "its parent ids form a loop"), (1, "s2", None)],
            id="loop-cut-at-earliest",
        ),
        pytest.param(
            [span(1, 1, 0)],
            [(0, "s1", f"parent {sid(1)} is not in the trace")],
            id="own-parent",
        ),
    ],
)
def test_tree_shape(spans, expected):
    assert shape(spans) == expected


def test_chain_deeper_than_the_limit_is_cut_into_extra_roots():
    chain = [span(1, None, 0)] + [span(n, n - 1, n) for n in range(2, 8)]
    roots = build_tree(chain, max_depth=2)
    assert [(r.span.name, r.detached) for r in roots] == [
        ("s1", None), ("s4", "nested deeper than 2 levels"), ("s7", "nested deeper than 2 levels"),
    ]
    assert max(line.depth for line in flatten(roots)) == 2


def test_offsets_count_from_the_true_root():
    spans = [span(5, 9, -2), span(1, None, 0), span(2, 1, 1.5, dur_ms=2)]
    roots = build_tree(spans)
    assert origin_ns(roots) == spans[1].start_ns
    view = node_view(roots[0], origin_ns(roots))
    assert (view["offset_ms"], view["children"][0]["offset_ms"], view["children"][0]["duration_ms"]) == (0.0, 1.5, 2.0)
    assert node_view(roots[1], origin_ns(roots))["offset_ms"] == -2.0


def test_format():
    spans = [
        span(1, None, 0, 12.34, "api", "POST /v1/apply", "OK"),
        span(2, 1, 1, 3, "scheduler", "round"),
        span(3, 2, 2.5, 250, "nodeagent", "nodeagent.start_task", "ERROR"),
        span(4, 7, 300, 1, "lb", "lb.sync"),
    ]
    assert format_trace(TRACE, spans) == "\n".join([
        f"trace {TRACE}: 4 spans from 4 services",
        "api POST /v1/apply                    +0.0 ms   12.3 ms  ok",
        "  scheduler round                     +1.0 ms    3.0 ms  unset",
        "    nodeagent nodeagent.start_task    +2.5 ms  250.0 ms  error",
        "spans whose parent is missing, shown as extra roots:",
        f"lb lb.sync                          +300.0 ms    1.0 ms  unset  (parent {sid(7)} is not in the trace)",
    ])


def test_format_of_a_span_still_open_and_of_nothing():
    open_span = span(1, None, 0).model_copy(update={"end_ns": None})
    assert format_trace(TRACE, [open_span]).splitlines()[1] == "svc s1  +0.0 ms  ?  unset"
    assert format_trace(TRACE, []) == f"trace {TRACE}: no spans"


@pytest.mark.parametrize(
    "record",
    [
        {"trace_id": "xyz", "span_id": sid(1), "name": "a", "start_ns": 1},
        {"trace_id": TRACE, "span_id": "1", "name": "a", "start_ns": 1},
        {"trace_id": TRACE, "span_id": sid(1), "parent_id": "nothex!!nothex!!", "name": "a", "start_ns": 1},
        {"trace_id": TRACE, "span_id": sid(1), "name": "a", "start_ns": -5},
        {"trace_id": TRACE, "span_id": sid(1), "start_ns": 1},
    ],
    ids=["bad-trace-id", "short-span-id", "bad-parent", "negative-start", "no-name"],
)
def test_records_that_are_not_spans_are_refused(record):
    with pytest.raises(ValueError):
        SpanRecord.model_validate(record)


# Spans with random parents among a small id space: loops, orphans, duplicates, self-parents.
random_spans = st.lists(
    st.tuples(st.integers(1, 12), st.none() | st.integers(1, 14), st.integers(0, 50)),
    max_size=30,
).map(lambda rows: [span(n, p, t) for n, p, t in rows])


@given(random_spans, st.integers(1, 5))
def test_every_span_appears_once_under_its_own_parent(spans, max_depth):
    roots = build_tree(spans, max_depth=max_depth)
    lines = flatten(roots)
    assert sorted(line.node.span.span_id for line in lines) == sorted({s.span_id for s in spans})
    assert all(line.depth <= max_depth for line in lines)
    for root in roots:
        assert (root.detached is None) == (root.span.parent_id is None)
    for line in lines:
        kids = line.node.children
        assert all(kid.span.parent_id == line.node.span.span_id and kid.detached is None for kid in kids)
        assert [(k.span.start_ns, k.span.span_id) for k in kids] == sorted((k.span.start_ns, k.span.span_id) for k in kids)
    true_roots = [r for r in roots if r.detached is None]
    assert roots[: len(true_roots)] == true_roots, "true roots come first"
