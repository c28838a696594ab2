"""The REST API: apply deployments and services; read and delete deployments; read tasks and nodes.
Services are read and deleted in service_routes.py."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import nats.js.errors
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from comp_common import subjects
from comp_common.manifest import DNS_LABEL, Deployment, ManifestError, Service, parse_objects
from comp_common.messages import AutoscaleDecision, DeploymentEvent, NodeInfo, PlacementEvent, ServiceEvent, TaskStatus
from comp_common.quota import quota_violations, usage_after_apply
from comp_common.scaling import ScaleRefused, scale_deployment
from comp_common.telemetry import current_trace_id

from .backends import NATS, REDIS, Backends, DependencyUnavailable
from .ordering import cycle_errors
from .schemas import (
    ApplyResponse,
    DeleteResponse,
    DeploymentState,
    DeploymentView,
    ErrorResponse,
    HealthResponse,
    ManifestErrorResponse,
)
from .service_store import published_port_clashes

log = logging.getLogger("api.routes")

router = APIRouter()


def get_backends(request: Request) -> Backends:
    return request.app.state.backends


BackendsDep = Annotated[Backends, Depends(get_backends)]
NamePath = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]

_UNAVAILABLE = {503: {"model": ErrorResponse, "description": "NATS or Redis is unavailable (named in detail)"}}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such deployment"}}


# ---- OpenAPI for the raw manifest body ----------------------------------------------

_SCHEMA_REF = "#/components/schemas/{model}"


def manifest_schemas() -> dict[str, Any]:
    """The Deployment and Service schemas and the ones they refer to, for the OpenAPI components."""
    schemas: dict[str, Any] = {}
    for model in (Deployment, Service):
        schema = model.model_json_schema(by_alias=True, ref_template=_SCHEMA_REF)
        schemas |= schema.pop("$defs", {})
        schemas[model.__name__] = schema
    return schemas


_MANIFEST_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "One or more Deployment and Service manifests (`kind`, default Deployment; the Service "
            "schema is in the components) in YAML (documents separated by `---`) or JSON, "
            "read raw whatever the Content-Type. Every document is validated before any is stored."
        ),
        "content": {
            media_type: {"schema": {"$ref": _SCHEMA_REF.format(model="Deployment")}}
            for media_type in ("application/yaml", "application/json")
        },
    }
}


# ---- routes -------------------------------------------------------------------------


@router.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def healthz(backends: BackendsDep) -> JSONResponse:
    connected = backends.nats_connected()
    body = HealthResponse(status="ok" if connected else "unavailable", nats="connected" if connected else "disconnected")
    return JSONResponse(body.model_dump(), status_code=200 if connected else 503)


@router.post(
    "/v1/apply",
    response_model=ApplyResponse,
    openapi_extra=_MANIFEST_BODY,
    responses={
        403: {"model": ErrorResponse, "description": "the apply would exceed a namespace quota; nothing was stored"},
        409: {"model": ErrorResponse, "description": "the deployment kept changing concurrently"},
        413: {"model": ErrorResponse, "description": "the body is larger than max_body_bytes"},
        422: {
            "model": ManifestErrorResponse,
            "description": (
                "the manifest is invalid, its depends_on would make a cycle, or a service's published "
                "port is another service's; nothing was stored"
            ),
        },
        **_UNAVAILABLE,
    },
)
async def apply(request: Request, backends: BackendsDep) -> Any:
    body = await _read_body(request, backends.settings.api.max_body_bytes)
    try:
        objects = parse_objects(body)
    except ManifestError as exc:
        return JSONResponse(ManifestErrorResponse(errors=exc.errors).model_dump(), status_code=422)
    deployment_documents = [(path, obj) for path, obj in objects if isinstance(obj, Deployment)]
    services = [(path, obj) for path, obj in objects if isinstance(obj, Service)]
    deployments = [deployment for _, deployment in deployment_documents]
    store = backends.deployments()
    errors = await _dependency_cycles(backends, deployment_documents) + await _published_port_clashes(backends, services)
    if errors:
        return JSONResponse(ManifestErrorResponse(errors=errors).model_dump(), status_code=422)
    refusal = await _quota_refusal(backends, deployments)
    if refusal:
        return JSONResponse({"detail": refusal}, status_code=403)
    results = []
    for deployment in deployments:
        async with backends.calling(NATS):
            result = await store.apply(deployment)
        results.append(result)
        if result.action != "unchanged":
            event = DeploymentEvent(
                action="applied",
                namespace=result.namespace,
                name=result.name,
                revision=result.revision,
                generation=result.generation,
            )
            await _announce(backends, event)
    service_results = []
    for _, service in services:
        async with backends.calling(NATS):
            result = await backends.services().apply(service)
        service_results.append(result)
        if result.action != "unchanged":
            await _announce_service(
                backends, ServiceEvent(action="applied", namespace=result.namespace, name=result.name, revision=result.revision)
            )
    return ApplyResponse(operation_id=current_trace_id() or "", results=results, services=service_results)


@router.get("/v1/deployments", response_model=list[DeploymentView], responses=_UNAVAILABLE)
async def list_deployments(backends: BackendsDep, namespace: str | None = None) -> list[DeploymentView]:
    store = backends.deployments()
    async with backends.calling(NATS):
        stored = await store.list(namespace)
    states = await _deployment_states(backends)
    return [DeploymentView.of(s, _state_of(states, s.deployment.key)) for s in stored]


class ScaleRequest(BaseModel):
    replicas: int = Field(ge=0, le=100_000)


class ScaleResponse(BaseModel):
    namespace: str
    name: str
    replicas: int
    previous: int
    revision: int
    changed: bool


@router.post(
    "/v1/deployments/{namespace}/{name}/scale",
    response_model=ScaleResponse,
    responses={
        **_NOT_FOUND, **_UNAVAILABLE,
        403: {"model": ErrorResponse, "description": "the namespace's quota would be exceeded"},
        409: {"model": ErrorResponse, "description": "outside the deployment's autoscale bounds, or it kept changing"},
    },
)
async def scale(namespace: NamePath, name: NamePath, request: ScaleRequest, backends: BackendsDep) -> ScaleResponse:
    """Set the replica count, as the autoscaler does (``comp_common.scaling``): the
    generation is kept, nothing restarts; a count outside an autoscale policy's bounds
    is refused."""
    async with backends.calling(NATS):
        try:
            scaled = await scale_deployment(
                backends.bucket(subjects.DEPLOYMENTS_BUCKET), backends.bucket(subjects.NAMESPACES_BUCKET),
                namespace, name, request.replicas,
            )
        except ScaleRefused as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
    if scaled.changed:
        await _announce(backends, DeploymentEvent(
            action="applied", namespace=namespace, name=name, revision=scaled.revision, generation=scaled.record.generation,
        ))
    return ScaleResponse(
        namespace=namespace, name=name, replicas=scaled.record.deployment.spec.replicas, previous=scaled.previous,
        revision=scaled.revision, changed=scaled.changed,
    )


@router.get(
    "/v1/deployments/{namespace}/{name}", response_model=DeploymentView, responses={**_NOT_FOUND, **_UNAVAILABLE}
)
async def get_deployment(namespace: NamePath, name: NamePath, backends: BackendsDep) -> DeploymentView:
    store = backends.deployments()
    async with backends.calling(NATS):
        stored = await store.get(namespace, name)
    if stored is None:
        raise _not_found(namespace, name)
    states = await _deployment_states(backends)
    return DeploymentView.of(stored, _state_of(states, stored.deployment.key))


@router.delete(
    "/v1/deployments/{namespace}/{name}", response_model=DeleteResponse, responses={**_NOT_FOUND, **_UNAVAILABLE}
)
async def delete_deployment(namespace: NamePath, name: NamePath, backends: BackendsDep) -> DeleteResponse:
    store = backends.deployments()
    async with backends.calling(NATS):
        deleted = await store.delete(namespace, name)
    if deleted is None:
        raise _not_found(namespace, name)
    await _forget_revisions(backends, deleted.deployment.key)
    # The revision the deployment had when it was deleted.
    event = DeploymentEvent(
        action="deleted", namespace=namespace, name=name, revision=deleted.revision, generation=deleted.record.generation
    )
    await _announce(backends, event)
    return DeleteResponse(operation_id=current_trace_id() or "", namespace=namespace, name=name)


@router.get(
    "/v1/deployments/{namespace}/{name}/placement",
    response_model=PlacementEvent,
    responses={404: {"model": ErrorResponse, "description": "no placement decision recorded yet"}, **_UNAVAILABLE},
)
async def last_placement(namespace: NamePath, name: NamePath, backends: BackendsDep) -> PlacementEvent:
    """The scheduler's last decision for this deployment: where each task went and why, what
    was stopped and why, and why any replicas are pending."""
    backends.deployments()  # 503 at once when NATS is not connected
    subject = subjects.placement_event(namespace, name)
    async with backends.calling(NATS):
        try:
            message = await backends.broker.connection.jetstream().get_last_msg(subjects.EVENTS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            raise HTTPException(404, f"no placement decision recorded for {namespace}/{name} yet") from None
    return PlacementEvent.model_validate_json(message.data)


@router.get("/v1/tasks", response_model=list[TaskStatus], responses=_UNAVAILABLE)
async def list_tasks(
    backends: BackendsDep,
    deployment: Annotated[str | None, Query(description="only this deployment, as namespace.name")] = None,
    node: Annotated[str | None, Query(description="only tasks on this node")] = None,
) -> list[TaskStatus]:
    async with backends.calling(REDIS):
        tasks = await backends.observed.list_tasks()
    return [t for t in tasks if (deployment is None or t.deployment == deployment) and (node is None or t.node_id == node)]


@router.get("/v1/deployments/{namespace}/{name}/autoscale", response_model=list[AutoscaleDecision], responses=_UNAVAILABLE)
async def autoscale_decisions(namespace: NamePath, name: NamePath, backends: BackendsDep, count: int = 10) -> list[AutoscaleDecision]:
    """The autoscaler's last decisions for the deployment (changes and holds), newest first."""
    async with backends.calling(REDIS):
        return await backends.observed.list_autoscale_decisions(subjects.deployment_key(namespace, name), max(1, min(count, 20)))


@router.get("/v1/nodes", response_model=list[NodeInfo], responses=_UNAVAILABLE)
async def list_nodes(backends: BackendsDep) -> list[NodeInfo]:
    async with backends.calling(REDIS):
        nodes = await backends.observed.list_nodes()
    now = time.time()
    return [n.info(now, backends.settings.liveness.grace_seconds) for n in nodes]


# ---- helpers ------------------------------------------------------------------------


async def _dependency_cycles(backends: Backends, documents: list[tuple[str, Deployment]]) -> list[dict[str, str]]:
    """The depends_on cycles this apply would make, within the batch and with what is stored."""
    if not any(d.spec.depends_on for _, d in documents):
        return []  # a cycle through an applied deployment needs it to depend on something
    stored: list[Deployment] = []
    for namespace in sorted({d.metadata.namespace for _, d in documents}):
        async with backends.calling(NATS):
            stored += [s.deployment for s in await backends.deployments().list(namespace)]
    return cycle_errors(documents, stored)


async def _published_port_clashes(backends: Backends, services: list[tuple[str, Service]]) -> list[dict[str, str]]:
    """The published ports of this apply that other services publish already."""
    if not any(port.published is not None for _, service in services for port in service.spec.ports):
        return []
    async with backends.calling(NATS):
        stored = [s.service for s in await backends.services().list()]
    return published_port_clashes(services, stored)


async def _forget_revisions(backends: Backends, key: str) -> None:
    try:
        async with backends.calling(NATS):
            await backends.deployments().revisions.delete_all(key)
    except DependencyUnavailable as exc:
        # The deployment is gone, which is what the answer reports.  Leftovers are never
        # shown (a history stops at the current generation) and are overwritten when a
        # deployment of this name reaches their generations again.
        log.error("deployment %s deleted but not all of its revisions: %s", key, exc)


async def _quota_refusal(backends: Backends, deployments: list[Deployment]) -> str | None:
    """Why this apply would exceed a namespace's quota, or None when it fits."""
    problems = []
    for namespace in sorted({d.metadata.namespace for d in deployments}):
        async with backends.calling(NATS):
            record = await backends.namespaces().get(namespace)
            if record is None:
                continue
            existing = [s.deployment for s in await backends.deployments().list(namespace)]
        usage = usage_after_apply(existing, [d for d in deployments if d.metadata.namespace == namespace])
        violations = quota_violations(record.quota, usage)
        if violations:
            problems.append(f"namespace {namespace} quota exceeded: " + "; ".join(violations))
    return "; ".join(problems) + "; nothing was applied" if problems else None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``."""
    too_large = HTTPException(
        413, f"request body is larger than {limit} bytes (the api's limit, COMP_API__MAX_BODY_BYTES)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _announce(backends: Backends, event: DeploymentEvent) -> None:
    try:
        await backends.publish(event, subjects.deployment_event(event.namespace, event.name))
    except DependencyUnavailable as exc:
        # The change is stored, which is what the answer reports; the scheduler's
        # periodic resync reads the bucket and picks it up without the event.
        log.error("deployment %s.%s %s but its event was not published: %s", event.namespace, event.name, event.action, exc)


async def _announce_service(backends: Backends, event: ServiceEvent) -> None:
    try:
        await backends.publish(event, subjects.service_event(event.namespace, event.name))
    except DependencyUnavailable as exc:
        # Stored, which is what the answer reports; discovery's resync reads the bucket.
        log.error("service %s.%s %s but its event was not published: %s", event.namespace, event.name, event.action, exc)


async def _deployment_states(backends: Backends) -> dict[str, DeploymentState] | None:
    """Observed state of every deployment, or None when Redis cannot be read.

    Desired state is still worth showing while Redis is down, so this degrades
    instead of failing the request.
    """
    try:
        async with backends.calling(REDIS):
            statuses = await backends.observed.list_deployment_statuses()
    except DependencyUnavailable as exc:
        log.warning("showing deployments without status: %s", exc)
        return None
    return {
        key: DeploymentState(
            desired=s.desired, placed=s.placed, running=s.running, pending_reason=s.pending_reason,
            rollout_generation=s.generation, rollout_state=s.rollout_state, rollout_message=s.rollout_message,
        )
        for key, s in statuses.items()
    }


def _state_of(states: dict[str, DeploymentState] | None, key: str) -> DeploymentState | None:
    if states is None:
        return None
    # Absent: the scheduler has not reported on it yet.
    return states.get(key, DeploymentState())


def _not_found(namespace: str, name: str) -> HTTPException:
    return HTTPException(404, f"deployment {name!r} not found in namespace {namespace!r}")
