"""Agent-declared taints (COMP_NODEAGENT__TAINTS) on real processes: the heartbeat on a real
nats-server carries them, a bad value stops the agent with a line naming the entry, and the
scheduler keeps untolerating replicas off the tainted node (hollow agents, no Docker)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster, _bin
from comp_common import subjects
from comp_common.messages import Heartbeat, Taint

TAINTS = "dedicated=gpu:NoSchedule,spot:NoSchedule"


def agent_env(nats_url: str, node_id: str, taints: str) -> dict[str, str]:
    return {
        **os.environ,
        "COMP_NATS__URL": nats_url,
        "COMP_NODEAGENT__NODE_ID": node_id,
        "COMP_NODEAGENT__DRIVER": "hollow",
        "COMP_NODEAGENT__TAINTS": taints,
        "COMP_LIVENESS__HEARTBEAT_SECONDS": "0.2",
    }


async def test_heartbeats_carry_the_declared_taints(nats_url: str, tmp_path: Path) -> None:
    nc = await nats.connect(nats_url)
    heartbeats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_heartbeat(msg) -> None:
        await heartbeats.put(Heartbeat.model_validate_json(msg.data))

    await nc.subscribe(subjects.node_heartbeat("tainted-1"), cb=on_heartbeat)
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [_bin("comp-nodeagent")], env=agent_env(nats_url, "tainted-1", TAINTS),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        # Two, so the taints are in every heartbeat, not only the first.
        first = await asyncio.wait_for(heartbeats.get(), 30)
        second = await asyncio.wait_for(heartbeats.get(), 30)
    finally:
        agent.terminate()
        agent.wait(10)
        await nc.close()
    for heartbeat in (first, second):
        assert heartbeat.node_id == "tainted-1"
        assert heartbeat.taints == [Taint(key="dedicated", value="gpu"), Taint(key="spot")]


def test_a_bad_taint_stops_the_agent_naming_the_entry(nats_url: str) -> None:
    result = subprocess.run(
        [_bin("comp-nodeagent")], env=agent_env(nats_url, "bad-1", "spot:NoSchedule,gpu:NoExecute"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "node agent cannot start" in output
    assert "nodeagent.taints" in output
    assert "taints entry 2 ('gpu:NoExecute'): effect 'NoExecute' is not supported (only NoSchedule)" in output


# ---- placement end to end -------------------------------------------------------------------
def deployment(name: str, tolerate: bool) -> str:
    tolerations = "\n    tolerations: [{key: dedicated, value: gpu}]" if tolerate else ""
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 2
  image: comp/hollow:test
  resources: {{cpu: 0.1, memory: 16Mi}}
  placement:
    max_per_node: 1{tolerations}
"""


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[LocalCluster]:
    """Real nats-server, redis-server, api and scheduler; two hollow agents, one tainted."""
    config = ClusterConfig.private(tmp_path, "taint", nodes=0, heartbeat_seconds=0.5, grace_seconds=3.0)
    local = LocalCluster(config)
    local.start()
    try:
        hollow = {"COMP_NODEAGENT__DRIVER": "hollow", "COMP_NODEAGENT__RESYNC_SECONDS": "2"}
        local.start_agent("plain", hollow)
        local.start_agent("gpu", {**hollow, "COMP_NODEAGENT__TAINTS": "dedicated=gpu:NoSchedule"})
        yield local
    finally:
        local.stop(purge_workloads=False)


def ready_nodes(api: str) -> dict[str, dict] | None:
    nodes = {n["node_id"]: n for n in httpx.get(f"{api}/v1/nodes", timeout=5).json() if n["state"] == "ready"}
    return nodes if set(nodes) == {"plain", "gpu"} else None


def running_on(api: str, name: str) -> list[str]:
    tasks = httpx.get(f"{api}/v1/tasks", params={"deployment": f"default.{name}"}, timeout=5).json()
    return sorted(t["node_id"] for t in tasks if t["state"] == "running")


def test_only_tolerating_replicas_go_to_the_tainted_node(two_nodes: LocalCluster) -> None:
    api = two_nodes.config.api_url
    nodes = wait_until(lambda: ready_nodes(api), 30, "both hollow nodes ready")
    assert nodes["gpu"]["taints"] == [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]
    assert nodes["plain"]["taints"] == []

    for name, tolerate in (("plain-only", False), ("tolerant", True)):
        response = httpx.post(f"{api}/v1/apply", content=deployment(name, tolerate), timeout=30)
        assert response.status_code == 200, response.text

    # One replica a node: the tolerating deployment needs both nodes, and gets them.
    wait_until(lambda: running_on(api, "tolerant") == ["gpu", "plain"], 30, "tolerant on both nodes")

    # The other gets the plain node only; its second replica waits, and says why.
    def one_running_one_pending() -> dict | None:
        status = httpx.get(f"{api}/v1/deployments/default/plain-only", timeout=5).json()["status"] or {}
        pending = status.get("placed") == 1 and "untolerated taint dedicated=gpu:NoSchedule" in status.get("pending_reason", "")
        return status if pending and running_on(api, "plain-only") == ["plain"] else None

    wait_until(one_running_one_pending, 30, "plain-only: one replica on plain, one pending on the taint")
