"""The hollow runtime driver, the agent running unchanged over it, and the fleet runner's parts."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from collections.abc import AsyncIterator

import pytest
from faststream.nats import NatsBroker, TestNatsBroker
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel, ValidationError

from waiting import eventually as _eventually
from comp_common import subjects
from comp_common.manifest import Port
from comp_common.messages import Capacity, Heartbeat, NodeAssignments, Nudge, TaskSpec, TaskState
from comp_nodeagent.agent import Agent
from comp_nodeagent.driver import DRIVERS, make_driver
from comp_nodeagent.handlers import make_fleet_router
from comp_nodeagent.hollow_driver import DEFAULT_CPU, DEFAULT_MEMORY, HollowDriver
from comp_nodeagent.main import FleetPublisher, parse_args, start_spread
from comp_nodeagent.settings import NodeAgentGroup, NodeAgentSettings

# This module's conditions settle within 5 s.
eventually = partial(_eventually, timeout=5.0)



def spec(task_id: str, ports: list[Port] | None = None, spec_hash: str = "h1") -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash=spec_hash,
        image="img", cpu=0.5, memory=64 * 1024**2, ports=ports or [],
    )


# ---- the driver --------------------------------------------------------------------------


async def test_started_task_runs_at_once_and_is_listed() -> None:
    driver = HollowDriver("n1")
    assert await driver.capacity() == Capacity(cpu=DEFAULT_CPU, memory=DEFAULT_MEMORY)
    started = await driver.start(spec("a", ports=[Port(container_port=80), Port(container_port=53, host_port=5353, protocol="udp")]))
    assert (started.task_id, started.state, started.alive) == ("a", "running", True)
    assert (started.spec_hash, started.deployment) == ("h1", "default.web")
    assert started.host_ports["53/udp"] == 5353 and started.host_ports["80/tcp"] >= 32768
    assert started.started_at is not None and started.container_id.startswith("hollow-n1-")
    assert await driver.list_tasks() == [started]
    # Every start is a new container, as with an engine.
    again = await driver.start(spec("b"))
    assert again.container_id != started.container_id
    assert {t.task_id for t in await driver.list_tasks()} == {"a", "b"}


async def test_stop_leaves_an_exited_container_until_it_is_removed() -> None:
    driver = HollowDriver("n1")
    started = await driver.start(spec("a"))
    await driver.stop(started, grace_seconds=10)
    [stopped] = await driver.list_tasks()
    assert (stopped.state, stopped.alive, stopped.exit_code) == ("exited", False, 143)
    assert stopped.finished_at is not None
    await driver.remove(stopped)
    assert await driver.list_tasks() == []
    # A gone container is no error, as the protocol says.
    await driver.stop(started, grace_seconds=10)
    await driver.remove(started)


async def test_start_takes_the_simulated_engine_time() -> None:
    driver = HollowDriver("n1", start_seconds=0.1)
    began = time.monotonic()
    await asyncio.gather(driver.start(spec("a")), driver.start(spec("b")))
    assert 0.1 <= time.monotonic() - began < 1.0


async def test_exit_reports_to_the_watch_until_it_is_closed() -> None:
    driver = HollowDriver("n1")
    events: list[str | None] = []
    watch = await driver.watch(events.append)
    await driver.start(spec("a"))
    assert driver.exit("a", exit_code=3)
    [ended] = await driver.list_tasks()
    assert (ended.state, ended.exit_code) == ("exited", 3)
    assert events == ["a"]
    assert not driver.exit("a"), "nothing runs any more"
    await driver.start(spec("a"))
    watch.close()
    assert driver.exit("a")
    assert events == ["a"]


def test_registry_makes_a_hollow_driver_sized_by_settings() -> None:
    assert "hollow" in DRIVERS
    settings = NodeAgentSettings(nodeagent={"node_id": "h-1", "driver": "hollow", "hollow_start_seconds": 0.5})
    driver = make_driver(settings)
    assert isinstance(driver, HollowDriver)
    assert (driver.name, driver.node_id, driver.start_seconds) == ("hollow", "h-1", 0.5)


# ---- the agent over it, unchanged ----------------------------------------------------------


class Node:
    """One Agent over a HollowDriver, its assignments in memory, its messages recorded."""

    def __init__(self, **settings: object) -> None:
        self.driver = HollowDriver("n1")
        self.assignments: NodeAssignments | None = None
        self.published: list[tuple[str, BaseModel]] = []
        group = NodeAgentGroup(node_id="n1", driver="hollow", resync_seconds=3600, restart_backoff_max_seconds=1, **settings)
        self.agent = Agent(settings=group, heartbeat_seconds=3600, driver=self.driver, load_assignments=self._load, publish=self._publish)

    async def _load(self) -> NodeAssignments | None:
        return self.assignments

    async def _publish(self, message: BaseModel, subject: str) -> None:
        self.published.append((subject, message))

    def assign(self, *task_ids: str) -> None:
        self.assignments = NodeAssignments(node_id="n1", tasks=[spec(t) for t in task_ids])

    def state(self, task_id: str) -> TaskState | None:
        status = self.agent.statuses.get(task_id)
        return status.state if status else None


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(cpu=2.0)
    yield node
    await node.agent.stop()


async def test_agent_runs_reports_and_stops_hollow_tasks(node: Node) -> None:
    node.assign("a", "b")
    await node.agent.start()
    await eventually(lambda: node.state("a") == node.state("b") == TaskState.RUNNING, "both running")
    heartbeat = node.agent.heartbeat()
    # The capacity override applies to the hollow engine as to a real one.
    assert heartbeat.capacity == Capacity(cpu=2.0, memory=DEFAULT_MEMORY)
    assert heartbeat.allocated == Capacity(cpu=1.0, memory=128 * 1024**2)
    assert heartbeat.driver == "hollow"
    assert {s.task_id: s.state for s in heartbeat.tasks} == {"a": TaskState.RUNNING, "b": TaskState.RUNNING}
    assert [s for s, m in node.published if isinstance(m, Heartbeat)] == [subjects.node_heartbeat("n1")]

    node.assign("a")
    await node.agent.reconcile("test")
    await eventually(lambda: "b" not in node.agent.statuses, "b stopped and forgotten")
    assert [t.task_id for t in await node.driver.list_tasks()] == ["a"]
    assert [m.state for s, m in node.published if s == subjects.task_event("n1") and getattr(m, "task_id", "") == "b"] == [
        TaskState.STARTING, TaskState.RUNNING, TaskState.STOPPED
    ]


async def test_agent_restarts_a_hollow_task_that_exits(node: Node) -> None:
    node.assign("a")
    await node.agent.start()
    await eventually(lambda: node.state("a") == TaskState.RUNNING, "a running")
    node.driver.exit("a", exit_code=2)
    await eventually(
        lambda: node.state("a") == TaskState.RUNNING and node.agent.statuses["a"].restarts == 1, "a restarted"
    )
    exited = [m for _, m in node.published if getattr(m, "state", None) == TaskState.EXITED]
    assert [(m.exit_code, m.restarts) for m in exited] == [(2, 0)]


async def test_agent_adopts_what_its_hollow_engine_still_runs(node: Node) -> None:
    # A restarted agent over the same driver: the same "containers", no new starts.
    node.assign("a")
    await node.agent.start()
    await eventually(lambda: node.state("a") == TaskState.RUNNING, "a running")
    await node.agent.stop()
    [container] = await node.driver.list_tasks()

    successor = Node()
    successor.driver = node.driver
    successor.agent.driver = node.driver
    successor.assign("a")
    await successor.agent.start()
    try:
        adopted = await eventually(lambda: successor.agent.statuses.get("a"), "a adopted")
        assert adopted.container_id == container.container_id
        assert [t.container_id for t in await node.driver.list_tasks()] == [container.container_id]
    finally:
        await successor.agent.stop()


# ---- settings and command line -------------------------------------------------------------


def test_count_names_the_nodes_after_the_node_id() -> None:
    group = NodeAgentGroup(node_id="hollow", driver="hollow", count=3)
    assert group.node_ids() == ["hollow-1", "hollow-2", "hollow-3"]
    assert NodeAgentGroup(node_id="solo").node_ids() == ["solo"]


def test_many_agents_need_the_hollow_driver_and_short_enough_ids() -> None:
    with pytest.raises(ValidationError, match="needs the hollow driver"):
        NodeAgentGroup(node_id="n", driver="docker", count=2)
    with pytest.raises(ValidationError, match="longer than 63"):
        NodeAgentGroup(node_id="n" * 60, driver="hollow", count=1000)
    with pytest.raises(ValidationError):
        NodeAgentGroup(node_id="n", driver="hollow", count=0)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMP_NODEAGENT__DRIVER", "docker")
    monkeypatch.setenv("COMP_NODEAGENT__COUNT", "2")
    monkeypatch.setenv("COMP_NODEAGENT__NODE_ID", "from-env")
    monkeypatch.setenv("COMP_NODEAGENT__CPU", "4")
    with pytest.raises(ValidationError, match="needs the hollow driver"):
        NodeAgentSettings()
    settings = NodeAgentSettings(nodeagent=parse_args(["--driver", "hollow", "--count", "5000"]))
    group = settings.nodeagent
    assert (group.driver, group.count, group.node_id, group.cpu) == ("hollow", 5000, "from-env", 4.0)
    assert NodeAgentSettings(nodeagent=parse_args(["--node-id", "h", "--driver", "hollow"])).nodeagent.node_ids()[-1] == "h-2"
    assert parse_args([]) == {}


# ---- the fleet runner's parts ---------------------------------------------------------------


class StartRecorder:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.started_at: float | None = None

    async def start(self) -> None:
        self.started_at = asyncio.get_running_loop().time()


async def test_starts_are_spread_evenly_over_the_period() -> None:
    agents = [StartRecorder(f"n-{i}") for i in range(100)]
    began = asyncio.get_running_loop().time()
    await start_spread(agents, over_seconds=0.5)  # type: ignore[arg-type]
    offsets = sorted(a.started_at - began for a in agents)  # type: ignore[operator]
    assert offsets[0] < 0.05 and 0.4 <= offsets[-1] < 0.7
    # Ten groups a half second (START_SLOTS_PER_SECOND), ten agents each.
    assert len({round(o, 2) for o in offsets}) >= 8
    assert sum(o < 0.25 for o in offsets) == 50


class RawConnection:
    """What FleetPublisher uses of a broker's NATS connection."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str] | None]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.sent.append((subject, data, headers))


class RawBroker:
    def __init__(self) -> None:
        self.connection = RawConnection()


async def test_fleet_publisher_batches_messages_and_carries_the_trace() -> None:
    broker = RawBroker()
    publisher = FleetPublisher(broker, window=0.05)  # type: ignore[arg-type]
    beats = [Nudge(node_id=f"n-{i}", version=i) for i in range(3)]
    for beat in beats:
        await publisher.publish(beat, f"comp.node.n-{beat.version}.heartbeat")
    assert broker.connection.sent == [], "held for the batch window"
    await eventually(lambda: len(broker.connection.sent) == 3, "the batch sent")
    assert [Nudge.model_validate_json(data) for _, data, _ in broker.connection.sent] == beats
    assert {headers for _, _, headers in broker.connection.sent} == {None}, "no trace, no headers"

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("a pass") as span:
        await publisher.publish(beats[0], "comp.evt.task.n-0")
    await eventually(lambda: len(broker.connection.sent) == 4, "the traced message sent")
    subject, _, headers = broker.connection.sent[-1]
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert subject == "comp.evt.task.n-0" and headers and headers["traceparent"].split("-")[1] == trace_id

    await publisher.publish(beats[1], "comp.node.n-1.heartbeat")
    await publisher.close()
    assert len(broker.connection.sent) == 4, "a batch not yet sent is dropped at close"


class ReconcileRecorder:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.triggers: list[str] = []

    async def reconcile(self, trigger: str) -> None:
        self.triggers.append(trigger)

    async def on_nudge(self, nudge: Nudge) -> None:
        await self.reconcile(f"nudge version {nudge.version}")


async def test_one_wildcard_subscription_dispatches_nudges_by_subject() -> None:
    agents = {node_id: ReconcileRecorder(node_id) for node_id in ("h-1", "h-2")}
    broker = NatsBroker()
    broker.include_router(make_fleet_router(agents))  # type: ignore[arg-type]
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(Nudge(node_id="h-2", version=7), subjects.node_nudge("h-2"))
        assert agents["h-2"].triggers == ["nudge version 7"] and agents["h-1"].triggers == []

        # Nudges of other processes' nodes, bodies naming another node, and garbage: dropped.
        await test_broker.publish(Nudge(node_id="x-9", version=1), subjects.node_nudge("x-9"))
        await test_broker.publish(Nudge(node_id="h-2", version=8), subjects.node_nudge("h-1"))
        for garbage in (b"\xff\x00 not json", b'{"node_id": "h-1"}', b"[1, 2]"):
            try:
                await test_broker.publish(garbage, subjects.node_nudge("h-1"))
            except ValidationError:
                pass  # the test broker re-raises what the real one logs and drops
        assert agents["h-1"].triggers == [] and agents["h-2"].triggers == ["nudge version 7"]

        await test_broker.publish(Nudge(node_id="h-1", version=1), subjects.node_nudge("h-1"))
        assert agents["h-1"].triggers == ["nudge version 1"]


def test_fleet_heartbeats_are_what_model_dump_json_writes_with_the_task_list_serialised_once():
    from comp_common.messages import TaskStatus

    fleet = FleetPublisher(None)  # type: ignore[arg-type]
    statuses = [
        TaskStatus(task_id=f"t{i}", node_id="h-1", deployment="default.web", state=TaskState.RUNNING, host_ports={"80/tcp": 32768 + i})
        for i in range(3)
    ]
    beat = Heartbeat(
        node_id="h-1", seq=1, sent_at=1.0, started_at=0.0, driver="hollow", capacity=Capacity(cpu=8, memory=1),
        allocated=Capacity(cpu=0.3, memory=3), labels={"zone": "a"}, tasks=statuses,
    )
    first = fleet._heartbeat_json(beat)
    assert first == beat.model_dump_json().encode()
    cached = fleet._task_lists["h-1"][1]
    second = beat.model_copy(update={"seq": 2, "tasks": list(statuses)})
    assert fleet._heartbeat_json(second) == second.model_dump_json().encode()
    assert fleet._task_lists["h-1"][1] is cached, "same status objects: the list is not serialised again"
    changed = beat.model_copy(update={"seq": 3, "tasks": statuses[:2] + [statuses[2].model_copy(update={"restarts": 1})]})
    assert fleet._heartbeat_json(changed) == changed.model_dump_json().encode()
    empty = beat.model_copy(update={"seq": 4, "tasks": []})
    assert fleet._heartbeat_json(empty) == empty.model_dump_json().encode()


async def test_the_fleet_clock_acts_on_every_running_agent_each_period_and_skips_the_others() -> None:
    from types import SimpleNamespace

    from comp_nodeagent.main import run_on_a_clock

    agents = [SimpleNamespace(node_id=f"n{i}", running=i != 3) for i in range(10)]
    acted: list[str] = []

    async def act(agent) -> None:
        acted.append(agent.node_id)

    clock = asyncio.create_task(run_on_a_clock(agents, 0.1, act))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(_until(lambda: acted.count("n9") >= 3), 10)
    finally:
        clock.cancel()
    turns = [acted[i : i + 9] for i in range(0, 27, 9)]
    expected = [f"n{i}" for i in range(10) if i != 3]
    assert turns == [expected] * 3, "each period every running agent once, in order; n3 never"


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)
