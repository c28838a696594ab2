"""``GET /v1/events``: the kept events, read back and followed.

NDJSON (one :class:`EventRecord` a line) by default; server-sent events when the client
accepts ``text/event-stream``, each event's ``id`` its stream sequence, so that a browser's
``EventSource`` (or any client sending ``Last-Event-ID``) resumes right after the last one
it saw.  The consumer is opened before the response starts, so bad parameters (422) and
NATS being away (503) are statuses, not a broken stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated

import anyio
import nats.errors
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from comp_common.events import (
    EventCursor,
    EventQuery,
    EventReadError,
    EventReader,
    EventRecord,
    QueryError,
    parse_namespace,
    parse_since,
    parse_target,
    plan_filter,
)

from .backends import NATS, Backends
from .routes import _UNAVAILABLE, get_backends

router = APIRouter()
log = logging.getLogger("api.events")

BackendsDep = Annotated[Backends, Depends(get_backends)]
NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
# A follow with nothing new writes an SSE comment this often, so that proxies keep the
# connection open; NDJSON gets nothing (a blank line is not a record).
KEEPALIVE_SECONDS = 15.0
# Stream sequences are unsigned 64-bit on the server; a start past this is refused there,
# which would read as NATS failing rather than as a bad parameter.
MAX_SEQUENCE = 2**63 - 2


def _invalid(parameter: str, message: str, value: object, location: str = "query") -> RequestValidationError:
    # The shape FastAPI gives its own validation errors, so that clients parse one format.
    return RequestValidationError([{"type": "value_error", "loc": (location, parameter), "msg": message, "input": value}])


@router.get(
    "/v1/events",
    responses={
        200: {
            "description": "the events, oldest first",
            "content": {NDJSON: {"schema": EventRecord.model_json_schema()}, EVENT_STREAM: {}},
        },
        **_UNAVAILABLE,
    },
    response_class=StreamingResponse,
)
async def list_events(
    request: Request,
    backends: BackendsDep,
    since: Annotated[str | None, Query(description="an RFC 3339 time (2026-12-01T10:00:00Z) or a duration before now (10m, 2h, 1h30m)")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQUENCE, description="only events after this stream sequence")] = None,
    for_: Annotated[str | None, Query(alias="for", description="KIND/NAME: deployment/web, service/api, node/n1, task/web-0a1b2c3d4e, namespace/shop")] = None,
    namespace: Annotated[str | None, Query(description="the namespace of --for's deployment or service (default: default); alone, every event of that namespace")] = None,
    follow: Annotated[bool, Query(description="keep the response open and send new events as they are kept")] = False,
    limit: Annotated[int | None, Query(ge=1, le=1_000_000, description="at most this many events")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", description="resume after this sequence (SSE reconnects send it); overrides since and after")] = None,
) -> StreamingResponse:
    """The kept events (``comp events``), oldest first; with ``follow`` the response stays
    open and delivers each new event as it is kept, until the client goes away."""
    query = _query(since, after, for_, namespace, follow, limit, last_event_id)
    backends.deployments()  # 503 at once when NATS is not connected
    reader = EventReader(
        backends.broker.connection,
        request_timeout=backends.settings.api.dependency_timeout_seconds,
        stall_seconds=2 * backends.settings.api.dependency_timeout_seconds,
    )
    async with backends.calling(NATS):
        cursor = await reader.open(query)
    sse = EVENT_STREAM in request.headers.get("accept", "")
    return StreamingResponse(
        _stream(cursor, sse, follow),
        media_type=EVENT_STREAM if sse else NDJSON,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # Runs when the client went away too, while the generator may sit at a yield.
        background=BackgroundTask(cursor.close),
    )


def _query(
    since: str | None, after: int | None, for_: str | None, namespace: str | None, follow: bool, limit: int | None,
    last_event_id: str | None,
) -> EventQuery:
    try:
        since_time = parse_since(since, datetime.now(timezone.utc)) if since is not None else None
        target = parse_target(for_, namespace) if for_ is not None else None
        scope = parse_namespace(namespace) if namespace is not None else None
    except QueryError as exc:
        raise _invalid(exc.parameter, exc.message, {"since": since, "for": for_, "namespace": namespace}[exc.parameter]) from None
    if last_event_id is not None:
        text = last_event_id.strip()
        if not text.isdigit() or len(text) > 19 or int(text) > MAX_SEQUENCE:
            raise _invalid("Last-Event-ID", "expected the stream sequence of an event (a whole number)", last_event_id, "header")
        # A reconnect resumes exactly after what the client saw, whatever the URL's since says.
        after, since_time = int(text), None
    return EventQuery(plan_filter(target, scope), after=after, since=since_time, limit=limit, follow=follow)


async def _stream(cursor: EventCursor, sse: bool, follow: bool) -> AsyncIterator[str]:
    try:
        while not cursor.done:
            record = await cursor.next(idle=KEEPALIVE_SECONDS if follow else None)
            if record is None:
                if sse and not cursor.done:
                    yield ": keepalive\n\n"
                continue
            body = record.model_dump_json()
            yield f"id: {record.seq}\ndata: {body}\n\n" if sse else body + "\n"
    except (EventReadError, nats.errors.Error, TimeoutError, OSError) as exc:
        # The status is already sent: the last line says why the listing stops short.
        log.warning("an event listing ended early: %s", exc)
        error = json.dumps({"error": f"NATS is unavailable: {exc}", "after": cursor.last_seq})
        yield f"event: error\ndata: {error}\n\n" if sse else error + "\n"
    finally:
        with anyio.CancelScope(shield=True):
            await cursor.close()
