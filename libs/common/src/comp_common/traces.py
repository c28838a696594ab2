"""A trace's spans as a tree, and the tree as text (``comp trace``).

Pure: spans in, a tree and lines out.  The api builds the tree it returns here and the
CLI formats with it, so both show the same tree.  Spans come from every host, so the
tree must stand whatever arrives: a span seen twice is shown once, a span whose parent
never arrived (dropped, not yet sent, or its service is not traced) becomes an extra
root that says so, and parent chains that loop or nest absurdly deep (only garbage does
that) are cut into extra roots rather than recursed into.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HEX_TRACE_ID = r"^[0-9a-f]{32}$"
HEX_SPAN_ID = r"^[0-9a-f]{16}$"
# Deeper than any real call chain; bounds what a reader recurses into (JSON encoders too).
MAX_DEPTH = 64


class SpanLink(BaseModel):
    trace_id: str = Field(pattern=HEX_TRACE_ID)
    span_id: str = Field(pattern=HEX_SPAN_ID)


class SpanRecord(BaseModel):
    """One finished span as every service publishes it (``comp_common.telemetry.span_record``)."""

    model_config = ConfigDict(extra="ignore")

    trace_id: str = Field(pattern=HEX_TRACE_ID)
    span_id: str = Field(pattern=HEX_SPAN_ID)
    parent_id: str | None = Field(default=None, pattern=HEX_SPAN_ID)
    name: str = Field(max_length=1000)
    service: str | None = None
    kind: str = "INTERNAL"
    start_ns: int = Field(ge=0)
    end_ns: int | None = Field(default=None, ge=0)
    status: str = "UNSET"
    attributes: dict[str, Any] = Field(default_factory=dict)
    links: list[SpanLink] = Field(default_factory=list)


@dataclass
class SpanNode:
    span: SpanRecord
    # Why a root that has a parent id is a root; None for a span placed under its parent
    # and for a true root.
    detached: str | None = None
    children: list[SpanNode] = field(default_factory=list)


@dataclass(frozen=True)
class TraceLine:
    depth: int
    node: SpanNode


def _order(span: SpanRecord) -> tuple[int, str]:
    return span.start_ns, span.span_id


def build_tree(spans: Iterable[SpanRecord], max_depth: int = MAX_DEPTH) -> list[SpanNode]:
    """The roots, true roots first (by start), then the detached ones (by start); every
    node's children by start.  Each distinct span id appears exactly once."""
    by_id: dict[str, SpanRecord] = {}
    for span in spans:
        by_id.setdefault(span.span_id, span)
    children: dict[str, list[SpanRecord]] = {}
    for span in by_id.values():
        if span.parent_id is not None and span.parent_id in by_id and span.parent_id != span.span_id:
            children.setdefault(span.parent_id, []).append(span)
    for kids in children.values():
        kids.sort(key=_order)

    placed: set[str] = set()
    too_deep: set[str] = set()

    def grow(root_span: SpanRecord, detached: str | None) -> SpanNode:
        root = SpanNode(root_span, detached)
        placed.add(root_span.span_id)
        stack = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            for kid in children.get(node.span.span_id, ()):
                if kid.span_id in placed:
                    continue  # reached again through a loop in the parent ids
                if depth + 1 > max_depth:
                    too_deep.add(kid.span_id)
                    continue
                child = SpanNode(kid)
                placed.add(kid.span_id)
                node.children.append(child)
                stack.append((child, depth + 1))
        return root

    roots = [grow(s, None) for s in sorted((s for s in by_id.values() if s.parent_id is None), key=_order)]
    detached = [
        grow(s, f"parent {s.parent_id} is not in the trace")
        for s in sorted(
            (s for s in by_id.values() if s.parent_id is not None and (s.parent_id not in by_id or s.parent_id == s.span_id)),
            key=_order,
        )
    ]
    # What is left hangs off a loop of parent ids, or was cut off too deep.
    for span in sorted(by_id.values(), key=_order):
        if span.span_id not in placed:
            reason = f"nested deeper than {max_depth} levels" if span.span_id in too_deep else "its parent ids form a loop"
            detached.append(grow(span, reason))
    detached.sort(key=lambda node: _order(node.span))
    return roots + detached


def flatten(roots: list[SpanNode]) -> list[TraceLine]:
    """Depth-first, each node before its children, children in order."""
    lines: list[TraceLine] = []
    stack = [(root, 0) for root in reversed(roots)]
    while stack:
        node, depth = stack.pop()
        lines.append(TraceLine(depth, node))
        stack.extend((child, depth + 1) for child in reversed(node.children))
    return lines


def origin_ns(roots: list[SpanNode]) -> int:
    """Where offsets count from: the first true root's start, else the earliest start."""
    for root in roots:
        if root.detached is None and root.span.parent_id is None:
            return root.span.start_ns
    return min((line.node.span.start_ns for line in flatten(roots)), default=0)


def _ms(nanoseconds: int) -> float:
    return round(nanoseconds / 1e6, 3)


def node_view(node: SpanNode, origin: int) -> dict[str, Any]:
    """A node as JSON, its subtree included (bounded by MAX_DEPTH)."""
    span = node.span
    return {
        **span.model_dump(mode="json"),
        "offset_ms": _ms(span.start_ns - origin),
        "duration_ms": None if span.end_ns is None else _ms(span.end_ns - span.start_ns),
        "detached": node.detached,
        "children": [node_view(child, origin) for child in node.children],
    }


def format_trace(trace_id: str, spans: Iterable[SpanRecord]) -> str:
    """The tree as text: one line a span, indented by depth: service, name, start offset
    from the root and duration in ms, status.  Detached roots come last, under a heading."""
    roots = build_tree(spans)
    lines = flatten(roots)
    if not lines:
        return f"trace {trace_id}: no spans"
    origin = origin_ns(roots)
    services = {line.node.span.service for line in lines}
    rows: list[tuple[str, str, str, str, str | None]] = []
    for line in lines:
        span = line.node.span
        label = f"{'  ' * line.depth}{span.service or '?'} {span.name}"
        offset = f"+{(span.start_ns - origin) / 1e6:.1f} ms"
        duration = "?" if span.end_ns is None else f"{(span.end_ns - span.start_ns) / 1e6:.1f} ms"
        rows.append((label, offset, duration, span.status.lower(), line.node.detached))
    label_width = max(len(r[0]) for r in rows)
    offset_width = max(len(r[1]) for r in rows)
    duration_width = max(len(r[2]) for r in rows)
    out = [f"trace {trace_id}: {len(lines)} spans from {len(services)} services"]
    heading_done = False
    for label, offset, duration, status, detached in rows:
        if detached is not None and not heading_done:
            out.append("spans whose parent is missing, shown as extra roots:")
            heading_done = True
        text = f"{label.ljust(label_width)}  {offset.rjust(offset_width)}  {duration.rjust(duration_width)}  {status}"
        if detached is not None:
            text += f"  ({detached})"
        out.append(text.rstrip())
    return "\n".join(out)
