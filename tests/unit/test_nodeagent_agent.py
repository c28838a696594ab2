"""The Agent's executor over an in-memory runtime: statuses, concurrency, backoff."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from pydantic import BaseModel

from waiting import eventually
from comp_common import subjects
from comp_common.manifest import Health, HealthCheck, RestartPolicy
from comp_common.messages import (
    Capacity,
    HealthEvent,
    HealthState,
    Heartbeat,
    NodeAssignments,
    Nudge,
    Taint,
    TaskSpec,
    TaskState,
    TaskStatus,
)
from comp_nodeagent.agent import Agent, check_epoch
from comp_nodeagent.driver import ExecOutcome, RuntimeTask, StartError
from comp_nodeagent.settings import NodeAgentGroup

NODE = "n1"



def spec(task_id: str, **fields: object) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash="h1",
        image="img", cpu=0.5, memory=1024**2, **fields,
    )


class FakeWatch:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeDriver:
    """A runtime in memory; ``gates`` hold a start until released, ``failures`` make it raise."""

    name = "fake"

    def __init__(self) -> None:
        self.containers: dict[str, RuntimeTask] = {}
        self.starts: list[str] = []
        self.failures: dict[str, str] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.graces: list[float | None] = []
        self.on_event: Callable[[str | None], None] | None = None
        self.watch_handle = FakeWatch()
        self._ids = itertools.count(1)
        # Every engine call in order: ("list", None), ("start", task id), ...
        self.calls: list[tuple[str, str | None]] = []
        # While set and not released, a listing waits: what a pass does before one is done.
        self.list_gate: asyncio.Event | None = None

    async def capacity(self) -> Capacity:
        return Capacity(cpu=4.0, memory=8 * 1024**3)

    async def list_tasks(self) -> list[RuntimeTask]:
        self.calls.append(("list", None))
        if self.list_gate is not None:
            await self.list_gate.wait()
        self.calls.append(("listed", None))
        return list(self.containers.values())

    async def start(self, task: TaskSpec) -> RuntimeTask:
        self.calls.append(("start", task.task_id))
        self.starts.append(task.task_id)
        if task.task_id in self.gates:
            await self.gates[task.task_id].wait()
        if task.task_id in self.failures:
            raise StartError(self.failures[task.task_id])
        container = RuntimeTask(
            task.task_id, f"c{next(self._ids)}", "running", spec_hash=task.spec_hash,
            deployment=task.deployment, started_at=time.time(),
        )
        self.containers[container.container_id] = container
        return container

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float | None) -> None:
        self.graces.append(grace_seconds)
        self.containers[runtime_task.container_id] = replace(
            runtime_task, state="exited", exit_code=143, finished_at=time.time()
        )

    async def remove(self, runtime_task: RuntimeTask) -> None:
        self.containers.pop(runtime_task.container_id, None)

    async def watch(self, on_event: Callable[[str | None], None]) -> FakeWatch:
        self.on_event = on_event
        return self.watch_handle

    async def close(self) -> None:
        pass

    def running(self, task_id: str) -> RuntimeTask | None:
        return next((c for c in self.containers.values() if c.task_id == task_id and c.alive), None)

    def crash(self, task_id: str, exit_code: int) -> None:
        """The process ends by itself a moment after it started, and the engine says so."""
        container = self.running(task_id)
        assert container is not None
        self.containers[container.container_id] = replace(
            container, state="exited", exit_code=exit_code, finished_at=time.time()
        )
        assert self.on_event is not None
        self.on_event(task_id)


class Harness:
    def __init__(self, driver: FakeDriver | None = None, **settings: object) -> None:
        self.driver = driver or FakeDriver()
        self.assignments: NodeAssignments | None = None
        self.unreadable = False
        self.loads = 0
        self.published: list[tuple[str, BaseModel]] = []
        self.agent = Agent(
            settings=NodeAgentGroup(node_id=NODE, resync_seconds=3600, restart_backoff_max_seconds=1, **settings),
            heartbeat_seconds=3600,
            driver=self.driver,
            load_assignments=self._load,
            publish=self._publish,
        )

    async def _load(self) -> NodeAssignments | None:
        self.loads += 1
        if self.unreadable:
            raise ConnectionError("nats is down")
        return self.assignments

    async def _publish(self, message: BaseModel, subject: str) -> None:
        self.published.append((subject, message))

    def assign(self, *task_ids: str, epoch: int = 0) -> None:
        self.assignments = NodeAssignments(node_id=NODE, tasks=[spec(t) for t in task_ids], epoch=epoch)

    def assign_specs(self, *specs: TaskSpec) -> None:
        self.assignments = NodeAssignments(node_id=NODE, tasks=list(specs))

    def statuses_of(self, task_id: str) -> list[TaskStatus]:
        return [m for s, m in self.published if isinstance(m, TaskStatus) and m.task_id == task_id]

    def health_events(self, task_id: str) -> list[tuple[str, HealthState, HealthState]]:
        return [
            (m.check, m.previous, m.state)
            for s, m in self.published
            if s == subjects.health_event(NODE) and isinstance(m, HealthEvent) and m.task_id == task_id
        ]

    def history(self, task_id: str) -> list[tuple[TaskState, int]]:
        return [
            (m.state, m.restarts)
            for s, m in self.published
            if s == subjects.task_event(NODE) and isinstance(m, TaskStatus) and m.task_id == task_id
        ]

    def status(self, task_id: str, state: TaskState) -> TaskStatus | None:
        status = self.agent.statuses.get(task_id)
        return status if status and status.state == state else None


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.agent.stop()


async def test_starts_assigned_tasks_and_reports_them(harness: Harness) -> None:
    harness.assign("a", "b")
    await harness.agent.start()
    await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.status("b", TaskState.RUNNING), "both running")
    assert harness.history("a") == [(TaskState.STARTING, 0), (TaskState.RUNNING, 0)]
    assert harness.agent.allocated == Capacity(cpu=1.0, memory=2 * 1024**2)
    heartbeat = harness.agent.heartbeat()
    assert heartbeat.capacity == Capacity(cpu=4.0, memory=8 * 1024**3)
    assert {s.task_id for s in heartbeat.tasks} == {"a", "b"}
    heartbeats = [m for s, m in harness.published if s == subjects.node_heartbeat(NODE)]
    assert heartbeats and isinstance(heartbeats[0], Heartbeat)


async def test_every_nth_heartbeat_is_full_and_the_others_carry_only_changes() -> None:
    harness = Harness(full_heartbeat_every=4)
    harness.assign("a", "b")
    await harness.agent.start()  # its loop sends heartbeat 1 (full), then waits an hour
    await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.status("b", TaskState.RUNNING), "both running")
    agent = harness.agent
    first = [m for s, m in harness.published if s == subjects.node_heartbeat(NODE)]
    assert len(first) == 1 and first[0].full
    agent.heartbeat()  # 2: whatever changed after the first
    beats = [agent.heartbeat()]  # 3: nothing changed since
    harness.driver.crash("a", 1)
    await eventually(lambda: [s for s, _ in harness.history("a")][-2:] == [TaskState.STARTING, TaskState.RUNNING]
                     and len(harness.history("a")) > 2, "a restarted")
    beats.append(agent.heartbeat())  # 4: a changed
    beats.append(agent.heartbeat())  # 5: full again
    assert [b.full for b in beats] == [False, False, True]
    assert [b.task_count for b in beats] == [2, 2, 2], "every heartbeat counts every task"
    assert agent.heartbeat().model_dump_json().endswith("]}"), "the list stays the last field"

    assert [sorted(s.task_id for s in b.tasks) for b in beats] == [[], ["a"], ["a", "b"]]
    assert beats[1].tasks[0] == agent.statuses["a"], "the change as it stands now"
    await agent.stop()


async def test_a_pass_never_waits_for_a_slow_start(harness: Harness) -> None:
    harness.driver.gates["slow"] = asyncio.Event()
    harness.assign("slow", "fast")
    await harness.agent.reconcile("test")
    await eventually(lambda: harness.status("fast", TaskState.RUNNING), "fast running")
    # Further passes leave the slow start alone rather than starting it twice.
    await harness.agent.reconcile("test")
    await harness.agent.reconcile("test")
    assert harness.driver.starts.count("slow") == 1
    assert harness.status("slow", TaskState.STARTING)

    harness.driver.gates["slow"].set()
    await eventually(lambda: harness.status("slow", TaskState.RUNNING), "slow running")
    assert harness.driver.starts.count("slow") == 1


async def test_failed_start_is_retried_after_a_backoff(harness: Harness) -> None:
    harness.driver.failures["a"] = 'image "x" is not present locally and could not be pulled: nope'
    harness.assign("a")
    await harness.agent.start()
    failed = await eventually(lambda: harness.status("a", TaskState.FAILED), "a failed")
    assert "could not be pulled" in failed.message
    assert failed.container_id is None
    # Inside the backoff a pass does not try again.
    await harness.agent.reconcile("test")
    assert harness.driver.starts == ["a"]

    del harness.driver.failures["a"]
    await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running after its backoff")
    assert [state for state, _ in harness.history("a")] == [
        TaskState.STARTING, TaskState.FAILED, TaskState.STARTING, TaskState.RUNNING
    ]


async def test_exited_task_restarts_at_once_then_backs_off_when_it_keeps_crashing(harness: Harness) -> None:
    harness.assign("a")
    await harness.agent.start()
    await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")

    harness.driver.crash("a", exit_code=3)
    await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.agent.statuses["a"].restarts == 1, "first restart")
    harness.driver.crash("a", exit_code=3)
    await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.agent.statuses["a"].restarts == 2, "second restart")

    exits = [m for _, m in harness.published if isinstance(m, TaskStatus) and m.state == TaskState.EXITED]
    assert [(e.exit_code, e.restarts) for e in exits] == [(3, 0), (3, 1)]
    assert harness.history("a")[-2:] == [(TaskState.STARTING, 2), (TaskState.RUNNING, 2)]
    # The second restart of a short-lived process waited out a backoff first.
    assert harness.agent._not_before.get("a") is not None
    assert len([c for c in harness.driver.containers.values() if c.task_id == "a"]) == 1


async def test_unassigned_task_is_stopped_removed_and_forgotten(harness: Harness) -> None:
    harness.assign("a", "b")
    await harness.agent.start()
    await eventually(lambda: harness.status("b", TaskState.RUNNING), "b running")

    harness.assign("a")
    await harness.agent.reconcile("test")
    await eventually(lambda: harness.history("b")[-1:] == [(TaskState.STOPPED, 0)], "b stopped")
    assert harness.driver.running("b") is None and [c.task_id for c in harness.driver.containers.values()] == ["a"]
    assert set(harness.agent.statuses) == {"a"}
    assert harness.agent.allocated.cpu == 0.5


async def test_running_containers_are_adopted_not_restarted(harness: Harness) -> None:
    existing = RuntimeTask("a", "c-old", "running", spec_hash="h1", deployment="default.web")
    harness.driver.containers["c-old"] = existing
    harness.assign("a")
    await harness.agent.start()
    adopted = await eventually(lambda: harness.status("a", TaskState.RUNNING), "a adopted")
    assert adopted.container_id == "c-old" and adopted.restarts == 0
    assert harness.driver.starts == []
    await harness.agent.reconcile("test")
    assert harness.history("a") == [(TaskState.RUNNING, 0)]


async def test_unreadable_assignments_change_nothing(harness: Harness) -> None:
    harness.driver.containers["c-old"] = RuntimeTask("a", "c-old", "running", spec_hash="h1")
    harness.unreadable = True
    await harness.agent.reconcile("test")
    await asyncio.sleep(0)
    assert list(harness.driver.containers) == ["c-old"]
    assert harness.history("a") == []


async def test_stopping_the_agent_leaves_containers_running(harness: Harness) -> None:
    harness.assign("a")
    await harness.agent.start()
    await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
    await harness.agent.stop()
    assert harness.driver.running("a") is not None
    assert harness.driver.watch_handle.closed


async def test_heartbeat_carries_the_declared_taints() -> None:
    harness = Harness(taints="dedicated=gpu:NoSchedule,spot:NoSchedule")
    heartbeat = harness.agent.heartbeat()
    assert heartbeat.taints == [Taint(key="dedicated", value="gpu"), Taint(key="spot")]
    assert Harness().agent.heartbeat().taints == []


# ---- the epoch floor: assignments and nudges from a deposed scheduler are refused -----------
@pytest.mark.parametrize(
    ("floor", "epoch", "current", "new_floor"),
    [
        (0, 0, True, 0),  # no scheduler epochs yet (values from before leadership existed)
        (0, 5, True, 5),  # the first epoch seen sets the floor
        (5, 5, True, 5),  # the same leader again
        (5, 9, True, 9),  # a new leader raises the floor
        (5, 4, False, 5),  # a deposed leader: refused, the floor stays
        (5, 0, False, 5),  # a scheduler without an epoch, after one with: refused
    ],
)
def test_check_epoch(floor: int, epoch: int, current: bool, new_floor: int) -> None:
    assert check_epoch(floor, epoch) == (current, new_floor)


async def test_a_nudge_from_a_new_leader_fences_the_old_one_before_its_assignments_are_read(harness: Harness) -> None:
    harness.assign("a", epoch=5)
    await harness.agent.reconcile("test")
    assert harness.agent.epoch == 5

    # The new leader (epoch 9) nudges; the deposed one's late write (epoch 5) is what the
    # pass reads, since the new leader's value is not there yet.
    harness.assign("a", "ghost", epoch=5)
    await harness.agent.on_nudge(Nudge(node_id=NODE, version=2, epoch=9))
    assert harness.agent.epoch == 9
    assert set(harness.agent._desired) == {"a"}

    harness.assign("a", "b", epoch=9)
    await harness.agent.on_nudge(Nudge(node_id=NODE, version=3, epoch=9))
    assert set(harness.agent._desired) == {"a", "b"}
    await eventually(lambda: harness.status("b", TaskState.RUNNING), "b running")
    assert "ghost" not in harness.driver.starts


async def test_a_nudge_from_an_older_epoch_is_logged_and_ignored(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.assign("a", epoch=7)
    await harness.agent.reconcile("test")
    loads = harness.loads

    with caplog.at_level(logging.INFO, logger="comp_nodeagent.agent"):
        await harness.agent.on_nudge(Nudge(node_id=NODE, version=1, epoch=6))
    assert harness.loads == loads, "no pass for a deposed leader's nudge"
    assert harness.agent.epoch == 7
    ignored = [r for r in caplog.records if r.getMessage() == "nudge from an older scheduler epoch; ignored"]
    assert len(ignored) == 1 and ignored[0].levelno == logging.INFO
    assert (ignored[0].epoch, ignored[0].accepted_epoch) == (6, 7)  # type: ignore[attr-defined]

    # The current leader's nudge still runs a pass.
    await harness.agent.on_nudge(Nudge(node_id=NODE, version=2, epoch=7))
    assert harness.loads == loads + 1


# ---- health checks, restart policy, stops ---------------------------------------------------
class ProbingDriver(FakeDriver):
    """A runtime whose exec checks pass unless the container is listed as failing them."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()  # container ids
        self.probes = 0

    async def probe_target(self, container_id: str) -> str | None:
        return "192.0.2.1"

    async def exec_check(self, container_id: str, command: list[str], timeout: float) -> ExecOutcome:
        self.probes += 1
        if container_id in self.failing:
            return ExecOutcome(1, "not yet")
        return ExecOutcome(0, "")


def exec_check(**fields: object) -> HealthCheck:
    return HealthCheck(exec={"command": ["check"]}, interval=0.02, **fields)


async def test_failing_liveness_check_restarts_the_container() -> None:
    harness = Harness(ProbingDriver())
    harness.assign_specs(spec("a", health=Health(liveness=exec_check(failure_threshold=2))))
    await harness.agent.start()
    try:
        first = await eventually(
            lambda: (s := harness.status("a", TaskState.RUNNING)) and s.liveness == HealthState.HEALTHY and s, "a healthy"
        )
        assert first.ready and first.ready_since is not None
        harness.driver.failing.add(first.container_id)

        again = await eventually(
            lambda: (s := harness.status("a", TaskState.RUNNING)) and s.restarts == 1 and s.liveness == HealthState.HEALTHY and s,
            "a restarted and healthy again",
        )
        assert again.container_id != first.container_id
        exited = [s for s in harness.statuses_of("a") if s.state == TaskState.EXITED]
        assert [(e.container_id, e.restarts) for e in exited] == [(first.container_id, 0)]
        assert exited[0].message == "liveness check failed: check exited 1: not yet"
        assert exited[0].liveness == HealthState.UNHEALTHY and not exited[0].ready
        # The unhealthy verdict was reported on the running task before it was stopped.
        unhealthy = [s for s in harness.statuses_of("a") if s.state == TaskState.RUNNING and s.liveness == HealthState.UNHEALTHY]
        assert unhealthy and unhealthy[0].container_id == first.container_id
        assert harness.health_events("a") == [
            ("liveness", HealthState.STARTING, HealthState.HEALTHY),
            ("liveness", HealthState.HEALTHY, HealthState.UNHEALTHY),
            ("liveness", HealthState.STARTING, HealthState.HEALTHY),
        ]
        assert harness.driver.graces == [10.0]  # the task's own grace
    finally:
        await harness.agent.stop()


async def test_readiness_sets_ready_and_never_restarts() -> None:
    harness = Harness(ProbingDriver())
    harness.driver.gates["a"] = asyncio.Event()
    harness.assign_specs(spec("a", health=Health(readiness=exec_check(failure_threshold=2))))
    await harness.agent.start()
    try:
        await eventually(lambda: harness.driver.starts == ["a"], "a starting")
        harness.driver.gates["a"].set()
        running = await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
        harness.driver.failing.add(running.container_id)
        await eventually(lambda: harness.agent.statuses["a"].readiness == HealthState.HEALTHY, "first probe passed")

        unready = await eventually(
            lambda: (s := harness.agent.statuses["a"]).readiness == HealthState.UNHEALTHY and s, "a unready"
        )
        assert (unready.ready, unready.ready_since, unready.liveness) == (False, None, HealthState.NONE)
        assert unready.message == "readiness check failed: check exited 1: not yet"

        harness.driver.failing.clear()
        ready = await eventually(lambda: (s := harness.agent.statuses["a"]).ready and s, "a ready again")
        assert ready.readiness == HealthState.HEALTHY and ready.ready_since is not None
        assert ready.container_id == running.container_id and ready.restarts == 0
        assert harness.health_events("a") == [
            ("readiness", HealthState.STARTING, HealthState.HEALTHY),
            ("readiness", HealthState.HEALTHY, HealthState.UNHEALTHY),
            ("readiness", HealthState.UNHEALTHY, HealthState.HEALTHY),
        ]
        # A status before the first verdict: running, not ready.
        first_running = next(s for s in harness.statuses_of("a") if s.state == TaskState.RUNNING)
        assert (first_running.readiness, first_running.ready) == (HealthState.STARTING, False)
    finally:
        await harness.agent.stop()
    # The checks end with the agent.
    probes = harness.driver.probes
    await asyncio.sleep(0.1)
    assert harness.driver.probes == probes


async def test_a_runtime_without_probes_passes_every_check(harness: Harness) -> None:
    # The hollow driver has no probe_target / exec_check: its tasks are healthy at once.
    harness.assign_specs(spec("a", health=Health(readiness=exec_check(), liveness=exec_check())))
    await harness.agent.start()
    ready = await eventually(lambda: (s := harness.status("a", TaskState.RUNNING)) and s.ready and s.liveness == HealthState.HEALTHY and s, "a ready")
    assert ready.readiness == HealthState.HEALTHY


async def test_a_task_without_checks_is_ready_when_running(harness: Harness) -> None:
    harness.assign("a")
    await harness.agent.start()
    running = await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
    assert (running.ready, running.liveness, running.readiness) == (True, HealthState.NONE, HealthState.NONE)
    assert running.ready_since is not None
    starting = harness.statuses_of("a")[0]
    assert (starting.state, starting.ready, starting.ready_since) == (TaskState.STARTING, False, None)


async def test_crash_loop_waits_longer_each_time(harness: Harness) -> None:
    harness.assign_specs(spec("a", restart=RestartPolicy(max_delay=2)))
    await harness.agent.start()
    for restarts in range(4):
        await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.agent.statuses["a"].restarts == restarts, f"run {restarts}")
        harness.driver.crash("a", exit_code=1)
    await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.agent.statuses["a"].restarts == 4, "run 4")

    exits = [s for s in harness.statuses_of("a") if s.state == TaskState.EXITED]
    waits = [None if e.next_restart_at is None else round(e.next_restart_at - e.updated_at) for e in exits]
    assert waits == [None, 1, 2, 2]  # at once, then 1 s, 2 s, capped at max_delay
    assert [e.crash_loop for e in exits] == [False, True, True, True]
    assert exits[1].message == "container exited with code 1 (restarting in 1s)"
    # Waiting is over once it starts again.
    assert not harness.agent.statuses["a"].crash_loop and harness.agent.statuses["a"].next_restart_at is None


@pytest.mark.parametrize(
    ("condition", "exit_code", "restarted"),
    [("on-failure", 0, False), ("on-failure", 2, True), ("never", 2, False), ("never", 0, False), ("always", 0, True)],
)
async def test_restart_condition(harness: Harness, condition: str, exit_code: int, restarted: bool) -> None:
    harness.assign_specs(spec("a", restart=RestartPolicy(condition=condition)))
    await harness.agent.start()
    first = await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
    harness.driver.crash("a", exit_code=exit_code)
    if restarted:
        await eventually(lambda: harness.status("a", TaskState.RUNNING) and harness.agent.statuses["a"].restarts == 1, "a restarted")
        return
    exited = await eventually(lambda: harness.status("a", TaskState.EXITED), "a exited")
    assert (exited.exit_code, exited.container_id, exited.restarts) == (exit_code, first.container_id, 0)
    assert exited.message == f"container exited with code {exit_code}; not restarted (restart policy {condition})"
    # It stays so: further passes neither restart nor report it again, and the container is kept.
    await harness.agent.reconcile("test")
    await harness.agent.reconcile("test")
    await asyncio.sleep(0.3)
    assert harness.driver.starts == ["a"] and first.container_id in harness.driver.containers
    assert [s.state for s in harness.statuses_of("a")] == [TaskState.STARTING, TaskState.RUNNING, TaskState.EXITED]
    # Unassigned, it is removed.
    harness.assign()
    await harness.agent.reconcile("test")
    await eventually(lambda: not harness.driver.containers, "container removed")


class SlowStopDriver(FakeDriver):
    """Stops that wait until released, as a process ignoring SIGTERM makes the engine wait."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = 0
        self.most_stopping = 0
        self.release = asyncio.Event()

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float | None) -> None:
        self.stopping += 1
        self.most_stopping = max(self.most_stopping, self.stopping)
        await self.release.wait()
        self.stopping -= 1
        await super().stop(runtime_task, grace_seconds)


async def test_stops_wait_out_their_grace_together_not_in_the_engine_slots() -> None:
    harness = Harness(SlowStopDriver(), parallelism=8, stop_grace_seconds=3)
    ids = [f"t{i}" for i in range(50)]
    harness.assign_specs(*(spec(t, stop_grace_seconds=30) for t in ids))
    await harness.agent.start()
    try:
        await eventually(lambda: all(harness.status(t, TaskState.RUNNING) for t in ids), "all running")
        harness.assign("new")
        await harness.agent.reconcile("unassign")
        await eventually(lambda: harness.driver.stopping == 50, "all 50 stops waiting at once")
        # A start is not held up by the stops.
        await eventually(lambda: harness.status("new", TaskState.RUNNING), "new running meanwhile")
        harness.driver.release.set()
        await eventually(lambda: all(harness.status(t, TaskState.STOPPED) is None and t not in harness.agent.statuses for t in ids), "all stopped")
        assert harness.driver.most_stopping == 50
        assert set(harness.driver.graces) == {3}  # the node's cap below the task's 30 s
    finally:
        await harness.agent.stop()


async def test_a_nudge_starts_a_new_task_without_waiting_for_a_listing(harness: Harness) -> None:
    harness.assign("a")
    await harness.agent.start()
    await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
    # The follow-up pass of a's start out of the way: it would hold the pass lock at the gate.
    await eventually(
        lambda: not harness.agent._inflight and not harness.agent._pass_wanted.is_set() and not harness.agent._pass_lock.locked(),
        "no action or pass pending",
    )

    harness.driver.calls.clear()
    harness.driver.list_gate = asyncio.Event()  # the engine's listing hangs
    harness.assign("a", "b")
    nudged = asyncio.create_task(harness.agent.on_nudge(Nudge(node_id=NODE, version=2, epoch=0)))
    running = await eventually(lambda: harness.status("b", TaskState.RUNNING), "b running while the listing hangs")
    # The pass lists after launching the start (the listing may reach the engine first, it
    # does not hold the start up): b ran while the listing had not returned.
    assert ("start", "b") in harness.driver.calls and ("listed", None) not in harness.driver.calls, harness.driver.calls
    assert not nudged.done(), "the pass still waits for its listing"
    assert running.container_id is not None

    # The listing then finds b's container and leaves it be: no second start, no adoption.
    harness.driver.list_gate.set()
    await nudged
    await harness.agent.reconcile("test")
    assert harness.driver.starts == ["a", "b"]
    assert [state for state, _ in harness.history("b")] == [TaskState.STARTING, TaskState.RUNNING]


async def test_a_task_known_to_the_agent_waits_for_the_listing(harness: Harness) -> None:
    """Only tasks the agent has no record of skip the listing: for one it tracks, only the
    listing can say what the host has (here its container vanished behind the agent's back)."""
    harness.assign("a")
    await harness.agent.start()
    await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
    await eventually(
        lambda: not harness.agent._inflight and not harness.agent._pass_wanted.is_set() and not harness.agent._pass_lock.locked(),
        "no action or pass pending",
    )
    harness.driver.containers.clear()

    harness.driver.calls.clear()
    harness.driver.list_gate = asyncio.Event()
    nudged = asyncio.create_task(harness.agent.on_nudge(Nudge(node_id=NODE, version=2, epoch=0)))
    await eventually(lambda: harness.driver.calls == [("list", None)], "the pass lists")
    assert harness.driver.starts == ["a"], f"no start before the listing: {harness.driver.calls}"
    harness.driver.list_gate.set()
    await nudged
    await eventually(lambda: harness.driver.starts == ["a", "a"], "a started again after the listing")
    assert harness.driver.calls[:3] == [("list", None), ("listed", None), ("start", "a")]


async def test_a_nudge_before_the_first_listing_adopts_rather_than_starts(harness: Harness) -> None:
    """A restarted agent knows nothing yet: a container of the last agent's may run the task."""
    harness.driver.containers["c-old"] = RuntimeTask("a", "c-old", "running", spec_hash="h1", deployment="default.web")
    harness.assign("a")
    await harness.agent.on_nudge(Nudge(node_id=NODE, version=1, epoch=0))
    adopted = await eventually(lambda: harness.status("a", TaskState.RUNNING), "a adopted")
    assert adopted.container_id == "c-old"
    assert harness.driver.starts == []
    assert harness.driver.calls == [("list", None), ("listed", None)]


async def test_a_refused_assignment_starts_nothing_new(harness: Harness) -> None:
    harness.assign("a", epoch=5)
    await harness.agent.start()
    await eventually(lambda: harness.status("a", TaskState.RUNNING), "a running")
    harness.assign("a", "stale", epoch=4)  # a deposed leader's write
    await harness.agent.on_nudge(Nudge(node_id=NODE, version=9, epoch=5))
    await harness.agent.reconcile("test")
    assert "stale" not in harness.driver.starts
