"""What the API answers, as pydantic models, so that OpenAPI describes every response."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from comp_common.manifest import Deployment
from comp_common.messages import RolloutEvent

from .store import ApplyResult, StoredDeployment


class ErrorResponse(BaseModel):
    detail: str


class ManifestProblem(BaseModel):
    path: str = Field(description="where in the manifest, e.g. spec.resources.memory; empty for the whole text")
    message: str


class ManifestErrorResponse(BaseModel):
    errors: list[ManifestProblem]


class ApplyResponse(BaseModel):
    operation_id: str = Field(description="trace id of this operation, also in the x-comp-operation-id header")
    results: list[ApplyResult]


class DeleteResponse(BaseModel):
    operation_id: str
    namespace: str
    name: str
    action: Literal["deleted"] = "deleted"


class DeploymentState(BaseModel):
    """What the cluster runs of a deployment, as the scheduler last reported it."""

    desired: int = 0
    placed: int = 0
    running: int = 0
    pending_reason: str = ""
    # The rollout of the generation the scheduler last planned for: progressing, paused,
    # complete, failed, reverted ("" before any), with the step's message.
    rollout_generation: int = 0
    rollout_state: str = ""
    rollout_message: str = ""


class DeploymentView(BaseModel):
    namespace: str
    name: str
    manifest: dict[str, Any] = Field(description="the applied manifest, defaults filled in")
    generation: int
    revision: int
    created_at: float
    updated_at: float
    change_cause: str = Field(description="why this generation is the desired one: applied, undo to revision N, ...")
    promoted_generation: int = Field(description="the generation whose canary was promoted; 0 while none is")
    status: DeploymentState | None = Field(description="null when the observed state (Redis) cannot be read")

    @classmethod
    def of(cls, stored: StoredDeployment, status: DeploymentState | None) -> "DeploymentView":
        deployment: Deployment = stored.deployment
        return cls(
            namespace=deployment.metadata.namespace,
            name=deployment.metadata.name,
            manifest=deployment.model_dump(mode="json", by_alias=True),
            generation=stored.record.generation,
            revision=stored.revision,
            created_at=stored.record.created_at,
            updated_at=stored.record.updated_at,
            change_cause=stored.record.change_cause,
            promoted_generation=stored.record.promoted_generation,
            status=status,
        )


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    nats: Literal["connected", "disconnected"]


class RevisionView(BaseModel):
    generation: int = Field(description="the revision number: the deployment's generation when it was applied")
    applied_at: float
    change_cause: str
    healthy_at: float | None = Field(description="when a rollout of it completed with every task healthy")
    image: str
    current: bool = Field(description="the desired one now")


class RevisionHistory(BaseModel):
    namespace: str
    name: str
    generation: int = Field(description="the current generation")
    revisions: list[RevisionView] = Field(description="oldest first")


class RolloutResponse(BaseModel):
    operation_id: str = Field(description="trace id of this operation, also in the x-comp-operation-id header")
    namespace: str
    name: str
    action: Literal["undo", "promote", "abort"]
    generation: int = Field(description="the desired generation now")
    from_generation: int = Field(description="the generation that was desired before")
    to_revision: int | None = Field(default=None, description="undo and abort: the revision whose spec is desired now")
    change_cause: str
    promoted_generation: int
    revision: int = Field(description="KV revision of the deployment after the change")


class RolloutTasks(BaseModel):
    """The deployment's tasks as the agents last reported them.  Task status does not say which
    generation a task runs, so these count every task of the deployment."""

    total: int = 0
    ready: int = 0
    crash_looping: int = 0
    by_state: dict[str, int] = Field(default_factory=dict)


class RolloutStatus(BaseModel):
    namespace: str
    name: str
    generation: int
    change_cause: str
    replicas: int
    canary: int = Field(description="spec.update.canary of the current generation")
    promoted_generation: int
    last_event: RolloutEvent | None = Field(description="the last rollout event recorded for this deployment, of any generation")
    tasks: RolloutTasks | None = Field(description="null when the observed state (Redis) cannot be read")
