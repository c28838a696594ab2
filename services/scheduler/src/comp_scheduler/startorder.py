"""Start order (``depends_on``): whether a deployment's replicas may be placed yet.

The rule: dependencies gate only a deployment that has no running replica.  They are
checked when it starts from nothing (first apply, or every replica gone, as after a
cluster restart), the one time order matters, as in Compose, which checks them only at
start.  Once one replica runs, further ones (scale up, replacements, rollouts) are placed
without asking: their siblings already cope with whatever state the dependency is in,
and holding them back would only lower this deployment's availability each time the
dependency has a bad moment.  Nothing here ever stops a running task; a dependency that
goes away later is the application's to survive (and its liveness check's to notice).

A dependency is met when all its desired replicas are running (``started``) or ready
(``healthy``), counting tasks of every generation, so one mid-rollout still counts.  A
dependency scaled to 0 is never met: it was asked for, and will not come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from comp_common.manifest import Dependency


@dataclass(frozen=True, slots=True)
class DependencyStatus:
    """A deployment another one depends on: desired replicas, and its tasks running and ready."""

    replicas: int
    running: int
    ready: int


WAITING_MISSING = "waiting for {name}, which does not exist"
WAITING_SCALED_TO_ZERO = "waiting for {name}, which is scaled to 0"
WAITING_STARTED = "waiting for {name} to be started: {running}/{replicas} running"
WAITING_HEALTHY = "waiting for {name} to be healthy: {ready}/{replicas} ready"


def unmet(dependency: Dependency, status: DependencyStatus | None) -> str | None:
    """Why ``dependency`` is not met, or None when it is."""
    name = dependency.name
    if status is None:
        return WAITING_MISSING.format(name=name)
    if status.replicas <= 0:
        return WAITING_SCALED_TO_ZERO.format(name=name)
    if dependency.condition == "started":
        if status.running < status.replicas:
            return WAITING_STARTED.format(name=name, running=status.running, replicas=status.replicas)
        return None
    if status.ready < status.replicas:
        return WAITING_HEALTHY.format(name=name, ready=status.ready, replicas=status.replicas)
    return None


def blocked_by(dependencies: Iterable[Dependency], status_of: Callable[[str], DependencyStatus | None]) -> str | None:
    """Every unmet dependency, in the order declared, joined by "; "; None when all are met.

    ``status_of(name)``: the named deployment of the same namespace, None when there is
    none (a dict's ``get`` will do).
    """
    reasons = [reason for dep in dependencies if (reason := unmet(dep, status_of(dep.name))) is not None]
    return "; ".join(reasons) if reasons else None


def start_blocked(
    dependencies: Iterable[Dependency], status_of: Callable[[str], DependencyStatus | None], running: int
) -> str | None:
    """``blocked_by``, applied by the rule above: ``running`` is how many of this
    deployment's own tasks run now (any generation)."""
    if running > 0:
        return None
    return blocked_by(dependencies, status_of)


__all__ = [
    "DependencyStatus",
    "blocked_by",
    "start_blocked",
    "unmet",
]
