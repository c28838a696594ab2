"""What the API answers, as pydantic models, so that OpenAPI describes every response."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from comp_common.manifest import Deployment

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


class DeploymentView(BaseModel):
    namespace: str
    name: str
    manifest: dict[str, Any] = Field(description="the applied manifest, defaults filled in")
    generation: int
    revision: int
    created_at: float
    updated_at: float
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
            status=status,
        )


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    nats: Literal["connected", "disconnected"]
