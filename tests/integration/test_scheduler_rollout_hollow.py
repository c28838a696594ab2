"""A rollout end to end on real processes (nats-server, redis-server, api, scheduler, two
hollow agents): `apply` of a new image rolls the deployment over without its running tasks
dropping below replicas - max_unavailable, the api shows the rollout complete and the
revision healthy, and every task carries the deployment's generation and health spec."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster
from comp_common import subjects


def manifest(image: str) -> str:
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 4
  image: {image}
  resources: {{cpu: 0.1, memory: 16Mi}}
  ports: [{{container_port: 80}}]
  health:
    readiness: {{http: {{path: /, port: 80}}}}
  update: {{max_surge: 1, max_unavailable: 1}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    config = ClusterConfig.private(tmp_path, "roll", nodes=0, heartbeat_seconds=0.5, grace_seconds=3.0)
    local = LocalCluster(config)
    local.start()
    try:
        hollow = {"COMP_NODEAGENT__DRIVER": "hollow", "COMP_NODEAGENT__RESYNC_SECONDS": "2"}
        local.start_agent("a", hollow)
        local.start_agent("b", hollow)
        yield local
    finally:
        local.stop(purge_workloads=False)


def tasks(api: str) -> list[dict]:
    return httpx.get(f"{api}/v1/tasks", params={"deployment": "default.web"}, timeout=5).json()


def rollout(api: str) -> dict:
    return httpx.get(f"{api}/v1/deployments/default/web/rollout", timeout=5).json()


def apply(api: str, image: str) -> None:
    response = httpx.post(f"{api}/v1/apply", content=manifest(image), timeout=30)
    assert response.status_code == 200, response.text


class RunningWatch:
    """The deployment's running tasks as the agents' own status events tell it, with the
    fewest seen since ``arm``."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.fewest: int | None = None

    async def on_status(self, msg) -> None:
        status = json.loads(msg.data)
        if status.get("deployment") != "default.web":
            return
        if status["state"] == "running":
            self.running.add(status["task_id"])
        else:
            self.running.discard(status["task_id"])
        if self.fewest is not None:
            self.fewest = min(self.fewest, len(self.running))

    def arm(self) -> None:
        self.fewest = len(self.running)


async def test_an_apply_rolls_out_on_hollow_agents_and_marks_the_revision_healthy(cluster: LocalCluster) -> None:
    api = cluster.config.api_url
    await asyncio.to_thread(
        wait_until, lambda: len([n for n in httpx.get(f"{api}/v1/nodes", timeout=5).json() if n["state"] == "ready"]) == 2,
        30, "both hollow nodes ready",
    )
    nc = await nats.connect(cluster.config.nats_url)
    watch = RunningWatch()
    await nc.subscribe(subjects.TASK_EVENTS, cb=watch.on_status)
    try:
        apply(api, "web:v1")
        await asyncio.to_thread(
            wait_until, lambda: (rollout(api).get("last_event") or {}).get("state") == "complete", 60, "generation 1 complete"
        )
        await asyncio.to_thread(wait_until, lambda: len(watch.running) == 4, 30, "4 running, as the events tell")
        watch.arm()

        apply(api, "web:v2")

        def complete_at_2() -> dict | None:
            event = rollout(api).get("last_event") or {}
            return event if event.get("state") == "complete" and event.get("generation") == 2 else None

        event = await asyncio.to_thread(wait_until, complete_at_2, 60, "generation 2 complete")
        assert "all 4 replicas healthy" in event["message"]
        revisions = httpx.get(f"{api}/v1/deployments/default/web/revisions", timeout=5).json()["revisions"]
        assert [r["generation"] for r in revisions if r["healthy_at"] is not None] == [1, 2]
        await asyncio.to_thread(
            wait_until, lambda: sorted(t["state"] for t in tasks(api)) == ["running"] * 4, 30, "4 tasks, all running"
        )
        assert watch.fewest is not None and watch.fewest >= 3, f"running dipped to {watch.fewest} (min 3)"
        # What `comp describe deployment` shows: the scheduler's summary, through the API.
        state = await asyncio.to_thread(
            wait_until,
            lambda: (s := httpx.get(f"{api}/v1/deployments/default/web", timeout=5).json()["status"])
            and s["rollout_state"] == "complete" and s,
            30, "the deployment view shows the completed rollout",
        )
        assert state["rollout_generation"] == 2 and "all 4 replicas healthy" in state["rollout_message"]
    finally:
        await nc.close()
