"""Desired state of deployments in the JetStream KV bucket, written with compare-and-set."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from nats.js.kv import KeyValue
from pydantic import BaseModel

from comp_common import subjects
from comp_common.kv import ConflictError, get_model, list_models, put_model
from comp_common.manifest import Deployment
from comp_common.messages import DeploymentRecord

ApplyAction = Literal["created", "configured", "unchanged"]


class ApplyResult(BaseModel):
    namespace: str
    name: str
    action: ApplyAction
    revision: int
    generation: int


@dataclass(frozen=True)
class StoredDeployment:
    record: DeploymentRecord
    revision: int

    @property
    def deployment(self) -> Deployment:
        return self.record.deployment


class DeploymentStore:
    """Create, update, read and delete deployments by ``namespace.name``.

    Every write is conditional on the revision that was read, so two concurrent
    applies of the same deployment cannot lose one another's change: the loser
    re-reads and tries again, a bounded number of times.
    """

    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time, max_attempts: int = 5):
        self._kv = kv
        self._clock = clock
        self._max_attempts = max_attempts

    async def apply(self, deployment: Deployment) -> ApplyResult:
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        key = subjects.deployment_key(namespace, name)
        for _ in range(self._max_attempts):
            current = await get_model(self._kv, key, DeploymentRecord)
            now = self._clock()
            if current is None:
                record = DeploymentRecord(deployment=deployment, generation=1, created_at=now, updated_at=now)
                last_revision = None
                action: ApplyAction = "created"
            else:
                stored, revision = current
                if stored.deployment == deployment:
                    return ApplyResult(
                        namespace=namespace, name=name, action="unchanged", revision=revision, generation=stored.generation
                    )
                # A generation is what each replica runs: labels or a replica count alone
                # change nothing that runs, so they keep the generation.
                runs_differently = stored.deployment.spec.task_hash() != deployment.spec.task_hash()
                record = stored.model_copy(
                    update={
                        "deployment": deployment,
                        "generation": stored.generation + 1 if runs_differently else stored.generation,
                        "updated_at": now,
                    }
                )
                last_revision = revision
                action = "configured"
            try:
                new_revision = await put_model(self._kv, key, record, last_revision)
            except ConflictError:
                continue
            return ApplyResult(namespace=namespace, name=name, action=action, revision=new_revision, generation=record.generation)
        raise ConflictError(f"deployment {key} kept changing while it was being applied; try again")

    async def get(self, namespace: str, name: str) -> StoredDeployment | None:
        found = await get_model(self._kv, subjects.deployment_key(namespace, name), DeploymentRecord)
        return StoredDeployment(*found) if found else None

    async def list(self, namespace: str | None = None) -> list[StoredDeployment]:
        records = await list_models(self._kv, DeploymentRecord)
        stored = [StoredDeployment(record, revision) for record, revision in records.values()]
        if namespace is not None:
            stored = [s for s in stored if s.deployment.metadata.namespace == namespace]
        return sorted(stored, key=lambda s: (s.deployment.metadata.namespace, s.deployment.metadata.name))

    async def delete(self, namespace: str, name: str) -> StoredDeployment | None:
        """Delete and return what was stored, or None when there was nothing to delete."""
        key = subjects.deployment_key(namespace, name)
        found = await get_model(self._kv, key, DeploymentRecord)
        if found is None:
            return None
        await self._kv.delete(key)
        return StoredDeployment(*found)
