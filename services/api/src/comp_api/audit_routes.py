"""``GET /v1/audit/log`` and ``GET /v1/audit/verify``: the audit service's answers over NATS.

The audit service holds the log; the api only asks (``comp.audit.query``,
``comp.audit.verify``).  No audit service answering is 503, saying so.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import nats.errors
from fastapi import APIRouter, Depends, HTTPException, Query

from comp_common import subjects

from .backends import NATS, Backends, DependencyUnavailable
from .routes import get_backends
from .schemas import ErrorResponse

router = APIRouter()
BackendsDep = Annotated[Backends, Depends(get_backends)]
# Verification reads the whole log: allowed longer than a query.
VERIFY_TIMEOUT_SECONDS = 120.0
MAX_LIMIT = 10_000
_RESPONSES = {
    503: {"model": ErrorResponse, "description": "NATS is unavailable, or no audit service answers"},
    502: {"model": ErrorResponse, "description": "the audit service answered with an error"},
}


async def _ask(backends: Backends, subject: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    if not backends.nats_connected():
        raise DependencyUnavailable(NATS, f"not connected to {backends.settings.nats.url}")
    try:
        reply = await backends.broker.connection.request(subject, json.dumps(body).encode(), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise HTTPException(503, f"no audit service answers on {subject} (is comp-audit running?)") from None
    except nats.errors.TimeoutError:
        raise HTTPException(503, f"the audit service did not answer on {subject} within {timeout:g}s") from None
    except (nats.errors.Error, OSError) as exc:
        raise DependencyUnavailable(NATS, str(exc) or type(exc).__name__) from exc
    try:
        answer = json.loads(reply.data)
    except ValueError:
        raise HTTPException(502, f"the audit service's answer on {subject} is not JSON") from None
    if not isinstance(answer, dict):
        raise HTTPException(502, f"the audit service's answer on {subject} is not a JSON object")
    if "error" in answer:
        raise HTTPException(400 if str(answer["error"]).startswith("bad audit query") else 502, str(answer["error"]))
    return answer


@router.get("/v1/audit/log", responses=_RESPONSES)
async def audit_log(
    backends: BackendsDep,
    actor: Annotated[str | None, Query(max_length=200, description="only api requests by this actor (user@host)")] = None,
    resource: Annotated[str | None, Query(max_length=63, description="deployments, services, namespaces, nodes, ...")] = None,
    namespace: Annotated[str | None, Query(max_length=63)] = None,
    name: Annotated[str | None, Query(max_length=253)] = None,
    kind: Annotated[Literal["request", "event", "gap"] | None, Query()] = None,
    since: Annotated[float | None, Query(ge=0, description="records appended at or after this time (seconds since the epoch)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="the newest this many matching records")] = 100,
) -> dict[str, Any]:
    """Audit records matching every filter given, oldest first (the newest ``limit`` of them)."""
    query = {"actor": actor, "resource": resource, "namespace": namespace, "name": name, "kind": kind, "since": since, "limit": limit}
    timeout = backends.settings.api.dependency_timeout_seconds
    return await _ask(backends, subjects.AUDIT_QUERY, {k: v for k, v in query.items() if v is not None}, timeout)


@router.get("/v1/audit/verify", responses=_RESPONSES)
async def audit_verify(backends: BackendsDep) -> dict[str, Any]:
    """The whole chain and its signed checkpoints checked: ``ok``, or the first problem and its record."""
    return await _ask(backends, subjects.AUDIT_VERIFY, {}, VERIFY_TIMEOUT_SECONDS)
