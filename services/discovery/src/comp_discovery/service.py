"""Discovery: virtual IPs for services and their ready endpoints, from desired and observed state.

Inputs: the services and deployments buckets (watched), task statuses (events and
heartbeats), and the VIP bucket.  Output, per service: a ``ServiceEndpoints`` value in the
endpoints bucket (watched by every host's lb) and an event, written only when it changed.
Level-triggered: a service is marked dirty by whatever may change it and is recomputed
whole, so a missed or repeated input is repaired by the next one or by the resync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from comp_common import subjects
from comp_common.aio import cancel_and_wait
from comp_common.broker import raw_publisher
from comp_common.kv import ConflictError, list_models, open_bucket, put_model, watch_bucket
from comp_common.manifest import Deployment, Service
from comp_common.messages import (
    DeploymentRecord,
    Heartbeat,
    ServiceEndpoints,
    ServiceRecord,
    TaskStatus,
    VipAllocation,
)
from comp_common.observed import ObservedStore
from comp_common.telemetry import MAX_CAUSES, span_continuing, traceparent_of

from .endpoints import selected, same_endpoints, service_endpoints
from .settings import DiscoverySettings
from . import instruments
from .vips import VipRange

log = logging.getLogger("discovery")
tracer = trace.get_tracer("comp_discovery")


class Discovery:
    def __init__(
        self,
        settings: DiscoverySettings,
        broker: NatsBroker,
        store: ObservedStore | None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.broker = broker
        self.store = store
        self.clock = clock
        self.monotonic = monotonic
        self.vip_range = VipRange(settings.discovery.vip_cidr)
        self.services: dict[str, Service] = {}
        self.deployments: dict[str, Deployment] = {}
        self.tasks: dict[str, TaskStatus] = {}
        self.node_seen: dict[str, float] = {}  # node -> monotonic time of its last heartbeat
        self.node_tasks: dict[str, set[str]] = {}
        self.holder_of: dict[str, str] = {}  # VIP -> service key
        self.published: dict[str, ServiceEndpoints] = {}
        self._serving: dict[str, set[str]] = {}  # deployment key -> keys of services selecting it
        self._dirty: set[str] = set()
        # Service key -> the spans of the traced task events that marked it dirty since its
        # last write: its next write continues their traces.
        self._causes: dict[str, list[SpanContext]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._publish = raw_publisher(broker)
        self.dns: Any = None  # the DNS server main.py runs beside it, for tests to find its port

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.services_kv = await open_bucket(self.broker, subjects.SERVICES_BUCKET)
        self.deployments_kv = await open_bucket(self.broker, subjects.DEPLOYMENTS_BUCKET)
        self.vips_kv = await open_bucket(self.broker, subjects.VIPS_BUCKET)
        self.endpoints_kv = await open_bucket(self.broker, subjects.ENDPOINTS_BUCKET)
        self.published = {key: value for key, (value, _) in (await list_models(self.endpoints_kv, ServiceEndpoints)).items()}
        if self.store is not None:
            # The scheduler's view of every task: endpoints are right from the first write,
            # rather than empty until each node's next full heartbeat.
            now = self.monotonic()
            for status in await self.store.list_tasks():
                self._put_task(status)
                self.node_seen.setdefault(status.node_id, now)
        await self.resync()
        self._tasks = [
            asyncio.create_task(watch_bucket(self.services_kv, self._on_service_entry, log), name="discovery-watch-services"),
            asyncio.create_task(watch_bucket(self.deployments_kv, self._on_deployment_entry, log), name="discovery-watch-deployments"),
            asyncio.create_task(self._flush_forever(), name="discovery-flush"),
            asyncio.create_task(self._resync_forever(), name="discovery-resync"),
            asyncio.create_task(self._liveness_forever(), name="discovery-liveness"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    # ---- inputs ------------------------------------------------------------------------
    async def resync(self) -> None:
        services = {k: r.service for k, (r, _) in (await list_models(self.services_kv, ServiceRecord)).items()}
        deployments = {k: r.deployment for k, (r, _) in (await list_models(self.deployments_kv, DeploymentRecord)).items()}
        vips = await list_models(self.vips_kv, VipAllocation)
        self.holder_of = {vip: allocation.service for vip, (allocation, _) in vips.items()}
        # Gone: published, or holding a VIP (a write that died between the two), yet absent.
        gone = (set(self.services) | set(self.published) | set(self.holder_of.values())) - set(services)
        self.services = services
        self.deployments = deployments
        self._reindex()
        self._mark(set(services) | gone)

    def _on_service_entry(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.services.pop(key, None)
        else:
            self.services[key] = ServiceRecord.model_validate_json(value).service
        self._reindex()
        self._mark({key})

    def _on_deployment_entry(self, key: str, value: bytes | None) -> None:
        before = self._serving.get(key, set())
        if value is None:
            self.deployments.pop(key, None)
        else:
            self.deployments[key] = DeploymentRecord.model_validate_json(value).deployment
        self._reindex()
        self._mark(before | self._serving.get(key, set()))

    def on_task_status(self, status: TaskStatus, cause: SpanContext | None = None) -> None:
        previous = self.tasks.get(status.task_id)
        if previous is not None and previous.updated_at > status.updated_at:
            return  # an older status that arrived late
        self.node_seen.setdefault(status.node_id, self.monotonic())
        self._put_task(status)
        self._mark(self._serving.get(status.deployment, set()), cause)

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        came_back = heartbeat.node_id not in self.node_seen or not self._live(heartbeat.node_id)
        self.node_seen[heartbeat.node_id] = self.monotonic()
        touched: set[str] = set()
        if heartbeat.full:
            listed = {t.task_id for t in heartbeat.tasks}
            for task_id in self.node_tasks.get(heartbeat.node_id, set()) - listed:
                gone = self.tasks.pop(task_id, None)
                if gone is not None:
                    touched.add(gone.deployment)
            self.node_tasks[heartbeat.node_id] = set()
        for status in heartbeat.tasks:
            previous = self.tasks.get(status.task_id)
            if previous is None or previous.updated_at <= status.updated_at:
                if previous != status:
                    touched.add(status.deployment)
                self._put_task(status)
        if came_back:
            touched |= {t.deployment for t in heartbeat.tasks}
        for deployment in touched:
            self._mark(self._serving.get(deployment, set()))

    def lookup(self, namespace: str, name: str) -> ServiceEndpoints | None:
        return self.published.get(subjects.deployment_key(namespace, name))

    # ---- state -------------------------------------------------------------------------
    def _put_task(self, status: TaskStatus) -> None:
        previous = self.tasks.get(status.task_id)
        if previous is not None and previous.node_id != status.node_id:
            self.node_tasks.get(previous.node_id, set()).discard(status.task_id)
        self.tasks[status.task_id] = status
        self.node_tasks.setdefault(status.node_id, set()).add(status.task_id)

    def _live(self, node_id: str) -> bool:
        seen = self.node_seen.get(node_id)
        return seen is not None and self.monotonic() - seen <= self.settings.liveness.grace_seconds

    def _reindex(self) -> None:
        serving: dict[str, set[str]] = {}
        for key, service in self.services.items():
            for deployment in selected(service, self.deployments):
                serving.setdefault(deployment, set()).add(key)
        self._serving = serving

    def _mark(self, keys: set[str], cause: SpanContext | None = None) -> None:
        if keys:
            self._dirty |= keys
            self._wake.set()
        if cause is not None:
            for key in keys:
                causes = self._causes.setdefault(key, [])
                if len(causes) < MAX_CAUSES:
                    causes.append(cause)

    # ---- output ------------------------------------------------------------------------
    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.settings.discovery.batch_seconds)
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            for key in sorted(dirty):
                causes = self._causes.pop(key, [])
                try:
                    await self._write(key, causes)
                except Exception:
                    # Kept dirty: the next flush or resync tries again.
                    log.exception("could not write a service's endpoints", extra={"service": key})
                    self._mark({key})
                    self._causes.setdefault(key, [])[:0] = causes
                    await asyncio.sleep(0.5)

    async def flush(self) -> None:
        """Write every dirty service now (tests and shutdown)."""
        dirty, self._dirty = self._dirty, set()
        for key in sorted(dirty):
            await self._write(key, self._causes.pop(key, []))

    async def _write(self, key: str, causes: Sequence[SpanContext] = ()) -> None:
        service = self.services.get(key)
        if service is None:
            await self._remove(key)
            return
        vip = await self._vip_for(key) if service.spec.mode == "vip" else None
        if service.spec.mode != "vip":
            await self._free_vips(key, keep=None)
        value = service_endpoints(service, vip, self.deployments, self.tasks.values(), self._live, self.clock())
        if same_endpoints(self.published.get(key), value):
            return
        # In the traces of the task events that changed it; the value names this span so
        # that every lb's sync continues the trace.
        attributes = {"comp.service": key, "comp.endpoints": len(value.endpoints)}
        with span_continuing(tracer, "discovery.endpoints", causes, attributes) as span:
            if span is not None:
                value = value.model_copy(update={"trace_parent": traceparent_of(span)})
            await self.endpoints_kv.put(key, value.model_dump_json().encode())
            instruments.ENDPOINT_WRITES.labels("updated").inc()
            self.published[key] = value
            await self._publish(value, subjects.endpoints_event(value.namespace, value.name))
        log.info(
            "endpoints changed",
            extra={"service": key, "vip": vip, "endpoints": [f"{e.address}" for e in value.endpoints]},
        )

    async def _remove(self, key: str) -> None:
        await self._free_vips(key, keep=None)
        if key in self.published:
            await self.endpoints_kv.delete(key)
            instruments.ENDPOINT_WRITES.labels("removed").inc()
            gone = self.published.pop(key)
            await self._publish(
                gone.model_copy(update={"endpoints": [], "updated_at": self.clock()}),
                subjects.endpoints_event(gone.namespace, gone.name),
            )
            log.info("service removed", extra={"service": key, "vip": gone.vip})

    async def _vip_for(self, key: str) -> str:
        held = sorted(vip for vip, holder in self.holder_of.items() if holder == key)
        if held:
            keep = held[0]
            # Two allocators racing could each have given this service one; keep the first.
            await self._free_vips(key, keep=keep)
            return keep
        for candidate in self.vip_range.candidates(key):
            if candidate in self.holder_of:
                continue
            try:
                await put_model(self.vips_kv, candidate, VipAllocation(service=key, allocated_at=self.clock()), None)
            except ConflictError:
                # Taken by someone this process has not heard of yet: learn it and go on.
                self.holder_of[candidate] = "?"
                continue
            self.holder_of[candidate] = key
            log.info("allocated a virtual IP", extra={"service": key, "vip": candidate})
            return candidate
        raise RuntimeError(f"no free virtual IP left in {self.settings.discovery.vip_cidr} for service {key}")

    async def _free_vips(self, key: str, keep: str | None) -> None:
        for vip in [v for v, holder in self.holder_of.items() if holder == key and v != keep]:
            await self.vips_kv.delete(vip)
            del self.holder_of[vip]
            log.info("freed a virtual IP", extra={"service": key, "vip": vip})

    # ---- clocks ------------------------------------------------------------------------
    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery.resync_seconds)
            try:
                await self.resync()
            except Exception:
                log.warning("resync failed; the next one tries again", exc_info=True)

    async def _liveness_forever(self) -> None:
        # A node that stopped sending heartbeats takes its endpoints with it after the grace;
        # a check every fifth of the grace keeps that within 20% of it.
        was_live: dict[str, bool] = {}
        while True:
            await asyncio.sleep(self.settings.liveness.grace_seconds / 5)
            for node_id in list(self.node_seen):
                live = self._live(node_id)
                if was_live.get(node_id, True) != live:
                    deployments = {self.tasks[t].deployment for t in self.node_tasks.get(node_id, set()) if t in self.tasks}
                    for deployment in deployments:
                        self._mark(self._serving.get(deployment, set()))
                was_live[node_id] = live
