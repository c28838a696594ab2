"""The lb: every service's endpoints (watched in the endpoints bucket) into this host's dataplane.

One sync at a time, in one worker thread (the dataplane shells out to ``nft`` or talks
netlink).  Updates that arrive while a sync runs, or within ``batch_seconds`` of the first,
are one transaction.  The first sync of a process reconciles with what the kernel holds; a
failed sync is retried, whole, after a pause, and the rules applied before it stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from comp_common import subjects
from comp_common.aio import cancel_and_wait
from comp_common.kv import is_deletion, open_bucket
from comp_common.broker import raw_publisher
from comp_common.messages import EndpointCounter, ServiceEndpoints, ServiceRate
from comp_common.telemetry import MAX_CAUSES, span_continuing, span_context_of_traceparent

from . import instruments
from .dataplane import Dataplane
from .ruleset import RulesetError
from .settings import LbSettings

log = logging.getLogger("lb")
tracer = trace.get_tracer("comp_lb")
_RETRY_SECONDS = 1.0


class LoadBalancer:
    def __init__(self, settings: LbSettings, broker: NatsBroker, dataplane: Dataplane):
        self.settings = settings
        self.broker = broker
        self.dataplane = dataplane
        self.desired: dict[str, ServiceEndpoints] = {}
        self.synced = asyncio.Event()  # set once the first sync has applied
        self.syncs = 0
        self.refused: dict[str, ServiceEndpoints] = {}  # key -> the value the dataplane refused
        self._connections: dict[str, tuple[float, int]] = {}  # key -> (when, connections counted)
        self._last_rate: dict[str, float] = {}
        self._changed = asyncio.Event()
        # The discovery spans that wrote the values changed since the last sync: the next
        # sync continues the first one's trace and links the others.
        self._causes: list[SpanContext] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lb-dataplane")
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.endpoints_kv = await open_bucket(self.broker, subjects.ENDPOINTS_BUCKET)
        initial = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._watch(initial), name="lb-watch"),
            asyncio.create_task(self._sync_forever(), name="lb-sync"),
        ]
        if self.settings.lb.rates_seconds > 0:
            self._tasks.append(asyncio.create_task(self._rates_forever(), name="lb-rates"))
        await initial  # every service present when the watch began is in `desired`

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self.settings.lb.cleanup_on_exit:
            await self._in_thread(self.dataplane.cleanup)
            log.info("removed this host's rules", extra={"dataplane": self.dataplane.name})
        self._thread.shutdown(wait=True)

    async def counters(self, namespace: str, name: str) -> list[EndpointCounter]:
        return await self._in_thread(self.dataplane.counters, namespace, name)

    async def rates(self, now: float) -> list[ServiceRate]:
        """Connections a second per service since the last call: the port counters' rise
        over the time between.  A service is reported while its rate is not zero, and once
        more when it falls to zero, so a quiet service costs nothing."""
        out = []
        for key, service in list(self.desired.items()):
            counters = await self.counters(service.namespace, service.name)
            connections = sum(c.packets for c in counters if c.target == "")
            before = self._connections.get(key)
            self._connections[key] = (now, connections)
            if before is None or now <= before[0]:
                continue
            rate = max(0, connections - before[1]) / (now - before[0])
            if rate > 0 or self._last_rate.get(key, 0.0) > 0:
                out.append(ServiceRate(
                    namespace=service.namespace, name=service.name, node_id=self.settings.lb.node_id, at=now,
                    period_seconds=now - before[0], connections_per_second=rate,
                ))
            self._last_rate[key] = rate
        for gone in set(self._connections) - set(self.desired):
            self._connections.pop(gone, None)
            self._last_rate.pop(gone, None)
        return out

    async def _rates_forever(self) -> None:
        publish = raw_publisher(self.broker)
        while True:
            await asyncio.sleep(self.settings.lb.rates_seconds)
            try:
                for rate in await self.rates(time.time()):
                    await publish(rate, subjects.service_rate(rate.namespace, rate.name))
            except Exception:
                log.warning("could not publish service rates", exc_info=True)

    async def _in_thread(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _watch(self, initial: asyncio.Future[None]) -> None:
        while True:
            try:
                watcher = await self.endpoints_kv.watchall()
                # Each watch starts from the bucket's present values: gathered apart and
                # swapped in whole, so a key deleted while no watch ran is dropped too.
                fresh: dict[str, ServiceEndpoints] | None = {}
                async for entry in watcher:
                    if entry is None:
                        if fresh is not None:
                            self.desired, fresh = fresh, None
                        if not initial.done():
                            initial.set_result(None)
                        self._changed.set()
                        continue
                    self._on_entry(fresh if fresh is not None else self.desired, entry.key, None if is_deletion(entry) else entry.value)
                    if fresh is None:
                        self._note_cause(entry.key)
                        self._changed.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("the endpoints watch ended; starting it again", exc_info=True)
                await asyncio.sleep(_RETRY_SECONDS)

    def _note_cause(self, key: str) -> None:
        # Values present when a watch began were synced before: only changes since carry a cause.
        value = self.desired.get(key)
        cause = span_context_of_traceparent(value.trace_parent) if value is not None else None
        if cause is not None and len(self._causes) < MAX_CAUSES:
            self._causes.append(cause)

    @staticmethod
    def _on_entry(into: dict[str, ServiceEndpoints], key: str, value: bytes | None) -> None:
        if not value:
            into.pop(key, None)
            return
        try:
            into[key] = ServiceEndpoints.model_validate_json(value)
        except ValueError:
            log.warning("dropped an endpoints value that does not parse", extra={"key": key}, exc_info=True)

    async def _sync_forever(self) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(self.settings.lb.batch_seconds)
            self._changed.clear()
            # A service the dataplane refused stays out until its value changes: one bad
            # service must not hold every other service's updates back.
            services = [s for key, s in self.desired.items() if self.refused.get(key) is not s]
            started = time.perf_counter()
            causes, self._causes = self._causes, []
            try:
                attributes = {"comp.node": self.settings.lb.node_id, "comp.services": len(services), "comp.dataplane": self.dataplane.name}
                with span_continuing(tracer, "lb.sync", causes, attributes):
                    report = await self._in_thread(self.dataplane.sync, services)
            except RulesetError as exc:
                # Retried below: the retry is the sync that carries these traces through.
                self._causes[:0] = causes
                instruments.not_synced("refused", time.perf_counter() - started)
                if exc.service is not None and exc.service in self.desired:
                    self.refused[exc.service] = self.desired[exc.service]
                    log.error("a service cannot be programmed; the others are applied without it",
                              extra={"service": exc.service, "error": str(exc)})
                    self._changed.set()
                    continue
                log.error("dataplane sync refused; retrying", extra={"error": str(exc)[:2000]})
                self._changed.set()
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            except Exception as exc:
                self._causes[:0] = causes
                instruments.not_synced("failed", time.perf_counter() - started)
                log.error("dataplane sync failed; retrying", extra={"error": str(exc)[:2000], "services": len(services)})
                self._changed.set()
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            self.refused = {k: v for k, v in self.refused.items() if self.desired.get(k) is v}
            instruments.synced(services, report, time.perf_counter() - started, len(self.refused))
            self.syncs += 1
            self.synced.set()
            log.info(
                "synced",
                extra={
                    "services": len(services),
                    "report": str(report),
                    "seconds": round(time.perf_counter() - started, 4),
                },
            )
