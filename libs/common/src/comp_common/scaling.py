"""Changing a deployment's replica count: the one path ``comp scale`` (through the api) and
the autoscaler both take, so both are held to the same rules.

A replica count is desired state like any other: written to the deployments bucket with
compare-and-set on the revision read (a concurrent apply is re-read, never overwritten),
keeping the generation (a count is not a new version of what runs).  Refused, with the
reason, when the deployment is absent, when an autoscale policy bounds the count and it
is outside them, or when the namespace's quota would be exceeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.kv import KeyValue

from . import subjects
from .kv import ConflictError, get_model, list_models, put_model
from .messages import DeploymentRecord, NamespaceRecord
from .quota import quota_violations, usage_after_apply


class ScaleRefused(ValueError):
    """The count cannot be written; the message says why.  ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Scaled:
    record: DeploymentRecord
    revision: int
    previous: int  # the replica count before
    changed: bool


async def scale_deployment(
    deployments: KeyValue,
    namespaces: KeyValue | None,
    namespace: str,
    name: str,
    replicas: int,
    *,
    within_policy: bool = True,
    clock: Callable[[], float] = time.time,
    max_attempts: int = 5,
) -> Scaled:
    """Set ``replicas``.  ``within_policy``: refuse a count outside the deployment's
    autoscale bounds (a person's ``comp scale``; the autoscaler clamps its own)."""
    if replicas < 0:
        raise ScaleRefused(f"replicas must be 0 or more, not {replicas}", 422)
    key = subjects.deployment_key(namespace, name)
    for _ in range(max_attempts):
        found = await get_model(deployments, key, DeploymentRecord)
        if found is None:
            raise ScaleRefused(f"deployment {namespace}/{name} not found", 404)
        record, revision = found
        spec = record.deployment.spec
        policy = spec.autoscale
        if within_policy and policy is not None and not policy.min <= replicas <= policy.max:
            raise ScaleRefused(
                f"deployment {namespace}/{name} autoscales between {policy.min} and {policy.max} replicas; "
                f"{replicas} is outside (change spec.autoscale to allow it)",
                409,
            )
        if replicas == spec.replicas:
            return Scaled(record, revision, spec.replicas, changed=False)
        scaled = record.deployment.model_copy(update={"spec": spec.model_copy(update={"replicas": replicas})})
        if namespaces is not None and replicas > spec.replicas:
            refusal = await _quota_refusal(deployments, namespaces, namespace, scaled)
            if refusal:
                raise ScaleRefused(refusal, 403)
        # change_cause is left alone: it says why this generation (what runs) is desired.
        updated = record.model_copy(update={"deployment": scaled, "updated_at": clock()})
        try:
            new_revision = await put_model(deployments, key, updated, revision)
        except ConflictError:
            continue  # someone wrote in between: read again
        return Scaled(updated, new_revision, spec.replicas, changed=True)
    raise ScaleRefused(f"deployment {namespace}/{name} kept changing; try again", 409)


async def _quota_refusal(deployments: KeyValue, namespaces: KeyValue, namespace: str, scaled) -> str | None:  # type: ignore[no-untyped-def]
    found = await get_model(namespaces, namespace, NamespaceRecord)
    if found is None:
        return None
    existing = [r.deployment for r, _ in (await list_models(deployments, DeploymentRecord)).values() if r.deployment.metadata.namespace == namespace]
    violations = quota_violations(found[0].quota, usage_after_apply(existing, [scaled]))
    return f"namespace {namespace} quota exceeded: " + "; ".join(violations) if violations else None
