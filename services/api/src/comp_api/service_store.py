"""Services as applied (the services bucket, written here with compare-and-set) and what
discovery made of them (the endpoints bucket, only ever read here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nats.js.kv import KeyValue

from comp_common.kv import ConflictError, get_model, list_models, put_model
from comp_common.manifest import Service
from comp_common.messages import ServiceEndpoints, ServiceRecord

from .store import ApplyAction, ApplyResult


def service_key(namespace: str, name: str) -> str:
    """The key of a service in both buckets, as ``Service.key`` and ``ServiceEndpoints.key``."""
    return f"{namespace}.{name}"


@dataclass(frozen=True)
class StoredService:
    record: ServiceRecord
    revision: int

    @property
    def service(self) -> Service:
        return self.record.service


class ServiceStore:
    """Create, update, read and delete services by ``namespace.name``; read their endpoints.

    Writes are conditional on the revision read, as for deployments, so that two concurrent
    applies of one service cannot lose one another's change.
    """

    def __init__(self, kv: KeyValue, endpoints: KeyValue, clock: Callable[[], float] = time.time, max_attempts: int = 5):
        self._kv = kv
        self._endpoints = endpoints
        self._clock = clock
        self._max_attempts = max_attempts

    async def apply(self, service: Service) -> ApplyResult:
        namespace, name = service.metadata.namespace, service.metadata.name
        key = service.key
        for _ in range(self._max_attempts):
            current = await get_model(self._kv, key, ServiceRecord)
            now = self._clock()
            action: ApplyAction
            if current is None:
                record = ServiceRecord(service=service, generation=1, created_at=now, updated_at=now)
                last_revision = None
                action = "created"
            else:
                stored, last_revision = current
                if stored.service == service:
                    return ApplyResult(
                        namespace=namespace, name=name, action="unchanged", revision=last_revision, generation=stored.generation
                    )
                # Labels alone change nothing discovery or the lbs do, so they keep the generation.
                generation = stored.generation + (stored.service.spec != service.spec)
                record = stored.model_copy(update={"service": service, "generation": generation, "updated_at": now})
                action = "configured"
            try:
                revision = await put_model(self._kv, key, record, last_revision)
            except ConflictError:
                continue
            return ApplyResult(namespace=namespace, name=name, action=action, revision=revision, generation=record.generation)
        raise ConflictError(f"service {key} kept changing while it was being applied; try again")

    async def get(self, namespace: str, name: str) -> StoredService | None:
        found = await get_model(self._kv, service_key(namespace, name), ServiceRecord)
        return StoredService(*found) if found else None

    async def list(self, namespace: str | None = None) -> list[StoredService]:
        records = await list_models(self._kv, ServiceRecord)
        stored = [StoredService(record, revision) for record, revision in records.values()]
        if namespace is not None:
            stored = [s for s in stored if s.service.metadata.namespace == namespace]
        return sorted(stored, key=lambda s: (s.service.metadata.namespace, s.service.metadata.name))

    async def delete(self, namespace: str, name: str) -> StoredService | None:
        """Delete and return what was stored, or None when there was nothing to delete."""
        key = service_key(namespace, name)
        found = await get_model(self._kv, key, ServiceRecord)
        if found is None:
            return None
        await self._kv.delete(key)
        return StoredService(*found)

    async def endpoints(self, services: Iterable[StoredService]) -> dict[str, ServiceEndpoints]:
        """What discovery last wrote for each of ``services`` that it has written for, by key.

        Read key by key rather than by listing the bucket: a namespace's few services should
        not cost a read of every service in the cluster.
        """
        keys = [s.service.key for s in services]
        found = await asyncio.gather(*(get_model(self._endpoints, key, ServiceEndpoints) for key in keys))
        return {key: f[0] for key, f in zip(keys, found) if f is not None}


def published_port_clashes(batch: list[tuple[str, Service]], stored: Iterable[Service]) -> list[dict[str, str]]:
    """A manifest error for each published port of ``batch`` that another service publishes
    too, naming it; ``batch`` is (path prefix, service) as ``parse_objects`` returns them.

    A published port opens on every host, so it is one per cluster whatever the namespace.
    A stored service that the batch re-applies counts as the batch has it, so that one apply
    can move a published port from one service to another.  Within the batch the first
    document keeps the port and the later ones are refused.
    """
    in_batch = {service.key for _, service in batch}
    owners: dict[tuple[int, str], Service] = {}
    for service in stored:
        if service.key not in in_batch:
            for port in service.spec.ports:
                if port.published is not None:
                    owners[port.published, port.protocol] = service
    errors = []
    for prefix, service in batch:
        for index, port in enumerate(service.spec.ports):
            if port.published is None:
                continue
            owner = owners.setdefault((port.published, port.protocol), service)
            if owner.key != service.key:
                field = f"spec.ports[{index}].published"
                errors.append({
                    "path": f"{prefix}.{field}" if prefix else field,
                    "message": f"published port {port.published}/{port.protocol} is already used by service "
                    f"{owner.metadata.namespace}/{owner.metadata.name}",
                })
    return errors
