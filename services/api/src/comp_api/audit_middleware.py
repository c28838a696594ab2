"""One audit record per API request, published for the audit service once it is answered.

Who (the ``x-comp-actor`` header `comp` sends, else ``anonymous``, and the client's
address), what (verb, path, resource kind, namespace, name), the outcome (status code),
the operation id (the trace id in ``x-comp-operation-id``) and, by ``audit_level`` as in
Kubernetes' audit policy, the request and response bodies.

The record is published on ``comp.audit.request`` (kept by the ``COMP_API_REQUESTS``
stream) in a task of its own after the response is sent: recording never fails nor delays
a request.  A record that cannot be published is logged with what it was about.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import nats.errors
from nats.js.errors import NoStreamResponseError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comp_common import subjects
from comp_common.streams import ensure_stream

from .backends import Backends
from .settings import ApiGroup
from .tracing import OPERATION_ID_HEADER

log = logging.getLogger("api.audit")

ACTOR_HEADER = "x-comp-actor"
ANONYMOUS = "anonymous"
MAX_ACTOR_CHARS = 200
_LEVELS = ("None", "Metadata", "Request", "RequestResponse")


def describe_route(template: str | None, path: str, path_params: dict[str, Any], query_namespace: str | None) -> dict[str, Any]:
    """Resource kind, namespace and name of a request, from the route it matched.

    The kind is the literal segment before the route's ``{name}`` (or its first parameter,
    ``/v1/nodes/{node_id}/...``), else its last literal segment (``/v1/deployments``); a
    path that matched no route is described by its own second segment.
    """
    segments = (template or path).strip("/").split("/")
    params = [i for i, s in enumerate(segments) if s.startswith("{")]
    if template is None:
        resource = segments[1] if len(segments) > 1 else segments[0]
    else:
        anchor = segments.index("{name}") if "{name}" in segments else (params[0] if params else len(segments))
        literals = [s for s in segments[:anchor] if not s.startswith("{")]
        resource = literals[-1] if literals else None
    name = path_params.get("name") or path_params.get("node_id")
    return {
        "resource": resource,
        "namespace": path_params.get("namespace") or query_namespace,
        "name": str(name) if name is not None else None,
    }


def _body_fields(name: str, body: bytes, limit: int) -> dict[str, Any]:
    """``name`` as text cut at ``limit`` bytes, and ``<name>_truncated_from`` (its whole
    size) when it was cut."""
    out: dict[str, Any] = {name: body[:limit].decode(errors="replace")}
    if len(body) > limit:
        out[f"{name}_truncated_from"] = len(body)
    return out


class AuditMiddleware:
    def __init__(self, app: ASGIApp, backends: Backends, settings: ApiGroup):
        self.app = app
        self.backends = backends
        self.level = _LEVELS.index(settings.audit_level)
        self.max_body = settings.audit_max_body_bytes
        self.excluded = frozenset(settings.audit_exclude_paths)
        # Strong references to the publishing tasks until they end (asyncio keeps weak ones).
        self._publishing: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.level == 0 or scope["path"] in self.excluded:
            await self.app(scope, receive, send)
            return
        started = time.time()
        request_body: list[bytes] = []
        response_body: list[bytes] = []
        outcome: dict[str, Any] = {"status": 500, "operation_id": None}
        keep_request, keep_response = self.level >= 2, self.level >= 3

        async def receive_recorded() -> Message:
            message = await receive()
            if keep_request and message["type"] == "http.request":
                request_body.append(message.get("body", b""))
            return message

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                for key, value in message.get("headers", []):
                    if key.decode("latin-1").lower() == OPERATION_ID_HEADER:
                        outcome["operation_id"] = value.decode("latin-1")
            elif keep_response and message["type"] == "http.response.body":
                response_body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_recorded if keep_request else receive, send_recorded)
        finally:
            try:
                record = self._record(scope, started, outcome, request_body, response_body)
            except Exception:
                log.exception("could not make the audit record of a request", extra={"path": scope.get("path")})
            else:
                task = asyncio.create_task(self._publish(record), name="api-audit-publish")
                self._publishing.add(task)
                task.add_done_callback(self._publishing.discard)

    def _record(self, scope: Scope, started: float, outcome: dict[str, Any], request_body: list[bytes], response_body: list[bytes]) -> dict[str, Any]:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        actor = headers.get(ACTOR_HEADER, "").strip()[:MAX_ACTOR_CHARS] or ANONYMOUS
        client = scope.get("client")
        query = {}
        for pair in scope.get("query_string", b"").decode("latin-1").split("&"):
            key, _, value = pair.partition("=")
            if key == "namespace":
                query["namespace"] = value
        route = scope.get("route")
        record: dict[str, Any] = {
            "actor": actor,
            "client": client[0] if client else None,
            "verb": scope["method"],
            "path": scope["path"],
            **describe_route(getattr(route, "path", None), scope["path"], scope.get("path_params") or {}, query.get("namespace")),
            "status": outcome["status"],
            "operation_id": outcome["operation_id"],
            "at": started,
            "duration_ms": round((time.time() - started) * 1000, 3),
            "level": _LEVELS[self.level],
        }
        if self.level >= 2:
            record.update(_body_fields("request_body", b"".join(request_body), self.max_body))
        if self.level >= 3:
            record.update(_body_fields("response_body", b"".join(response_body), self.max_body))
        return record

    async def _publish(self, record: dict[str, Any]) -> None:
        about = {"verb": record["verb"], "path": record["path"], "status": record["status"], "operation_id": record["operation_id"]}
        if not self.backends.nats_connected():
            log.warning("the audit record of a request was not published: not connected to NATS", extra=about)
            return
        data = json.dumps(record).encode()
        js = self.backends.broker.connection.jetstream()
        timeout = self.backends.settings.api.dependency_timeout_seconds
        try:
            try:
                await js.publish(subjects.API_REQUEST_SUBJECT, data, timeout=timeout)
            except (nats.errors.NoRespondersError, NoStreamResponseError):
                # No stream yet (no audit service has run): make it, then publish again.
                await self._ensure_stream(js)
                await js.publish(subjects.API_REQUEST_SUBJECT, data, timeout=timeout)
        except Exception as exc:
            log.warning("the audit record of a request was not published", extra={**about, "error": repr(exc)})

    async def _ensure_stream(self, js: Any) -> None:
        # The default retention; an existing stream keeps the audit's (or an operator's).
        await ensure_stream(js, subjects.API_REQUESTS_STREAM, subjects.API_REQUEST_SUBJECT, 7 * 24 * 3600, 1024**3, adjust=False)

    async def drain(self) -> None:
        """Wait for the records being published (tests, and a clean shutdown)."""
        while self._publishing:
            await asyncio.wait(list(self._publishing))
