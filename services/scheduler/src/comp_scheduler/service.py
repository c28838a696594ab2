"""The scheduler service: keeps :class:`ClusterState` current and runs reconcile rounds.

A round is ``snapshot -> reconcile (pure) -> Applier``, one at a time under a lock.
Rounds run inline when a deployment event arrives (so they join that event's trace)
and in the background when nodes come or go, or on the resync period.

Leader and hot standby: every instance keeps its state current from the same events,
but only the holder of the lease (:mod:`.leader`) runs rounds, writes assignments and
writes observed state to Redis.  On becoming leader an instance takes over under the
round lock: it re-reads every node's assignments from the bucket (the old leader wrote
them; reconcile counts what is there, so a half-applied deploy is completed, never
repeated), re-reads the desired state, stamps every node's assignments with its epoch
(from then on agents refuse whatever the old leader might still write), and runs a
round at once.
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
from comp_common.messages import (
    ControlEvent,
    DeploymentEvent,
    DeploymentRecord,
    Heartbeat,
    LeaderChange,
    NodeAssignments,
    NodeControl,
    TaskState,
    TaskStatus,
)
from comp_common.observed import ObservedStore

from .applier import Applier
from .leader import Identity, LeaseElector
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
        identity: Identity | None = None,
    ):
        self.settings = settings
        self.identity = identity or Identity.of_this_process(settings.scheduler.instance)
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
        self.elector: LeaseElector | None = None
        # The epoch whose takeover (reload, restamp) is done: rounds run only under it.
        self._ready_epoch: int | None = None
        self._takeover: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        # Nodes whose assignments could not be stamped with our epoch yet.
        self._unstamped: set[str] = set()

    # ---- leadership --------------------------------------------------------------------
    def acting_epoch(self) -> int | None:
        """Our fencing epoch while we hold a live lease and have taken over; None while standing by."""
        epoch = self.elector.epoch() if self.elector is not None else None
        return epoch if epoch is not None and epoch == self._ready_epoch else None

    @property
    def leading(self) -> bool:
        return self.acting_epoch() is not None

    def _on_leadership(self, epoch: int | None, reason: str) -> None:
        """The elector's callback: never blocks it, so renewals stay on time."""
        if epoch is None:
            was = self._ready_epoch
            self._ready_epoch = None
            if self._takeover is not None:
                self._takeover.cancel()
                self._takeover = None
            log.warning("standing by", extra={"reason": reason, "epoch": was})
            if was is not None:
                self._in_background(self._announce("stepped-down", was, reason))
        else:
            log.info("elected leader; taking over", extra={"epoch": epoch, "reason": reason})
            self._takeover = asyncio.create_task(self._take_over(epoch, reason), name="takeover")

    async def _take_over(self, epoch: int, reason: str) -> None:
        started = time.monotonic()
        assert self.elector is not None and self.applier is not None
        while self.elector.epoch() == epoch:
            try:
                with tracer.start_as_current_span("scheduler.takeover", attributes={"comp.epoch": epoch}):
                    async with self._lock:
                        if self.elector.epoch() != epoch:
                            return
                        await self._load_assignments()
                        await self._load_desired()
                        self._ready_epoch = epoch
                        # Redis has the old leader's picture: write ours whole.
                        self._dirty_nodes.update(self.state.nodes)
                        self._dirty_tasks.update(self.state.statuses)
                        nodes = set(self.state.assignments)
                        restamped = await self.applier.restamp(nodes)
                        self._unstamped = nodes - set(restamped)  # tried again on resync
                        plan = await self._round(f"became leader (epoch {epoch})")
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("takeover failed; trying again", extra={"epoch": epoch})
                await asyncio.sleep(self.elector.check_seconds)
        else:
            return
        log.info(
            "leading",
            extra={
                "epoch": epoch,
                "holder": self.identity.holder,
                "nodes_restamped": len(restamped),
                "places": len(plan.places),
                "takeover_seconds": round(time.monotonic() - started, 3),
            },
        )
        await self._sweep_observed()
        await self._announce("leading", epoch, reason)

    async def _sweep_observed(self) -> None:
        """Have the next flush delete what the old leader's picture in Redis has and ours does
        not: it may have died before deleting a task that has gone since."""
        try:
            shown_tasks = {s.task_id for s in await self.store.list_tasks()}
            shown_deployments = set(await self.store.list_deployment_statuses())
        except Exception as exc:
            log.warning("could not read observed state from redis", extra={"error": repr(exc)})
            return
        self._gone_tasks.update(shown_tasks - set(self.state.statuses))
        self._gone_deployments.update(shown_deployments - set(self.state.desired))

    async def _announce(self, state: str, epoch: int, reason: str) -> None:
        change = LeaderChange(
            role="scheduler", holder=self.identity.holder, name=self.identity.name, epoch=epoch,
            state=state, reason=reason, at=time.time(),  # type: ignore[arg-type]
        )
        try:
            await self.broker.publish(change, subjects.SCHEDULER_LEADER_EVENTS)
            if state == "leading":
                await self.store.put_scheduler_leader(change)
        except Exception as exc:
            log.warning("could not announce leadership", extra={"error": repr(exc)})

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.deployments_kv = await open_bucket(self.broker, subjects.DEPLOYMENTS_BUCKET)
        self.assignments_kv = await open_bucket(self.broker, subjects.ASSIGNMENTS_BUCKET)
        self.node_controls_kv = await open_bucket(self.broker, subjects.NODE_CONTROLS_BUCKET)
        leases_kv = await open_bucket(self.broker, subjects.LEASES_BUCKET, history=1)
        self.applier = Applier(self.state, self.assignments_kv, self.broker, self.acting_epoch)
        await self._load_assignments()
        await self._load_desired()
        self._loops = [
            asyncio.create_task(self._every(self.settings.scheduler.resync_seconds, self._resync), name="resync"),
            asyncio.create_task(self._every(self.settings.scheduler.liveness_check_seconds, self._check_liveness), name="liveness"),
            asyncio.create_task(self._every(self.settings.scheduler.flush_seconds, self.flush), name="flush"),
            asyncio.create_task(self._kicked_rounds(), name="rounds"),
        ]
        lease = self.settings.scheduler
        self.elector = LeaseElector(
            leases_kv,
            subjects.SCHEDULER_LEASE_KEY,
            self.identity,
            lease_seconds=lease.lease_seconds,
            renew_seconds=lease.renew_seconds,
            on_change=self._on_leadership,
        )
        self.elector.start()
        log.info(
            "scheduler started",
            extra={"deployments": len(self.state.desired), "nodes": len(self.state.nodes), "holder": self.identity.holder},
        )

    async def stop(self, release_lease: bool = True) -> None:
        """Stop acting at once; with ``release_lease``, let a standby take over without waiting
        out the lease (``False`` behaves like a crash, for tests)."""
        if self.elector is not None:
            await self.elector.stop()
        if self._background:  # the "stepped-down" announcement, on its way out
            await asyncio.wait(self._background, timeout=1.0)
        loops = self._loops + ([self._takeover] if self._takeover else []) + list(self._background)
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if self.elector is not None and release_lease:
            async with self._lock:  # a round under way finishes first: the successor reads its writes
                await self.elector.release()

    # ---- inputs ------------------------------------------------------------------------
    async def on_deployment_event(self, event: DeploymentEvent) -> None:
        key = subjects.deployment_key(event.namespace, event.name)
        found = await get_model(self.deployments_kv, key, DeploymentRecord)
        if found is None:
            if self.state.desired.pop(key, None) is not None:
                self._gone_deployments.add(key)
        else:
            self.state.desired[key] = found[0]
        if self.leading:  # a standby only keeps its state current
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
            if status.state is TaskState.RUNNING and self.state.draining_nodes():
                # A replacement runs: the task it stands in for on a draining node may go now.
                self._kick.set()
        elif outcome == "gone":
            self._gone_tasks.add(status.task_id)

    # ---- rounds ------------------------------------------------------------------------
    async def run_round(self, why: str) -> Plan:
        """One round, if this scheduler leads; an empty plan if it stands by."""
        async with self._lock:
            return await self._round(why)

    async def _round(self, why: str) -> Plan:
        epoch = self.acting_epoch()
        if epoch is None:
            return Plan()
        now = self.clock()
        plan = reconcile(
            self.state.desired_view(), self.state.snapshot(), now, self.rng, self.settings.scheduler.default_strategy
        )
        span = trace.get_current_span()
        span.set_attribute("comp.round.reason", why)
        span.set_attribute("comp.epoch", epoch)
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
            if not self.leading:
                continue
            with tracer.start_as_current_span("scheduler.round"):
                try:
                    await self.run_round("cluster changed")
                except Exception:
                    log.exception("reconcile round failed; will retry on the next change or resync")

    async def _resync(self) -> None:
        await self._load_desired()
        if self.leading:
            await self._repair_assignments()
            self._kick.set()
        else:
            async with self._lock:
                if self.elector is None or self.elector.epoch() is None:  # a takeover reloads for itself
                    await self._load_assignments()

    async def _load_assignments(self) -> None:
        """Every node's assignments as the bucket holds them.  Under the round lock, or before
        the loops start: the applier relies on its view being no older than the last takeover."""
        found = await list_models(self.assignments_kv, NodeAssignments)
        self.state.replace_assignments(found, self.clock())

    async def _repair_assignments(self) -> None:
        """Leader only: finish fencing off the old leader.

        After the takeover restamped every node, a deposed leader can no longer write an
        existing key: its compare-and-set fails, and the value it then reads carries a newer
        epoch, which stops it.  What it could still do is *create* the key of a node this
        leader has never seen, or write a node whose restamp failed: both are stamped again
        here (a late write of a lower epoch is void, see the applier).  Keys only, so that a
        resync does not read every node's value.
        """
        keys = set(await list_keys(self.assignments_kv))
        if not (keys - set(self.state.assignments)) and not self._unstamped:
            return
        async with self._lock:
            # Again under the lock: a round may have written a new node's key meanwhile.
            suspects = (keys - set(self.state.assignments)) | self._unstamped
            if not suspects or not self.leading:
                return
            assert self.applier is not None
            log.warning("stamping assignments this leader has not written", extra={"nodes": sorted(suspects)})
            written = await self.applier.restamp(suspects)
            self._unstamped = suspects - set(written)

    async def _load_node_controls(self) -> None:
        controls = await list_models(self.node_controls_kv, NodeControl)
        self.state.node_controls = {node_id: control for node_id, (control, _) in controls.items()}

    async def on_control_event(self, event: ControlEvent) -> None:
        if event.kind != "node":
            return
        await self._load_node_controls()
        if self.leading:
            await self.run_round(f"node {event.name} {event.action}")

    async def _load_desired(self) -> None:
        await self._load_node_controls()
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
        if not self.leading:
            # The leader's picture is the one in Redis; on taking over, ours is written whole
            # and what it lacks is swept, so nothing needs remembering meanwhile.
            self._dirty_nodes.clear()
            self._dirty_tasks.clear()
            self._gone_tasks.clear()
            self._gone_deployments.clear()
            return
        nodes = [e.record for n in self._dirty_nodes if (e := self.state.nodes.get(n)) and e.record]
        tasks = [s for t in self._dirty_tasks if (s := self.state.statuses.get(t))]
        gone_tasks, gone_deployments = set(self._gone_tasks), set(self._gone_deployments)
        # Taken with the tasks, before any await: a summary computed after the writes could
        # count statuses whose task records only the next flush writes, and a reader would
        # see "500 running" beside tasks still listed as pending.
        summaries = self.state.deployment_statuses(self.clock())
        self._dirty_nodes.clear()
        self._dirty_tasks.clear()
        self._gone_tasks.clear()
        self._gone_deployments.clear()
        try:
            await self.store.put_nodes(nodes)
            await self.store.put_tasks(tasks)
            await self.store.delete_tasks(gone_tasks)
            await self.store.put_deployment_statuses(summaries)
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
