"""Per-task metrics on the real engine: the ``comp-nodeagent`` process publishes NodeMetrics on
real NATS for a busy and an idle busybox container; the driver's engine-stats fallback agrees
with its cgroup reading."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faststream.nats import NatsBroker

from comp_cli.local import _bin
from comp_common.broker import server_caught_up
from comp_common import subjects
from comp_common.kv import open_bucket
from comp_common.messages import NodeAssignments, NodeMetrics, Nudge, TaskSpec
from comp_nodeagent.docker_driver import DockerDriver
from processes import stop_process

pytestmark = pytest.mark.docker

NODE_ID = "metrics-a"
BUSY = ["sh", "-c", "while :; do :; done"]
IDLE = ["sleep", "3600"]


def task(task_id: str, image: str, command: list[str], cpu: float = 0.5) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.load", namespace="default", name="load", spec_hash="h1",
        image=image, command=command, cpu=cpu, memory=32 * 1024**2,
    )


@pytest.fixture
async def broker(nats_url: str) -> AsyncIterator[NatsBroker]:
    broker = NatsBroker(nats_url)
    await broker.connect()
    yield broker
    await broker.stop()


@pytest.fixture
def agent_process(nats_url: str, cluster_name: str, tmp_path: Path):
    procs: list[subprocess.Popen] = []
    log = tmp_path / "nodeagent.log"

    def start(**env: str) -> subprocess.Popen:
        environment = {
            **os.environ,
            "COMP_NATS__URL": nats_url,
            "COMP_CLUSTER": cluster_name,
            "COMP_NODEAGENT__NODE_ID": NODE_ID,
            "COMP_LIVENESS__HEARTBEAT_SECONDS": "0.5",
            "COMP_NODEAGENT__STOP_GRACE_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen([_bin("comp-nodeagent")], env=environment, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    start.log = log  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        stop_process(proc)


async def test_busy_task_uses_its_cpu_limit_and_idle_one_nothing(
    broker: NatsBroker, agent_process: Any, busybox_image: str
) -> None:
    received: list[NodeMetrics] = []

    async def on_metrics(msg: Any) -> None:
        received.append(NodeMetrics.model_validate_json(msg.data))

    nc = broker.connection
    await nc.subscribe(subjects.node_metrics(NODE_ID), cb=on_metrics)
    await server_caught_up(nc)
    kv = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
    tasks = [task("busy-1", busybox_image, BUSY), task("idle-1", busybox_image, IDLE)]
    await kv.put(NODE_ID, NodeAssignments(node_id=NODE_ID, version=1, tasks=tasks).model_dump_json().encode())
    agent_process(COMP_NODEAGENT__METRICS_SECONDS="1")
    await nc.publish(subjects.node_nudge(NODE_ID), Nudge(node_id=NODE_ID, version=1).model_dump_json().encode())

    def with_both() -> list[NodeMetrics]:
        return [m for m in received if {u.task_id for u in m.tasks} == {"busy-1", "idle-1"}]

    deadline = time.monotonic() + 60
    # Three full periods after both are measured: the first may still cover the busy loop's start.
    while len(with_both()) < 4:
        if time.monotonic() > deadline:
            tail = "\n".join(agent_process.log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"no 4 metrics messages with both tasks; got {len(received)} messages\n{tail}")
        await asyncio.sleep(0.1)

    readings = with_both()[1:4]
    busy = [next(u for u in m.tasks if u.task_id == "busy-1") for m in readings]
    idle = [next(u for u in m.tasks if u.task_id == "idle-1") for m in readings]
    # The CFS quota holds the loop to its 0.5 core: it uses its whole limit.  A noisy
    # machine may starve it for part of a period, hence the median and the wide band.
    assert 0.6 <= statistics.median(u.cpu_share for u in busy) <= 1.3, busy
    assert all(u.cpu_share is not None and u.cpu_share < 0.2 for u in idle), idle
    assert all(u.memory_bytes > 0 and u.memory_share is not None and 0 < u.memory_share < 1 for u in busy + idle)
    last = readings[-1]
    assert last.node_id == NODE_ID
    assert 0.9 <= last.period_seconds <= 1.5
    assert last.cpu_cores == pytest.approx(sum(u.cpu_cores for u in last.tasks), abs=1e-3)
    assert last.memory_bytes == sum(u.memory_bytes for u in last.tasks)
    assert last.allocated is not None and last.allocated.cpu == 1.0 and last.allocated.memory == 64 * 1024**2
    assert last.capacity is not None and last.capacity.cpu > 0


async def test_engine_stats_fallback_agrees_with_the_cgroup_files(cluster_name: str, busybox_image: str, tmp_path: Path) -> None:
    from_cgroups = DockerDriver(cluster_name, NODE_ID)
    # An empty tree: no cgroup is found, so every container is measured through the engine.
    from_engine = DockerDriver(cluster_name, NODE_ID, cgroup_root=tmp_path)
    try:
        busy = await from_cgroups.start(task("busy-1", busybox_image, BUSY))
        idle = await from_cgroups.start(task("idle-1", busybox_image, IDLE))
        ids = [busy.container_id, idle.container_id, "0" * 64]  # the last one does not exist

        began = time.monotonic()
        first = await from_engine.usage(ids)
        took = time.monotonic() - began
        assert set(first) == {busy.container_id, idle.container_id}
        # One-shot stats, concurrently: the engine answers from its collector's next round (at
        # most 1 s away on Docker 20.10), where a plain stats call waits for two rounds, ~2 s,
        # and one container after the other would take that for each.
        assert took < 1.8, took

        await asyncio.sleep(1.0)
        before = await from_cgroups.usage(ids)
        by_engine = await from_engine.usage(ids)
        after = await from_cgroups.usage(ids)
        assert set(after) == {busy.container_id, idle.container_id}
        for container_id in (busy.container_id, idle.container_id):
            assert by_engine[container_id][1] > 0 and after[container_id][1] > 0
        # Both read the same kernel counter, in seconds.  The engine answers from its
        # collector's latest round, up to 1 s old: the busy loop (0.5 core) may have run up
        # to half a second more by the time of the file read before the call.
        engine_cpu = by_engine[busy.container_id][0]
        assert engine_cpu > first[busy.container_id][0]
        assert before[busy.container_id][0] - 0.6 <= engine_cpu <= after[busy.container_id][0] + 0.05, (
            before[busy.container_id][0], engine_cpu, after[busy.container_id][0]
        )
    finally:
        for driver in (from_engine, from_cgroups):
            await driver.close()
