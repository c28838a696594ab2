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
from comp_common.messages import Capacity, Heartbeat, NodeAssignments, Nudge, Taint, TaskSpec, TaskState, TaskStatus
from comp_nodeagent.agent import Agent, check_epoch
from comp_nodeagent.driver import RuntimeTask, StartError
from comp_nodeagent.settings import NodeAgentGroup

NODE = "n1"



def spec(task_id: str) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash="h1",
        image="img", cpu=0.5, memory=1024**2,
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
        self.on_event: Callable[[str | None], None] | None = None
        self.watch_handle = FakeWatch()
        self._ids = itertools.count(1)

    async def capacity(self) -> Capacity:
        return Capacity(cpu=4.0, memory=8 * 1024**3)

    async def list_tasks(self) -> list[RuntimeTask]:
        return list(self.containers.values())

    async def start(self, task: TaskSpec) -> RuntimeTask:
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

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float) -> None:
        self.containers[runtime_task.container_id] = replace(runtime_task, state="exited", exit_code=143)

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
    def __init__(self, **settings: object) -> None:
        self.driver = FakeDriver()
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
