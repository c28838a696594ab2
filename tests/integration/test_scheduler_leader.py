"""Leader and hot standby on a real nats-server: two schedulers in one process contending for
the lease (fast), and the real thing: SIGKILL of the leading comp-scheduler process mid-deploy
on a local cluster with Docker."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import nats
import pytest
from faststream import TestApp
from faststream.nats import NatsBroker

from comp_cli.local import ClusterConfig, LocalCluster
from comp_common import labels, subjects
from comp_common.kv import get_model, list_models, open_bucket, put_model
from comp_common.manifest import parse_deployments
from comp_common.messages import (
    Capacity,
    DeploymentEvent,
    DeploymentRecord,
    Heartbeat,
    LeaseRecord,
    NodeAssignments,
    TaskState,
    TaskStatus,
)
from comp_common.observed import ObservedStore, connect
from comp_scheduler.applier import NotLeader, task_spec
from comp_scheduler.main import build_app
from comp_scheduler.model import Place
from comp_scheduler.settings import SchedulerSettings

LEASE = 1.0

DEPLOYMENT = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: %s}
spec: {replicas: %d, image: "comp/busybox:test", resources: {cpu: 0.1, memory: 16Mi}}
"""


async def wait_for(predicate, timeout=10.0, what="condition", every=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class FakeNode:
    """Heartbeats like an agent, reporting every assigned task as running."""

    def __init__(self, nc, node_id: str, kv):
        self.nc, self.node_id, self.kv = nc, node_id, kv
        self.seq = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self):
        while True:
            found = await get_model(self.kv, self.node_id, NodeAssignments)
            tasks = found[0].tasks if found else []
            self.seq += 1
            hb = Heartbeat(
                node_id=self.node_id, seq=self.seq, sent_at=time.time(), started_at=0, driver="fake",
                capacity=Capacity(cpu=4.0, memory=4 * 1024**3), allocated=Capacity(cpu=0, memory=0),
                tasks=[TaskStatus(task_id=t.task_id, node_id=self.node_id, deployment=t.deployment, state=TaskState.RUNNING) for t in tasks],
            )
            await self.nc.publish(subjects.node_heartbeat(self.node_id), hb.model_dump_json().encode())
            await asyncio.sleep(0.2)

    def close(self):
        self._task.cancel()


def settings_for(instance: str, seed: int, nats_url: str, redis_url: str, cluster: str, lease: float = LEASE) -> SchedulerSettings:
    return SchedulerSettings(
        cluster=cluster,
        nats={"url": nats_url},
        redis={"url": redis_url},
        liveness={"heartbeat_seconds": 0.2, "grace_seconds": 1.0},
        # Different seeds: two schedulers drawing the same task ids would hide duplicates.
        scheduler={"resync_seconds": 1.0, "seed": seed, "lease_seconds": lease, "instance": instance},
        log={"json": False},
    )


async def apply(nc, kv, name: str, replicas: int) -> DeploymentRecord:
    deployment = parse_deployments(DEPLOYMENT % (name, replicas))[0]
    record = DeploymentRecord(deployment=deployment, created_at=time.time(), updated_at=time.time())
    found = await get_model(kv, f"default.{name}", DeploymentRecord)
    rev = await put_model(kv, f"default.{name}", record, found[1] if found else None)
    event = DeploymentEvent(action="applied", namespace="default", name=name, revision=rev)
    await nc.publish(subjects.deployment_event("default", name), event.model_dump_json().encode())
    return record


async def lease_record(leases) -> LeaseRecord | None:
    try:
        entry = await leases.get(subjects.SCHEDULER_LEASE_KEY)
    except Exception:
        return None
    return LeaseRecord.model_validate_json(entry.value) if entry.value else None


async def all_tasks(assignments) -> dict[str, list[str]]:
    return {n: [t.task_id for t in v.tasks] for n, (v, _) in (await list_models(assignments, NodeAssignments)).items()}


async def test_standby_takes_over_a_half_applied_deploy_and_fences_the_old_leader(nats_url, redis_url, cluster_name):
    nc = await nats.connect(nats_url)
    broker = NatsBroker(nats_url)
    await broker.connect()
    deployments = await open_bucket(broker, subjects.DEPLOYMENTS_BUCKET)
    assignments = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
    leases = await open_bucket(broker, subjects.LEASES_BUCKET)
    changes: list[dict] = []

    async def on_change(msg):
        changes.append(json.loads(msg.data))

    await nc.subscribe(subjects.SCHEDULER_LEADER_EVENTS, cb=on_change)
    nodes = [FakeNode(nc, n, assignments) for n in ("n1", "n2")]

    app_a, a = build_app(settings_for("a", 1, nats_url, redis_url, cluster_name))
    app_b, b = build_app(settings_for("b", 2, nats_url, redis_url, cluster_name))
    async with TestApp(app_a), TestApp(app_b):
        first = await wait_for(lambda: _one_leader(a, b), what="one leader")
        assert first is a, "a started first and found the key absent"
        epoch_a = a.acting_epoch()
        record = await lease_record(leases)
        assert record is not None and record.name == "a" and record.holder == a.identity.holder
        # Both nodes known first, or the 6 replicas may all go to the one heard from so far
        # (seen once in CI) and n1 would have no assignments to half-write below.
        await wait_for(lambda: _ready_nodes(a), what="the leader sees both nodes")

        await apply(nc, deployments, "web", 6)
        web = await wait_for(lambda: _placed(assignments, "default.web", 6), what="6 web replicas placed")
        values = await list_models(assignments, NodeAssignments)
        assert {v.epoch for v, _ in values.values()} == {epoch_a}, "every value carries the leader's epoch"

        # The standby is hot: it knows the deployment and both nodes, and never wrote or ran a round.
        assert "default.web" in b.state.desired
        assert {n for n, e in b.state.nodes.items() if e.status.value == "ready"} == {"n1", "n2"}
        assert b.acting_epoch() is None

        # a crashes (no release) right after it wrote n1 but not n2 for a new deployment: the
        # same as a SIGKILL between two KV writes of one round.
        await a.stop(release_lease=False)
        crashed_at = time.monotonic()
        api_record = await apply(nc, deployments, "api", 4)
        n1, rev = await get_model(assignments, "n1", NodeAssignments)
        half = [
            task_spec(Place(f"api-half{i}", "default.api", "n1", "test"), api_record, time.time()) for i in range(2)
        ]
        await put_model(
            assignments, "n1", NodeAssignments(node_id="n1", version=n1.version + 1, tasks=n1.tasks + half, epoch=epoch_a), rev
        )

        await wait_for(lambda: _leads(b), timeout=LEASE + 5, what="b takes over")
        takeover = time.monotonic() - crashed_at
        print(f"\ntakeover after a crash: {takeover:.2f}s (lease {LEASE}s)")
        assert takeover < LEASE + 3
        epoch_b = b.acting_epoch()
        assert epoch_b is not None and epoch_b > epoch_a

        api = await wait_for(lambda: _placed(assignments, "default.api", 4), what="api completed to 4")
        assert {"api-half0", "api-half1"} <= set(api), "the half-applied tasks are kept, not placed again"
        assert await _placed(assignments, "default.web", 6) == web, "web untouched"
        every = [t for ts in (await all_tasks(assignments)).values() for t in ts]
        assert len(every) == len(set(every)) == 10
        values = await list_models(assignments, NodeAssignments)
        assert {v.epoch for v, _ in values.values()} == {epoch_b}, "every node restamped with the new epoch"

        # The deposed leader, unaware, writes late.  An existing key it cannot: its compare-and-set
        # fails on the restamped revision, and the value it then reads has a newer epoch.
        a.applier._epoch = lambda: epoch_a  # a deposed leader that still believes it leads
        with pytest.raises(NotLeader, match="written at epoch"):
            await a.applier._write_node("n2", [], set(), now=time.time())
        # What it could still do is create the key of a node the new leader has never seen
        # (here bypassing its own leadership check, as a stalled write would):
        ghost = task_spec(Place("api-ghost", "default.api", "n3", "late"), api_record, time.time())
        await put_model(assignments, "n3", NodeAssignments(node_id="n3", version=1, tasks=[ghost], epoch=epoch_a), None)

        async def ghost_voided():
            found = await get_model(assignments, "n3", NodeAssignments)
            return found and found[0].epoch == epoch_b and not found[0].tasks

        await wait_for(ghost_voided, timeout=5, what="the late write voided")

        store = ObservedStore(connect(redis_url), cluster_name)
        shown = await wait_for(store.get_scheduler_leader, what="leader in redis")
        assert (shown.name, shown.epoch) == ("b", epoch_b)
        statuses = await wait_for(
            lambda: _status(store, "default.api", 4), what="the new leader's picture in redis"
        )
        assert statuses.placed == 4

    assert [(c["name"], c["state"], c["epoch"]) for c in changes if c["state"] == "leading"] == [
        ("a", "leading", epoch_a), ("b", "leading", epoch_b)
    ]
    for node in nodes:
        node.close()
    await nc.close()
    await broker.stop()


async def test_a_graceful_stop_hands_over_without_waiting_out_the_lease(nats_url, redis_url, cluster_name):
    lease = 5.0
    app_a, a = build_app(settings_for("a", 1, nats_url, redis_url, cluster_name, lease))
    app_b, b = build_app(settings_for("b", 2, nats_url, redis_url, cluster_name, lease))
    async with TestApp(app_a), TestApp(app_b):
        assert await wait_for(lambda: _one_leader(a, b), what="one leader") is a
        await a.stop()  # what SIGTERM does: stop acting, then release the lease
        stopped_at = time.monotonic()
        await wait_for(lambda: _leads(b), timeout=lease, what="b takes over")
        handover = time.monotonic() - stopped_at
        print(f"\nhandover after a graceful stop: {handover:.2f}s (lease {lease}s)")
        assert handover < lease / 2


async def _one_leader(*schedulers):
    leading = [s for s in schedulers if s.leading]
    return leading[0] if len(leading) == 1 else None


async def _leads(scheduler):
    return scheduler.leading


async def _ready_nodes(scheduler) -> bool:
    return {n for n, e in scheduler.state.nodes.items() if e.status.value == "ready"} == {"n1", "n2"}


async def _placed(assignments, deployment: str, n: int) -> list[str] | None:
    found = await list_models(assignments, NodeAssignments)
    ids = sorted(t.task_id for v, _ in found.values() for t in v.tasks if t.deployment == deployment)
    return ids if len(ids) == n else None


async def _status(store, key, placed):
    s = (await store.list_deployment_statuses()).get(key)
    return s if s and s.placed == placed else None


# ---- real processes ---------------------------------------------------------------------------

SLEEPERS = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: sleepers}
spec:
  replicas: 20
  image: %s
  command: [sleep, "3600"]
  resources: {cpu: 0.05, memory: 16Mi}
"""


@pytest.fixture
def ha_cluster(tmp_path, docker_client, busybox_image):
    config = ClusterConfig.private(tmp_path / "cluster", "ha", nodes=2, schedulers=2)
    local = LocalCluster(config)
    local.start()
    yield local
    local.stop(purge_workloads=True)


@pytest.mark.docker
async def test_killing_the_leader_mid_deploy_the_standby_finishes_with_no_duplicate_task_ids(ha_cluster, docker_client, busybox_image):
    local = ha_cluster
    api = local.config.api_url
    nc = await nats.connect(local.config.nats_url)
    js = nc.jetstream()
    leases = await js.key_value(subjects.LEASES_BUCKET)
    assignments = await js.key_value(subjects.ASSIGNMENTS_BUCKET)

    leader = await wait_for(lambda: lease_record(leases), what="a leader")
    assert leader.name in local.config.scheduler_names() and local.pid_of(leader.name) == leader.pid
    standby = next(n for n in local.config.scheduler_names() if n != leader.name)
    assert local.running()[standby], "the standby runs"

    # Watch the assignments: kill the leader the moment its first placement lands.
    watch = await assignments.watchall(include_history=False)
    response = httpx.post(f"{api}/v1/apply", content=SLEEPERS % busybox_image, timeout=30)
    assert response.status_code == 200, response.text
    async for entry in watch:
        if entry is not None and entry.value and NodeAssignments.model_validate_json(entry.value).tasks:
            break
    local.kill(leader.name, signal.SIGKILL)
    killed_at = time.monotonic()
    await watch.stop()
    at_kill = await all_tasks(assignments)
    print(f"\nleader {leader.name} (epoch {leader.epoch or '?'}) SIGKILLed with {sum(map(len, at_kill.values()))}/20 placed")

    async def new_holder():
        record = await lease_record(leases)
        return record if record and record.holder != leader.holder else None

    successor = await wait_for(new_holder, timeout=30, what="the standby takes the lease")
    takeover = time.monotonic() - killed_at
    assert successor.name == standby

    def running():
        tasks = [t for t in httpx.get(f"{api}/v1/tasks", timeout=10).json() if t["deployment"] == "default.sleepers"]
        return tasks if len(tasks) == 20 and all(t["state"] == "running" for t in tasks) else None

    async def all_running():
        return await asyncio.to_thread(running)

    tasks = await wait_for(all_running, timeout=120, every=0.2, what="20 running")
    all_done = time.monotonic() - killed_at
    print(f"takeover {takeover:.2f}s after the kill; all 20 running {all_done:.2f}s after it")
    assert takeover < 15, "a generous bound: the lease is 2 s"

    ids = [t["task_id"] for t in tasks]
    assert len(set(ids)) == 20
    placed = await all_tasks(assignments)
    every = [t for ts in placed.values() for t in ts]
    assert sorted(every) == sorted(ids), "the bucket holds exactly the 20 running tasks"

    def containers():
        filters = {"label": [f"{labels.CLUSTER}={local.config.cluster}", f"{labels.DEPLOYMENT}=default.sleepers"]}
        return docker_client.api.containers(all=True, filters=filters)

    found = containers()
    assert len(found) == 20
    assert sorted(c["Labels"][labels.TASK_ID] for c in found) == sorted(ids)
    # Nothing more turns up after a few resync periods of both the agents and the new leader.
    await asyncio.sleep(6)
    assert len(containers()) == 20
    await nc.close()
