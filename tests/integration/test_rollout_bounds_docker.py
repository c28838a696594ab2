"""A rolling update to a healthy version on real containers stays within its bounds: at
most replicas + max_surge tasks not told to stop (from the scheduler's rollout events), and
never fewer than replicas - max_unavailable ready (from the agent's status events)."""

from __future__ import annotations

import asyncio
import json

import httpx
import nats
import pytest
from httpd_web import httpd_web
from waiting import wait_until

from comp_cli.local import LocalCluster
from comp_common.broker import server_caught_up
from comp_common import subjects

pytestmark = pytest.mark.docker

REPLICAS, SURGE = 4, 1


def manifest(image: str, version: int) -> str:
    return httpd_web(image, replicas=REPLICAS, env=f'{{VERSION: "{version}"}}',
                     update=f"{{max_surge: {SURGE}, max_unavailable: 0}}")


async def test_a_healthy_rollout_stays_within_surge_and_unavailability(one_node_cluster: LocalCluster, busybox_image: str) -> None:
    cluster = one_node_cluster
    api = cluster.config.api_url
    ready: set[str] = set()
    fewest_ready: list[int] = []
    events: list[dict] = []

    async def on_status(msg) -> None:
        status = json.loads(msg.data)
        if status.get("deployment") != "default.web":
            return
        if status["state"] == "running" and status.get("ready"):
            ready.add(status["task_id"])
        else:
            ready.discard(status["task_id"])
        if fewest_ready:
            fewest_ready.append(len(ready))

    async def on_rollout(msg) -> None:
        events.append(json.loads(msg.data))

    def tasks() -> list[dict]:
        return httpx.get(f"{api}/v1/tasks", params={"deployment": "default.web"}, timeout=5).json()

    def apply(version: int) -> None:
        response = httpx.post(f"{api}/v1/apply", content=manifest(busybox_image, version), timeout=30)
        assert response.status_code == 200, response.text

    nc = await nats.connect(cluster.config.nats_url)
    await nc.subscribe(subjects.TASK_EVENTS, cb=on_status)
    await nc.subscribe(subjects.ROLLOUT_EVENTS, cb=on_rollout)
    await server_caught_up(nc)
    try:
        apply(1)
        await asyncio.to_thread(wait_until, lambda: len(ready) == REPLICAS, 90, f"{REPLICAS} version-1 tasks ready")
        old = {t["task_id"] for t in tasks()}
        assert len(old) == REPLICAS
        fewest_ready.append(len(ready))
        events.clear()

        apply(2)
        await asyncio.to_thread(
            wait_until, lambda: any(e["state"] == "complete" and e["generation"] == 2 for e in events), 90,
            "generation 2 complete",
        )
        await asyncio.to_thread(
            wait_until, lambda: len(t := tasks()) == REPLICAS and not ({x["task_id"] for x in t} & old) and t, 30,
            "only new tasks left",
        )
    finally:
        await nc.close()

    # Replay the steps: tasks not told to stop = the old ones + started - stopped.
    live = set(old)
    most = len(live)
    for event in (e for e in events if e["generation"] == 2):
        live -= set(event["stopped"])
        live |= set(event["started"])
        most = max(most, len(live))
    assert sum(len(e["started"]) for e in events if e["generation"] == 2) == REPLICAS, "one new task per replica"
    assert most <= REPLICAS + SURGE, f"{most} tasks not told to stop at once (bound {REPLICAS + SURGE})"
    assert min(fewest_ready) >= REPLICAS, f"ready dipped to {min(fewest_ready)} (max_unavailable 0)"
