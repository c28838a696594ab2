"""Desired state of deployments in the JetStream KV bucket, written with compare-and-set."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from nats.js.kv import KeyValue
from pydantic import BaseModel

from comp_common import subjects
from comp_common.kv import ConflictError, get_model, list_models, put_model, read_entries
from comp_common.manifest import Deployment
from comp_common.messages import DeploymentRecord, RevisionRecord
from comp_common.revisions import Revisions

log = logging.getLogger("api.store")

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

    A write that makes a new generation records it in the revisions bucket first
    (see :mod:`comp_common.revisions` for why first, and what an orphan is).
    """

    def __init__(self, kv: KeyValue, revisions: Revisions, clock: Callable[[], float] = time.time, max_attempts: int = 5):
        self._kv = kv
        self.revisions = revisions
        self._clock = clock
        self._max_attempts = max_attempts

    async def apply(self, deployment: Deployment) -> ApplyResult:
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        key = subjects.deployment_key(namespace, name)
        applied = deployment
        for _ in range(self._max_attempts):
            current = await get_model(self._kv, key, DeploymentRecord)
            now = self._clock()
            deployment = _autoscaled_replicas(applied, current[0].deployment if current else None)
            if current is None:
                record = DeploymentRecord(deployment=deployment, generation=1, created_at=now, updated_at=now)
                last_revision = None
                action: ApplyAction = "created"
                runs_differently = True
            else:
                stored, revision = current
                if stored.deployment == deployment:
                    return ApplyResult(
                        namespace=namespace, name=name, action="unchanged", revision=revision, generation=stored.generation
                    )
                # A generation is what each replica runs: labels or a replica count alone
                # change nothing that runs, so they keep the generation.
                runs_differently = stored.deployment.spec.task_hash() != deployment.spec.task_hash()
                update: dict[str, Any] = {"deployment": deployment, "updated_at": now}
                if runs_differently:
                    update |= {"generation": stored.generation + 1, "change_cause": "applied"}
                record = stored.model_copy(update=update)
                last_revision = revision
                action = "configured"
            try:
                new_revision = await self._commit(key, record, last_revision, new_generation=runs_differently)
            except ConflictError:
                continue
            return ApplyResult(namespace=namespace, name=name, action=action, revision=new_revision, generation=record.generation)
        raise ConflictError(f"deployment {key} kept changing while it was being applied; try again")

    async def change(
        self, namespace: str, name: str, build: Callable[[StoredDeployment], Awaitable[DeploymentRecord]]
    ) -> tuple[StoredDeployment, StoredDeployment]:
        """Replace the stored record with ``await build(stored)``, compare-and-set, retried on
        conflict with ``build`` called again on what is stored then.  Returns (before, after).

        ``build`` raises to refuse (:class:`RolloutRefused`); a record of another generation
        is recorded as a new revision.  Raises :class:`DeploymentNotFound` when there is none.
        """
        key = subjects.deployment_key(namespace, name)
        for _ in range(self._max_attempts):
            before = await self.get(namespace, name)
            if before is None:
                raise DeploymentNotFound(namespace, name)
            record = await build(before)
            new_generation = record.generation != before.record.generation
            try:
                revision = await self._commit(key, record, before.revision, new_generation=new_generation)
            except ConflictError:
                continue
            return before, StoredDeployment(record, revision)
        raise ConflictError(f"deployment {key} kept changing while it was being changed; try again")

    async def _commit(self, key: str, record: DeploymentRecord, last_revision: int | None, *, new_generation: bool) -> int:
        if new_generation:
            # First: were this to fail after the deployment was written, the apply would have
            # happened with its revision missing from the history.
            await self.revisions.put(
                key,
                RevisionRecord(
                    deployment=record.deployment,
                    generation=record.generation,
                    applied_at=record.updated_at,
                    change_cause=record.change_cause,
                ),
            )
        try:
            return await put_model(self._kv, key, record, last_revision)
        except ConflictError:
            if new_generation:
                await self._restore_revision(key, record.generation)
            raise

    async def _restore_revision(self, key: str, generation: int) -> None:
        """After losing a compare-and-set: the winner may have reached the same generation,
        and our revision write, if it landed after the winner's, replaced its record.  The
        deployment key's own history says what the winner wrote."""
        entries = await read_entries(self._kv, key, include_history=True)
        winner: DeploymentRecord | None = None
        latest = 0
        for entry in entries:
            if not entry.value or str(entry.operation).endswith(("DEL", "PURGE")):  # deleted: start over
                winner, latest = None, 0
                continue
            record = DeploymentRecord.model_validate_json(entry.value)
            latest = record.generation
            if record.generation < generation:
                winner = None
            elif record.generation == generation and winner is None:
                winner = record
        if winner is None:
            # Nobody reached it (ours is an orphan, overwritten when someone does), or that
            # is older than the bucket keeps: more writers raced than this can untangle.
            if latest > generation:
                log.warning("revision %d of %s may hold the spec of an apply that lost its race", generation, key)
            return
        await self.revisions.put(
            key,
            RevisionRecord(
                deployment=winner.deployment, generation=generation, applied_at=winner.updated_at, change_cause=winner.change_cause
            ),
        )

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


class DeploymentNotFound(LookupError):
    def __init__(self, namespace: str, name: str):
        self.namespace = namespace
        self.name = name
        super().__init__(f"deployment {name!r} not found in namespace {namespace!r}")


class RolloutRefused(Exception):
    """A rollout request that cannot be carried out as asked (answered 409)."""


def _autoscaled_replicas(applied: Deployment, stored: Deployment | None) -> Deployment:
    """Under an autoscale policy the replica count is the autoscaler's: an apply keeps the
    stored count (brought within the policy's bounds) instead of resetting it, as
    ``kubectl apply`` of a manifest without ``replicas`` leaves an HPA's count alone."""
    policy = applied.spec.autoscale
    if policy is None:
        return applied
    base = stored.spec.replicas if stored is not None else applied.spec.replicas
    replicas = min(max(base, policy.min), policy.max)
    if replicas == applied.spec.replicas:
        return applied
    return applied.model_copy(update={"spec": applied.spec.model_copy(update={"replicas": replicas})})
