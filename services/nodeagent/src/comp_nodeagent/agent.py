"""The node agent's core: make this host run exactly the tasks assigned to it.

Two halves, as in dask's worker state machine:

* :func:`plan_actions` is pure.  Desired tasks and observed containers in, a list of
  :class:`Action` out, each with the reason for it.  Table-tested without an engine.
  :func:`check_epoch`, as pure, is the fencing rule for assignments and nudges.
* :class:`Agent` owns the state (assignments, task statuses, restart counts, failure
  backoff), runs each action as its own asyncio task, one at a time per task id and at
  most ``parallelism`` engine operations at once, and publishes every status change.

A pass is level-triggered: it re-reads the assignments and re-lists the containers, so
a missed nudge or event is repaired by the next pass, whatever triggered it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

from comp_common import subjects
from comp_common.messages import Capacity, Heartbeat, NodeAssignments, Nudge, TaskSpec, TaskState, TaskStatus

from .driver import EventWatch, RuntimeDriver, RuntimeTask
from .settings import NodeAgentGroup

log = logging.getLogger(__name__)
tracer = trace.get_tracer("comp_nodeagent")

# A container that ran at least this long before it ended was healthy: its exit starts a
# fresh backoff, so it is restarted at once.  Shorter runs count as a crash loop.
STABLE_RUN_SECONDS = 10.0
# How long shutdown waits for engine operations already under way.
SHUTDOWN_WAIT_SECONDS = 5.0
FOLLOW_UP_PASS_DELAY_SECONDS = 0.2
_FINISHED = " finished"
# After an engine error in a stop or replace, the task is held back this long so that a
# persistent error (an engine in trouble) is retried at a walk, not in a tight loop.
ACTION_ERROR_PAUSE_SECONDS = 1.0


class ActionKind(StrEnum):
    START = "start"  # no container: create and start one
    RESTART = "restart"  # the container ended, or is not the one wanted: replace it
    STOP = "stop"  # the task is no longer assigned here: stop and remove its containers
    ADOPT = "adopt"  # a running container the agent does not know yet: take it as it is


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
) -> list[Action]:
    """What to do so that the host runs exactly ``desired``.

    ``busy``: task ids with an action under way; left alone this time.
    ``tracked``: task id -> container id for every task the agent reports a status for
    (None where it has no container), so that known containers are not adopted again and
    tasks that vanished are reported stopped.
    ``not_before``: task id -> time before which a failed task must not be started again.
    """
    tracked = tracked or {}
    not_before = not_before or {}
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
            actions.append(Action(ActionKind.RESTART, task_id, _ended_reason(container), spec, found))
        elif container.spec_hash != spec.spec_hash:
            actions.append(Action(ActionKind.RESTART, task_id, "spec changed", spec, found))
        elif tracked.get(task_id) != container.container_id:
            actions.append(Action(ActionKind.ADOPT, task_id, "found running", spec, found))
    return actions


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
    ):
        self.settings = settings
        self.node_id = settings.node_id
        self.heartbeat_seconds = heartbeat_seconds
        self.driver = driver
        self._load_assignments = load_assignments
        self._publish = publish
        self._engine_slots = asyncio.Semaphore(settings.parallelism)

        self.started_at = time.time()
        self.capacity = Capacity(cpu=0.0, memory=0)
        self._desired: dict[str, TaskSpec] = {}
        # The highest scheduler epoch seen in assignments or nudges: a value with a lower one
        # comes from a deposed leader and is refused.
        self._epoch = 0
        self._statuses: dict[str, TaskStatus] = {}
        self._restarts: dict[str, int] = {}
        self._failures: dict[str, int] = {}  # consecutive failed starts or short runs
        self._not_before: dict[str, float] = {}  # monotonic time
        self._heartbeat_seq = 0

        self._inflight: dict[str, asyncio.Task[None]] = {}
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
        tasks = self._desired.values()
        return Capacity(cpu=round(sum(t.cpu for t in tasks), 6), memory=sum(t.memory for t in tasks))

    def heartbeat(self) -> Heartbeat:
        self._heartbeat_seq += 1
        return Heartbeat(
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
            tasks=list(self._statuses.values()),
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
        self._loops = [
            asyncio.create_task(self._run_requested_passes(), name="nodeagent-passes"),
            asyncio.create_task(self._heartbeat_loop(), name="nodeagent-heartbeat"),
            asyncio.create_task(self._resync_loop(), name="nodeagent-resync"),
        ]
        self.request_reconcile("agent started")
        log.info("node agent started", extra={"node_id": self.node_id, "driver": self.driver.name})

    async def stop(self) -> None:
        """Stop reconciling and reporting.  Containers keep running: the next agent adopts them."""
        # Nudges can still arrive until the broker closes, after this: they must act no more.
        self._stopping = True
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        for handle in self._wakeups:
            handle.cancel()
        self._wakeups.clear()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        inflight = list(self._inflight.values())
        if inflight:
            _, unfinished = await asyncio.wait(inflight, timeout=SHUTDOWN_WAIT_SECONDS)
            for action_task in unfinished:
                action_task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
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
            )
            for action in actions:
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
            # An empty context: this pass is no part of whatever trace asked for it.
            with tracer.start_as_current_span(
                "nodeagent.reconcile", context=otel_context.Context(), attributes={"comp.trigger": trigger}
            ):
                try:
                    await self.reconcile(trigger)
                except Exception:
                    log.exception("reconcile pass failed")

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.request_reconcile("resync")

    async def _heartbeat_loop(self) -> None:
        subject = subjects.node_heartbeat(self.node_id)
        while True:
            try:
                await self._publish(self.heartbeat(), subject)
            except Exception:
                log.warning("could not publish heartbeat", exc_info=True)
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
        except Exception:
            log.exception("action failed", extra={"action": action.kind.value, "task_id": action.task_id})
            # Still in flight while it waits, so passes leave the task alone meanwhile.
            await asyncio.sleep(ACTION_ERROR_PAUSE_SECONDS)
        finally:
            self._inflight.pop(action.task_id, None)
            self._settled_since_listing.add(action.task_id)
            self.request_reconcile(f"{action.kind.value} of {action.task_id}{_FINISHED}")

    async def _start(self, spec: TaskSpec, reason: str) -> None:
        with tracer.start_as_current_span(
            "nodeagent.start_task",
            attributes={"comp.task_id": spec.task_id, "comp.deployment": spec.deployment, "comp.node": self.node_id},
        ) as span:
            await self._set_status(spec.task_id, spec.deployment, TaskState.STARTING, message=reason)
            try:
                async with self._engine_slots:
                    started = await self.driver.start(spec)
            except Exception as exc:
                failures = self._failures.get(spec.task_id, 0) + 1
                self._failures[spec.task_id] = failures
                delay = self._back_off(spec.task_id, failures)
                span.set_status(StatusCode.ERROR, str(exc))
                log.warning("task failed to start", extra={"task_id": spec.task_id, "error": str(exc), "retry_in": delay})
                await self._set_status(
                    spec.task_id, spec.deployment, TaskState.FAILED, message=f"{exc} (retrying in {delay:g}s)"
                )
                return
            span.set_attribute("comp.container_id", started.container_id)
            await self._set_status(
                spec.task_id,
                spec.deployment,
                TaskState.RUNNING,
                container_id=started.container_id,
                host_ports=dict(started.host_ports),
            )

    async def _restart(self, action: Action) -> None:
        spec = action.spec
        assert spec is not None
        ended = next((c for c in action.containers if has_exited(c)), None)
        delay = 0.0
        if ended is not None and len(action.containers) == 1:
            await self._set_status(
                spec.task_id,
                spec.deployment,
                TaskState.EXITED,
                message=action.reason,
                container_id=ended.container_id,
                exit_code=ended.exit_code,
            )
            self._restarts[spec.task_id] = self._restarts.get(spec.task_id, 0) + 1
            delay = self._note_exit(spec.task_id, ended)
        async with self._engine_slots:
            for container in action.containers:
                if container.alive:
                    await self.driver.stop(container, self.settings.stop_grace_seconds)
                await self.driver.remove(container)
        if delay > 0:
            log.info("task is crash looping; restart delayed", extra={"task_id": spec.task_id, "delay": delay})
            return
        await self._start(spec, action.reason)

    async def _stop(self, action: Action) -> None:
        async with self._engine_slots:
            for container in action.containers:
                if container.alive:
                    await self.driver.stop(container, self.settings.stop_grace_seconds)
                await self.driver.remove(container)
        last = self._statuses.get(action.task_id)
        deployment = last.deployment if last else next((c.deployment for c in action.containers), "")
        container_id = action.containers[0].container_id if action.containers else (last.container_id if last else None)
        await self._set_status(action.task_id, deployment, TaskState.STOPPED, message=action.reason, container_id=container_id)
        self._forget(action.task_id)

    async def _adopt(self, action: Action) -> None:
        spec = action.spec
        assert spec is not None
        container = action.containers[0]
        await self._set_status(
            spec.task_id,
            spec.deployment,
            TaskState.RUNNING,
            message="adopted running container",
            container_id=container.container_id,
            host_ports=dict(container.host_ports),
        )

    # ---- state --------------------------------------------------------------------------
    def _note_exit(self, task_id: str, ended: RuntimeTask) -> float:
        """Count an exit towards the crash loop backoff; the delay before the next start."""
        if ended.started_at is not None and ended.finished_at is not None:
            if ended.finished_at - ended.started_at >= STABLE_RUN_SECONDS:
                self._failures[task_id] = 0
        failures_before = self._failures.get(task_id, 0)
        self._failures[task_id] = failures_before + 1
        # The first exit after a healthy run restarts at once; a loop of short runs backs off.
        return self._back_off(task_id, failures_before)

    def _back_off(self, task_id: str, failures: int) -> float:
        delay = backoff_delay(failures, self.settings.restart_backoff_max_seconds)
        if delay > 0:
            self._not_before[task_id] = time.monotonic() + delay
            self._wake_after(delay, f"backoff of {task_id} over")
        return delay

    def _forget(self, task_id: str) -> None:
        for table in (self._statuses, self._restarts, self._failures, self._not_before):
            table.pop(task_id, None)

    async def _set_status(self, task_id: str, deployment: str, state: TaskState, **fields: Any) -> None:
        status = TaskStatus(
            task_id=task_id,
            node_id=self.node_id,
            deployment=deployment,
            state=state,
            restarts=self._restarts.get(task_id, 0),
            updated_at=time.time(),
            **fields,
        )
        self._statuses[task_id] = status
        try:
            await self._publish(status, subjects.task_event(self.node_id))
        except Exception:
            # The next heartbeat carries every status, so a lost event is repaired.
            log.warning("could not publish task status", extra={"task_id": task_id}, exc_info=True)
