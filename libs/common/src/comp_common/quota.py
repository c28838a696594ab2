"""Namespace quotas: what a namespace may reserve in total, checked at apply time (a clear
4xx, nothing stored) and again at placement time (the quota may have been lowered since)."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .manifest import Deployment
from .quantities import format_memory, parse_optional_cpu, parse_optional_memory


class Quota(BaseModel):
    """Upper bounds on the sum over a namespace's deployments of replicas x resources; None is no bound."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: float | None = Field(default=None, description="cores, e.g. 4 or '4000m'")
    memory: int | None = Field(default=None, description="bytes, or a quantity like '8Gi'")
    tasks: int | None = Field(default=None, ge=0)

    _cpu = field_validator("cpu", mode="before")(parse_optional_cpu)
    _memory = field_validator("memory", mode="before")(parse_optional_memory)


class Usage(BaseModel):
    cpu: float = 0.0
    memory: int = 0
    tasks: int = 0


def usage_of(deployments: Iterable[Deployment]) -> Usage:
    usage = Usage()
    for d in deployments:
        n = d.spec.replicas
        usage.cpu += n * d.spec.resources.cpu
        usage.memory += n * d.spec.resources.memory
        usage.tasks += n
    return usage


def quota_violations(quota: Quota, usage: Usage) -> list[str]:
    """Each bound ``usage`` exceeds, said plainly; empty when within the quota."""
    out = []
    # A hair of tolerance so that 10 x 0.1 cores fits a quota of 1 core.
    if quota.cpu is not None and usage.cpu > quota.cpu + 1e-9:
        out.append(f"cpu {usage.cpu:g} cores > quota {quota.cpu:g}")
    if quota.memory is not None and usage.memory > quota.memory:
        out.append(f"memory {format_memory(usage.memory)} > quota {format_memory(quota.memory)}")
    if quota.tasks is not None and usage.tasks > quota.tasks:
        out.append(f"tasks {usage.tasks} > quota {quota.tasks}")
    return out


def usage_after_apply(existing: Iterable[Deployment], applying: Iterable[Deployment]) -> Usage:
    """The namespace's usage once ``applying`` replaces the deployments of the same names."""
    merged = {d.key: d for d in existing}
    merged.update({d.key: d for d in applying})
    return usage_of(merged.values())
