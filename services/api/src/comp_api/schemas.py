"""What the API answers, as pydantic models, so that OpenAPI describes every response."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from comp_common.manifest import Deployment, ServiceMode
from comp_common.messages import Endpoint, RolloutEvent, ServiceEndpoints

from .service_store import StoredService
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
    results: list[ApplyResult] = Field(description="the deployments of the manifest, in its order")
    services: list[ApplyResult] = Field(default_factory=list, description="the services of the manifest, in its order")


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


class ServicePortView(BaseModel):
    name: str = Field(description="the port's name, or <protocol>-<port>: how endpoints and counters name the port")
    port: int = Field(description="on the virtual IP")
    target_port: int | str = Field(description="the replica's port: a number, or the name of one of its deployment's ports")
    protocol: Literal["tcp", "udp"]
    published: int | None = Field(description="also open on every host's own addresses at this port")


class ServiceView(BaseModel):
    namespace: str
    name: str
    manifest: dict[str, Any] = Field(description="the applied manifest, defaults filled in")
    generation: int = Field(description="bumped when the spec changes")
    revision: int
    created_at: float
    updated_at: float
    mode: ServiceMode
    ports: list[ServicePortView] = Field(description="as applied")
    vip: str | None = Field(description="null until discovery has allocated one, and always in mode dnsrr")
    endpoints: list[Endpoint] = Field(description="the ready replicas, as discovery last wrote them")
    endpoints_updated_at: float | None = Field(description="when discovery last wrote them; null if it has not yet")

    @classmethod
    def of(cls, stored: StoredService, discovered: ServiceEndpoints | None) -> "ServiceView":
        service = stored.service
        return cls(
            namespace=service.metadata.namespace,
            name=service.metadata.name,
            manifest=service.model_dump(mode="json", by_alias=True),
            generation=stored.record.generation,
            revision=stored.revision,
            created_at=stored.record.created_at,
            updated_at=stored.record.updated_at,
            mode=service.spec.mode,
            ports=[
                ServicePortView(name=p.key, port=p.port, target_port=p.target, protocol=p.protocol, published=p.published)
                for p in service.spec.ports
            ],
            vip=discovered.vip if discovered else None,
            endpoints=discovered.endpoints if discovered else [],
            endpoints_updated_at=discovered.updated_at if discovered else None,
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
