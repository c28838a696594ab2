"""Auto-revert on real containers (nats-server, redis-server, api, scheduler, one docker
agent, busybox httpd): a new version whose readiness check asks for a page that 404s
never gets ready; after its healthy_deadline the scheduler reverts to the last healthy
revision as a new generation, and the old containers serve throughout."""

from __future__ import annotations

import asyncio
import json

import httpx
import nats
import pytest
from httpd_web import httpd_web
from waiting import wait_until

from comp_cli.local import LocalCluster
from comp_common import subjects

pytestmark = pytest.mark.docker

REPLICAS = 2


def manifest(image: str, ready_page: str) -> str:
    return httpd_web(image, replicas=REPLICAS, ready_page=ready_page,
                     update="{max_surge: 1, max_unavailable: 0, healthy_deadline: 5s}")


def apply(api: str, text: str) -> None:
    response = httpx.post(f"{api}/v1/apply", content=text, timeout=30)
    assert response.status_code == 200, response.text


def last_event(api: str) -> dict:
    return httpx.get(f"{api}/v1/deployments/default/web/rollout", timeout=5).json().get("last_event") or {}


class ReadyWatch:
    """Which of the deployment's tasks are running and ready, from the agent's own status
    events; and, once armed with the old version's tasks, the fewest of those ever ready."""

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.old: set[str] = set()
        self.fewest_old: int | None = None

    async def on_status(self, msg) -> None:
        status = json.loads(msg.data)
        if status.get("deployment") != "default.web":
            return
        if status["state"] == "running" and status.get("ready"):
            self.ready.add(status["task_id"])
        else:
            self.ready.discard(status["task_id"])
        if self.fewest_old is not None:
            self.fewest_old = min(self.fewest_old, len(self.ready & self.old))

    def arm(self) -> None:
        self.old = set(self.ready)
        self.fewest_old = len(self.old)


async def test_a_version_that_never_gets_ready_is_reverted_and_the_old_one_serves_throughout(
    one_node_cluster: LocalCluster, busybox_image: str
) -> None:
    cluster = one_node_cluster
    api = cluster.config.api_url
    nc = await nats.connect(cluster.config.nats_url)
    watch = ReadyWatch()
    await nc.subscribe(subjects.TASK_EVENTS, cb=watch.on_status)

    def wait(predicate, seconds: float, what: str):
        return asyncio.to_thread(wait_until, predicate, seconds, what)

    try:
        apply(api, manifest(busybox_image, "/ready.html"))
        await wait(lambda: last_event(api).get("state") == "complete", 90, "generation 1 complete")
        await wait(lambda: len(watch.ready) == REPLICAS, 30, f"{REPLICAS} ready, as the agent's events tell")
        watch.arm()

        apply(api, manifest(busybox_image, "/missing.html"))

        def reverted() -> dict | None:
            event = last_event(api)
            return event if event.get("state") in ("reverted", "complete") and event.get("generation") == 3 else None

        await wait(reverted, 90, "the failed rollout reverted as generation 3")
        history = httpx.get(f"{api}/v1/deployments/default/web/revisions", timeout=5).json()["revisions"]
        current = history[-1]
        assert current["generation"] == 3 and current["change_cause"].startswith("auto-revert: ")
        assert "healthy_deadline" in current["change_cause"]

        await wait(lambda: last_event(api).get("state") == "complete" and last_event(api).get("generation") == 3, 60,
                   "generation 3 complete")
        await wait(lambda: len(httpx.get(f"{api}/v1/tasks", params={"deployment": "default.web"}, timeout=5).json()) == REPLICAS,
                   30, "the failed version's tasks gone")
        tasks = httpx.get(f"{api}/v1/tasks", params={"deployment": "default.web"}, timeout=5).json()
        assert {t["task_id"] for t in tasks} == watch.old, "the old containers were kept: they run the version returned to"
        assert watch.fewest_old == REPLICAS, f"old tasks ready dipped to {watch.fewest_old} (max_unavailable 0)"
        history = httpx.get(f"{api}/v1/deployments/default/web/revisions", timeout=5).json()["revisions"]
        assert [r["generation"] for r in history if r["healthy_at"] is not None] == [1, 3]
    finally:
        await nc.close()
