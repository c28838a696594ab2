"""Namespaces (with quotas) and node controls (cordon, drain): desired state in KV buckets."""

from __future__ import annotations

import time
from collections.abc import Callable

from nats.js.kv import KeyValue

from comp_common.kv import get_model, list_models, put_model
from comp_common.messages import NamespaceRecord, NodeControl
from comp_common.quota import Quota


class NamespaceStore:
    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time):
        self._kv = kv
        self._clock = clock

    async def put(self, name: str, quota: Quota) -> tuple[NamespaceRecord, bool]:
        """Create or replace the namespace's quota; True when it was created."""
        found = await get_model(self._kv, name, NamespaceRecord)
        now = self._clock()
        if found is None:
            record = NamespaceRecord(name=name, quota=quota, created_at=now, updated_at=now)
            await put_model(self._kv, name, record, None)
            return record, True
        stored, revision = found
        record = stored.model_copy(update={"quota": quota, "updated_at": now})
        await put_model(self._kv, name, record, revision)
        return record, False

    async def get(self, name: str) -> NamespaceRecord | None:
        found = await get_model(self._kv, name, NamespaceRecord)
        return found[0] if found else None

    async def list(self) -> list[NamespaceRecord]:
        return sorted((r for r, _ in (await list_models(self._kv, NamespaceRecord)).values()), key=lambda r: r.name)

    async def delete(self, name: str) -> bool:
        if await self.get(name) is None:
            return False
        await self._kv.delete(name)
        return True


class NodeControlStore:
    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time):
        self._kv = kv
        self._clock = clock

    async def set(self, node_id: str, *, cordoned: bool, draining: bool) -> NodeControl:
        found = await get_model(self._kv, node_id, NodeControl)
        control = NodeControl(node_id=node_id, cordoned=cordoned, draining=draining, updated_at=self._clock())
        await put_model(self._kv, node_id, control, found[1] if found else None)
        return control

    async def list(self) -> dict[str, NodeControl]:
        return {key: c for key, (c, _) in (await list_models(self._kv, NodeControl)).items()}
