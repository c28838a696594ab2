"""A deployment's history: one RevisionRecord per generation in the revisions bucket.

Written by the api on every apply that makes a new generation (and by undo / abort),
read by `comp rollout history` and `undo`, and marked healthy by the scheduler when a
rollout completes, so that auto-revert and abort know which version to return to.

A record is written *before* the deployment's compare-and-set, so that an apply never
reports success with its revision missing.  The price is that an apply whose CAS then
fails leaves a record for a generation the deployment never reached (an orphan); it is
overwritten by whichever apply does reach that generation, and until then nothing reads
it, since the history shows only generations up to the deployment's current one.  (Two
applies racing to the same generation can also leave the loser's record in place of the
winner's; the api's store rewrites it from the deployment key's history when it loses.)
"""

from __future__ import annotations

import contextlib

from faststream.nats import NatsBroker
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from . import subjects
from .kv import ConflictError, get_model, list_models, open_bucket, put_model
from .messages import DeploymentRecord, RevisionRecord


def revision_of(record: DeploymentRecord) -> RevisionRecord:
    """The revision a deployment record's generation is recorded as."""
    return RevisionRecord(
        deployment=record.deployment,
        generation=record.generation,
        applied_at=record.updated_at,
        change_cause=record.change_cause,
    )


def returned_to(current: DeploymentRecord, target: RevisionRecord, change_cause: str, now: float) -> DeploymentRecord:
    """``current`` going back to what ``target`` ran, as a new generation (undo, abort,
    auto-revert).  The replica count and metadata stay as they are now, as `kubectl rollout
    undo` restores only the template: a scale since then is not undone with the version.

    The new generation is promoted at once: a version being returned to has run before,
    and a canary in its update policy must not hold the way back (an abort would pause).
    """
    spec = target.deployment.spec.model_copy(update={"replicas": current.deployment.spec.replicas})
    generation = current.generation + 1
    return current.model_copy(
        update={
            "deployment": current.deployment.model_copy(update={"spec": spec}),
            "generation": generation,
            "updated_at": now,
            "change_cause": change_cause,
            "promoted_generation": generation,
        }
    )


def last_healthy(history: list[RevisionRecord], before: int) -> RevisionRecord | None:
    """The newest revision older than generation ``before`` that ran healthy: where a failed
    rollout of ``before`` goes back to.  ``history`` oldest first, as :meth:`Revisions.list`."""
    for record in reversed(history):
        if record.generation < before and record.healthy_at is not None:
            return record
    return None


async def open_revisions(broker: NatsBroker) -> "Revisions":
    # open_bucket's default history, as for every bucket: creating a bucket that exists with
    # another configuration fails, so every service must open it alike (best through here).
    return Revisions(await open_bucket(broker, subjects.REVISIONS_BUCKET))


class Revisions:
    """The revisions bucket, by deployment key (``namespace.name``) and generation."""

    def __init__(self, kv: KeyValue):
        self.kv = kv

    async def put(self, deployment: str, record: RevisionRecord) -> int:
        """Write (or overwrite) the record of ``record.generation``; returns its KV revision."""
        return await self.kv.put(subjects.revision_key(deployment, record.generation), record.model_dump_json().encode())

    async def get(self, deployment: str, generation: int) -> RevisionRecord | None:
        found = await get_model(self.kv, subjects.revision_key(deployment, generation), RevisionRecord)
        return found[0] if found else None

    async def list(self, deployment: str, up_to: int | None = None) -> list[RevisionRecord]:
        """The deployment's revisions, oldest first; with ``up_to``, none past that generation
        (the orphans of applies that lost their compare-and-set are past the current one)."""
        # Every key one token below the deployment's key is one of its revisions.
        found = await list_models(self.kv, RevisionRecord, f"{deployment}.*")
        records = (record for record, _ in found.values() if up_to is None or record.generation <= up_to)
        return sorted(records, key=lambda r: r.generation)

    async def mark_healthy(self, deployment: str, generation: int, at: float, attempts: int = 5) -> RevisionRecord | None:
        """Record that ``generation`` ran healthy; the first time is kept, so marking again is
        harmless.  None when there is no such revision."""
        key = subjects.revision_key(deployment, generation)
        for _ in range(attempts):
            found = await get_model(self.kv, key, RevisionRecord)
            if found is None:
                return None
            record, revision = found
            if record.healthy_at is not None:
                return record
            marked = record.model_copy(update={"healthy_at": at})
            try:
                await put_model(self.kv, key, marked, revision)
            except ConflictError:
                continue
            return marked
        raise ConflictError(f"revision {key} kept changing while it was being marked healthy")

    async def delete_all(self, deployment: str) -> int:
        """Remove the deployment's revisions; returns how many went."""
        removed = 0
        for record in await self.list(deployment):
            with contextlib.suppress(KeyNotFoundError):
                await self.kv.purge(subjects.revision_key(deployment, record.generation))
            removed += 1
        return removed
