"""``GET /v1/traces/{trace_id}``: every span of one trace, as every service published it.

Spans are kept by the COMP_SPANS stream, one subject per trace (``comp.spans.<id>``).  The
read is an ordered consumer filtered on that subject that ends at the subject's last
sequence, read first (as ``comp_common.kv.read_entries`` does for buckets), so that a
trace is read whole however slow the delivery, and an unknown one answers at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field, ValidationError

from comp_common import subjects
from comp_common.traces import SpanRecord, build_tree, node_view, origin_ns

from .backends import NATS, Backends
from .routes import _UNAVAILABLE, get_backends
from .schemas import ErrorResponse

log = logging.getLogger("api.traces")
router = APIRouter()
BackendsDep = Annotated[Backends, Depends(get_backends)]
TraceIdPath = Annotated[
    str, Path(pattern=r"^[0-9a-fA-F]{32}$", description="a W3C trace id: 32 hex digits (an operation id)")
]

# A trace is one operation; more spans than this is a runaway loop, not something to read whole.
MAX_SPANS = 10_000
# The server's code for "the stream does not exist" (as opposed to "no message on that subject").
_STREAM_NOT_FOUND = 10059


class TraceView(BaseModel):
    trace_id: str
    services: list[str] = Field(description="the services with spans in the trace")
    spans: list[SpanRecord] = Field(description="every span, by start time")
    tree: list[dict[str, Any]] = Field(
        description=(
            "the spans as a tree: roots (the true root first, then spans whose parent is missing, each with "
            "`detached` saying why), each span with offset_ms from the root, duration_ms and its children"
        )
    )
    skipped: int = Field(description="records under the trace's subject that are not spans of it (ignored)")
    truncated: bool = Field(description=f"the trace has more than {MAX_SPANS} spans; the first are shown")


class TraceNotFound(Exception):
    pass


@router.get(
    "/v1/traces/{trace_id}",
    response_model=TraceView,
    responses={404: {"model": ErrorResponse, "description": "no span of this trace is kept"}, **_UNAVAILABLE},
)
async def get_trace(trace_id: TraceIdPath, backends: BackendsDep) -> TraceView:
    trace_id = trace_id.lower()
    backends.deployments()  # 503 now when NATS is away, rather than after a timeout
    async with backends.calling(NATS):
        try:
            spans, skipped, truncated = await read_trace(backends.broker.connection, trace_id)
        except TraceNotFound as exc:
            raise HTTPException(404, str(exc)) from None
    if not spans:
        raise HTTPException(404, f"trace {trace_id}: none of its {skipped} kept records is a span of it")
    roots = build_tree(spans)
    origin = origin_ns(roots)
    return TraceView(
        trace_id=trace_id,
        services=sorted({s.service or "?" for s in spans}),
        spans=sorted(spans, key=lambda s: (s.start_ns, s.span_id)),
        tree=[node_view(root, origin) for root in roots],
        skipped=skipped,
        truncated=truncated,
    )


async def read_trace(connection: Client, trace_id: str, limit: int = MAX_SPANS) -> tuple[list[SpanRecord], int, bool]:
    """The kept spans of ``trace_id``, the number of records skipped as not its spans, and
    whether ``limit`` cut the reading short.  Raises TraceNotFound when nothing is kept."""
    js = connection.jetstream()
    subject = subjects.span_subject(trace_id)
    try:
        last = (await js.get_last_msg(subjects.SPANS_STREAM, subject)).seq
    except NotFoundError as exc:
        if exc.err_code == _STREAM_NOT_FOUND:
            raise TraceNotFound(f"trace {trace_id}: no span is kept yet (the {subjects.SPANS_STREAM} stream does not exist)") from None
        raise TraceNotFound(f"trace {trace_id}: no span of it is kept (unknown, or older than the spans' retention)") from None
    arrived: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        await arrived.put(msg)

    subscription = await js.subscribe(
        subject, stream=subjects.SPANS_STREAM, cb=on_message, ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL, inactive_threshold=10,
    )
    spans: list[SpanRecord] = []
    skipped = 0
    try:
        while True:
            msg = await arrived.get()
            try:
                span = SpanRecord.model_validate_json(msg.data)
            except ValidationError:
                span = None
            if span is None or span.trace_id != trace_id:
                skipped += 1
            else:
                spans.append(span)
            if msg.metadata.sequence.stream >= last:
                return spans, skipped, False
            if len(spans) >= limit:
                log.warning("trace %s has more than %d spans; the rest are not read", trace_id, limit)
                return spans, skipped, True
    finally:
        await subscription.unsubscribe()
