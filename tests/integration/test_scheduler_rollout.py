"""Rollouts through the scheduler service on a real nats-server and redis-server: a spec
change rolls out within its surge and unavailability bounds, a canary waits for promotion,
a version whose tasks never get ready is reverted to the last healthy one.

The nodes are simulated on the wire (heartbeats and task statuses, as agents send them),
so that a test decides which versions get ready: a task of an image named ``*:bad`` runs
but never passes its readiness check.  Each node checks the bounds on every assignments
value it reads, against its own picture of which tasks are ready, so the assertions come
from the history of what ran, never from timing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial

import nats
import pytest
from faststream import TestApp
from faststream.nats import NatsBroker
from waiting import eventually

from comp_common import subjects
from comp_common.kv import get_model, open_bucket, put_model
from comp_common.manifest import parse_deployments
from comp_common.messages import (
    Capacity,
    DeploymentEvent,
    DeploymentRecord,
    HealthState,
    Heartbeat,
    NodeAssignments,
    RevisionRecord,
    RolloutEvent,
    TaskState,
    TaskStatus,
)
from comp_common.observed import ObservedStore, connect
from comp_common.revisions import Revisions, open_revisions
from comp_scheduler.main import build_app
from comp_scheduler.settings import SchedulerSettings

KEY = "default.web"


def manifest(image: str, replicas: int, update: str) -> str:
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  image: "{image}"
  resources: {{cpu: 0.1, memory: 16Mi}}
  ports: [{{container_port: 80}}]
  health:
    readiness: {{http: {{path: /, port: 80}}, interval: 1s}}
  update: {update}
"""


wait_for = partial(eventually, timeout=30.0)


@dataclass
class Sample:
    """One assignments value as a node read it: the deployment's tasks, and those ready then."""

    version: int
    assigned: dict[str, str]  # task id -> image
    ready: set[str]


@dataclass
class FakeNode:
    """An agent on the wire: runs what it is assigned (starting, then running one poll
    later), reports readiness (never for a ``*:bad`` image), heartbeats, and keeps a
    sample of every assignments value it reads."""

    nc: nats.NATS
    kv: object
    node_id: str
    samples: list[Sample] = field(default_factory=list)
    statuses: dict[str, TaskStatus] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    seq: int = 0

    def start(self) -> None:
        self._poked = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        await self.nc.subscribe(subjects.node_nudge(self.node_id), cb=self._on_nudge)
        last_beat = 0.0
        while True:
            await self._sync()
            if time.monotonic() - last_beat > 0.2:
                await self._beat()
                last_beat = time.monotonic()
            try:
                await asyncio.wait_for(self._poked.wait(), 0.1)
            except TimeoutError:
                pass
            self._poked.clear()

    async def _on_nudge(self, msg) -> None:
        self._poked.set()

    async def _sync(self) -> None:
        found = await get_model(self.kv, self.node_id, NodeAssignments)
        value = found[0] if found else NodeAssignments(node_id=self.node_id)
        specs = {t.task_id: t for t in value.tasks}
        for task_id in [t for t in self.statuses if t not in specs]:
            status = self.statuses.pop(task_id)
            await self._publish(status.model_copy(update={"state": TaskState.STOPPED, "ready": False, "ready_since": None}))
        now = time.time()
        for task_id, spec in specs.items():
            self.images[task_id] = spec.image
            old = self.statuses.get(task_id)
            if old is None:
                new = TaskStatus(task_id=task_id, node_id=self.node_id, deployment=spec.deployment, state=TaskState.STARTING, updated_at=now)
            elif old.state is TaskState.STARTING:
                good = not spec.image.endswith(":bad")
                new = old.model_copy(
                    update={
                        "state": TaskState.RUNNING,
                        "readiness": HealthState.HEALTHY if good else HealthState.UNHEALTHY,
                        "ready": good,
                        "ready_since": now if good else None,
                        "updated_at": now,
                    }
                )
            else:
                continue
            self.statuses[task_id] = new
            await self._publish(new)
        ours = {t: s for t, s in specs.items() if s.deployment == KEY}
        self.samples.append(
            Sample(value.version, {t: s.image for t, s in ours.items()}, {t for t in ours if (st := self.statuses.get(t)) and st.ready})
        )

    async def _publish(self, status: TaskStatus) -> None:
        await self.nc.publish(subjects.task_event(self.node_id), status.model_dump_json().encode())

    async def _beat(self) -> None:
        self.seq += 1
        hb = Heartbeat(
            node_id=self.node_id, seq=self.seq, sent_at=time.time(), started_at=0, driver="fake",
            capacity=Capacity(cpu=16.0, memory=64 * 1024**3), allocated=Capacity(cpu=0, memory=0),
            tasks=list(self.statuses.values()),
        )
        await self.nc.publish(subjects.node_heartbeat(self.node_id), hb.model_dump_json().encode())


class Cluster:
    def __init__(self, nc, broker, deployments, revisions: Revisions, node: FakeNode, store: ObservedStore):
        self.nc, self.broker, self.deployments, self.revisions, self.node, self.store = nc, broker, deployments, revisions, node, store
        self.events: list[RolloutEvent] = []

    async def on_rollout(self, msg) -> None:
        self.events.append(RolloutEvent.model_validate_json(msg.data))

    async def apply(self, text: str, change_cause: str = "applied") -> DeploymentRecord:
        """As the api applies: a new generation's revision first, then the record (CAS), then the event."""
        deployment = parse_deployments(text)[0]
        found = await get_model(self.deployments, KEY, DeploymentRecord)
        now = time.time()
        if found is None:
            record, last = DeploymentRecord(deployment=deployment, created_at=now, updated_at=now), None
        else:
            record = found[0].model_copy(
                update={"deployment": deployment, "generation": found[0].generation + 1, "updated_at": now, "change_cause": change_cause}
            )
            last = found[1]
        await self.revisions.put(
            KEY, RevisionRecord(deployment=deployment, generation=record.generation, applied_at=now, change_cause=change_cause)
        )
        return await self._write(record, last)

    async def promote(self) -> DeploymentRecord:
        record, last = await get_model(self.deployments, KEY, DeploymentRecord)
        return await self._write(record.model_copy(update={"promoted_generation": record.generation}), last)

    async def _write(self, record: DeploymentRecord, last: int | None) -> DeploymentRecord:
        revision = await put_model(self.deployments, KEY, record, last)
        event = DeploymentEvent(action="applied", namespace="default", name="web", revision=revision, generation=record.generation)
        await self.nc.publish(subjects.deployment_event("default", "web"), event.model_dump_json().encode())
        return record

    async def record(self) -> DeploymentRecord:
        return (await get_model(self.deployments, KEY, DeploymentRecord))[0]

    def running(self, image: str) -> set[str]:
        last = self.node.samples[-1] if self.node.samples else None
        return {t for t, i in last.assigned.items() if i == image and t in last.ready} if last else set()

    def event(self, state: str, generation: int | None = None) -> RolloutEvent | None:
        return next((e for e in self.events if e.state == state and (generation is None or e.generation == generation)), None)


@pytest.fixture
async def cluster(nats_url, redis_url, cluster_name):
    settings = SchedulerSettings(
        cluster=cluster_name,
        nats={"url": nats_url},
        redis={"url": redis_url},
        liveness={"heartbeat_seconds": 0.2, "grace_seconds": 2.0},
        scheduler={"resync_seconds": 2.0, "seed": 7},
        log={"json": False},
    )
    app, _ = build_app(settings)
    nc = await nats.connect(nats_url)
    broker = NatsBroker(nats_url)
    await broker.connect()
    async with TestApp(app):
        deployments = await open_bucket(broker, subjects.DEPLOYMENTS_BUCKET)
        assignments = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
        revisions = await open_revisions(broker)
        node = FakeNode(nc, assignments, "n1")
        node.start()
        c = Cluster(nc, broker, deployments, revisions, node, ObservedStore(connect(redis_url), cluster_name))
        await nc.subscribe(subjects.ROLLOUT_EVENTS, cb=c.on_rollout)
        store = c.store
        await wait_for(lambda: _node_known(store), what="the node recorded")
        try:
            yield c
        finally:
            await node.close()
    await broker.stop()
    await nc.close()


async def _node_known(store: ObservedStore) -> bool:
    return any(n.node_id == "n1" for n in await store.list_nodes())


def after(samples: list[Sample], start: int) -> list[Sample]:
    return samples[start:]


async def test_a_spec_change_rolls_out_within_surge_and_unavailable_bounds_and_marks_the_revision_healthy(cluster: Cluster):
    update = "{max_surge: 1, max_unavailable: 1}"
    await cluster.apply(manifest("web:v1", 4, update))
    await wait_for(lambda: len(cluster.running("web:v1")) == 4, what="4 v1 tasks ready")
    first = await wait_for(lambda: cluster.event("complete", 1), what="generation 1 complete")
    assert "all 4 replicas healthy" in first.message
    await wait_for(lambda: _healthy_at(cluster, 1), what="revision 1 marked healthy")

    start = len(cluster.node.samples)
    await cluster.apply(manifest("web:v2", 4, update))
    await wait_for(lambda: len(cluster.running("web:v2")) == 4 and not cluster.running("web:v1"), what="4 v2 tasks ready, no v1")
    await wait_for(lambda: cluster.event("complete", 2), what="generation 2 complete")
    assert (await cluster.revisions.get(KEY, 2)).healthy_at is not None

    seen = after(cluster.node.samples, start)
    # Every assignments value the node read: at most replicas + surge tasks, and at least
    # replicas - unavailable of them ready.
    assert max(len(s.assigned) for s in seen) <= 5
    assert min(len(s.ready) for s in seen) >= 3
    assert any(len(s.assigned) == 5 for s in seen), "the surge was used"
    steps = [e for e in cluster.events if e.generation == 2]
    assert steps[0].state == "progressing" and steps[-1].state == "complete"
    assert {"progressing", "complete"} == {e.state for e in steps}
    assert len({(e.state, e.message) for e in steps}) == len(steps), "an event only when the step changed"
    await wait_for(lambda: _summary_shows(cluster, 2, "complete"), what="the summary in redis shows the rollout complete")


async def _summary_shows(cluster: Cluster, generation: int, state: str) -> bool:
    summary = (await cluster.store.list_deployment_statuses()).get(KEY)
    return summary is not None and (summary.generation, summary.rollout_state) == (generation, state)


async def _healthy_at(cluster: Cluster, generation: int) -> bool:
    found = await cluster.revisions.get(KEY, generation)
    return found is not None and found.healthy_at is not None


async def test_a_canary_waits_for_promotion_then_the_rollout_completes(cluster: Cluster):
    update = "{canary: 1, max_surge: 1}"
    await cluster.apply(manifest("web:v1", 3, update))
    await wait_for(lambda: cluster.event("complete", 1), what="generation 1 complete")

    start = len(cluster.node.samples)
    await cluster.apply(manifest("web:v2", 3, update))
    paused = await wait_for(lambda: cluster.event("paused", 2), what="the canary paused the rollout")
    assert "1/1 canaries healthy; waiting for promotion" in paused.message
    # While paused, nothing more happens, whatever rounds run (a resync at least).
    resynced_at = len(cluster.node.samples)
    await wait_for(lambda: len(cluster.node.samples) > resynced_at + 25, what="a few more node polls")
    assert len(cluster.running("web:v1")) == 3 and len(cluster.running("web:v2")) == 1
    assert not await _healthy_at(cluster, 2)
    await wait_for(lambda: _summary_shows(cluster, 2, "paused"), what="the summary in redis shows the rollout paused")

    await cluster.promote()
    await wait_for(lambda: cluster.event("complete", 2), what="generation 2 complete after promotion")
    await wait_for(lambda: len(cluster.running("web:v2")) == 3 and not cluster.running("web:v1"), what="3 v2 tasks, no v1")
    assert await _healthy_at(cluster, 2)
    seen = after(cluster.node.samples, start)
    assert min(len(s.ready) for s in seen) >= 3, "max_unavailable 0: never fewer than 3 ready"
    assert max(len(s.assigned) for s in seen) <= 4, "the canary took the one surge place"


async def test_a_version_that_never_gets_ready_is_reverted_to_the_last_healthy_one(cluster: Cluster):
    update = "{max_surge: 1, max_unavailable: 0, healthy_deadline: 2s}"
    await cluster.apply(manifest("web:v1", 3, update))
    await wait_for(lambda: cluster.event("complete", 1), what="generation 1 complete")

    start = len(cluster.node.samples)
    await cluster.apply(manifest("web:bad", 3, update))
    reverted = await wait_for(lambda: cluster.event("reverted"), what="the rollout reverted")
    assert reverted.generation == 3 and reverted.from_generation == 2
    assert "not healthy within 2s of its creation (healthy_deadline)" in reverted.message
    record = await cluster.record()
    assert record.generation == 3 and record.deployment.spec.image == "web:v1"
    assert record.change_cause.startswith("auto-revert: ") and "healthy_deadline" in record.change_cause
    revision = await cluster.revisions.get(KEY, 3)
    assert revision is not None and revision.change_cause == record.change_cause

    await wait_for(lambda: cluster.event("complete", 3), what="generation 3 (v1 again) complete")
    await wait_for(lambda: _healthy_at(cluster, 3), what="revision 3 marked healthy")
    last = cluster.node.samples[-1]
    assert set(last.assigned.values()) == {"web:v1"} and len(last.assigned) == 3
    seen = after(cluster.node.samples, start)
    assert min(len(s.ready) for s in seen) >= 3, "the old version kept serving throughout"
    assert max(len(s.assigned) for s in seen) <= 4
    assert sum(e.state == "reverted" for e in cluster.events) == 1, "reverted once"
    assert not cluster.event("failed"), "a reverted rollout is reported as reverted, not failed"


async def test_without_auto_revert_a_failed_rollout_is_reported_once_and_left(cluster: Cluster):
    update = "{max_surge: 1, max_unavailable: 0, healthy_deadline: 1s, auto_revert: false}"
    await cluster.apply(manifest("web:v1", 2, update))
    await wait_for(lambda: cluster.event("complete", 1), what="generation 1 complete")
    await cluster.apply(manifest("web:bad", 2, update))
    failed = await wait_for(lambda: cluster.event("failed", 2), what="the rollout failed")
    assert "web" in failed.message and "healthy_deadline" in failed.message
    polls = len(cluster.node.samples)
    await wait_for(lambda: len(cluster.node.samples) > polls + 25, what="a few more node polls")
    assert (await cluster.record()).generation == 2, "left as it is"
    assert sum(e.state == "failed" for e in cluster.events) == 1
    assert len(cluster.running("web:v1")) == 2, "the old version keeps serving"
    await wait_for(lambda: _summary_shows(cluster, 2, "failed"), what="the summary in redis shows the rollout failed")


async def test_a_failed_canary_is_reverted_without_waiting_for_a_promotion(cluster: Cluster):
    update = "{canary: 1, max_surge: 1, healthy_deadline: 1s}"
    await cluster.apply(manifest("web:v1", 2, update))
    await wait_for(lambda: cluster.event("complete", 1), what="generation 1 complete")
    start = len(cluster.node.samples)
    await cluster.apply(manifest("web:bad", 2, update))
    await wait_for(lambda: cluster.event("reverted", 3), what="the canary's failure reverted the rollout")
    record = await cluster.record()
    assert record.promoted_generation == 3, "the way back is not held for a promotion"
    await wait_for(lambda: cluster.event("complete", 3), what="generation 3 (v1 again) complete")
    last = cluster.node.samples[-1]
    assert set(last.assigned.values()) == {"web:v1"} and len(last.assigned) == 2
    assert min(len(s.ready) for s in after(cluster.node.samples, start)) >= 2
