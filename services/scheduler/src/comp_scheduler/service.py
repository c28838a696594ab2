"""The scheduler service: keeps :class:`ClusterState` current and runs reconcile rounds.

A round is ``snapshot -> reconcile (pure) -> Applier``, one at a time under a lock.
Rounds run inline when a deployment event arrives (so they join that event's trace)
and in the background when nodes come or go, or on the resync period.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from faststream.nats import NatsBroker
from opentelemetry import trace

from comp_common import subjects
from comp_common.kv import get_model, list_keys, list_models, open_bucket
from comp_common.messages import DeploymentEvent, DeploymentRecord, Heartbeat, NodeAssignments, TaskStatus
from comp_common.observed import ObservedStore

from .applier import Applier
from .model import Plan
from .reconcile import reconcile
from .settings import SchedulerSettings
from .state import ClusterState

log = logging.getLogger("scheduler")
tracer = trace.get_tracer("comp.scheduler")


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        broker: NatsBroker,
        store: ObservedStore,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.broker = broker
        self.store = store
        self.clock = clock
        seed = settings.scheduler.seed
        self.rng = random.Random(seed if seed is not None else random.SystemRandom().getrandbits(64))
        self.state = ClusterState(grace_seconds=settings.liveness.grace_seconds)
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._dirty_nodes: set[str] = set()
        self._dirty_tasks: set[str] = set()
        self._gone_tasks: set[str] = set()
        self._gone_deployments: set[str] = set()
        self._loops: list[asyncio.Task] = []
        self.applier: Applier | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.deployments_kv = await open_bucket(self.broker, subjects.DEPLOYMENTS_BUCKET)
        self.assignments_kv = await open_bucket(self.broker, subjects.ASSIGNMENTS_BUCKET)
        self.applier = Applier(self.state, self.assignments_kv, self.broker)
        now = self.clock()
        for node_id in await list_keys(self.assignments_kv):
            found = await get_model(self.assignments_kv, node_id, NodeAssignments)
            if found:
                self.state.load_assignments(node_id, found[0], found[1], now)
        await self._load_desired()
        self._loops = [
            asyncio.create_task(self._every(self.settings.scheduler.resync_seconds, self._resync), name="resync"),
            asyncio.create_task(self._every(self.settings.scheduler.liveness_check_seconds, self._check_liveness), name="liveness"),
            asyncio.create_task(self._every(self.settings.scheduler.flush_seconds, self.flush), name="flush"),
            asyncio.create_task(self._kicked_rounds(), name="rounds"),
        ]
        log.info("scheduler started", extra={"deployments": len(self.state.desired), "nodes": len(self.state.nodes)})

    async def stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    # ---- inputs ------------------------------------------------------------------------
    async def on_deployment_event(self, event: DeploymentEvent) -> None:
        key = subjects.deployment_key(event.namespace, event.name)
        found = await get_model(self.deployments_kv, key, DeploymentRecord)
        if found is None:
            if self.state.desired.pop(key, None) is not None:
                self._gone_deployments.add(key)
        else:
            self.state.desired[key] = found[0]
        await self.run_round(f"deployment {key} {event.action}")

    def on_heartbeat(self, hb: Heartbeat) -> None:
        became_ready, changed, gone = self.state.record_heartbeat(hb, self.clock())
        self._dirty_nodes.add(hb.node_id)
        self._dirty_tasks.update(s.task_id for s in changed)
        self._gone_tasks.update(gone)
        if became_ready:
            log.info("node ready", extra={"node": hb.node_id})
            self._kick.set()

    def on_task_status(self, status: TaskStatus) -> None:
        outcome = self.state.record_status(status)
        if outcome == "changed":
            self._dirty_tasks.add(status.task_id)
        elif outcome == "gone":
            self._gone_tasks.add(status.task_id)

    # ---- rounds ------------------------------------------------------------------------
    async def run_round(self, why: str) -> Plan:
        async with self._lock:
            now = self.clock()
            plan = reconcile(self.state.desired_view(), self.state.snapshot(), now, self.rng)
            span = trace.get_current_span()
            span.set_attribute("comp.round.reason", why)
            span.set_attribute("comp.plan.places", len(plan.places))
            span.set_attribute("comp.plan.stops", len(plan.stops))
            self.state.pending_reasons = {p.deployment: p.reason for p in plan.pending}
            if not plan.empty:
                assert self.applier is not None
                await self.applier.apply(plan, now)
                self._dirty_tasks.update(p.task_id for p in plan.places)
                log.info(
                    "round applied",
                    extra={"why": why, "places": len(plan.places), "stops": len(plan.stops), "pending": len(plan.pending)},
                )
            elif plan.pending:
                log.info("round: nothing placeable", extra={"why": why, "pending": plan.pending[0].reason})
            return plan

    async def _kicked_rounds(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            with tracer.start_as_current_span("scheduler.round"):
                try:
                    await self.run_round("cluster changed")
                except Exception:
                    log.exception("reconcile round failed; will retry on the next change or resync")

    async def _resync(self) -> None:
        await self._load_desired()
        self._kick.set()

    async def _load_desired(self) -> None:
        records = await list_models(self.deployments_kv, DeploymentRecord)
        fresh = {key: rec for key, (rec, _) in records.items()}
        self._gone_deployments.update(set(self.state.desired) - set(fresh))
        self.state.desired = fresh

    async def _check_liveness(self) -> None:
        down, up = self.state.refresh_liveness(self.clock())
        for node_id in down:
            log.warning("node down", extra={"node": node_id})
        self._dirty_nodes.update(down + up)
        if down or up:
            self._kick.set()

    # ---- observed state to Redis --------------------------------------------------------
    async def flush(self) -> None:
        nodes = [e.record for n in self._dirty_nodes if (e := self.state.nodes.get(n)) and e.record]
        tasks = [s for t in self._dirty_tasks if (s := self.state.statuses.get(t))]
        gone_tasks, gone_deployments = set(self._gone_tasks), set(self._gone_deployments)
        self._dirty_nodes.clear()
        self._dirty_tasks.clear()
        self._gone_tasks.clear()
        self._gone_deployments.clear()
        try:
            await self.store.put_nodes(nodes)
            await self.store.put_tasks(tasks)
            await self.store.delete_tasks(gone_tasks)
            await self.store.put_deployment_statuses(self.state.deployment_statuses(self.clock()))
            await self.store.delete_deployment_statuses(gone_deployments)
        except Exception as exc:
            # Keep what was not written for the next flush; Redis may be back by then.
            self._dirty_nodes.update(n.node_id for n in nodes)
            self._dirty_tasks.update(s.task_id for s in tasks)
            self._gone_tasks.update(gone_tasks)
            self._gone_deployments.update(gone_deployments)
            log.warning("could not write observed state to redis", extra={"error": repr(exc)})

    async def _every(self, seconds: float, action: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("periodic task failed", extra={"task": getattr(action, "__name__", str(action))})
