"""A service's ready endpoints from the deployments it selects and their tasks' statuses.

Pure: the same inputs give the same ``ServiceEndpoints`` (endpoints sorted by task id), so
the service can tell "nothing changed" by comparing and skip the write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from comp_common.manifest import Deployment, Service
from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints, TaskState, TaskStatus


def selected(service: Service, deployments: Mapping[str, Deployment]) -> set[str]:
    """Keys of the deployments of the service's namespace that its selector picks."""
    namespace = service.metadata.namespace
    return {
        key
        for key, deployment in deployments.items()
        if deployment.metadata.namespace == namespace and service.spec.selector.selects(deployment)
    }


def endpoint_ports(service: Service) -> list[EndpointPort]:
    return [
        EndpointPort(name=p.key, port=p.port, protocol=p.protocol, published=p.published, named=p.name is not None)
        for p in service.spec.ports
    ]


def _target_ports(service: Service, deployment: Deployment) -> dict[str, int]:
    """Service port key -> the replica's port.  A named target is looked up in the
    deployment's ports (same protocol); a deployment without that name serves none of it."""
    out: dict[str, int] = {}
    for port in service.spec.ports:
        target = port.target
        if isinstance(target, int):
            out[port.key] = target
            continue
        for container_port in deployment.spec.ports:
            if container_port.name == target and container_port.protocol == port.protocol:
                out[port.key] = container_port.container_port
                break
    return out


def is_endpoint(status: TaskStatus) -> bool:
    """Ready and reachable: running, passing its readiness check, with an address."""
    return status.state == TaskState.RUNNING and status.ready and bool(status.address)


def service_endpoints(
    service: Service,
    vip: str | None,
    deployments: Mapping[str, Deployment],
    tasks: Iterable[TaskStatus],
    node_is_live: Callable[[str], bool],
    now: float,
) -> ServiceEndpoints:
    chosen = selected(service, deployments)
    targets = {key: _target_ports(service, deployments[key]) for key in chosen}
    endpoints = [
        Endpoint(task_id=t.task_id, node_id=t.node_id, address=t.address or "", ports=targets[t.deployment])
        for t in tasks
        if t.deployment in targets and is_endpoint(t) and node_is_live(t.node_id) and targets[t.deployment]
    ]
    endpoints.sort(key=lambda e: e.task_id)
    return ServiceEndpoints(
        namespace=service.metadata.namespace,
        name=service.metadata.name,
        mode=service.spec.mode,
        vip=vip if service.spec.mode == "vip" else None,
        ports=endpoint_ports(service),
        endpoints=endpoints,
        updated_at=now,
    )


def same_endpoints(a: ServiceEndpoints | None, b: ServiceEndpoints | None) -> bool:
    """Equal apart from when each was computed and which trace caused it."""
    if a is None or b is None:
        return a is b
    ignored = {"updated_at": 0.0, "trace_parent": None}
    return a.model_copy(update=ignored) == b.model_copy(update=ignored)
