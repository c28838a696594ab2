"""The scheduler service: keeps :class:`ClusterState` current and runs reconcile rounds.

A round is ``snapshot -> reconcile (pure) -> Applier``, one at a time under a lock.
Rounds run in the background, one for whatever asked since the last one began: a burst
of deployment events (one apply of 100 deployments) is one round, not 100.  The round
continues the trace of the first event that asked for it and links the others, so an
apply's trace still runs through the scheduler to the agents.  ``reconcile`` runs in a
worker thread over an immutable snapshot, so heartbeats keep being handled meanwhile.

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
import uuid
from collections.abc import Callable, Sequence
from types import MappingProxyType

import nats.errors
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry import trace

from comp_common import subjects
from comp_common.aio import Slots, cancel_and_wait, within
from comp_common.broker import raw_publisher
from comp_common.kv import ConflictError, get_model, list_keys, list_models, open_bucket, put_model, read_model
from comp_common.messages import (
    CapacityEvent,
    ControlEvent,
    DeploymentEvent,
    DeploymentRecord,
    Heartbeat,
    LeaderChange,
    NamespaceRecord,
    NodeAssignments,
    NodeControl,
    RolloutEvent,
    TaskState,
    TaskStatus,
)
from comp_common.leader import RETOOK_OWN, ElectorThread, Identity
from comp_common.observed import ObservedStore
from comp_common.revisions import Revisions, last_healthy, open_revisions, returned_to, revision_of

from . import instruments
from .applier import Applier
from .model import Plan
from .reconcile import reconcile
from .rollout import RolloutState, RolloutStep
from .settings import SchedulerSettings
from .state import ClusterState, DisruptionPolicy

log = logging.getLogger("scheduler")
tracer = trace.get_tracer("comp.scheduler")
# Reasons named in one round's span and log line; the rest are counted.
_REASONS_SHOWN = 5
_CATCH_UP_BOUND_SECONDS = 10.0
# How often the liveness check looks again while the disruption policy holds nodes up.
HELD_CHECK_SECONDS = 0.5
# Revisions read at once when a resync or takeover refreshes which generations are settled.
_REVISION_READS_IN_FLIGHT = 32
# A wake-up round runs this long after the step's wake_at, so that the clock has passed it.
_WAKE_SLACK_SECONDS = 0.05
_ASK_TASKS = "tasks changed"
# The longest a round asked for by deployment events waits for more of them.
_APPLY_WAIT_MAX_SECONDS = 2.0
_MOVED_ON = object()


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
        liveness = settings.liveness
        self.state = ClusterState(
            grace_seconds=liveness.grace_seconds,
            ping_after_seconds=liveness.ping_after_seconds,
            disruption=DisruptionPolicy(
                liveness.disruption_fraction, liveness.disruption_min_nodes, liveness.disruption_hold_seconds
            ),
        )
        self._was_holding = False
        self.rebalance = settings.scheduler.rebalance.policy()
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        # What asked for the next round: (why, the asker's trace context or None).
        self._wanted: list[tuple[str, otel_context.Context | None]] = []
        self._flush_wanted = asyncio.Event()
        # The subscriptions heartbeats arrive on (set by main): the liveness check lets them
        # catch up before it declares anyone down.
        self.inputs: Sequence[Subscription] = ()
        self._echo: Subscription | None = None
        self._echoes: dict[str, asyncio.Future[None]] = {}
        self._dirty_nodes: set[str] = set()  # records to write
        self._seen_nodes: set[str] = set()  # heartbeat times to write
        self._dirty_tasks: set[str] = set()
        self._gone_tasks: set[str] = set()
        self._gone_deployments: set[str] = set()
        self._loops: list[asyncio.Task] = []
        self.applier: Applier | None = None
        self.elector: ElectorThread | None = None
        # The epoch whose takeover (reload, restamp) is done: rounds run only under it.
        self._ready_epoch: int | None = None
        # What the last round could not place, per deployment: a change is a CapacityEvent.
        self._last_pending: dict[str, dict[str, str | int]] = {}
        # A takeover has completed in this process: its state then follows every write.
        self._led_before = False
        self._takeover: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        # Nodes whose assignments could not be stamped with our epoch yet.
        self._unstamped: set[str] = set()
        # Deployments a task status can move along (see _status_moves_rounds), as of the last round.
        self._rolling: set[str] = set()
        self._awaited: set[str] = set()
        # The timer of the round at the earliest rollout step's wake_at.
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at: float | None = None
        # Deployment -> the generation last acted on once: its revision marked healthy; its
        # failure handled (reverted, or reported as failed where it cannot be).  Generations
        # only grow, so one per deployment is all there is to remember.
        self._marked: dict[str, int] = {}
        self._failure_handled: dict[str, int] = {}
        # A round for task changes is asked for (not yet taken by a round), and when the last was.
        self._tasks_asked = False
        # When the last round ended, and how long it took (see _ask_tasks).
        self._tasks_round_at = 0.0
        self._round_took = 0.0
        # Deployment events taken so far, and those being handled: a round they asked for waits
        # until they stop coming and are all handled.
        self._deployment_events = 0
        self._deployment_events_handling = 0
        # The KV revision each deployment's record in state.desired was read at.
        self._desired_revisions: dict[str, int] = {}

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
        elif reason == RETOOK_OWN and self._led_before:
            # Our lease lapsed (a stall) and we took it back before anyone else: no one has
            # written since, so our state is the bucket's and there is nothing to fence off.
            # Re-reading and restamping every node (megabytes at 5,000 nodes) would only
            # make the next stall likelier.  Values keep their epoch until next written;
            # each node's nudge carries its value's epoch, so agents accept them.
            log.warning("took the lease back", extra={"epoch": epoch})
            self._ready_epoch = epoch
            self._dirty_nodes.update(self.state.nodes)  # flushes were skipped meanwhile
            self._dirty_tasks.update(self.state.statuses)
            self.state.touched.update(self.state.desired)
            self.want_round(f"took the lease back (epoch {epoch})")
            self._in_background(self._announce("leading", epoch, reason))
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
                        self._led_before = True
                        # Redis has the old leader's picture: write ours whole.
                        self._dirty_nodes.update(self.state.nodes)
                        self._dirty_tasks.update(self.state.statuses)
                        self.state.touched.update(self.state.desired)
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
        self.namespaces_kv = await open_bucket(self.broker, subjects.NAMESPACES_BUCKET)
        self.revisions: Revisions = await open_revisions(self.broker)
        await open_bucket(self.broker, subjects.LEASES_BUCKET)  # created here, used by the elector
        self.applier = Applier(self.state, self.assignments_kv, self.broker, self.acting_epoch, nudge=raw_publisher(self.broker))
        await self._load_assignments()
        await self._load_desired()
        self._loops = [
            asyncio.create_task(self._every(self.settings.scheduler.resync_seconds, self._resync), name="resync"),
            asyncio.create_task(self._liveness_timer(), name="liveness"),
            asyncio.create_task(self._flush_loop(), name="flush"),
            asyncio.create_task(self._kicked_rounds(), name="rounds"),
        ]
        lease = self.settings.scheduler
        # On a thread and connection of its own: a busy loop must not cost the lease.
        self.elector = ElectorThread(
            self.settings.nats.url,
            subjects.LEASES_BUCKET,
            subjects.SCHEDULER_LEASE_KEY,
            self.identity,
            lease_seconds=lease.lease_seconds,
            renew_seconds=lease.renew_seconds,
            on_change=self._on_leadership,
            connect_timeout=self.settings.nats.connect_timeout,
        )
        await self.elector.start()
        log.info(
            "scheduler started",
            extra={"deployments": len(self.state.desired), "nodes": len(self.state.nodes), "holder": self.identity.holder},
        )

    async def stop(self, release_lease: bool = True) -> None:
        """Stop acting at once; with ``release_lease``, let a standby take over without waiting
        out the lease (``False`` behaves like a crash, for tests)."""
        if self.elector is not None:
            await self.elector.stop()
            await asyncio.sleep(0)  # the step-down callback, handed over from the elector's thread
        if self._background:  # the "stepped-down" announcement, on its way out
            await asyncio.wait(self._background, timeout=1.0)
        loops = self._loops + ([self._takeover] if self._takeover else []) + list(self._background)
        if self._wake is not None:
            self._wake.cancel()
        await cancel_and_wait(loops)
        if self.elector is not None and release_lease:
            async with self._lock:  # a round under way finishes first: the successor reads its writes
                await self.elector.release()
        if self.elector is not None:
            await self.elector.close()

    # ---- inputs ------------------------------------------------------------------------
    async def on_deployment_event(self, event: DeploymentEvent) -> None:
        """A read that returns older than one already taken (by KV revision) is dropped: the
        periodic resync reads records too, and either may finish last."""
        self._deployment_events += 1
        self._deployment_events_handling += 1
        try:
            await self._take_deployment_event(event)
        finally:
            self._deployment_events_handling -= 1

    async def _take_deployment_event(self, event: DeploymentEvent) -> None:
        key = subjects.deployment_key(event.namespace, event.name)
        record, revision = await read_model(self.deployments_kv, key, DeploymentRecord)
        if revision and revision < self._desired_revisions.get(key, 0):
            pass
        elif record is None:
            self._desired_revisions[key] = revision
            if self.state.desired.pop(key, None) is not None:
                self._gone_deployments.add(key)
            self._forget(key)
        else:
            self._desired_revisions[key] = revision
            self.state.desired[key] = record
            self.state.touched.add(key)
            await self._refresh_settled({key: record})
        if self.leading:  # a standby only keeps its state current
            self.want_round(f"deployment {key} {event.action}", otel_context.get_current())

    def on_heartbeat(self, hb: Heartbeat) -> None:
        # What the changed statuses were before: a heartbeat repairs a missed event, and
        # that event may have been one a round waits for.
        before: dict[str, TaskStatus | None] = {}
        known = self.state.nodes.get(hb.node_id)
        record_before = known.record if known is not None else None
        became_ready, changed, gone = self.state.record_heartbeat(hb, self.clock(), before)
        if changed and self.leading and any(self._status_moves_rounds(before.get(s.task_id), s) for s in changed):
            self._ask_tasks()
        if became_ready or self.state.nodes[hb.node_id].record is not record_before:
            self._dirty_nodes.add(hb.node_id)
        self._seen_nodes.add(hb.node_id)
        self._dirty_tasks.update(s.task_id for s in changed)
        self._gone_tasks.update(gone)
        if changed or gone or became_ready:
            # A fresh heartbeat time alone waits for the periodic flush.
            self._flush_wanted.set()
        if became_ready:
            log.info("node ready", extra={"node": hb.node_id})
            self.want_round("cluster changed")

    def on_task_status(self, status: TaskStatus) -> None:
        before = self.state.statuses.get(status.task_id)
        outcome = self.state.record_status(status)
        if outcome == "changed":
            self._dirty_tasks.add(status.task_id)
            self._flush_wanted.set()
            if self.leading and self._status_moves_rounds(before, status):
                self._ask_tasks()
        elif outcome == "gone":
            self._gone_tasks.add(status.task_id)
            self._flush_wanted.set()

    def _forget(self, key: str) -> None:
        self.state.forget_deployment(key)
        self._marked.pop(key, None)
        self._failure_handled.pop(key, None)

    def _status_moves_rounds(self, before: TaskStatus | None, after: TaskStatus) -> bool:
        """Whether a round may now decide something it could not before: a task came up, its
        readiness or crash loop flipped, or it failed; and its deployment is one such a change
        moves along (a rollout, a rebalancing move or a drain waiting for it to run, or a
        deployment waiting on it in start order).  Anything else waits for the next round
        that runs anyway: a large deploy's tasks coming up one by one must not each cost a
        round of every deployment."""
        if before is not None and before.state is after.state and before.ready is after.ready and before.crash_loop is after.crash_loop:
            return False
        if after.state not in (TaskState.RUNNING, TaskState.FAILED, TaskState.EXITED):
            return False
        key = after.deployment
        if key in self._rolling or key in self._awaited:
            return True
        want = self.state.desired.get(key)
        if want is not None and self.state.assigned_count(key) > want.deployment.spec.replicas:
            return True  # a rebalancing move or a replacement during a drain, completing
        return bool(self.state.node_controls) and bool(self.state.draining_nodes())

    def _ask_tasks(self) -> None:
        """Ask for a round for task changes: once however many come before it runs, and no
        sooner than ``task_round_seconds`` after the last round ended, so that a rollout of
        thousands of tasks coming up one by one costs a round per interval, not per task.
        Nor sooner than twice what the last round took: at 100,000 tasks a round takes a
        second or two, and back to back they left too little of the process for the
        heartbeats and statuses coming in, until the scheduler was seconds behind and judged
        nodes on stale news.  So at most a third of the time goes to such rounds."""
        if self._tasks_asked:
            return
        self._tasks_asked = True
        gap = max(self.settings.scheduler.task_round_seconds, 2 * self._round_took)
        delay = self._tasks_round_at + gap - time.monotonic()
        if delay <= 0:
            self.want_round(_ASK_TASKS)
        else:
            asyncio.get_running_loop().call_later(delay, self.want_round, _ASK_TASKS)

    # ---- rounds ------------------------------------------------------------------------
    def want_round(self, why: str, context: otel_context.Context | None = None) -> None:
        """Have a round run soon; ``context`` (a trace) is continued or linked by it."""
        self._wanted.append((why, context))
        self._kick.set()

    async def run_round(self, why: str) -> Plan:
        """One round, if this scheduler leads; an empty plan if it stands by."""
        async with self._lock:
            return await self._round(why)

    async def _round(self, why: str) -> Plan:
        epoch = self.acting_epoch()
        if epoch is None:
            return Plan()
        now = self.clock()
        began = time.perf_counter()
        # Built here, on the loop, and immutable: the thread reads nothing the loop changes.
        desired, observed = self.state.desired_view(), self.state.snapshot()
        snapshot_took = time.perf_counter() - began
        plan = await asyncio.to_thread(
            reconcile,
            desired,
            observed,
            now,
            self.rng,
            self.settings.scheduler.default_strategy,
            namespaces=MappingProxyType(dict(self.state.namespaces)),
            rebalance=self.rebalance,
        )
        if self.acting_epoch() != epoch:
            return Plan()  # deposed while it was computed; the applier would refuse anyway
        span = trace.get_current_span()
        span.set_attribute("comp.round.reason", why)
        span.set_attribute("comp.epoch", epoch)
        span.set_attribute("comp.plan.places", len(plan.places))
        span.set_attribute("comp.plan.stops", len(plan.stops))
        reasons = {p.deployment: p.reason for p in plan.pending}
        pending = {p.deployment: {"count": p.count, "reason": p.reason} for p in plan.pending}
        if pending != self._last_pending:
            self._last_pending = pending
            self._in_background(self.broker.publish(
                CapacityEvent(fits=not pending, pending=pending, at=time.time()), subjects.CAPACITY_EVENTS
            ))
        old_reasons = self.state.pending_reasons
        self.state.touched.update(k for k in old_reasons.keys() | reasons.keys() if old_reasons.get(k) != reasons.get(k))
        self.state.pending_reasons = reasons
        planned = time.perf_counter()
        instruments.planned(snapshot_took, planned - began - snapshot_took, len(plan.places), len(plan.stops),
                            sum(p.count for p in plan.pending))
        if not plan.empty:
            assert self.applier is not None
            await self.applier.apply(plan, now)
            self._dirty_tasks.update(p.task_id for p in plan.places)
            applied = time.perf_counter()
            instruments.applied(applied - planned)
            log.info(
                "round applied",
                extra={
                    "why": why, "places": len(plan.places), "stops": len(plan.stops), "pending": len(plan.pending),
                    # Where a slow round's time went: reading the state, planning, writing.
                    "seconds": {
                        "snapshot": round(snapshot_took, 3),
                        "reconcile": round(planned - began - snapshot_took, 3),
                        "apply": round(applied - planned, 3),
                    },
                },
            )
        elif plan.pending:
            log.info("round: nothing placeable", extra={"why": why, "pending": plan.pending[0].reason})
        self._awaited = self._awaited_by(reasons)
        await self._act_on_rollouts(plan, now)
        self._flush_wanted.set()
        return plan

    def _awaited_by(self, pending: dict[str, str]) -> set[str]:
        """Deployments that a pending deployment's depends_on names: their tasks coming up may
        release it."""
        awaited = set()
        for key in pending:
            record = self.state.desired.get(key)
            if record is not None and record.deployment.spec.depends_on:
                namespace = record.deployment.metadata.namespace
                awaited.update(subjects.deployment_key(namespace, d.name) for d in record.deployment.spec.depends_on)
        return awaited

    # ---- rollouts ------------------------------------------------------------------------
    async def _act_on_rollouts(self, plan: Plan, now: float) -> None:
        """Report each rollout step and act on its verdict: a completed generation's revision
        is marked healthy, a failed one reverted (``auto_revert``) or reported; and a round
        is set for the earliest moment a step changes by the clock alone."""
        self._rolling = {key for key, _ in plan.rollouts}
        started: dict[str, list[str]] = {}
        for place in plan.places:
            started.setdefault(place.deployment, []).append(place.task_id)
        wake_at: float | None = None
        for key, step in plan.rollouts:
            record = self.state.desired.get(key)
            if record is None:
                continue
            generation = record.generation
            self.state.remember_healthy(key, generation, step.healthy)
            if step.wake_at is not None and (wake_at is None or step.wake_at < wake_at):
                wake_at = step.wake_at
            try:
                if step.state is RolloutState.FAILED:
                    await self._on_failed(key, record, step, now)
                    continue
                if step.state is RolloutState.COMPLETE and self._marked.get(key) != generation:
                    await self.revisions.mark_healthy(key, generation, now)
                    self._marked[key] = generation
                    self.state.settled[key] = (generation, True)
                if self.state.set_rollout_status(key, generation, step.state.value, step.message):
                    await self._publish_rollout(
                        key, generation, step.state.value, step.message, now,
                        started=started.get(key, []), stopped=[s.task_id for s in step.stops],
                    )
            except Exception:
                log.exception("acting on a rollout step failed; the next round tries again", extra={"deployment": key})
        self._set_wake(wake_at)

    async def _on_failed(self, key: str, record: DeploymentRecord, step: RolloutStep, now: float) -> None:
        generation = record.generation
        if self._failure_handled.get(key) == generation:
            return
        reason = step.failed_tasks[0].reason if step.failed_tasks else step.message
        reverted = None
        if record.deployment.spec.update.auto_revert:
            reverted = await self._revert(key, generation, f"auto-revert: {reason}", now)
        self._failure_handled[key] = generation
        if reverted is _MOVED_ON:
            return  # applied, undone or reverted by someone else meanwhile: theirs stands
        if reverted is None:
            # Nothing to go back to, or not asked to: the failed version stays, frozen, for
            # the user to act on (undo, abort, a new apply).
            self.state.set_rollout_status(key, generation, "failed", step.message)
            await self._publish_rollout(key, generation, "failed", step.message, now)
            return
        assert isinstance(reverted, tuple)
        new, target = reverted
        message = f"{step.message}; reverted to revision {target} as generation {new.generation}"
        self.state.set_rollout_status(key, new.generation, "reverted", message)
        await self._publish_rollout(key, new.generation, "reverted", message, now, from_generation=generation)

    async def _revert(self, key: str, failed: int, cause: str, now: float) -> tuple[DeploymentRecord, int] | None | object:
        """Make the newest revision before ``failed`` that ran healthy the desired one again,
        as a new generation, written as the api writes a change (its revision first, then the
        deployment by compare-and-set).  Returns (the new record, the revision returned to);
        None when there is none to go to; ``_MOVED_ON`` when the deployment is no longer at
        ``failed`` (a user's apply, or a revert by a leader before us, wins)."""
        for _ in range(5):
            found = await get_model(self.deployments_kv, key, DeploymentRecord)
            if found is None or found[0].generation != failed:
                return _MOVED_ON
            current, revision = found
            target = last_healthy(await self.revisions.list(key, up_to=failed), before=failed)
            if target is None:
                return None
            new = returned_to(current, target, cause, now)
            if new.deployment.spec.task_hash() == current.deployment.spec.task_hash():
                return None
            if not self.leading:
                return None
            await self.revisions.put(key, revision_of(new))
            try:
                new_revision = await put_model(self.deployments_kv, key, new, revision)
            except ConflictError:
                continue  # read again: if it is still the failed generation, try again
            log.warning(
                "rollout failed; reverted",
                extra={"deployment": key, "generation": failed, "to_revision": target.generation, "cause": cause},
            )
            self.state.desired[key] = new
            self.state.touched.add(key)
            # The version returned to ran healthy, but this generation is a rollout of its own.
            self.state.settled[key] = (new.generation, False)
            namespace, name = new.deployment.metadata.namespace, new.deployment.metadata.name
            event = DeploymentEvent(
                action="applied", namespace=namespace, name=name, revision=new_revision, generation=new.generation
            )
            await self.broker.publish(event, subjects.deployment_event(namespace, name))
            self.want_round(f"deployment {key} reverted")
            return new, target.generation
        return None

    async def _publish_rollout(
        self,
        key: str,
        generation: int,
        state: str,
        message: str,
        now: float,
        *,
        started: list[str] | None = None,
        stopped: list[str] | None = None,
        from_generation: int | None = None,
    ) -> None:
        record = self.state.desired.get(key)
        if record is None:
            return
        namespace, name = record.deployment.metadata.namespace, record.deployment.metadata.name
        event = RolloutEvent(
            deployment=key,
            generation=generation,
            from_generation=from_generation,
            state=state,  # type: ignore[arg-type]
            message=message,
            started=started or [],
            stopped=stopped or [],
            at=now,
        )
        await self.broker.publish(event, subjects.rollout_event(namespace, name))

    def _set_wake(self, wake_at: float | None) -> None:
        """One timer, at the earliest wake_at of the last round: each round sets it anew."""
        if wake_at == self._wake_at:
            return
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self._wake_at = wake_at
        if wake_at is not None:
            delay = max(0.0, wake_at - self.clock()) + _WAKE_SLACK_SECONDS
            self._wake = asyncio.get_running_loop().call_later(delay, self._on_wake)

    def _on_wake(self) -> None:
        self._wake, self._wake_at = None, None
        self.want_round("rollout step due")

    async def _refresh_settled(self, records: dict[str, DeploymentRecord]) -> None:
        """Read whether each deployment's generation ran healthy, where it is not known to
        have (a settled generation stays settled, so a resync reads only rollouts in flight)."""
        todo = [
            (key, rec.generation)
            for key, rec in records.items()
            if self.state.settled.get(key) != (rec.generation, True)
        ]
        if not todo:
            return
        slots = Slots(_REVISION_READS_IN_FLIGHT)

        async def read(key: str, generation: int) -> None:
            async with slots:
                try:
                    found = await self.revisions.get(key, generation)
                except Exception as exc:
                    log.warning("could not read a revision", extra={"deployment": key, "error": repr(exc)})
                    return
            # Without a record (applied before revisions were kept) there is no rollout to watch.
            self.state.settled[key] = (generation, found is None or found.healthy_at is not None)

        await asyncio.gather(*(read(key, generation) for key, generation in todo))

    async def _applies_landed(self) -> None:
        """Wait while deployment events keep coming, ``apply_quiet_seconds`` apart at most, or
        are being handled (for two seconds at most in all).  An apply of many deployments stores them one by one, and each
        event asks for a round: at 5,000 nodes each round writes every node's assignments
        (every deployment spreads over all of them), so 100 deployments met by 7 rounds were
        35,000 writes where one round needs 5,000."""
        quiet = self.settings.scheduler.apply_quiet_seconds
        if quiet <= 0:
            return
        give_up = time.monotonic() + _APPLY_WAIT_MAX_SECONDS
        while time.monotonic() < give_up:
            seen = self._deployment_events
            await asyncio.sleep(quiet)
            if self._deployment_events == seen and not self._deployment_events_handling:
                return

    async def _kicked_rounds(self) -> None:
        while True:
            await self._kick.wait()
            if any(why.startswith("deployment ") for why, _ in self._wanted):
                await self._applies_landed()
            async with self._lock:
                # Taken under the lock: whatever asks while a round runs is the next round's.
                self._kick.clear()
                wanted, self._wanted = self._wanted, []
                if any(why == _ASK_TASKS for why, _ in wanted):
                    self._tasks_asked = False
                if not self.leading:
                    continue
                why, parent, links = _round_origin(wanted)
                started = time.monotonic()
                with tracer.start_as_current_span("scheduler.round", context=parent, links=links):
                    try:
                        await self._round(why)
                    except Exception:
                        instruments.ROUND_ERRORS.inc()
                        log.exception("reconcile round failed; will retry on the next change or resync")
                self._tasks_round_at = time.monotonic()
                self._round_took = self._tasks_round_at - started

    async def _resync(self) -> None:
        await self._load_desired()
        if self.leading:
            await self._repair_assignments()
            self.want_round("resync")
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

    async def _load_namespaces(self) -> None:
        records = await list_models(self.namespaces_kv, NamespaceRecord)
        self.state.namespaces = {name: record for name, (record, _) in records.items()}

    async def on_control_event(self, event: ControlEvent) -> None:
        if event.kind == "node":
            await self._load_node_controls()
        elif event.kind == "namespace":
            # A raised quota may release pending replicas; a lowered one holds back new ones.
            found = await get_model(self.namespaces_kv, event.name, NamespaceRecord)
            if found is None:
                self.state.namespaces.pop(event.name, None)
            else:
                self.state.namespaces[event.name] = found[0]
        else:
            return
        if self.leading:
            self.want_round(f"{event.kind} {event.name} {event.action}", otel_context.get_current())

    async def _load_desired(self) -> None:
        await self._load_node_controls()
        await self._load_namespaces()
        records = await list_models(self.deployments_kv, DeploymentRecord)
        fresh = {key: rec for key, (rec, _) in records.items()}
        self._desired_revisions.update((key, revision) for key, (_, revision) in records.items())
        gone = set(self.state.desired) - set(fresh)
        self._gone_deployments.update(gone)
        for key in gone:
            self._forget(key)
        old = self.state.desired
        self.state.touched.update(k for k, rec in fresh.items() if old.get(k) != rec)
        self.state.desired = fresh
        await self._refresh_settled(fresh)

    # ---- liveness -------------------------------------------------------------------------
    async def _liveness_timer(self) -> None:
        """Check liveness when the earliest node's grace runs out, not on a fixed poll: a lost
        node is noticed at its deadline.  No more often than ``liveness_check_seconds``, since
        with thousands of nodes some deadline is always about to pass."""
        gap = self.settings.scheduler.liveness_check_seconds
        liveness = self.settings.liveness
        # The soonest any node first heard of after this sleep began could need a look.
        grace = min(liveness.grace_seconds, liveness.ping_after_seconds or liveness.grace_seconds)
        while True:
            deadlines = [d for d in (self.state.next_deadline(), self.state.next_ping()) if d is not None]
            # Held nodes stay overdue: look again now and then, not every gap.
            least = HELD_CHECK_SECONDS if self.state.holding_since is not None else gap
            await asyncio.sleep(next_check_in(min(deadlines, default=None), self.clock(), least, grace))
            try:
                await self._ping_late_nodes()
                await self._check_liveness()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("liveness check failed")

    async def _check_liveness(self) -> None:
        if not self.state.overdue(self.clock()):
            self.state.holding_since = None  # no one is late: nothing is held
            self._say_if_holding()
            return
        # Heartbeats are stamped when this loop handles them.  After a stall (a long round,
        # a burst of events) the ones that came in meanwhile still wait in the socket or the
        # subscription's queue, and every node would look late: let them in first.  A node
        # that is really gone is late still, by the time this took (normally a round trip).
        await self._catch_up()
        down, up = self.state.refresh_liveness(self.clock())
        self._say_if_holding()
        for node_id in down:
            log.warning("node down", extra={"node": node_id})
        self._dirty_nodes.update(down + up)
        if down or up:
            self._flush_wanted.set()
            self.want_round("cluster changed")

    async def _ping_late_nodes(self) -> None:
        """Ping the nodes that are late but within their grace; one whose ping subject has no
        subscriber on the server goes down now (see ``NodeLivenessSettings``)."""
        late = self.state.due_for_ping(self.clock())
        if not late:
            return
        await self._catch_up()  # a heartbeat that waited in our queue is no lateness
        late = self.state.still_silent(late)
        asked_at = self.clock()
        gone = await asyncio.gather(*(self._unreachable(node_id) for node_id in late))
        down = self.state.mark_unreachable([n for n, no_one in zip(late, gone) if no_one], asked_at, self.clock())
        self._say_if_holding()
        for node_id in down:
            log.warning("node down: no connection answers its pings", extra={"node": node_id})
        if down:
            self._dirty_nodes.update(down)
            self._flush_wanted.set()
            self.want_round("cluster changed")

    def _say_if_holding(self) -> None:
        holding = self.state.holding_since is not None
        if holding != self._was_holding:
            self._was_holding = holding
            if holding:
                policy = self.state.disruption
                log.warning(
                    "most nodes are late at once; holding them up rather than declaring them down",
                    extra={"fraction": policy.fraction, "hold_seconds": policy.hold_seconds},
                )
            else:
                log.warning("no nodes held up any more")

    async def _unreachable(self, node_id: str) -> bool:
        """True only on the server's "no responders": a reply or a timeout is no verdict."""
        try:
            await self.broker.connection.request(
                subjects.node_ping(node_id), b"", timeout=self.settings.liveness.ping_timeout_seconds
            )
        except nats.errors.NoRespondersError:
            return True
        except Exception:
            return False
        return False

    async def _catch_up(self) -> None:
        """Return once every heartbeat the server sent before now has been handled.

        A message to ourselves comes back after everything the server sent us before it;
        once it is back, the heartbeat subscriptions have queued all of that, and we wait
        for them to have handled it.  (Not ``flush()``: nats-py's read loop dies on a PONG
        that comes after its flush timed out.)
        """
        if not self.inputs:
            return
        # However far behind this loop is, waiting for it is right: until the heartbeats
        # that arrived meanwhile are handled, no node can be judged.  The bound is only for
        # a connection that is gone (NATS cuts a consumer 10 s behind by default).
        bound = max(_CATCH_UP_BOUND_SECONDS, 3 * self.settings.liveness.grace_seconds)
        connection = self.broker.connection
        if self._echo is None:
            self._echo = await connection.subscribe(connection.new_inbox(), cb=self._on_echo)
        token = uuid.uuid4().hex
        returned = self._echoes[token] = asyncio.get_running_loop().create_future()
        try:
            await connection.publish(self._echo.subject, token.encode())
            await within(returned, bound)
        except Exception as exc:
            log.warning("heartbeats could not be caught up with before a liveness check", extra={"error": repr(exc)})
            return
        finally:
            self._echoes.pop(token, None)
        marks = [(sub, sub.delivered) for sub in self.inputs]
        give_up = time.monotonic() + bound
        while any(sub.delivered - sub.pending_msgs < mark for sub, mark in marks):
            if time.monotonic() > give_up:
                log.warning("heartbeats still queued after the catch-up bound; checking liveness anyway")
                return
            await asyncio.sleep(0.005)

    async def _on_echo(self, msg: Msg) -> None:
        returned = self._echoes.get(msg.data.decode(errors="replace"))
        if returned is not None and not returned.done():
            returned.set_result(None)

    # ---- observed state to Redis --------------------------------------------------------
    async def flush(self) -> None:
        if not self.leading:
            # The leader's picture is the one in Redis; on taking over, ours is written whole
            # and what it lacks is swept, so nothing needs remembering meanwhile.
            self._dirty_nodes.clear()
            self._seen_nodes.clear()
            self._dirty_tasks.clear()
            self._gone_tasks.clear()
            self._gone_deployments.clear()
            self.state.take_touched()
            return
        nodes = [self.state.shown_record(e) for n in self._dirty_nodes if (e := self.state.nodes.get(n)) and e.record]
        seen = {n: e.record.last_heartbeat for n in self._seen_nodes if (e := self.state.nodes.get(n)) and e.record}
        tasks = [s for t in self._dirty_tasks if (s := self.state.statuses.get(t))]
        gone_tasks, gone_deployments = set(self._gone_tasks), set(self._gone_deployments)
        # Taken with the tasks, before any await: a summary computed after the writes could
        # count statuses whose task records only the next flush writes, and a reader would
        # see "500 running" beside tasks still listed as pending.  Only the deployments whose
        # tasks, statuses, spec or pending reason changed since the last flush.
        touched = self.state.take_touched()
        summaries = self.state.deployment_statuses(self.clock(), touched)
        self._dirty_nodes.clear()
        self._seen_nodes.clear()
        self._dirty_tasks.clear()
        self._gone_tasks.clear()
        self._gone_deployments.clear()
        try:
            await self.store.put_nodes(nodes)
            await self.store.put_node_seen(seen)
            await self.store.put_tasks(tasks)
            await self.store.delete_tasks(gone_tasks)
            await self.store.put_deployment_statuses(summaries)
            await self.store.delete_deployment_statuses(gone_deployments)
        except Exception as exc:
            # Keep what was not written for the next flush; Redis may be back by then.
            self._dirty_nodes.update(n.node_id for n in nodes)
            self._seen_nodes.update(seen)
            self._dirty_tasks.update(s.task_id for s in tasks)
            self._gone_tasks.update(gone_tasks)
            self._gone_deployments.update(gone_deployments)
            self.state.touched.update(touched)
            self._flush_wanted.set()
            log.warning("could not write observed state to redis", extra={"error": repr(exc)})

    async def _flush_loop(self) -> None:
        """Flush as soon as a task, summary or node status changed, then at most every
        ``flush_seconds``: a change after a quiet spell reaches Redis at once, a stream of
        them in batches.  Heartbeat times alone are written on the period."""
        period = self.settings.scheduler.flush_seconds
        while True:
            try:
                await within(self._flush_wanted.wait(), period)
            except TimeoutError:
                pass
            self._flush_wanted.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("flush failed")
            await asyncio.sleep(period)

    async def _every(self, seconds: float, action: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("periodic task failed", extra={"task": getattr(action, "__name__", str(action))})


def _round_origin(
    wanted: list[tuple[str, otel_context.Context | None]],
) -> tuple[str, otel_context.Context | None, list[trace.Link]]:
    """One round for many asks: why (the reasons, deduplicated), the trace it continues (the
    first ask that came with one) and links to the other asks' spans."""
    whys = list(dict.fromkeys(why for why, _ in wanted)) or ["cluster changed"]
    why = ", ".join(whys[:_REASONS_SHOWN]) + (f" and {len(whys) - _REASONS_SHOWN} more" if len(whys) > _REASONS_SHOWN else "")
    traced = [c for _, c in wanted if c is not None and trace.get_current_span(c).get_span_context().is_valid]
    parent = traced[0] if traced else otel_context.Context()
    links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in traced[1:]]
    return why, parent, links


def next_check_in(deadline: float | None, now: float, gap: float, grace: float) -> float:
    """Seconds until the next liveness check: at the earliest deadline, at least ``gap`` away.
    With no deadline, a grace: any node added meanwhile has a deadline a whole grace away,
    never sooner, so it cannot be missed."""
    return max(grace if deadline is None else deadline - now, gap)
