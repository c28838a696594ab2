"""Per-task metrics: the CPU rate and share math, cgroup discovery on fake trees, engine stats
parsing, and the agent's NodeMetrics over the hollow driver's synthetic load."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path

import pytest
from pydantic import BaseModel

from comp_common import subjects
from comp_common.messages import Capacity, NodeAssignments, NodeMetrics, TaskSpec, TaskState
from comp_nodeagent.agent import Agent
from comp_nodeagent.driver import can_measure, make_driver
from comp_nodeagent.hollow_driver import HollowDriver
from comp_nodeagent.metrics import (
    CgroupUsage,
    RunningTask,
    Sample,
    UsageTracker,
    counters_from_engine_stats,
    cpu_cores,
    find_cgroup,
    share,
)
from comp_nodeagent.settings import DEFAULT_METRICS_SECONDS, NodeAgentGroup, NodeAgentSettings

CID = "c0ffee" * 10 + "abcd"  # 64 hex digits, as the engine's ids


# ---- the math ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "current", "cores"),
    [
        (None, Sample(10.0, 5.0, 0), None),  # first sample: no rate yet
        (Sample(10.0, 5.0, 0), Sample(12.0, 6.0, 0), 0.5),
        (Sample(10.0, 5.0, 0), Sample(12.0, 9.0, 0), 2.0),  # more than one core
        (Sample(10.0, 5.0, 0), Sample(12.0, 5.0, 0), 0.0),  # idle
        (Sample(10.0, 5.0, 0), Sample(12.0, 0.3, 0), None),  # counter reset: cgroup made afresh
        (Sample(10.0, 5.0, 0), Sample(10.0, 6.0, 0), None),  # no time between the samples
    ],
)
def test_cpu_cores_is_the_counter_growth_over_wall_time(previous: Sample | None, current: Sample, cores: float | None) -> None:
    assert cpu_cores(previous, current) == (pytest.approx(cores) if cores is not None else None)


@pytest.mark.parametrize(
    ("used", "limit", "expected"),
    [(0.25, 0.5, 0.5), (0.5, 0.5, 1.0), (0.75, 0.5, 1.5), (0.3, 0.0, None), (64, 128, 0.5), (10, 0, None)],
)
def test_share_of_the_limit(used: float, limit: float, expected: float | None) -> None:
    assert share(used, limit) == expected


def running(task_id: str, container_id: str, cpu: float = 0.5, memory: int = 1000) -> RunningTask:
    return RunningTask(task_id, "default.web", container_id, cpu, memory)


def test_tracker_reports_a_task_from_its_second_sample_and_restarts_after_a_reset() -> None:
    tracker = UsageTracker()
    a, b = running("a", "ca"), running("b", "cb", cpu=0.0, memory=0)

    usages, since = tracker.observe(100.0, {"ca": (10.0, 400)}, [a])
    assert (usages, since) == ([], None)  # a's first sample

    usages, since = tracker.observe(102.0, {"ca": (11.0, 500), "cb": (3.0, 50)}, [a, b])
    assert since == 2.0
    [ua] = usages  # b is new: not yet
    assert (ua.task_id, ua.deployment, ua.cpu_cores, ua.cpu_share, ua.memory_bytes, ua.memory_share) == (
        "a", "default.web", 0.5, 1.0, 500, 0.5
    )

    # a's counter went backwards (restarted in place): no rate this time, one the next.
    usages, _ = tracker.observe(104.0, {"ca": (0.2, 300), "cb": (3.5, 60)}, [a, b])
    [ub] = usages
    assert (ub.task_id, ub.cpu_cores, ub.cpu_share, ub.memory_bytes, ub.memory_share) == ("b", 0.25, None, 60, None)
    usages, _ = tracker.observe(106.0, {"ca": (1.2, 300), "cb": (3.5, 60)}, [a, b])
    assert {u.task_id: u.cpu_cores for u in usages} == {"a": 0.5, "b": 0.0}


def test_tracker_forgets_containers_that_are_gone() -> None:
    tracker = UsageTracker()
    tracker.observe(0.0, {"ca": (1.0, 1)}, [running("a", "ca")])
    tracker.observe(2.0, {}, [running("a", "ca")])  # not measured this time (ended)
    # The same container seen again is a first sample, not a rate over 4 s.
    usages, _ = tracker.observe(4.0, {"ca": (9.0, 1)}, [running("a", "ca")])
    assert usages == []
    # A task replaced by a new container starts afresh too.
    usages, _ = tracker.observe(6.0, {"ca2": (0.1, 1)}, [running("a", "ca2")])
    assert usages == []


# ---- cgroup discovery ------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(root: Path, parent: str, cpuacct_dir: str = "cpuacct") -> None:
    write(root / cpuacct_dir / parent / "cpuacct.usage", "2500000000\n")
    write(root / "memory" / parent / "memory.usage_in_bytes", "10000\n")
    write(root / "memory" / parent / "memory.stat", "cache 5000\ninactive_file 99\ntotal_inactive_file 3000\n")


def v2_tree(root: Path, parent: str) -> None:
    write(root / "cgroup.controllers", "cpu memory\n")
    write(root / parent / "cpu.stat", "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    write(root / parent / "memory.current", "8000\n")
    write(root / parent / "memory.stat", "anon 4000\nfile 4000\ninactive_file 1000\n")


@pytest.mark.parametrize(
    ("layout", "make", "version", "counters"),
    [
        ("v1 cgroupfs", lambda r: v1_tree(r, f"docker/{CID}"), 1, (2.5, 7000)),
        ("v1 systemd", lambda r: v1_tree(r, f"system.slice/docker-{CID}.scope"), 1, (2.5, 7000)),
        ("v1 cpu,cpuacct", lambda r: v1_tree(r, f"docker/{CID}", "cpu,cpuacct"), 1, (2.5, 7000)),
        ("v2 systemd", lambda r: v2_tree(r, f"system.slice/docker-{CID}.scope"), 2, (1.5, 7000)),
        ("v2 cgroupfs", lambda r: v2_tree(r, f"docker/{CID}"), 2, (1.5, 7000)),
    ],
)
def test_cgroup_files_are_found_and_read(tmp_path: Path, layout: str, make, version: int, counters: tuple[float, int]) -> None:
    make(tmp_path)
    files = find_cgroup(tmp_path, CID)
    assert files is not None, layout
    assert files.version == version
    # Memory is the working set: the inactive page cache is not counted as used.
    assert files.read() == counters


def test_no_cgroup_for_another_container_or_a_half_tree(tmp_path: Path) -> None:
    v1_tree(tmp_path, f"docker/{CID}")
    assert find_cgroup(tmp_path, "f" * 64) is None
    write(tmp_path / "cpuacct" / "docker" / ("e" * 64) / "cpuacct.usage", "1\n")  # no memory controller dir
    assert find_cgroup(tmp_path, "e" * 64) is None


def test_cgroup_usage_reads_found_ones_and_names_the_others(tmp_path: Path) -> None:
    v1_tree(tmp_path, f"docker/{CID}")
    gone = "d" * 64
    v1_tree(tmp_path, f"docker/{gone}")
    reader = CgroupUsage(tmp_path)
    counters, elsewhere = reader.read([CID, gone, "elsewhere"])
    assert counters == {CID: (2.5, 7000), gone: (2.5, 7000)}
    assert elsewhere == ["elsewhere"]

    # The container ended: its files vanish while cached; it is in neither answer.
    (tmp_path / "cpuacct" / "docker" / gone / "cpuacct.usage").unlink()
    write(tmp_path / "cpuacct" / "docker" / CID / "cpuacct.usage", "4500000000\n")
    counters, elsewhere = reader.read([CID, gone])
    assert counters == {CID: (4.5, 7000)} and elsewhere == []


@pytest.mark.parametrize(
    ("stats", "counters"),
    [
        # cgroup v1 engine
        ({"cpu_stats": {"cpu_usage": {"total_usage": 3_000_000_000}},
          "memory_stats": {"usage": 9000, "stats": {"total_inactive_file": 1000, "inactive_file": 5}}}, (3.0, 8000)),
        # cgroup v2 engine
        ({"cpu_stats": {"cpu_usage": {"total_usage": 500_000_000}},
          "memory_stats": {"usage": 9000, "stats": {"inactive_file": 2000}}}, (0.5, 7000)),
        # a container that is not running
        ({"cpu_stats": {"cpu_usage": {"total_usage": 0}}, "memory_stats": {}}, None),
        ({}, None),
    ],
)
def test_counters_from_engine_stats(stats: dict, counters: tuple[float, int] | None) -> None:
    assert counters_from_engine_stats(stats) == counters


# ---- settings ----------------------------------------------------------------------------


def test_metrics_period_defaults_on_for_one_agent_and_off_for_a_fleet() -> None:
    assert NodeAgentGroup().metrics_period == DEFAULT_METRICS_SECONDS
    assert NodeAgentGroup(driver="hollow", count=50).metrics_period == 0.0
    assert NodeAgentGroup(driver="hollow", count=50, metrics_seconds=5).metrics_period == 5.0
    assert NodeAgentGroup(metrics_seconds=0).metrics_period == 0.0
    with pytest.raises(ValueError):
        NodeAgentGroup(metrics_seconds=-1)


def test_hollow_load_settings_reach_the_driver() -> None:
    settings = NodeAgentSettings(nodeagent={"node_id": "h", "driver": "hollow", "hollow_task_cpu": 0.25, "hollow_task_memory": "64Mi"})
    driver = make_driver(settings)
    assert isinstance(driver, HollowDriver) and can_measure(driver)
    assert (driver.task_cpu, driver.task_memory) == (0.25, 64 * 1024**2)


# ---- the agent -----------------------------------------------------------------------------


def spec(task_id: str, cpu: float, memory: int) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash="h",
        image="img", cpu=cpu, memory=memory,
    )


async def test_agent_publishes_node_metrics_from_the_second_sample() -> None:
    # The synthetic load grows with the same clock the agent samples with.
    driver = HollowDriver("n1", task_cpu=0.25, task_memory=32 * 1024**2, clock=time.monotonic)
    published: list[tuple[str, BaseModel]] = []

    async def publish(message: BaseModel, subject: str) -> None:
        published.append((subject, message))

    tasks = [spec("a", cpu=0.5, memory=64 * 1024**2), spec("b", cpu=0.25, memory=128 * 1024**2)]

    async def load() -> NodeAssignments:
        return NodeAssignments(node_id="n1", tasks=tasks)

    # own_clock False: the test says when a sample is taken.
    agent = Agent(
        settings=NodeAgentGroup(node_id="n1", driver="hollow", cpu=4, memory=2 * 1024**3),
        heartbeat_seconds=3600, driver=driver, load_assignments=load, publish=publish, own_clock=False,
    )
    await agent.start()
    try:
        for _ in range(200):
            if len(agent.statuses) == 2 and all(s.state == TaskState.RUNNING for s in agent.statuses.values()):
                break
            await asyncio.sleep(0.01)
        await agent.publish_metrics()
        await asyncio.sleep(0.5)
        await agent.publish_metrics()
    finally:
        await agent.stop()

    metrics = [m for s, m in published if s == subjects.node_metrics("n1")]
    assert len(metrics) == 2 and all(isinstance(m, NodeMetrics) for m in metrics)
    first, second = metrics
    assert first.tasks == [] and first.cpu_cores == 0.0  # no rate from one sample
    assert second.period_seconds == pytest.approx(0.5, abs=0.1)
    usage = {u.task_id: u for u in second.tasks}
    assert set(usage) == {"a", "b"}
    approx = partial(pytest.approx, rel=0.02)
    assert (usage["a"].cpu_cores, usage["a"].cpu_share, usage["a"].memory_share) == (approx(0.25), approx(0.5), 0.5)
    assert (usage["b"].cpu_cores, usage["b"].cpu_share, usage["b"].memory_share) == (approx(0.25), approx(1.0), 0.25)
    assert second.cpu_cores == approx(0.5) and second.memory_bytes == 64 * 1024**2
    assert second.capacity == Capacity(cpu=4, memory=2 * 1024**3)
    assert second.allocated == Capacity(cpu=0.75, memory=192 * 1024**2)


class BrokenUsageDriver(HollowDriver):
    async def usage(self, container_ids):  # type: ignore[override]
        raise OSError("cgroup filesystem went away")


async def test_a_metrics_failure_is_logged_and_the_agent_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    published: list[tuple[str, BaseModel]] = []

    async def publish(message: BaseModel, subject: str) -> None:
        published.append((subject, message))

    async def load() -> NodeAssignments:
        return NodeAssignments(node_id="n1", tasks=[spec("a", 0.5, 1024)])

    agent = Agent(
        settings=NodeAgentGroup(node_id="n1", metrics_seconds=0.05, resync_seconds=3600),
        heartbeat_seconds=3600, driver=BrokenUsageDriver("n1"), load_assignments=load, publish=publish,
    )
    await agent.start()
    try:
        await asyncio.sleep(0.3)
        # The metrics loop kept going (several failures logged), and the task still runs.
        assert sum("could not publish node metrics" in r.message for r in caplog.records) >= 2
        assert agent.statuses["a"].state == TaskState.RUNNING
        assert agent.running
    finally:
        await agent.stop()
    assert not any(s == subjects.node_metrics("n1") for s, _ in published)
