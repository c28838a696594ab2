"""The scheduler on a real nats-server and redis-server, with simulated nodes on the wire."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from faststream import TestApp

from comp_common import subjects
from comp_common.kv import get_model, open_bucket, put_model
from comp_common.manifest import parse_deployments
from comp_common.messages import Capacity, DeploymentEvent, DeploymentRecord, Heartbeat, NodeAssignments, TaskState, TaskStatus
from comp_common.observed import ObservedStore, connect
from comp_scheduler.main import build_app
from comp_scheduler.settings import SchedulerSettings

WEB = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: %d, image: "comp/busybox:test", resources: {cpu: 0.5, memory: 64Mi}}
"""


async def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class FakeNode:
    """Heartbeats like an agent and reports every assigned task as running."""

    def __init__(self, nc, node_id: str, kv):
        self.nc, self.node_id, self.kv = nc, node_id, kv
        self.beating = True
        self.seq = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self):
        while True:
            if self.beating:
                found = await get_model(self.kv, self.node_id, NodeAssignments)
                tasks = found[0].tasks if found else []
                self.seq += 1
                hb = Heartbeat(
                    node_id=self.node_id, seq=self.seq, sent_at=time.time(), started_at=0, driver="fake",
                    capacity=Capacity(cpu=2.0, memory=1024**3), allocated=Capacity(cpu=0, memory=0),
                    tasks=[TaskStatus(task_id=t.task_id, node_id=self.node_id, deployment=t.deployment, state=TaskState.RUNNING) for t in tasks],
                )
                await self.nc.publish(subjects.node_heartbeat(self.node_id), hb.model_dump_json().encode())
            await asyncio.sleep(0.2)

    async def close(self):
        self._task.cancel()


async def apply(nc, kv, replicas: int, revision: int | None) -> int:
    deployment = parse_deployments(WEB % replicas)[0]
    record = DeploymentRecord(deployment=deployment, created_at=time.time(), updated_at=time.time())
    rev = await put_model(kv, "default.web", record, revision)
    event = DeploymentEvent(action="applied", namespace="default", name="web", revision=rev)
    await nc.publish(subjects.deployment_event("default", "web"), event.model_dump_json().encode())
    return rev


@pytest.fixture
async def scheduler_app(nats_url, redis_url, cluster_name, monkeypatch):
    settings = SchedulerSettings(
        cluster=cluster_name,
        nats={"url": nats_url},
        redis={"url": redis_url},
        liveness={"heartbeat_seconds": 0.2, "grace_seconds": 1.0},
        scheduler={"resync_seconds": 1.0, "seed": 7},
        log={"json": False},
    )
    app, scheduler = build_app(settings)
    async with TestApp(app):
        yield scheduler


async def test_places_scales_survives_garbage_and_replaces_lost_node(scheduler_app, nats_url, redis_url, cluster_name):
    nc = await nats.connect(nats_url)
    from faststream.nats import NatsBroker

    broker = NatsBroker(nats_url)
    await broker.connect()
    deployments = await open_bucket(broker, subjects.DEPLOYMENTS_BUCKET)
    assignments = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
    nudges: list[dict] = []

    async def on_nudge(msg):
        nudges.append(json.loads(msg.data))

    await nc.subscribe("comp.node.*.nudge", cb=on_nudge)
    a, b = FakeNode(nc, "a", assignments), FakeNode(nc, "b", assignments)
    store = ObservedStore(connect(redis_url), cluster_name)

    async def placed():
        out = {}
        for node_id in ("a", "b"):
            found = await get_model(assignments, node_id, NodeAssignments)
            out[node_id] = [t.task_id for t in found[0].tasks] if found else []
        return out

    async def nodes_ready():
        return {n.node_id for n in await store.list_nodes()} == {"a", "b"}

    await wait_for(nodes_ready, what="both nodes recorded in redis")
    rev = await apply(nc, deployments, 4, None)
    first = await wait_for(lambda: _count(placed, 4), what="4 tasks placed")
    assert sorted(len(v) for v in first.values()) == [2, 2], "spread over both nodes"
    assert {n["node_id"] for n in nudges} == {"a", "b"}

    # Garbage on every subject the scheduler consumes is dropped; it keeps serving.
    for subject in (subjects.deployment_event("default", "web"), subjects.node_heartbeat("a"), subjects.task_event("a")):
        for garbage in (b"\xff\xfe not json", b"{}", b'{"node_id": 5}', bytes(range(256)) * 8):
            await nc.publish(subject, garbage)
    await apply(nc, deployments, 2, rev)
    await wait_for(lambda: _count(placed, 2), what="scaled down to 2")

    statuses = await wait_for(
        lambda: _status(store, lambda s: s.desired == 2 and s.placed == 2 and s.running == 2), what="deployment status in redis"
    )
    assert statuses["default.web"].pending_reason == ""

    # Node a stops heartbeating: its tasks are placed on b.
    a.beating = False
    after = await wait_for(lambda: _where(placed, {"a": 0, "b": 2}), timeout=15, what="tasks moved off the lost node")
    assert not set(after["b"]) & set(first["a"]), "lost tasks are replaced with new ids, not moved"
    await a.close(), await b.close()
    await nc.close()
    await broker.stop()


async def _count(placed, n):
    got = await placed()
    return got if sum(len(v) for v in got.values()) == n else None


async def _where(placed, counts):
    got = await placed()
    return got if {k: len(v) for k, v in got.items()} == counts else None


async def _status(store, check):
    statuses = await store.list_deployment_statuses()
    s = statuses.get("default.web")
    return statuses if s and check(s) else None
