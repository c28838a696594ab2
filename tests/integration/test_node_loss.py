"""A lost node on real Docker: SIGKILL of a node agent, its tasks run elsewhere; when it
comes back, the copies it still runs are stopped so no replica runs twice."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster
from comp_common import labels

pytestmark = pytest.mark.docker

MANIFEST = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: sleepers}
spec:
  replicas: 4
  image: %s
  command: [sleep, "3600"]
  resources: {cpu: 0.05, memory: 16Mi}
"""


@pytest.fixture
def two_nodes(tmp_path, docker_client, busybox_image):
    config = ClusterConfig.private(tmp_path / "cluster", "loss", nodes=2)
    local = LocalCluster(config)
    local.start()
    yield local
    local.stop(purge_workloads=True)


def test_sigkilled_agent_tasks_move_and_duplicates_go_when_it_returns(two_nodes, docker_client, busybox_image):
    api = two_nodes.config.api_url
    lost_node, survivor = two_nodes.config.node_ids()

    def tasks():
        return [t for t in httpx.get(f"{api}/v1/tasks", timeout=10).json() if t["deployment"] == "default.sleepers"]

    def running_on(node=None):
        found = [t for t in tasks() if t["state"] == "running" and (node is None or t["node_id"] == node)]
        return found

    def container_ids():
        return {
            c["Id"]
            for c in docker_client.api.containers(
                filters={"label": [f"{labels.CLUSTER}={two_nodes.config.cluster}", f"{labels.DEPLOYMENT}=default.sleepers"]}
            )
        }

    assert httpx.post(f"{api}/v1/apply", content=MANIFEST % busybox_image, timeout=30).status_code == 200
    wait_until(lambda: len(running_on()) == 4, what="4 running")
    before = {t["task_id"]: t["node_id"] for t in running_on()}
    assert set(before.values()) == {lost_node, survivor}, "spread over both nodes"
    moved = {task_id for task_id, node in before.items() if node == lost_node}

    two_nodes.kill(f"nodeagent-{lost_node}", signal.SIGKILL)
    after = wait_until(
        lambda: (r := running_on(survivor)) and len(r) == 4 and r, timeout=20, what="all 4 running on the surviving node"
    )
    assert not moved & {t["task_id"] for t in after}, "lost tasks are replaced by new ones"
    # The killed agent's containers still run: the engine does not know the agent died.
    assert len(container_ids()) == 4 + len(moved)

    two_nodes.start_agent(lost_node)

    def stale_copies() -> set[str]:
        found = docker_client.api.containers(
            all=True, filters={"label": [f"{labels.CLUSTER}={two_nodes.config.cluster}", f"{labels.NODE}={lost_node}"]}
        )
        return {c["Labels"][labels.TASK_ID] for c in found} & moved

    wait_until(lambda: not stale_copies(), timeout=30, what="the returning node removes its stale copies")
    # Then the rebalancer spreads the deployment back over both nodes, one move at a time,
    # each new copy running before the old one goes.
    lowest = 4
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now_running = running_on()
        lowest = min(lowest, len(now_running))
        assert not moved & {t["task_id"] for t in now_running}, "a replaced task never runs again"
        if len(now_running) == 4 and {t["node_id"] for t in now_running} == {lost_node, survivor} and len(container_ids()) == 4:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not spread back out: {running_on()}")
    assert lowest >= 4, "rebalancing must never leave fewer than the desired replicas running"


def test_drain_moves_tasks_without_dropping_below_the_replica_count(two_nodes, docker_client, busybox_image):
    api = two_nodes.config.api_url
    draining, other = two_nodes.config.node_ids()

    def running() -> list[dict]:
        return [t for t in httpx.get(f"{api}/v1/tasks", timeout=10).json()
                if t["deployment"] == "default.sleepers" and t["state"] == "running"]

    assert httpx.post(f"{api}/v1/apply", content=MANIFEST % busybox_image, timeout=30).status_code == 200
    wait_until(lambda: len(running()) == 4, what="4 running")
    assert {t["node_id"] for t in running()} == {draining, other}

    response = httpx.post(f"{api}/v1/nodes/{draining}/drain", timeout=10)
    assert response.status_code == 200 and response.json()["draining"] is True
    lowest = 4
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        now_running = running()
        lowest = min(lowest, len(now_running))
        if len(now_running) == 4 and all(t["node_id"] == other for t in now_running):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"drain did not finish: {running()}")
    assert lowest >= 4, "a drain must never leave fewer than the desired replicas running"
    wait_until(
        lambda: not docker_client.api.containers(
            filters={"label": [f"{labels.CLUSTER}={two_nodes.config.cluster}", f"{labels.NODE}={draining}"]}
        ),
        timeout=30, what="no containers left on the drained node",
    )
    # Cordoned: a scale-up goes to the other node only.
    assert httpx.post(f"{api}/v1/apply", content=(MANIFEST % busybox_image).replace("replicas: 4", "replicas: 6"), timeout=30).status_code == 200
    wait_until(lambda: len(running()) == 6, what="6 running")
    assert {t["node_id"] for t in running()} == {other}
