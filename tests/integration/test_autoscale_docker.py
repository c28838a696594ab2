"""Autoscaling end to end on real Docker: CPU burners under a CPU limit scale up, and back
down once the load is gone and the (shortened) window has passed; an httpd deployment
scales on its request rate through its service VIP."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
from click.testing import CliRunner

from comp_cli import main as cli_main

from comp_cli.local import ClusterConfig, LocalCluster
from comp_common import subjects
from comp_common.messages import CapacityEvent
from waiting import wait_until

pytestmark = pytest.mark.docker

BURNERS = """
kind: Deployment
metadata: {name: burn}
spec:
  replicas: 1
  image: comp/busybox:test
  # Busy until /tmp/stop exists: the test turns the load off with one file per replica.
  command: ["sh", "-c", "while :; do if [ -f /tmp/stop ]; then sleep 1; fi; done"]
  resources: {cpu: 0.2, memory: 16Mi}
  stop_grace_period: 0s
  autoscale:
    min: 1
    max: 3
    metric: cpu
    target: 0.5
    scale_up: {period: 1s}
    scale_down: {stabilization: 6s, period: 1s}
"""

# More than any node here has: pending, and the capacity summary says it does not fit.
HUGE = """
kind: Deployment
metadata: {name: huge}
spec: {replicas: 1, image: comp/busybox:test, command: [sleep, "3600"], resources: {cpu: 500, memory: 16Mi}}
"""

WEB = """
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  image: comp/busybox:test
  command: ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"]
  resources: {cpu: 0.05, memory: 16Mi}
  ports: [{container_port: 8080, name: http}]
  stop_grace_period: 0s
  autoscale:
    min: 1
    max: 3
    metric: rps
    target: 5
    scale_up: {period: 1s}
---
kind: Service
metadata: {name: web}
spec:
  selector: {deployment: web}
  ports: [{name: http, port: 80, target_port: http}]
"""


@pytest.fixture
def cluster(tmp_path: Path, docker_client, busybox_image) -> Iterator[LocalCluster]:
    config = ClusterConfig.private(
        tmp_path / "cluster", "scale", nodes=1, networking=True, vip_cidr=f"10.98.{random.randrange(256)}.0/24",
        extra_env={
            "COMP_NODEAGENT__METRICS_SECONDS": "1",
            "COMP_AUTOSCALER__METRICS_SECONDS": "1",
            "COMP_LB__RATES_SECONDS": "1",
        },
    )
    local = LocalCluster(config)
    local.start()
    try:
        yield local
    finally:
        local.stop(purge_workloads=True)


async def capacity_events(cluster: LocalCluster) -> list[CapacityEvent]:
    """Every capacity event so far, from the event log."""
    nc = await nats.connect(cluster.config.nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subjects.CAPACITY_EVENTS, ordered_consumer=True)
        found = []
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                return found
            found.append(CapacityEvent.model_validate_json(msg.data))
    finally:
        await nc.close()


def replicas(cluster: LocalCluster, name: str) -> int:
    return httpx.get(f"{cluster.config.api_url}/v1/deployments/default/{name}", timeout=5).json()["manifest"]["spec"]["replicas"]


def running(docker_client, cluster: LocalCluster, name: str) -> list:
    return docker_client.containers.list(filters={"label": [f"comp.cluster={cluster.config.cluster}", f"comp.deployment=default.{name}"]})


def apply(cluster: LocalCluster, manifest: str) -> None:
    answer = httpx.post(f"{cluster.config.api_url}/v1/apply", content=manifest, timeout=10)
    assert answer.status_code < 300, answer.text


def test_cpu_burners_scale_up_and_back_down_after_the_window(cluster, docker_client):
    apply(cluster, BURNERS)
    # One burner at its whole 0.2-core limit against a 0.5 target: 1 -> 2 -> 3 (max).
    wait_until(lambda: replicas(cluster, "burn") == 3, timeout=90, what="3 replicas on CPU load")
    wait_until(lambda: len(running(docker_client, cluster, "burn")) == 3, timeout=60, what="3 burners running")
    # What they use, as comp top shows it.
    def burning():
        tasks = [t for t in httpx.get(f"{cluster.config.api_url}/v1/top/tasks", timeout=5).json() if t["deployment"] == "default.burn"]
        return tasks if len(tasks) == 3 and all(t["cpu_share"] > 0.5 for t in tasks) else None

    wait_until(burning, timeout=20, what="three burners near their limit in /v1/top/tasks")
    [node] = httpx.get(f"{cluster.config.api_url}/v1/top/nodes", timeout=5).json()
    assert node["used_cpu"] > 0.3 and node["used_memory"] > 0 and node["allocated"]["cpu"] >= 0.6
    shown = CliRunner().invoke(cli_main.cli, ["--api", cluster.config.api_url, "top", "nodes"])
    assert shown.exit_code == 0 and node["node_id"] in shown.output and "cluster: 1/1 nodes ready" in shown.output, shown.output
    assert httpx.get(f"{cluster.config.api_url}/v1/capacity", timeout=5).json()["fits"] is True
    apply(cluster, HUGE)
    summary = httpx.get(f"{cluster.config.api_url}/v1/capacity", timeout=5).json()
    assert summary["fits"] is False and "cpu: 500.6 cores desired" in summary["shortfall"], summary
    short = wait_until(lambda: [e for e in asyncio.run(capacity_events(cluster)) if not e.fits], timeout=10, what="a capacity event")
    assert short[-1].pending["default.huge"]["count"] == 1
    assert httpx.delete(f"{cluster.config.api_url}/v1/deployments/default/huge", timeout=5).status_code < 300
    wait_until(lambda: asyncio.run(capacity_events(cluster))[-1].fits, timeout=10, what="fits again, said by an event")

    for container in running(docker_client, cluster, "burn"):
        container.exec_run(["touch", "/tmp/stop"])
    idle_at = time.monotonic()
    wait_until(lambda: replicas(cluster, "burn") == 1, timeout=60, what="back to 1 once idle")
    assert time.monotonic() - idle_at >= 6.0, "scaled down before the 6 s window had passed"
    decisions = httpx.get(f"{cluster.config.api_url}/v1/deployments/default/burn/autoscale", params={"count": 20}).json()
    assert any(d["current"] < d["replicas"] and "cpu" in d["reason"] for d in decisions)
    assert decisions[0]["replicas"] == 1


def test_an_httpd_scales_on_its_request_rate_through_the_vip(cluster, docker_client):
    apply(cluster, WEB)
    vip = wait_until(
        lambda: (v := httpx.get(f"{cluster.config.api_url}/v1/namespaces/default/services/web", timeout=5).json()).get("vip")
        and v.get("endpoints") and v["vip"],
        timeout=60, what="the service's VIP with an endpoint",
    )
    stop = threading.Event()

    def load() -> None:  # ~30 connections a second against a target of 5 per replica
        while not stop.is_set():
            try:
                urllib.request.urlopen(f"http://{vip}/", timeout=1).read()
            except OSError:
                pass
            time.sleep(0.03)

    threading.Thread(target=load, daemon=True).start()
    try:
        wait_until(lambda: replicas(cluster, "web") == 3, timeout=60, what="3 replicas on request rate")
    finally:
        stop.set()
    decisions = httpx.get(f"{cluster.config.api_url}/v1/deployments/default/web/autoscale", params={"count": 20}).json()
    assert any("rps" in d["reason"] and d["replicas"] > d["current"] for d in decisions), decisions
