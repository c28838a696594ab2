"""Start order on real containers: ``web`` depends on ``db`` being healthy, both applied in one
manifest.  db's readiness page appears only a few seconds after it starts, so web's
replicas must wait that long; the order is read from the agent's own status events, in
the order NATS delivered them, never from timing."""

from __future__ import annotations

import asyncio
import json

import httpx
import nats
import pytest
from waiting import wait_until

from comp_cli.local import LocalCluster
from comp_common.broker import server_caught_up
from comp_common import subjects

pytestmark = pytest.mark.docker

MANIFEST = """
apiVersion: comp/v1
kind: Deployment
metadata: {{name: db}}
spec:
  replicas: 1
  image: {image}
  command: ["sh", "-c", "mkdir -p /www; (sleep 3; echo ok > /www/ready.html) & exec httpd -f -p 80 -h /www"]
  resources: {{cpu: 0.05, memory: 16Mi}}
  ports: [{{container_port: 80, name: http}}]
  stop_grace_period: 1s
  health:
    readiness: {{http: {{path: /ready.html, port: http}}, interval: 0.5s, failure_threshold: 1}}
---
apiVersion: comp/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  image: {image}
  command: [sleep, "3600"]
  resources: {{cpu: 0.05, memory: 16Mi}}
  stop_grace_period: 1s
  depends_on: [db]
"""


async def test_web_starts_only_after_db_is_healthy(one_node_cluster: LocalCluster, busybox_image: str) -> None:
    cluster = one_node_cluster
    api = cluster.config.api_url
    seen: list[dict] = []  # every task status of either deployment, in delivery order

    async def on_status(msg) -> None:
        status = json.loads(msg.data)
        if status.get("deployment") in ("default.db", "default.web"):
            seen.append(status)

    nc = await nats.connect(cluster.config.nats_url)
    await nc.subscribe(subjects.TASK_EVENTS, cb=on_status)
    await server_caught_up(nc)

    def web_state() -> dict:
        return httpx.get(f"{api}/v1/deployments/default/web", timeout=5).json()["status"] or {}

    try:
        response = httpx.post(f"{api}/v1/apply", content=MANIFEST.format(image=busybox_image), timeout=30)
        assert response.status_code == 200, response.text
        held = await asyncio.to_thread(
            wait_until, lambda: "waiting for db" in web_state().get("pending_reason", "") and web_state(), 30,
            "web reported as waiting for db",
        )
        assert "waiting for db to be healthy" in held["pending_reason"]
        await asyncio.to_thread(
            wait_until, lambda: len([s for s in seen if s["deployment"] == "default.web" and s["state"] == "running"]) >= 2,
            60, "both web replicas running",
        )
    finally:
        await nc.close()

    db_ready = next(i for i, s in enumerate(seen) if s["deployment"] == "default.db" and s["state"] == "running" and s.get("ready"))
    web_first = next(i for i, s in enumerate(seen) if s["deployment"] == "default.web")
    assert db_ready < web_first, f"web's first status came before db was ready: {seen[: web_first + 1]}"
    # db ran for a while unready first: the gate waited for readiness, not just for db to run.
    assert any(s["deployment"] == "default.db" and s["state"] == "running" and not s.get("ready") for s in seen[:db_ready])
