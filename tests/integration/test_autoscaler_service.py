"""The autoscaler service on a real nats-server and redis-server, fed synthetic metrics:
it scales up on load through the deployments bucket, down once the (shortened) window has
passed, holds on missing metrics, follows a custom metric, records every decision, drops
garbage, and only the leader of two writes."""

from __future__ import annotations

import time
from functools import partial

import nats
import pytest
from faststream import TestApp
from waiting import eventually

from comp_common import subjects
from comp_common.manifest import parse_deployments
from comp_common.messages import CustomMetric, DeploymentRecord, NodeMetrics, TaskUsage
from comp_common.observed import ObservedStore, connect
from comp_autoscaler.main import build_app
from comp_autoscaler.settings import AutoscalerSettings

wait_for = partial(eventually, timeout=15.0)
WEB = """
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  image: x
  resources: {cpu: 0.5}
  autoscale:
    min: 1
    max: 6
    metric: %s
    target: %s
    scale_up: {period: 1s}
    scale_down: {stabilization: 2s, period: 1s}
"""


def settings(nats_url, redis_url, cluster_name, instance="a"):
    return AutoscalerSettings(
        cluster=cluster_name, nats={"url": nats_url}, redis={"url": redis_url}, log={"json": False},
        autoscaler={"evaluate_seconds": 0.1, "metrics_seconds": 0.2, "lease_seconds": 2.0, "instance": instance},
    )


class World:
    def __init__(self, nc, kv):
        self.nc, self.kv = nc, kv

    async def apply(self, metric="cpu", target="0.5"):
        deployment = parse_deployments(WEB % (metric, target))[0]
        record = DeploymentRecord(deployment=deployment, created_at=time.time(), updated_at=time.time())
        await self.kv.put("default.web", record.model_dump_json().encode())

    async def replicas(self):
        entry = await self.kv.get("default.web")
        return DeploymentRecord.model_validate_json(entry.value).deployment.spec.replicas

    async def load(self, share: float, tasks: int):
        usage = [TaskUsage(task_id=f"t{i}", deployment="default.web", cpu_cores=share / 2, cpu_share=share,
                           memory_bytes=1, memory_share=0.1) for i in range(tasks)]
        metrics = NodeMetrics(node_id="n1", at=time.time(), period_seconds=0.2, tasks=usage)
        await self.nc.publish(subjects.node_metrics("n1"), metrics.model_dump_json().encode())


@pytest.fixture
async def world(nats_url, redis_url, cluster_name):
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().create_key_value(bucket=subjects.DEPLOYMENTS_BUCKET, history=10)
    app, autoscaler = build_app(settings(nats_url, redis_url, cluster_name))
    async with TestApp(app):
        await wait_for(lambda: autoscaler.leading, what="the only autoscaler leads")
        yield World(nc, kv), autoscaler
    await nc.close()


async def keep_loading(world, share, until):
    """Metrics every 0.2 s, as agents send them, while ``until`` is false."""
    import asyncio

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        await world.load(share, await world.replicas())
        if await until():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("timed out")


async def test_up_on_load_down_after_the_window_and_decisions_kept(world, redis_url, cluster_name):
    world, autoscaler = world
    await world.apply()
    # 0.9 of the limit against a 0.5 target: 2 -> ceil(2 x 1.8) = 4.
    await keep_loading(world, 0.9, lambda: _at_least(world, 4))
    assert await world.replicas() in (4, 6)  # 4, then maybe 4 x 1.8 -> 6 (max) on the next samples
    ups = [d for d in autoscaler.decisions if d.changed and d.replicas > d.current]
    assert ups and ups[0].current == 2 and ups[0].replicas == 4 and "cpu 0.90 of target 0.50" in ups[0].reason
    # Idle: down only once the 2 s scale-down window has passed, and to min at most.
    low_since = time.monotonic()
    await keep_loading(world, 0.05, lambda: _equals(world, 1))
    assert time.monotonic() - low_since >= 2.0, "scaled down before the window passed"
    kept = await ObservedStore(connect(redis_url), cluster_name).list_autoscale_decisions("default.web")
    assert kept[0].replicas == 1 and any(d.replicas > d.current for d in kept)


async def test_missing_metrics_hold_and_garbage_is_dropped(world):
    world, autoscaler = world
    await world.apply()
    await world.nc.publish(subjects.node_metrics("n1"), b"{not json")
    await world.nc.publish(subjects.CUSTOM_METRICS.replace("*", "x"), b"[]")
    import asyncio

    await asyncio.sleep(1.0)  # five rounds with no metrics at all
    assert await world.replicas() == 2
    assert autoscaler.leading  # and still serving: load now scales it
    await keep_loading(world, 0.9, lambda: _at_least(world, 3))


async def test_a_custom_metric(world):
    world, autoscaler = world
    await world.apply(metric="queue", target="10")
    # 50 queued for 2 replicas at 10 each: 5.
    deadline = time.monotonic() + 15
    import asyncio

    while await world.replicas() != 5:
        assert time.monotonic() < deadline, autoscaler.decisions[-3:]
        metric = CustomMetric(name="queue", value=50, at=time.time())
        await world.nc.publish(subjects.custom_metric("default", "web"), metric.model_dump_json().encode())
        await asyncio.sleep(0.2)


async def test_only_the_leader_writes(nats_url, redis_url, cluster_name):
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().create_key_value(bucket=subjects.DEPLOYMENTS_BUCKET, history=10)
    one, a = build_app(settings(nats_url, redis_url, cluster_name, "a"))
    two, b = build_app(settings(nats_url, redis_url, cluster_name, "b"))
    try:
        async with TestApp(one), TestApp(two):
            await wait_for(lambda: a.leading or b.leading, what="one of two leads")
            assert not (a.leading and b.leading)
            world = World(nc, kv)
            await world.apply()
            await keep_loading(world, 0.9, lambda: _at_least(world, 4))
            leader, standby = (a, b) if a.leading else (b, a)
            assert leader.decisions and not standby.decisions
    finally:
        await nc.close()


async def _at_least(world, n):
    return await world.replicas() >= n


async def _equals(world, n):
    return await world.replicas() == n


async def test_a_task_its_node_no_longer_lists_is_forgotten(world):
    world, autoscaler = world
    await world.apply()
    await world.load(0.5, 3)
    await wait_for(lambda: len(autoscaler.usage.get("default.web", {})) == 3, what="three tasks' usage")
    await world.load(0.5, 1)
    await wait_for(lambda: set(autoscaler.usage.get("default.web", {})) == {"t0"}, what="t1 and t2 forgotten")
