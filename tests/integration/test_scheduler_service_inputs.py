"""The scheduler service on a real nats-server and redis-server: bursts of events make one
round, garbage on the raw subscriptions is dropped, and a stall of its own loop does not
make it declare nodes down (while a node that really stops is still declared down)."""

from __future__ import annotations

import asyncio
import threading
import time
from functools import partial

import nats
import pytest
from faststream import TestApp
from faststream.nats import NatsBroker
from waiting import eventually

from comp_common import subjects
from comp_common.kv import list_models, open_bucket, put_model
from comp_common.manifest import parse_deployments
from comp_common.messages import Capacity, DeploymentEvent, DeploymentRecord, Heartbeat, NodeAssignments
from comp_scheduler.main import build_app
from comp_scheduler.model import NodeStatus
from comp_scheduler.settings import SchedulerSettings

DEPLOYMENT = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: %s}
spec: {replicas: 1, image: "comp/busybox:test", resources: {cpu: 0.1, memory: 16Mi}}
"""
GRACE = 1.0


wait_for = partial(eventually, timeout=15.0)


class Beater:
    """Heartbeats of some nodes from a thread with its own loop and connection, so that they
    keep coming while the scheduler's loop (the test's) is blocked."""

    def __init__(self, url: str, node_ids: list[str], period: float = 0.2):
        self.url, self.period = url, period
        self.beating = {n: True for n in node_ids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        nc = await nats.connect(self.url)
        seq = 0
        while not self._stop.is_set():
            seq += 1
            for node_id, on in list(self.beating.items()):
                if on:
                    hb = Heartbeat(
                        node_id=node_id, seq=seq, sent_at=time.time(), started_at=0, driver="fake",
                        capacity=Capacity(cpu=4.0, memory=4 * 1024**3), allocated=Capacity(cpu=0, memory=0),
                    )
                    await nc.publish(subjects.node_heartbeat(node_id), hb.model_dump_json().encode())
            await nc.flush()
            await asyncio.sleep(self.period)
        await nc.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
async def scheduler(nats_url, redis_url, cluster_name):
    settings = SchedulerSettings(
        cluster=cluster_name,
        nats={"url": nats_url},
        redis={"url": redis_url},
        liveness={"heartbeat_seconds": 0.2, "grace_seconds": GRACE},
        scheduler={"resync_seconds": 30.0, "seed": 11, "lease_seconds": 30.0},
        log={"json": False},
    )
    app, scheduler = build_app(settings)
    async with TestApp(app):
        await wait_for(lambda: scheduler.leading, what="the only scheduler leads")
        yield scheduler


@pytest.fixture
def downs(scheduler):
    """Every node the scheduler declares down, in order."""
    seen: list[str] = []
    refresh = scheduler.state.refresh_liveness

    def recording(now):
        down, up = refresh(now)
        seen.extend(down)
        return down, up

    scheduler.state.refresh_liveness = recording
    return seen


def ready(scheduler, *node_ids):
    return all((e := scheduler.state.nodes.get(n)) is not None and e.status is NodeStatus.READY for n in node_ids)


class Burst:
    """Two beating nodes, deployments stored and announced as the API does, and every round
    the scheduler runs from here on, with what it placed."""

    def __init__(self, scheduler, nc, deployments, assignments):
        self.scheduler, self.nc, self.deployments, self.assignments = scheduler, nc, deployments, assignments
        self.rounds: list[tuple[str, int]] = []
        inner = scheduler._round

        async def counting(why):
            plan = await inner(why)
            self.rounds.append((why, len(plan.places)))
            return plan

        scheduler._round = counting

    async def store(self, name: str) -> int:
        record = DeploymentRecord(deployment=parse_deployments(DEPLOYMENT % name)[0], created_at=time.time(), updated_at=time.time())
        return await put_model(self.deployments, f"default.{name}", record, None)

    async def announce(self, name: str, revision: int) -> None:
        event = DeploymentEvent(action="applied", namespace="default", name=name, revision=revision)
        await self.nc.publish(subjects.deployment_event("default", name), event.model_dump_json().encode())

    async def wait_placed(self, count: int) -> list[tuple[str, int]]:
        """The rounds that deployment events asked for, once ``count`` tasks are placed."""

        async def all_placed():
            found = await list_models(self.assignments, NodeAssignments)
            return sum(len(v.tasks) for v, _ in found.values()) == count

        await wait_for(all_placed, what=f"{count} tasks placed")
        return [(why, places) for why, places in self.rounds if "deployment default." in why]


@pytest.fixture
async def burst(scheduler, nats_url):
    beater = Beater(nats_url, ["n1", "n2"])
    nc = await nats.connect(nats_url)
    broker = NatsBroker(nats_url)
    await broker.connect()
    try:
        deployments = await open_bucket(broker, subjects.DEPLOYMENTS_BUCKET)
        assignments = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
        await wait_for(lambda: ready(scheduler, "n1", "n2"), what="nodes ready")
        yield Burst(scheduler, nc, deployments, assignments)
    finally:
        beater.close()
        await nc.close()
        await broker.stop()


async def test_a_burst_of_deployment_events_is_one_round(scheduler, burst):
    names = [f"d{i:02d}" for i in range(20)]
    # A round under way (held here) while the whole burst arrives: the next round takes it all.
    async with scheduler._lock:
        for name in names:
            await burst.announce(name, await burst.store(name))
        # Handled to the end: a handler asks for its round only after reading the record
        # (and the revisions) back, so a full ``desired`` alone could leave one ask to come.
        await wait_for(
            lambda: sum(why.startswith("deployment default.") for why, _ in scheduler._wanted) == 20,
            what="every event handled and its round asked for",
        )
    rounds = await burst.wait_placed(20)
    assert len(rounds) == 1, burst.rounds
    why, places = rounds[0]
    assert places == 20 and why.endswith("and 15 more")


async def test_an_applys_events_one_after_another_are_met_by_one_round(scheduler, burst):
    """No round is under way this time: the first event's round waits until the events stop
    coming (apply_quiet_seconds apart), so a many-deployment apply is one round."""
    scheduler.settings.scheduler.apply_quiet_seconds = 0.3  # CI machines stall; 20 events come 10 ms apart
    names = [f"q{i:02d}" for i in range(20)]
    revisions = {name: await burst.store(name) for name in names}
    for name in names:
        await burst.announce(name, revisions[name])
        await asyncio.sleep(0.01)
    rounds = await burst.wait_placed(20)
    assert rounds == [(rounds[0][0], 20)], burst.rounds


async def test_a_deployment_read_older_than_one_already_held_is_dropped(scheduler, nats_url, monkeypatch):
    """Deployment events are handled several at a time, so two reads of one key can return
    out of order: the older value must not replace the newer."""
    import comp_scheduler.service as service

    broker = NatsBroker(nats_url)
    await broker.connect()
    deployments = await open_bucket(broker, subjects.DEPLOYMENTS_BUCKET)
    try:
        old = DeploymentRecord(deployment=parse_deployments(DEPLOYMENT % "web")[0], created_at=1.0, updated_at=1.0)
        new = old.model_copy(update={"generation": 2, "updated_at": 2.0})
        first = await put_model(deployments, "default.web", old, None)
        await put_model(deployments, "default.web", new, first)
        event = DeploymentEvent(action="applied", namespace="default", name="web", revision=first)
        await scheduler.on_deployment_event(event)
        assert scheduler.state.desired["default.web"].generation == 2

        async def late_read(kv, key, model):
            return old, first  # the answer to a read sent before the update, arriving after

        monkeypatch.setattr(service, "read_model", late_read)
        await scheduler.on_deployment_event(event)
        assert scheduler.state.desired["default.web"].generation == 2, "the stale read was dropped"
    finally:
        await broker.stop()


async def test_garbage_on_the_raw_subscriptions_is_dropped_and_the_service_keeps_serving(scheduler, nats_url):
    nc = await nats.connect(nats_url)
    try:
        for subject in (subjects.node_heartbeat("g"), subjects.task_event("g")):
            for garbage in (b"\xff\xfe not json", b"{}", b'{"node_id": 5}', b"[]", bytes(range(256)) * 8):
                await nc.publish(subject, garbage)
        hb = Heartbeat(
            node_id="after-garbage", seq=1, sent_at=time.time(), started_at=0, driver="fake",
            capacity=Capacity(cpu=1.0, memory=1024**3), allocated=Capacity(cpu=0, memory=0),
        )
        await nc.publish(subjects.node_heartbeat("after-garbage"), hb.model_dump_json().encode())
        await wait_for(lambda: ready(scheduler, "after-garbage"), what="a valid heartbeat after the garbage")
        assert "g" not in scheduler.state.nodes
        assert all(not sub._closed for sub in scheduler.inputs), "the subscriptions live on"
    finally:
        await nc.close()


async def test_a_stalled_loop_declares_no_node_down_but_a_silent_node_still_goes_down(scheduler, nats_url, downs):
    beater = Beater(nats_url, ["s1", "s2"])
    try:
        await wait_for(lambda: ready(scheduler, "s1", "s2"), what="nodes ready")
        # The whole loop blocked for two graces, as a huge round once did: heartbeats keep
        # coming (from another thread) but wait in the socket.  Every node looks late when
        # the loop wakes; none is.
        time.sleep(2 * GRACE + 0.5)
        await asyncio.sleep(0.3)  # the checks that follow the stall
        await wait_for(lambda: ready(scheduler, "s1", "s2"), what="nodes still ready")
        assert downs == []

        beater.beating["s1"] = False  # s1 really stops
        await wait_for(lambda: downs == ["s1"], what="the silent node declared down")
        assert ready(scheduler, "s2")
    finally:
        beater.close()
