"""Namespaces with quotas, and node cordon / uncordon / drain."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel, ValidationError

from comp_common import subjects
from comp_common.manifest import DNS_LABEL, errors_from_validation
from comp_common.messages import ControlEvent, NamespaceRecord, NodeControl
from comp_common.quota import Quota, quota_violations, usage_of

from .backends import NATS, Backends, DependencyUnavailable
from .routes import _UNAVAILABLE, get_backends, log
from .schemas import ErrorResponse, ManifestErrorResponse

router = APIRouter()
BackendsDep = Annotated[Backends, Depends(get_backends)]
NamePath = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]


class NamespaceBody(BaseModel):
    model_config = {"extra": "forbid"}
    quota: Quota = Quota()


class NamespaceView(NamespaceRecord):
    usage: dict[str, float] = {}


@router.put(
    "/v1/namespaces/{name}",
    response_model=NamespaceView,
    responses={422: {"model": ManifestErrorResponse}, 403: {"model": ErrorResponse}, **_UNAVAILABLE},
)
async def put_namespace(name: NamePath, request: Request, backends: BackendsDep) -> NamespaceView:
    """Create a namespace or set its quota.  A quota below what the namespace already
    reserves is refused: lowering it must follow scaling down, not precede it."""
    try:
        body = NamespaceBody.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        raise HTTPException(422, {"errors": errors_from_validation(exc)}) from None
    async with backends.calling(NATS):
        usage = usage_of(s.deployment for s in await backends.deployments().list(name))
    violations = quota_violations(body.quota, usage)
    if violations:
        raise HTTPException(403, f"namespace {name} already reserves more than this quota: " + "; ".join(violations))
    async with backends.calling(NATS):
        record, created = await backends.namespaces().put(name, body.quota)
    await _announce(backends, ControlEvent(kind="namespace", name=name, action="created" if created else "updated"))
    return NamespaceView(**record.model_dump(), usage=usage.model_dump())


@router.get("/v1/namespaces", response_model=list[NamespaceView], responses=_UNAVAILABLE)
async def list_namespaces(backends: BackendsDep) -> list[NamespaceView]:
    async with backends.calling(NATS):
        records = await backends.namespaces().list()
        deployments = await backends.deployments().list()
    views = []
    for record in records:
        usage = usage_of(s.deployment for s in deployments if s.deployment.metadata.namespace == record.name)
        views.append(NamespaceView(**record.model_dump(), usage=usage.model_dump()))
    return views


@router.delete("/v1/namespaces/{name}", responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, **_UNAVAILABLE})
async def delete_namespace(name: NamePath, backends: BackendsDep) -> dict[str, str]:
    async with backends.calling(NATS):
        if await backends.deployments().list(name):
            raise HTTPException(409, f"namespace {name} still has deployments; delete them first")
        if await backends.services().list(name):
            raise HTTPException(409, f"namespace {name} still has services; delete them first")
        if not await backends.namespaces().delete(name):
            raise HTTPException(404, f"namespace {name!r} not found")
    await _announce(backends, ControlEvent(kind="namespace", name=name, action="deleted"))
    return {"name": name, "action": "deleted"}


@router.post("/v1/nodes/{node_id}/{action}", response_model=NodeControl, responses=_UNAVAILABLE)
async def control_node(
    node_id: NamePath, action: Literal["cordon", "uncordon", "drain"], backends: BackendsDep
) -> NodeControl:
    """cordon: nothing new is placed on the node.  drain: cordon, and move its tasks
    elsewhere, each stopped only once its replacement runs.  uncordon: both undone."""
    cordoned, draining = {"cordon": (True, False), "uncordon": (False, False), "drain": (True, True)}[action]
    async with backends.calling(NATS):
        control = await backends.node_controls().set(node_id, cordoned=cordoned, draining=draining)
    await _announce(backends, ControlEvent(kind="node", name=node_id, action=action))
    return control


async def _announce(backends: Backends, event: ControlEvent) -> None:
    try:
        await backends.publish(event, subjects.control_event(event.kind, event.name))
    except DependencyUnavailable as exc:
        # Stored already; the scheduler's resync reads the bucket.
        log.error("control change %s %s stored but not announced: %s", event.kind, event.name, exc)
