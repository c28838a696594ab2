"""Hollow nodes end to end: `comp-nodeagent --driver hollow --count 50` as one process beside
real nats-server, redis-server, comp-api and comp-scheduler processes, driven through the API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import nats
import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster, _bin
from comp_common import subjects
from comp_common.messages import Nudge

NODES = 50
PREFIX = "hollow"


def manifest(name: str, replicas: int) -> str:
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  image: comp/hollow:test
  resources: {{cpu: 0.1, memory: 64Mi}}
"""




@pytest.fixture
def fleet(tmp_path) -> Iterator[LocalCluster]:
    config = ClusterConfig.private(tmp_path, "hollow", nodes=0, heartbeat_seconds=0.5, grace_seconds=2.0)
    local = LocalCluster(config)
    local.start()
    try:
        # The command line of the issue; the resync period is also the start spread.
        local._spawn(
            f"nodeagent-{PREFIX}",
            [_bin("comp-nodeagent"), "--driver", "hollow", "--count", str(NODES), "--node-id", PREFIX],
            local.env({"COMP_NODEAGENT__RESYNC_SECONDS": "2", "COMP_LOG__LEVEL": "INFO"}),
        )
        yield local
    finally:
        local.stop(purge_workloads=False)


def ready_hollow_nodes(api: str) -> list[dict] | None:
    nodes = [n for n in httpx.get(f"{api}/v1/nodes", timeout=5).json() if n["state"] == "ready"]
    return nodes if len(nodes) == NODES else None


def running(api: str, name: str, replicas: int) -> dict | None:
    status = httpx.get(f"{api}/v1/deployments/default/{name}", timeout=5).json()["status"] or {}
    return status if status.get("running") == replicas else None


def apply(api: str, text: str) -> None:
    response = httpx.post(f"{api}/v1/apply", content=text, timeout=30)
    assert response.status_code == 200, response.text


async def test_fifty_hollow_nodes_run_500_replicas_and_shrug_off_garbage(fleet: LocalCluster) -> None:
    api = fleet.config.api_url
    nodes = wait_until(lambda: ready_hollow_nodes(api), 20, f"{NODES} hollow nodes ready")
    assert {n["node_id"] for n in nodes} == {f"{PREFIX}-{i}" for i in range(1, NODES + 1)}
    assert {(n["driver"], n["capacity"]["cpu"], n["capacity"]["memory"]) for n in nodes} == {("hollow", 8.0, 32 * 1024**3)}

    apply(api, manifest("wide", 500))
    wait_until(lambda: running(api, "wide", 500), 20, "500 replicas running")
    tasks = [t for t in httpx.get(f"{api}/v1/tasks", params={"deployment": "default.wide"}, timeout=10).json()]
    assert len(tasks) == 500 and {t["state"] for t in tasks} == {"running"}
    per_node = {}
    for task in tasks:
        per_node[task["node_id"]] = per_node.get(task["node_id"], 0) + 1
    assert len(per_node) == NODES, "spread over every hollow node"

    # Garbage on the shared nudge wildcard: not JSON, not a Nudge, a node this process
    # does not run, a body naming another node than its subject.
    nc = await nats.connect(fleet.config.nats_url)
    try:
        await nc.publish(subjects.node_nudge(f"{PREFIX}-1"), b"\xff\xfe not json at all")
        await nc.publish(subjects.node_nudge(f"{PREFIX}-2"), b'{"node_id": "hollow-2"}')
        await nc.publish(subjects.node_nudge("elsewhere-1"), Nudge(node_id="elsewhere-1", version=1).model_dump_json().encode())
        await nc.publish(subjects.node_nudge(f"{PREFIX}-3"), Nudge(node_id=f"{PREFIX}-4", version=99).model_dump_json().encode())
        await nc.flush()
    finally:
        await nc.close()

    # Everything keeps working: a scale-up and a second deployment reach running.
    apply(api, manifest("wide", 600) + "---\n" + manifest("more", 100))
    wait_until(lambda: running(api, "wide", 600) and running(api, "more", 100), 20, "700 replicas running")
    assert ready_hollow_nodes(api), "no node was lost"

    agent_process = fleet._procs[f"nodeagent-{PREFIX}"]
    assert agent_process.poll() is None, "the hollow agent process is alive"
    records = [json.loads(line) for line in (fleet.logs / f"nodeagent-{PREFIX}.log").read_text().splitlines() if line.startswith("{")]
    assert any(r["msg"] == "nudge body names another node than its subject; dropped" for r in records)
    assert any(r["level"] == "error" and "ValidationError" in r.get("error", "") + r["msg"] for r in records), "garbage logged"
    # Most starts came from nudges (a resync pass that reads the new assignments before the
    # nudge arrives starts the rest), each start exactly once.
    triggers = [r.get("trigger", "") for r in records if r["msg"] == "action" and r.get("action") == "start"]
    assert len(triggers) == 700
    assert sum(t.startswith("nudge version") for t in triggers) > 350
