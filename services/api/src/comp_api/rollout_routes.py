"""A deployment's revisions and its rollout: history, undo, promote (a canary), abort, status."""

from __future__ import annotations

import time
from collections import Counter
from typing import Annotated, Any, Literal

import nats.js.errors
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from comp_common import subjects
from comp_common.manifest import DNS_LABEL, errors_from_validation
from comp_common.messages import DeploymentEvent, DeploymentRecord, RevisionRecord, RolloutEvent
from comp_common.revisions import returned_to
from comp_common.telemetry import current_trace_id

from .backends import NATS, REDIS, Backends, DependencyUnavailable
from .ordering import cycle_errors
from .routes import _UNAVAILABLE, _announce, _not_found, _quota_refusal, get_backends, log
from .schemas import (
    ErrorResponse,
    ManifestErrorResponse,
    RevisionHistory,
    RevisionView,
    RolloutResponse,
    RolloutStatus,
    RolloutTasks,
)
from .store import DeploymentNotFound, RolloutRefused, StoredDeployment

router = APIRouter()
BackendsDep = Annotated[Backends, Depends(get_backends)]
NamePath = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]

_ROLLOUT = "/v1/deployments/{namespace}/{name}/rollout"
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such deployment, or no such revision of it"}}
_REFUSED = {
    409: {"model": ErrorResponse, "description": "the request does not apply to the deployment as it is (said why)"},
    403: {"model": ErrorResponse, "description": "the spec returned to would exceed the namespace quota"},
}


class UndoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_revision: int | None = Field(default=None, ge=1, description="default: the revision before the current one")


@router.get("/v1/deployments/{namespace}/{name}/revisions", response_model=RevisionHistory, responses={**_NOT_FOUND, **_UNAVAILABLE})
async def revisions(namespace: NamePath, name: NamePath, backends: BackendsDep) -> RevisionHistory:
    """Every recorded version of the deployment, oldest first."""
    store = backends.deployments()
    async with backends.calling(NATS):
        stored = await store.get(namespace, name)
        if stored is None:
            raise _not_found(namespace, name)
        history = await _history(backends, stored)
    generation = stored.record.generation
    return RevisionHistory(
        namespace=namespace,
        name=name,
        generation=generation,
        revisions=[
            RevisionView(
                generation=r.generation,
                applied_at=r.applied_at,
                change_cause=r.change_cause,
                healthy_at=r.healthy_at,
                image=r.deployment.spec.image,
                current=r.generation == generation,
            )
            for r in history
        ],
    )


@router.post(
    f"{_ROLLOUT}/undo",
    response_model=RolloutResponse,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": UndoBody.model_json_schema()}},
        }
    },
    responses={**_NOT_FOUND, **_REFUSED, 422: {"model": ManifestErrorResponse}, **_UNAVAILABLE},
)
async def undo(namespace: NamePath, name: NamePath, request: Request, backends: BackendsDep) -> Any:
    """Make a recorded revision's spec the desired one again, as a new generation.  The
    replica count and the metadata stay as they are now (as `kubectl rollout undo` restores
    only the template)."""
    raw = await request.body()
    try:
        body = UndoBody.model_validate_json(raw) if raw.strip() else UndoBody()
    except ValidationError as exc:
        return JSONResponse(ManifestErrorResponse(errors=errors_from_validation(exc)).model_dump(), status_code=422)

    def choose(stored: StoredDeployment, history: list[RevisionRecord]) -> RevisionRecord:
        generation = stored.record.generation
        if body.to_revision is None:
            earlier = [r for r in history if r.generation < generation]
            if not earlier:
                raise RolloutRefused(f"{_label(stored)} has no revision before the current one ({generation}) to undo to")
            return earlier[-1]
        if body.to_revision == generation:
            raise RolloutRefused(f"revision {generation} is the current one of {_label(stored)}; nothing to undo")
        for record in history:
            if record.generation == body.to_revision:
                return record
        known = ", ".join(str(r.generation) for r in history) or "none"
        raise HTTPException(404, f"{_label(stored)} has no revision {body.to_revision} (recorded: {known})")

    return await _return_to(backends, namespace, name, "undo", choose, lambda target: f"undo to revision {target}")


@router.post(f"{_ROLLOUT}/abort", response_model=RolloutResponse, responses={**_NOT_FOUND, **_REFUSED, **_UNAVAILABLE})
async def abort(namespace: NamePath, name: NamePath, backends: BackendsDep) -> Any:
    """Stop the rollout of the current generation: go back to the last revision that ran
    healthy (or, when none has been marked so, the one before the current)."""

    def choose(stored: StoredDeployment, history: list[RevisionRecord]) -> RevisionRecord:
        generation = stored.record.generation
        current = next((r for r in history if r.generation == generation), None)
        if current is not None and current.healthy_at is not None:
            raise RolloutRefused(
                f"the rollout of generation {generation} of {_label(stored)} completed healthy; nothing to abort "
                "(`comp rollout undo` returns to an earlier revision)"
            )
        earlier = [r for r in history if r.generation < generation]
        if not earlier:
            raise RolloutRefused(f"{_label(stored)} has no revision before the current one ({generation}) to go back to")
        healthy = [r for r in earlier if r.healthy_at is not None]
        return (healthy or earlier)[-1]

    return await _return_to(backends, namespace, name, "abort", choose, lambda target: "rollout aborted")


@router.post(f"{_ROLLOUT}/promote", response_model=RolloutResponse, responses={**_NOT_FOUND, **_REFUSED, **_UNAVAILABLE})
async def promote(namespace: NamePath, name: NamePath, backends: BackendsDep) -> Any:
    """Release the current generation's canary: the rollout goes on to every replica."""
    store = backends.deployments()

    async def build(stored: StoredDeployment) -> DeploymentRecord:
        record = stored.record
        if stored.deployment.spec.update.canary == 0:
            raise RolloutRefused(f"{_label(stored)} has no canary (spec.update.canary is 0); there is nothing to promote")
        if record.promoted_generation == record.generation:
            raise RolloutRefused(f"generation {record.generation} of {_label(stored)} is already promoted")
        return record.model_copy(update={"promoted_generation": record.generation, "updated_at": time.time()})

    async with backends.calling(NATS):
        before, after = await _change(store, namespace, name, build)
    return await _answer(backends, "promote", before, after, None, "promoted", f"canary of generation {after.record.generation} promoted")


@router.get(_ROLLOUT, response_model=RolloutStatus, responses={**_NOT_FOUND, **_UNAVAILABLE})
async def rollout_status(namespace: NamePath, name: NamePath, backends: BackendsDep) -> RolloutStatus:
    """The current generation, the last rollout event recorded for the deployment, and its tasks."""
    store = backends.deployments()
    async with backends.calling(NATS):
        stored = await store.get(namespace, name)
        if stored is None:
            raise _not_found(namespace, name)
        try:
            message = await backends.broker.connection.jetstream().get_last_msg(
                subjects.EVENTS_STREAM, subjects.rollout_event(namespace, name)
            )
            last_event = RolloutEvent.model_validate_json(message.data)
        except nats.js.errors.NotFoundError:
            last_event = None
    spec = stored.deployment.spec
    return RolloutStatus(
        namespace=namespace,
        name=name,
        generation=stored.record.generation,
        change_cause=stored.record.change_cause,
        replicas=spec.replicas,
        canary=spec.update.canary,
        promoted_generation=stored.record.promoted_generation,
        last_event=last_event,
        tasks=await _tasks_of(backends, stored.deployment.key),
    )


# ---- helpers ------------------------------------------------------------------------


async def _history(backends: Backends, stored: StoredDeployment) -> list[RevisionRecord]:
    """The recorded revisions up to the current generation; the current one is taken from the
    deployment itself where it has none (it was applied before revisions were recorded)."""
    generation = stored.record.generation
    history = await backends.deployments().revisions.list(stored.deployment.key, up_to=generation)
    if not history or history[-1].generation != generation:
        history.append(
            RevisionRecord(
                deployment=stored.deployment,
                generation=generation,
                applied_at=stored.record.updated_at,
                change_cause=stored.record.change_cause,
            )
        )
    return history


async def _return_to(backends, namespace, name, action, choose, cause) -> Any:  # type: ignore[no-untyped-def]
    """Undo and abort: a new generation whose spec is that of the revision ``choose`` picks,
    with the replica count and metadata as they are now."""
    store = backends.deployments()
    chosen: dict[str, int] = {}

    async def build(stored: StoredDeployment) -> DeploymentRecord:
        target = choose(stored, await _history(backends, stored))
        chosen["revision"] = target.generation
        current = stored.deployment
        record = returned_to(stored.record, target, cause(target.generation), time.time())
        deployment = record.deployment
        if deployment.spec.task_hash() == current.spec.task_hash():
            raise RolloutRefused(
                f"revision {target.generation} of {_label(stored)} runs what generation {stored.record.generation} "
                "runs already; there is nothing to go back to"
            )
        others = [s.deployment for s in await store.list(namespace)]
        for problem in cycle_errors([("", deployment)], others):
            raise RolloutRefused(f"revision {target.generation} of {_label(stored)} cannot be restored: {problem['message']}")
        refusal = await _quota_refusal(backends, [deployment])
        if refusal:
            raise HTTPException(403, refusal)
        return record

    async with backends.calling(NATS):
        before, after = await _change(store, namespace, name, build)
    target = chosen["revision"]
    if action == "undo":
        state, message = "progressing", f"undo to revision {target}"
    else:
        state, message = "aborted", f"rollout of generation {before.record.generation} aborted; back to revision {target}"
    return await _answer(backends, action, before, after, target, state, message)


async def _change(store, namespace: str, name: str, build) -> tuple[StoredDeployment, StoredDeployment]:  # type: ignore[no-untyped-def]
    try:
        return await store.change(namespace, name, build)
    except DeploymentNotFound:
        raise _not_found(namespace, name) from None
    except RolloutRefused as exc:
        raise HTTPException(409, str(exc)) from None


async def _answer(
    backends: Backends,
    action: Literal["undo", "promote", "abort"],
    before: StoredDeployment,
    after: StoredDeployment,
    to_revision: int | None,
    state: Literal["progressing", "promoted", "aborted"],
    message: str,
) -> RolloutResponse:
    namespace, name = after.deployment.metadata.namespace, after.deployment.metadata.name
    record = after.record
    # So that the scheduler runs a round now rather than at its next resync.
    await _announce(
        backends,
        DeploymentEvent(action="applied", namespace=namespace, name=name, revision=after.revision, generation=record.generation),
    )
    event = RolloutEvent(
        deployment=after.deployment.key,
        generation=record.generation,
        from_generation=before.record.generation,
        state=state,
        message=message,
        at=time.time(),
    )
    try:
        await backends.publish(event, subjects.rollout_event(namespace, name))
    except DependencyUnavailable as exc:
        log.error("rollout %s of %s.%s stored but its event was not published: %s", action, namespace, name, exc)
    return RolloutResponse(
        operation_id=current_trace_id() or "",
        namespace=namespace,
        name=name,
        action=action,
        generation=record.generation,
        from_generation=before.record.generation,
        to_revision=to_revision,
        change_cause=record.change_cause,
        promoted_generation=record.promoted_generation,
        revision=after.revision,
    )


async def _tasks_of(backends: Backends, key: str) -> RolloutTasks | None:
    try:
        async with backends.calling(REDIS):
            tasks = [t for t in await backends.observed.list_tasks() if t.deployment == key]
    except DependencyUnavailable as exc:
        log.warning("showing rollout without tasks: %s", exc)
        return None
    return RolloutTasks(
        total=len(tasks),
        ready=sum(t.ready for t in tasks),
        crash_looping=sum(t.crash_loop for t in tasks),
        by_state=dict(sorted(Counter(str(t.state) for t in tasks).items())),
    )


def _label(stored: StoredDeployment) -> str:
    return f"deployment {stored.deployment.metadata.namespace}/{stored.deployment.metadata.name}"
