"""Start order between deployments (``depends_on``): what an apply may not create."""

from __future__ import annotations

from collections.abc import Iterable

from comp_common.manifest import Deployment, dependency_cycle


def cycle_errors(documents: list[tuple[str, Deployment]], stored: Iterable[Deployment]) -> list[dict[str, str]]:
    """One error for each depends_on cycle that applying ``documents`` (each with its error
    path prefix, as ``parse_documents`` gives them) over ``stored`` would make, at the
    depends_on of the first document on the cycle.

    A dependency on a deployment that does not exist is no error: it may be applied later,
    and until then the scheduler reports the dependent as waiting.
    """
    graphs: dict[str, dict[str, list[str]]] = {}
    for deployment in stored:
        graphs.setdefault(deployment.metadata.namespace, {})[deployment.metadata.name] = _needs(deployment)
    # What is applied replaces what is stored under the same name.
    for _, deployment in documents:
        graphs.setdefault(deployment.metadata.namespace, {})[deployment.metadata.name] = _needs(deployment)
    errors = []
    reported: set[tuple[str, str]] = set()
    for prefix, deployment in documents:
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        if (namespace, name) in reported:
            continue
        cycle = dependency_cycle(graphs[namespace], start=name)
        if cycle is None:
            continue
        reported.update((namespace, member) for member in cycle)
        path = f"{prefix}.spec.depends_on" if prefix else "spec.depends_on"
        errors.append({"path": path, "message": f"depends_on cycle: {' -> '.join(cycle)}"})
    return errors


def _needs(deployment: Deployment) -> list[str]:
    return [dependency.name for dependency in deployment.spec.depends_on]
