"""The node agent's core: make this host run exactly the tasks assigned to it.

Two halves, as in dask's worker state machine:

* :func:`plan_actions` is pure.  Desired tasks and observed containers in, a list of
  :class:`Action` out, each with the reason for it.  Table-tested without an engine.
  :func:`check_epoch`, as pure, is the fencing rule for assignments and nudges.
  :func:`restart_wanted` and :func:`exit_backoff`, as pure, are the restart policy.
* :class:`Agent` owns the state (assignments, task statuses, restart counts, failure
  backoff, health checks), runs each action as its own asyncio task, one at a time per
  task id and at most ``parallelism`` engine operations at once (a stop's grace wait is
  no engine operation), and publishes every status change.  Each health check of a
  running task is an asyncio loop of its own (see :mod:`comp_nodeagent.health`).

A pass is level-triggered: it re-reads the assignments and re-lists the containers, so
a missed nudge or event is repaired by the next pass, whatever triggered it.  Tasks new to
the agent (the pure :func:`plan_new_starts`) are started before the listing, once the host
has been listed since the agent started: a replacement placed here waits for the engine's
start only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

import httpx

from comp_common import subjects
from comp_common.aio import cancel_and_wait
from comp_common.manifest import HealthCheck, RestartPolicy
from comp_common.metrics import timed
from comp_common.messages import (
    Capacity,
    HealthEvent,
    HealthState,
    Heartbeat,
    NodeAssignments,
    NodeMetrics,
    Nudge,
    TaskSpec,
    TaskState,
    TaskStatus,
)

from . import instruments
from .driver import EventWatch, RuntimeDriver, RuntimeTask, can_measure, can_probe
from .health import Checker, ProbeResult, Verdict, exec_result, new_http_client, probe_http, probe_tcp, resolve_port
from .metrics import RunningTask, UsageTracker
from .settings import NodeAgentGroup

log = logging.getLogger(__name__)
tracer = trace.get_tracer("comp_nodeagent")

# How long shutdown waits for engine operations already under way.
SHUTDOWN_WAIT_SECONDS = 5.0
FOLLOW_UP_PASS_DELAY_SECONDS = 0.2
_FINISHED = " finished"
_RESYNC = "resync"
NEW_TASK_REASON = "newly assigned"
# After an engine error in a stop or replace, the task is held back this long so that a
# persistent error (an engine in trouble) is retried at a walk, not in a tight loop.
ACTION_ERROR_PAUSE_SECONDS = 1.0


class ActionKind(StrEnum):
    START = "start"  # no container: create and start one
    RESTART = "restart"  # the container ended, or is not the one wanted: replace it
    STOP = "stop"  # the task is no longer assigned here: stop and remove its containers
    ADOPT = "adopt"  # a running container the agent does not know yet: take it as it is
    FINISH = "finish"  # the process ended and the restart policy says so: report it, keep the container
    # The liveness check failed: stop the container (signal, grace).  Not planned by
    # plan_actions but by the check; the pass after it restarts the task as after any exit.
    TERMINATE = "terminate"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    task_id: str
    reason: str
    spec: TaskSpec | None = None  # what should run; None for STOP
    containers: tuple[RuntimeTask, ...] = ()  # what exists now: to adopt, replace or stop


def plan_actions(
    desired: Iterable[TaskSpec],
    actual: Iterable[RuntimeTask],
    *,
    busy: Iterable[str] = (),
    tracked: Mapping[str, str | None] | None = None,
    not_before: Mapping[str, float] | None = None,
    now: float = 0.0,
    finished: Collection[str] = (),
    terminated: Mapping[str, str] | None = None,
) -> list[Action]:
    """What to do so that the host runs exactly ``desired``.

    ``busy``: task ids with an action under way; left alone this time.
    ``tracked``: task id -> container id for every task the agent reports a status for
    (None where it has no container), so that known containers are not adopted again and
    tasks that vanished are reported stopped.
    ``not_before``: task id -> time before which a failed task must not be started again.
    ``finished``: ids of ended containers already reported and left as the restart policy says.
    ``terminated``: container id -> why the agent stopped it (its liveness check failed):
    its exit is a failure whatever its exit code, and that is the reason given.
    """
    tracked = tracked or {}
    not_before = not_before or {}
    finished = set(finished)
    terminated = terminated or {}
    busy = set(busy)
    wanted = {task.task_id: task for task in desired}
    containers: dict[str, list[RuntimeTask]] = defaultdict(list)
    for runtime_task in actual:
        containers[runtime_task.task_id].append(runtime_task)

    actions: list[Action] = []
    for task_id in sorted(wanted.keys() | containers.keys() | tracked.keys()):
        if task_id in busy:
            continue
        spec = wanted.get(task_id)
        found = tuple(containers.get(task_id, ()))
        if spec is None:
            if found or task_id in tracked:
                actions.append(Action(ActionKind.STOP, task_id, "no longer assigned to this node", containers=found))
            continue
        if not found:
            if not_before.get(task_id, now) > now:
                continue  # failed recently; waiting out its backoff
            actions.append(Action(ActionKind.START, task_id, "assigned and not running", spec=spec))
            continue
        if len(found) > 1:
            actions.append(Action(ActionKind.RESTART, task_id, f"{len(found)} containers for one task", spec, found))
            continue
        container = found[0]
        if not container.alive:
            killed = terminated.get(container.container_id)
            reason = killed or _ended_reason(container)
            if (
                container.spec_hash == spec.spec_hash
                and has_exited(container)
                and not restart_wanted(spec.restart.condition, container.exit_code, killed=killed is not None)
            ):
                if container.container_id not in finished:
                    why = f"{reason}; not restarted (restart policy {spec.restart.condition})"
                    actions.append(Action(ActionKind.FINISH, task_id, why, spec, found))
                continue
            actions.append(Action(ActionKind.RESTART, task_id, reason, spec, found))
        elif container.spec_hash != spec.spec_hash:
            actions.append(Action(ActionKind.RESTART, task_id, "spec changed", spec, found))
        elif tracked.get(task_id) != container.container_id:
            actions.append(Action(ActionKind.ADOPT, task_id, "found running", spec, found))
    return actions


def plan_new_starts(
    desired: Iterable[TaskSpec],
    *,
    known: Collection[str],
    not_before: Mapping[str, float] | None = None,
    now: float = 0.0,
) -> list[Action]:
    """Starts that need no listing: assigned tasks the agent has no record of.

    ``known``: task ids the agent reports a status for or has an action under way for.  A
    task it has never seen has no container here, once the host has been listed since the
    agent started (containers of an earlier agent are then known, adopted or stopped).
    ``not_before`` as for :func:`plan_actions`.
    """
    not_before = not_before or {}
    return [
        Action(ActionKind.START, task.task_id, NEW_TASK_REASON, spec=task)
        for task in sorted(desired, key=lambda t: t.task_id)
        if task.task_id not in known and not_before.get(task.task_id, now) <= now
    ]


def _ended_reason(container: RuntimeTask) -> str:
    if container.state == "created":
        return "container was created but never started"
    if container.exit_code is not None:
        return f"container exited with code {container.exit_code}"
    return f"container is {container.state}"


def has_exited(container: RuntimeTask) -> bool:
    """The task's process ran and ended (as opposed to never having started)."""
    return not container.alive and container.state != "created"


def check_epoch(floor: int, epoch: int) -> tuple[bool, int]:
    """Whether something from scheduler epoch ``epoch`` is current, and the floor after it.

    ``floor`` is the highest epoch seen so far.  Anything from a lower epoch comes from a
    scheduler that has since lost its lease; anything else raises the floor to its epoch.
    Assignments and nudges both carry the epoch, so both raise the floor: a nudge from a
    new leader fences the old one before the new leader's assignments are even read.
    """
    if epoch < floor:
        return False, floor
    return True, epoch


def backoff_delay(failures: int, cap: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures: 0, then 1, 2, 4... up to ``cap``."""
    return 0.0 if failures <= 0 else min(cap, 2.0 ** (failures - 1))


def restart_wanted(condition: str, exit_code: int | None, *, killed: bool = False) -> bool:
    """Whether a task whose process ended is started again, by its restart policy's condition.

    ``killed``: the agent stopped it because its liveness check failed, which is a failure
    whatever the exit code (a process may well exit 0 on SIGTERM).  An unknown exit code
    (the engine lost it) counts as a failure.
    """
    if condition == "never":
        return False
    if condition == "on-failure":
        return killed or exit_code != 0
    return True


def exit_backoff(failures: int, ran_for: float | None, policy: RestartPolicy) -> tuple[float, int]:
    """The wait before restarting a task that just ended, and its count of failures after.

    ``failures``: consecutive exits so far, each after a run shorter than
    ``policy.reset_after``.  A run at least that long was stable and starts the count
    afresh.  The first exit of a count restarts at once; then 1, 2, 4... s, at most
    ``policy.max_delay``.
    """
    if ran_for is not None and ran_for >= policy.reset_after:
        failures = 0
    return backoff_delay(failures, policy.max_delay), failures + 1


@dataclass
class _Health:
    """A task's current verdicts, and the checks that make them."""

    liveness: HealthState = HealthState.NONE
    readiness: HealthState = HealthState.NONE
    container_id: str | None = None  # whose checks run
    loops: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def initial(cls, spec: TaskSpec) -> _Health:
        return cls(
            liveness=HealthState.STARTING if spec.health.liveness else HealthState.NONE,
            readiness=HealthState.STARTING if spec.health.readiness else HealthState.NONE,
        )

    def cancel(self) -> None:
        current = asyncio.current_task()
        for loop_task in self.loops:
            # A check that decides to end its container cancels the others, never itself.
            if loop_task is not current:
                loop_task.cancel()
        self.loops = []
        self.container_id = None


Publish = Callable[[BaseModel, str], Awaitable[Any]]
LoadAssignments = Callable[[], Awaitable[NodeAssignments | None]]


class Agent:
    def __init__(
        self,
        *,
        settings: NodeAgentGroup,
        heartbeat_seconds: float,
        driver: RuntimeDriver,
        load_assignments: LoadAssignments,
        publish: Publish,
        own_clock: bool = True,
    ):
        """``own_clock`` False: the caller sends the heartbeats (``beat``), the metrics
        (``publish_metrics``) and asks for the resyncs (``resync``) on its own schedule, as a
        fleet of hollow agents does for all of them at once rather than with timers per agent."""
        self.settings = settings
        self._own_clock = own_clock
        # Started and not stopped: it heartbeats and acts.
        self.running = False
        self.node_id = settings.node_id
        self.heartbeat_seconds = heartbeat_seconds
        self.driver = driver
        self._load_assignments = load_assignments
        self._publish = publish
        self._engine_slots = asyncio.Semaphore(settings.parallelism)

        self.started_at = time.time()
        self.capacity = Capacity(cpu=0.0, memory=0)
        # Set by whoever subscribes this agent to its ping subject (handlers.make_router).
        self.answers_pings = False
        self._desired: dict[str, TaskSpec] = {}
        self._allocated: tuple[dict[str, TaskSpec] | None, Capacity] = (None, Capacity(cpu=0.0, memory=0))
        # The highest scheduler epoch seen in assignments or nudges: a value with a lower one
        # comes from a deposed leader and is refused.
        self._epoch = 0
        self._statuses: dict[str, TaskStatus] = {}
        self._restarts: dict[str, int] = {}
        self._failures: dict[str, int] = {}  # consecutive failed starts or short runs
        self._not_before: dict[str, float] = {}  # monotonic time
        # The spec each task's container was started (or adopted) with: how to stop it.
        self._specs: dict[str, TaskSpec] = {}
        self._health: dict[str, _Health] = {}
        # task id -> the container left ended by the restart policy, already reported.
        self._finished: dict[str, str] = {}
        # container id -> why the agent stopped it (a failed liveness check).
        self._terminated: dict[str, str] = {}
        self._can_probe = can_probe(driver)
        self._usage = UsageTracker()
        self._http: httpx.AsyncClient | None = None
        self._heartbeat_seq = 0
        # Tasks whose status changed since the last heartbeat: what a partial one carries.
        self._changed_since_beat: set[str] = set()

        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Whether a pass has listed the host since this agent started: until then a task the
        # agent has no record of may still have a container here, left by the last agent.
        self._listed = False
        # Task ids whose action finished while a pass was listing: that listing may predate
        # the action's effect, so the pass leaves them to the pass the finish triggers.
        self._settled_since_listing: set[str] = set()
        self._pass_lock = asyncio.Lock()
        self._pass_wanted = asyncio.Event()
        self._pass_reasons: list[str] = []
        self._loops: list[asyncio.Task[None]] = []
        self._wakeups: set[asyncio.TimerHandle] = set()
        self._watch: EventWatch | None = None
        self._stopping = False

    # ---- what others read ---------------------------------------------------------------
    @property
    def statuses(self) -> dict[str, TaskStatus]:
        return dict(self._statuses)

    @property
    def allocated(self) -> Capacity:
        # Summed once per assignments value, not on every heartbeat.
        if self._allocated[0] is not self._desired:
            tasks = self._desired.values()
            total = Capacity(cpu=round(sum(t.cpu for t in tasks), 6), memory=sum(t.memory for t in tasks))
            self._allocated = (self._desired, total)
        return self._allocated[1]

    def heartbeat(self) -> Heartbeat:
        """The next heartbeat: the first and every ``full_heartbeat_every``-th carry every
        task's status, the others those changed since the previous one."""
        self._heartbeat_seq += 1
        full = (self._heartbeat_seq - 1) % self.settings.full_heartbeat_every == 0
        if full:
            tasks = list(self._statuses.values())
        else:
            tasks = [s for t in self._changed_since_beat if (s := self._statuses.get(t)) is not None]
        self._changed_since_beat.clear()
        # Built from the agent's own validated values: a fleet makes thousands a second.
        return Heartbeat.model_construct(
            node_id=self.node_id,
            seq=self._heartbeat_seq,
            sent_at=time.time(),
            started_at=self.started_at,
            driver=self.driver.name,
            address=self.settings.address,
            capacity=self.capacity,
            allocated=self.allocated,
            labels=dict(self.settings.labels),
            taints=list(self.settings.taints),
            answers_pings=self.answers_pings,
            full=full,
            task_count=len(self._statuses),
            tasks=tasks,
        )

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        engine = await self.driver.capacity()
        self.capacity = Capacity(
            cpu=self.settings.cpu if self.settings.cpu is not None else engine.cpu,
            memory=self.settings.memory if self.settings.memory is not None else engine.memory,
        )
        # The watch asks for a pass of its own once connected, so no death goes unseen.
        self._watch = await self.driver.watch(self._on_runtime_event)
        self._loops = [asyncio.create_task(self._run_requested_passes(), name="nodeagent-passes")]
        if self._own_clock:
            self._loops += [
                asyncio.create_task(self._heartbeat_loop(), name="nodeagent-heartbeat"),
                asyncio.create_task(self._resync_loop(), name="nodeagent-resync"),
            ]
            if self.settings.metrics_period > 0:
                if can_measure(self.driver):
                    self._loops.append(asyncio.create_task(self._metrics_loop(), name="nodeagent-metrics"))
                else:
                    log.info("the runtime reports no resource use; no metrics", extra={"driver": self.driver.name})
        self.running = True
        self.request_reconcile("agent started")
        log.info("node agent started", extra={"node_id": self.node_id, "driver": self.driver.name})

    async def stop(self) -> None:
        """Stop reconciling and reporting.  Containers keep running: the next agent adopts them."""
        # Nudges can still arrive until the broker closes, after this: they must act no more.
        self._stopping = True
        self.running = False
        await cancel_and_wait(self._loops)
        self._loops = []
        for handle in self._wakeups:
            handle.cancel()
        self._wakeups.clear()
        checks = [loop_task for health in self._health.values() for loop_task in health.loops]
        for health in self._health.values():
            health.cancel()
        await cancel_and_wait(checks)
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        inflight = list(self._inflight.values())
        if inflight:
            _, unfinished = await asyncio.wait(inflight, timeout=SHUTDOWN_WAIT_SECONDS)
            await cancel_and_wait(unfinished)
        await self.driver.close()
        log.info("node agent stopped", extra={"node_id": self.node_id})

    @property
    def epoch(self) -> int:
        """The lowest scheduler epoch whose assignments this agent still accepts."""
        return self._epoch

    # ---- passes ---------------------------------------------------------------------------
    async def on_nudge(self, nudge: Nudge) -> None:
        """A scheduler says this node's assignments changed: raise the epoch floor, then pass.

        A nudge from an older epoch than the floor comes from a deposed leader; it is
        logged and dropped, since a pass it asked for could only find what the next nudge
        or resync will.
        """
        current, self._epoch = check_epoch(self._epoch, nudge.epoch)
        if not current:
            log.info(
                "nudge from an older scheduler epoch; ignored",
                extra={"epoch": nudge.epoch, "accepted_epoch": self._epoch, "version": nudge.version},
            )
            return
        # The KV value is the truth, the nudge only says "look now".  The pass runs in the
        # caller's span, so the starts it causes join the scheduler's trace.
        await self.reconcile(trigger=f"nudge version {nudge.version}")

    def request_reconcile(self, reason: str) -> None:
        """Have a pass run soon in the background, under a root span of its own.

        Requests that arrive while a pass runs are folded into one further pass.
        """
        self._pass_reasons.append(reason)
        self._pass_wanted.set()

    @timed(instruments.SYNC_SECONDS)
    async def reconcile(self, trigger: str) -> None:
        """One pass, in the caller's trace context: the actions it starts inherit it."""
        async with self._pass_lock:
            if self._stopping:
                return
            self._settled_since_listing.clear()
            try:
                assignments = await self._load_assignments()
            except Exception:
                # Unknown is not empty: acting on it could stop every task on the node.
                log.warning("could not read assignments; leaving the host as it is", exc_info=True)
                return
            if assignments is not None and assignments.node_id != self.node_id:
                log.error("assignments are for another node; ignored", extra={"for_node": assignments.node_id})
                return
            current = True
            if assignments is not None:
                current, self._epoch = check_epoch(self._epoch, assignments.epoch)
                if not current:
                    # Written by a scheduler that has since lost its lease: keep what we have.
                    log.warning(
                        "assignments from an older scheduler epoch; ignored",
                        extra={"epoch": assignments.epoch, "accepted_epoch": self._epoch, "version": assignments.version},
                    )
            if current:
                self._desired = {task.task_id: task for task in (assignments.tasks if assignments else [])}
            if self._listed:
                # A task new to this node needs no listing to be started: the agent knows from
                # its own records that it has no container (the engine's create also refuses a
                # second one by name).  The listing that follows leaves it alone while it starts,
                # so a replacement does not wait for the engine to list every container first.
                for action in plan_new_starts(
                    self._desired.values(),
                    known=self._statuses.keys() | self._inflight.keys(),
                    not_before=self._not_before,
                    now=time.monotonic(),
                ):
                    self._launch(action, trigger)
            try:
                actual = await self.driver.list_tasks()
            except Exception:
                log.warning("could not list containers", exc_info=True)
                return
            actions = plan_actions(
                self._desired.values(),
                actual,
                busy=self._inflight.keys() | self._settled_since_listing,
                tracked={task_id: status.container_id for task_id, status in self._statuses.items()},
                not_before=self._not_before,
                now=time.monotonic(),
                finished=self._finished.values(),
                terminated=self._terminated,
            )
            for action in actions:
                self._launch(action, trigger)
            self._listed = True

    def _launch(self, action: Action, trigger: str) -> None:
        log.info(
            "action",
            extra={"action": action.kind.value, "task_id": action.task_id, "reason": action.reason, "trigger": trigger},
        )
        self._inflight[action.task_id] = asyncio.create_task(
            self._execute(action), name=f"nodeagent-{action.kind.value}-{action.task_id}"
        )

    async def _run_requested_passes(self) -> None:
        while True:
            await self._pass_wanted.wait()
            if all(reason.endswith(_FINISHED) for reason in self._pass_reasons):
                # A pass after an action only confirms what the action did; waiting a little
                # folds the confirmations of a large deploy into a few engine listings
                # instead of one per container.  Nudges and engine events never wait.
                await asyncio.sleep(FOLLOW_UP_PASS_DELAY_SECONDS)
            self._pass_wanted.clear()
            reasons, self._pass_reasons = self._pass_reasons, []
            trigger = ", ".join(sorted(set(reasons)))
            # An empty context: this pass is no part of whatever trace asked for it.  A
            # periodic resync gets no span: it mostly finds nothing to do (a fleet's 1,000
            # a second were a third of its CPU), and what it does do traces itself.
            span = (
                contextlib.nullcontext()
                if trigger == _RESYNC
                else tracer.start_as_current_span(
                    "nodeagent.reconcile", context=otel_context.Context(), attributes={"comp.trigger": trigger}
                )
            )
            with span:
                try:
                    await self.reconcile(trigger)
                except Exception:
                    log.exception("reconcile pass failed")

    def resync(self) -> None:
        """Have the periodic repairing pass run (see ``own_clock``)."""
        self.request_reconcile(_RESYNC)

    async def beat(self) -> None:
        """Publish the next heartbeat (see ``own_clock``)."""
        try:
            await self._publish(self.heartbeat(), subjects.node_heartbeat(self.node_id))
        except Exception:
            log.warning("could not publish heartbeat", exc_info=True)

    async def publish_metrics(self) -> None:
        """Sample every running task's resource use and publish one :class:`NodeMetrics` (see
        ``own_clock``).  A task sampled for the first time has no CPU rate yet: it is in the
        message from its second sample on.  Never raises: metrics are a report, and a
        failure to make one must not disturb the tasks."""
        if not can_measure(self.driver):
            return
        try:
            message = await self._sample_metrics()
            await self._publish(message, subjects.node_metrics(self.node_id))
        except Exception:
            log.warning("could not publish node metrics", exc_info=True)

    async def _sample_metrics(self) -> NodeMetrics:
        running: list[RunningTask] = []
        for task_id, status in self._statuses.items():
            spec = self._specs.get(task_id) or self._desired.get(task_id)
            if status.state != TaskState.RUNNING or status.container_id is None or spec is None:
                continue
            running.append(RunningTask(task_id, status.deployment, status.container_id, spec.cpu, spec.memory))
        before = time.monotonic()
        counters = await self.driver.usage([task.container_id for task in running])
        # The middle of the read stands for all its samples: reading many containers takes a
        # few milliseconds, a small part of a period.
        at = (before + time.monotonic()) / 2
        usages, since = self._usage.observe(at, counters, running)
        return NodeMetrics(
            node_id=self.node_id,
            at=time.time(),
            period_seconds=round(since if since is not None else self.settings.metrics_period, 3),
            tasks=usages,
            cpu_cores=round(sum(u.cpu_cores for u in usages), 4),
            memory_bytes=sum(u.memory_bytes for u in usages),
            capacity=self.capacity,
            allocated=self.allocated,
        )

    async def _metrics_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.settings.metrics_period
        # On a fixed schedule, so that a slow sample does not stretch every later period.
        due = loop.time()
        while True:
            await self.publish_metrics()
            due = max(due + period, loop.time())
            await asyncio.sleep(due - loop.time())

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.resync()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.heartbeat_seconds)

    def _on_runtime_event(self, task_id: str | None) -> None:
        self.request_reconcile(f"container event for {task_id}" if task_id else "runtime watch connected")

    def _wake_after(self, delay: float, reason: str) -> None:
        def wake() -> None:
            self._wakeups.discard(handle)
            self.request_reconcile(reason)

        handle = asyncio.get_running_loop().call_later(delay, wake)
        self._wakeups.add(handle)

    # ---- actions --------------------------------------------------------------------------
    async def _execute(self, action: Action) -> None:
        try:
            if action.kind is ActionKind.START:
                assert action.spec is not None
                await self._start(action.spec, action.reason)
            elif action.kind is ActionKind.RESTART:
                await self._restart(action)
            elif action.kind is ActionKind.STOP:
                await self._stop(action)
            elif action.kind is ActionKind.ADOPT:
                await self._adopt(action)
            elif action.kind is ActionKind.FINISH:
                await self._finish(action)
            elif action.kind is ActionKind.TERMINATE:
                await self._terminate(action)
        except Exception:
            log.exception("action failed", extra={"action": action.kind.value, "task_id": action.task_id})
            # Still in flight while it waits, so passes leave the task alone meanwhile.
            await asyncio.sleep(ACTION_ERROR_PAUSE_SECONDS)
        finally:
            self._inflight.pop(action.task_id, None)
            self._settled_since_listing.add(action.task_id)
            self.request_reconcile(f"{action.kind.value} of {action.task_id}{_FINISHED}")

    async def _start(self, spec: TaskSpec, reason: str, removing: asyncio.Task[None] | None = None) -> None:
        """Start the task's container.  ``removing``: the removal of its last container, under
        way meanwhile; awaited before the outcome is reported, so that a task reported
        running has one container."""
        with tracer.start_as_current_span(
            "nodeagent.start_task",
            attributes={"comp.task_id": spec.task_id, "comp.deployment": spec.deployment, "comp.node": self.node_id},
        ) as span:
            self._reset_health(spec)
            await self._set_status(spec.task_id, spec.deployment, TaskState.STARTING, message=reason)
            try:
                try:
                    async with self._engine_slots:
                        started = await instruments.start_container(self.driver.start(spec))
                finally:
                    if removing is not None:
                        await removing
            except Exception as exc:
                failures = self._failures.get(spec.task_id, 0) + 1
                self._failures[spec.task_id] = failures
                delay = self._back_off(spec.task_id, backoff_delay(failures, self.settings.restart_backoff_max_seconds))
                span.set_status(StatusCode.ERROR, str(exc))
                log.warning("task failed to start", extra={"task_id": spec.task_id, "error": str(exc), "retry_in": delay})
                await self._set_status(
                    spec.task_id,
                    spec.deployment,
                    TaskState.FAILED,
                    message=f"{exc} (retrying in {delay:g}s)",
                    next_restart_at=time.time() + delay,
                )
                return
            span.set_attribute("comp.container_id", started.container_id)
            self._specs[spec.task_id] = spec
            self._finished.pop(spec.task_id, None)
            await self._set_status(
                spec.task_id,
                spec.deployment,
                TaskState.RUNNING,
                container_id=started.container_id,
                host_ports=dict(started.host_ports),
            )
            self._check_health(spec, started)

    async def _restart(self, action: Action) -> None:
        spec = action.spec
        assert spec is not None
        ended = next((c for c in action.containers if has_exited(c)), None)
        delay = 0.0
        if ended is not None and len(action.containers) == 1:
            delay = self._note_exit(spec, ended)
            await self._set_status(
                spec.task_id,
                spec.deployment,
                TaskState.EXITED,
                message=action.reason + (f" (restarting in {delay:g}s)" if delay > 0 else ""),
                container_id=ended.container_id,
                exit_code=ended.exit_code,
                crash_loop=delay > 0,
                next_restart_at=time.time() + delay if delay > 0 else None,
            )
            self._restarts[spec.task_id] = self._restarts.get(spec.task_id, 0) + 1
            set_aside = getattr(self.driver, "set_aside", None)
            if delay == 0 and set_aside is not None:
                # The replacement starts while the ended container is removed: a restart
                # waits for the engine's start only.
                await set_aside(ended)
                removing = asyncio.create_task(self._remove_all(action.task_id, action.containers))
                await self._start(spec, action.reason, removing=removing)
                return
        await self._remove_all(action.task_id, action.containers)
        if delay > 0:
            log.info("task is crash looping; restart delayed", extra={"task_id": spec.task_id, "delay": delay})
            return
        await self._start(spec, action.reason)

    async def _stop(self, action: Action) -> None:
        await self._remove_all(action.task_id, action.containers)
        last = self._statuses.get(action.task_id)
        deployment = last.deployment if last else next((c.deployment for c in action.containers), "")
        container_id = action.containers[0].container_id if action.containers else (last.container_id if last else None)
        await self._set_status(action.task_id, deployment, TaskState.STOPPED, message=action.reason, container_id=container_id)
        self._forget(action.task_id)

    async def _remove_all(self, task_id: str, containers: Iterable[RuntimeTask]) -> None:
        containers = tuple(containers)
        # The stops wait outside the engine slots: a stop's cost is its grace, time the
        # engine spends idle, and fifty stops with a 10 s grace holding 8 slots would
        # take a minute and hold up every start meanwhile.
        await asyncio.gather(*(self.driver.stop(c, self._grace(task_id)) for c in containers if c.alive))
        async with self._engine_slots:
            for container in containers:
                await self.driver.remove(container)
                self._terminated.pop(container.container_id, None)

    async def _adopt(self, action: Action) -> None:
        spec = action.spec
        assert spec is not None
        container = action.containers[0]
        self._specs[spec.task_id] = spec
        self._reset_health(spec)
        await self._set_status(
            spec.task_id,
            spec.deployment,
            TaskState.RUNNING,
            message="adopted running container",
            container_id=container.container_id,
            host_ports=dict(container.host_ports),
        )
        self._check_health(spec, container)

    async def _finish(self, action: Action) -> None:
        spec = action.spec
        assert spec is not None
        container = action.containers[0]
        self._specs[spec.task_id] = spec
        self._finished[spec.task_id] = container.container_id
        await self._set_status(
            spec.task_id,
            spec.deployment,
            TaskState.EXITED,
            message=action.reason,
            container_id=container.container_id,
            exit_code=container.exit_code,
        )

    async def _terminate(self, action: Action) -> None:
        container = action.containers[0]
        # Noted before the stop: the pass that sees the exit must know why it happened.
        self._terminated[container.container_id] = action.reason
        log.info("stopping unhealthy task", extra={"task_id": action.task_id, "reason": action.reason})
        await self.driver.stop(container, self._grace(action.task_id))

    # ---- health checks --------------------------------------------------------------------
    def _reset_health(self, spec: TaskSpec) -> None:
        previous = self._health.get(spec.task_id)
        if previous is not None:
            previous.cancel()
        self._health[spec.task_id] = _Health.initial(spec)

    def _check_health(self, spec: TaskSpec, container: RuntimeTask) -> None:
        """Start the task's check loops against ``container``, which has just been reported running."""
        health = self._health.setdefault(spec.task_id, _Health.initial(spec))
        health.cancel()
        health.container_id = container.container_id
        for which in ("liveness", "readiness"):
            check: HealthCheck | None = getattr(spec.health, which)
            if check is not None:
                health.loops.append(
                    asyncio.create_task(
                        self._run_check(spec, container, which, check), name=f"nodeagent-{which}-{spec.task_id}"
                    )
                )

    async def _run_check(self, spec: TaskSpec, container: RuntimeTask, which: str, check: HealthCheck) -> None:
        checker = Checker(check, started_at=container.started_at or time.time())
        loop = asyncio.get_running_loop()
        # The first probe at once: a task is ready as soon as it answers, not an interval later.
        due = loop.time()
        while True:
            result = await self._probe(spec, container.container_id, check)
            verdict = checker.observe(result.ok, result.detail, time.time())
            if verdict is not None and not await self._on_verdict(spec, container, which, verdict):
                return
            due = max(due + check.interval, loop.time())
            await asyncio.sleep(due - loop.time())

    async def _probe(self, spec: TaskSpec, container_id: str, check: HealthCheck) -> ProbeResult:
        if not self._can_probe:
            return ProbeResult(True, f"not probed: the {self.driver.name} runtime runs no processes")
        try:
            if check.exec is not None:
                outcome = await self.driver.exec_check(container_id, check.exec.command, check.timeout)
                return exec_result(outcome.exit_code, outcome.output, check.exec.command, check.timeout)
            port = resolve_port(check.port, spec)
            if port is None:
                return ProbeResult(False, f"port {check.port!r} is not one of the task's ports")
            host = await self.driver.probe_target(container_id)
            if host is None:
                return ProbeResult(False, "the container has no network address")
            if check.http is not None:
                if self._http is None:
                    self._http = new_http_client()
                return await probe_http(self._http, host, port, check.http.path, check.http.status, check.timeout)
            return await probe_tcp(host, port, check.timeout)
        except Exception as exc:
            log.warning("probe failed", extra={"task_id": spec.task_id, "error": str(exc)}, exc_info=True)
            return ProbeResult(False, f"probe failed: {exc}")

    async def _on_verdict(self, spec: TaskSpec, container: RuntimeTask, which: str, verdict: Verdict) -> bool:
        """Report a changed verdict; False when the check has nothing more to do."""
        task_id = spec.task_id
        current = self._statuses.get(task_id)
        health = self._health.get(task_id)
        if (
            current is None
            or health is None
            or current.state != TaskState.RUNNING
            or current.container_id != container.container_id
        ):
            return False  # the container is no longer the task's running one
        setattr(health, which, verdict.state)
        log.info(
            "health verdict changed",
            extra={"task_id": task_id, "check": which, "state": verdict.state.value, "detail": verdict.detail},
        )
        event = HealthEvent(
            task_id=task_id,
            node_id=self.node_id,
            deployment=spec.deployment,
            check=which,  # type: ignore[arg-type]
            state=verdict.state,
            previous=verdict.previous,
            detail=verdict.detail,
            at=time.time(),
        )
        try:
            await self._publish(event, subjects.health_event(self.node_id))
        except Exception:
            log.warning("could not publish health event", extra={"task_id": task_id}, exc_info=True)
        message = f"{which} check failed: {verdict.detail}" if verdict.state == HealthState.UNHEALTHY else ""
        await self._set_status(
            task_id,
            spec.deployment,
            TaskState.RUNNING,
            message=message,
            container_id=container.container_id,
            host_ports=dict(current.host_ports),
        )
        if which == "liveness" and verdict.state == HealthState.UNHEALTHY:
            self._terminate_unhealthy(spec, container, message)
            return False
        return True

    def _terminate_unhealthy(self, spec: TaskSpec, container: RuntimeTask, reason: str) -> None:
        health = self._health.get(spec.task_id)
        if health is not None:
            health.cancel()
        if spec.task_id in self._inflight or self._stopping:
            return  # already being replaced or stopped
        action = Action(ActionKind.TERMINATE, spec.task_id, reason, spec, (container,))
        self._inflight[spec.task_id] = asyncio.create_task(self._execute(action), name=f"nodeagent-terminate-{spec.task_id}")

    # ---- state --------------------------------------------------------------------------
    def _note_exit(self, spec: TaskSpec, ended: RuntimeTask) -> float:
        """Count an exit towards the crash loop backoff; the delay before the next start."""
        ran_for = None
        if ended.started_at is not None and ended.finished_at is not None:
            ran_for = ended.finished_at - ended.started_at
        delay, self._failures[spec.task_id] = exit_backoff(self._failures.get(spec.task_id, 0), ran_for, spec.restart)
        return self._back_off(spec.task_id, delay)

    def _back_off(self, task_id: str, delay: float) -> float:
        if delay > 0:
            self._not_before[task_id] = time.monotonic() + delay
            self._wake_after(delay, f"backoff of {task_id} over")
        return delay

    def _grace(self, task_id: str) -> float | None:
        """Seconds between the stop signal and SIGKILL: the task's own, at most the node's cap.

        None for a container of a task this agent never ran: the runtime then uses the
        grace the container was created with."""
        spec = self._specs.get(task_id)
        grace = spec.stop_grace_seconds if spec is not None else None
        cap = self.settings.stop_grace_seconds
        if cap is not None:
            grace = cap if grace is None else min(grace, cap)
        return grace

    async def _address_of(self, container_id: str, previous: TaskStatus | None) -> str | None:
        # Discovery sends a ready task's service traffic here.  One inspect per container,
        # the first time it is ready; later statuses of the same container reuse it.
        if previous is not None and previous.container_id == container_id and previous.address is not None:
            return previous.address
        if not self._can_probe:
            return None
        try:
            return await self.driver.probe_target(container_id)
        except Exception:
            log.warning("could not read the container's address", extra={"container_id": container_id}, exc_info=True)
            return None

    def _forget(self, task_id: str) -> None:
        health = self._health.pop(task_id, None)
        if health is not None:
            health.cancel()
        for table in (self._statuses, self._restarts, self._failures, self._not_before, self._specs, self._finished):
            table.pop(task_id, None)

    async def _set_status(self, task_id: str, deployment: str, state: TaskState, **fields: Any) -> None:
        previous = self._statuses.get(task_id)
        health = self._health.get(task_id) or _Health()
        container_id = fields.get("container_id")
        if health.container_id is not None and (state != TaskState.RUNNING or container_id != health.container_id):
            health.cancel()  # the container its checks probe is gone or going
        ready = state == TaskState.RUNNING and health.readiness in (HealthState.NONE, HealthState.HEALTHY)
        ready_since = None
        if ready:
            # Ready since the container first was: a status change that keeps it ready
            # (a liveness verdict, say) does not restart a rollout's min_healthy_time.
            still = previous is not None and previous.ready and previous.container_id == container_id
            ready_since = previous.ready_since if still and previous is not None else time.time()
        if ready and container_id is not None and "address" not in fields:
            fields["address"] = await self._address_of(container_id, previous)
        status = TaskStatus(
            task_id=task_id,
            node_id=self.node_id,
            deployment=deployment,
            state=state,
            restarts=self._restarts.get(task_id, 0),
            updated_at=time.time(),
            liveness=health.liveness,
            readiness=health.readiness,
            ready=ready,
            ready_since=ready_since,
            **fields,
        )
        self._statuses[task_id] = status
        self._changed_since_beat.add(task_id)
        try:
            await self._publish(status, subjects.task_event(self.node_id))
        except Exception:
            # The next heartbeat carries this status again, so a lost event is repaired.
            log.warning("could not publish task status", extra={"task_id": task_id}, exc_info=True)
