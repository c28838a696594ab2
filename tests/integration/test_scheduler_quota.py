"""Namespace quotas through the scheduler service on a real nats-server and redis-server: the
scheduler reads the namespaces bucket, holds placements past a quota as pending with the
quota's reason, and places them once a namespace event says the quota was raised."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from faststream import TestApp
from faststream.nats import NatsBroker

from comp_common import subjects
from comp_common.kv import get_model, open_bucket, put_model
from comp_common.manifest import parse_deployments
from comp_common.messages import (
    Capacity,
    ControlEvent,
    DeploymentEvent,
    DeploymentRecord,
    Heartbeat,
    NamespaceRecord,
    NodeAssignments,
    TaskState,
    TaskStatus,
)
from comp_common.observed import ObservedStore, connect
from comp_common.quota import Quota
from comp_scheduler.main import build_app
from comp_scheduler.settings import SchedulerSettings

KEY = "team.web"
WEB = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: web, namespace: team}
spec: {replicas: 4, image: "web:v1", resources: {cpu: 0.5, memory: 16Mi}}
"""


async def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def beat(nc, kv, node_id: str) -> None:
    """Heartbeats like an agent that runs every task it is assigned."""
    seq = 0
    while True:
        found = await get_model(kv, node_id, NodeAssignments)
        tasks = found[0].tasks if found else []
        seq += 1
        hb = Heartbeat(
            node_id=node_id, seq=seq, sent_at=time.time(), started_at=0, driver="fake",
            capacity=Capacity(cpu=8.0, memory=8 * 1024**3), allocated=Capacity(cpu=0, memory=0),
            tasks=[TaskStatus(task_id=t.task_id, node_id=node_id, deployment=t.deployment, state=TaskState.RUNNING) for t in tasks],
        )
        await nc.publish(subjects.node_heartbeat(node_id), hb.model_dump_json().encode())
        await asyncio.sleep(0.2)


@pytest.fixture
async def env(nats_url, redis_url, cluster_name):
    settings = SchedulerSettings(
        cluster=cluster_name,
        nats={"url": nats_url},
        redis={"url": redis_url},
        liveness={"heartbeat_seconds": 0.2, "grace_seconds": 2.0},
        # Long: the raised quota must take effect on its event, not on a resync.
        scheduler={"resync_seconds": 600.0, "seed": 7},
        log={"json": False},
    )
    app, _ = build_app(settings)
    nc = await nats.connect(nats_url)
    broker = NatsBroker(nats_url)
    await broker.connect()
    namespaces = await open_bucket(broker, subjects.NAMESPACES_BUCKET)
    # The quota is there before the scheduler starts: it is read at start, not only on events.
    await put_model(namespaces, "team", NamespaceRecord(name="team", quota=Quota(cpu=1.0), created_at=0, updated_at=0), None)
    async with TestApp(app):
        assignments = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
        deployments = await open_bucket(broker, subjects.DEPLOYMENTS_BUCKET)
        node = asyncio.create_task(beat(nc, assignments, "n1"))
        store = ObservedStore(connect(redis_url), cluster_name)
        try:
            yield nc, namespaces, assignments, deployments, store
        finally:
            node.cancel()
            await asyncio.gather(node, return_exceptions=True)
    await broker.stop()
    await nc.close()


async def test_a_quota_holds_placements_pending_until_a_namespace_event_raises_it(env):
    nc, namespaces, assignments, deployments, store = env

    async def placed() -> int:
        found = await get_model(assignments, "n1", NodeAssignments)
        return sum(t.deployment == KEY for t in found[0].tasks) if found else 0

    async def summary():
        return (await store.list_deployment_statuses()).get(KEY)

    async def node_known():
        return any(n.node_id == "n1" for n in await store.list_nodes())

    await wait_for(node_known, what="the node recorded")
    now = time.time()
    revision = await put_model(deployments, KEY, DeploymentRecord(deployment=parse_deployments(WEB)[0], created_at=now, updated_at=now), None)
    event = DeploymentEvent(action="applied", namespace="team", name="web", revision=revision)
    await nc.publish(subjects.deployment_event("team", "web"), event.model_dump_json().encode())

    async def two_placed_two_pending():
        s = await summary()
        return s if s is not None and s.placed == 2 and s.running == 2 and "namespace team quota" in s.pending_reason else None

    held = await wait_for(two_placed_two_pending, what="2 placed within the 1-core quota, 2 pending on it")
    assert "cpu" in held.pending_reason
    assert await placed() == 2

    found = await get_model(namespaces, "team", NamespaceRecord)
    raised = found[0].model_copy(update={"quota": Quota(cpu=2.0), "updated_at": time.time()})
    await put_model(namespaces, "team", raised, found[1])
    control = ControlEvent(kind="namespace", name="team", action="updated")
    await nc.publish(subjects.control_event("namespace", "team"), control.model_dump_json().encode())

    async def all_placed():
        s = await summary()
        return s if s is not None and s.placed == 4 and s.running == 4 and not s.pending_reason else None

    await wait_for(all_placed, what="all 4 placed once the quota was raised")
    assert await placed() == 4

    # Lowered again below what runs: nothing is stopped, but a scale up stays pending on it.
    found = await get_model(namespaces, "team", NamespaceRecord)
    await put_model(namespaces, "team", found[0].model_copy(update={"quota": Quota(cpu=1.0)}), found[1])
    lowered = ControlEvent(kind="namespace", name="team", action="updated")
    await nc.publish(subjects.control_event("namespace", "team"), lowered.model_dump_json().encode())
    current, revision = await get_model(deployments, KEY, DeploymentRecord)
    scaled = current.deployment.model_copy(update={"spec": current.deployment.spec.model_copy(update={"replicas": 5})})
    revision = await put_model(deployments, KEY, current.model_copy(update={"deployment": scaled}), revision)
    event = DeploymentEvent(action="applied", namespace="team", name="web", revision=revision)
    await nc.publish(subjects.deployment_event("team", "web"), event.model_dump_json().encode())

    async def four_kept_one_pending():
        s = await summary()
        return s if s is not None and s.desired == 5 and s.placed == 4 and "namespace team quota" in s.pending_reason else None

    await wait_for(four_kept_one_pending, what="the 4 running kept, the 5th pending on the lowered quota")
    assert await placed() == 4
