"""End to end: `comp`'s local cluster (real nats-server, redis-server, Docker, every service as
its own process) driven through the API and the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import docker
import httpx
import nats
import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster, free_port
from comp_common import labels, subjects

pytestmark = pytest.mark.docker


def manifest(name: str, replicas: int, image: str, command: str = '[httpd, -f, -p, "8080", -h, /www]', ports: bool = True) -> str:
    port_block = "\n  ports:\n    - container_port: 8080" if ports else ""
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: {name}, labels: {{app: {name}}}}}
spec:
  replicas: {replicas}
  image: {image}
  command: {command}
  resources: {{cpu: 0.05, memory: 16Mi}}{port_block}
"""




@pytest.fixture(scope="module")
def cluster(tmp_path_factory, docker_client, busybox_image):
    state = tmp_path_factory.mktemp("cluster")
    config = ClusterConfig.private(state, "e2e", nodes=1, span_file=state / "spans.jsonl")
    local = LocalCluster(config)
    local.start()
    yield local
    local.stop(purge_workloads=True)


class Api:
    def __init__(self, local: LocalCluster):
        self.url = local.config.api_url

    def apply(self, text: str) -> dict:
        response = httpx.post(f"{self.url}/v1/apply", content=text, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def tasks(self, deployment: str) -> list[dict]:
        return [t for t in httpx.get(f"{self.url}/v1/tasks", timeout=10).json() if t["deployment"] == deployment]

    def running(self, deployment: str, n: int) -> list[dict] | None:
        tasks = [t for t in self.tasks(deployment) if t["state"] == "running"]
        return tasks if len(tasks) == n and len(self.tasks(deployment)) == n else None

    def delete(self, namespace: str, name: str) -> None:
        response = httpx.delete(f"{self.url}/v1/deployments/{namespace}/{name}", timeout=30)
        assert response.status_code == 200, response.text


def containers(client: docker.DockerClient, local: LocalCluster, deployment: str, status: str | None = "running") -> list[dict]:
    """The engine's list (no per-container inspect, so containers going away mid-call are no error)."""
    filters = {"label": [f"{labels.CLUSTER}={local.config.cluster}", f"{labels.DEPLOYMENT}={deployment}"]}
    if status:
        filters["status"] = status
    return client.api.containers(all=True, filters=filters)


def started_at(client: docker.DockerClient, found: list[dict]) -> dict[str, str]:
    return {c["Id"]: client.api.inspect_container(c["Id"])["State"]["StartedAt"] for c in found}


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as response:
        return response.read().decode()


def test_deploy_answers_http_then_scales_and_deletes(cluster, docker_client, busybox_image):
    api = Api(cluster)
    api.apply(manifest("web", 3, busybox_image))
    tasks = wait_until(lambda: api.running("default.web", 3), what="3 running replicas")
    for task in tasks:
        (host_port,) = task["host_ports"].values()
        assert "COMP busybox" in http_get(host_port)
    assert len(containers(docker_client, cluster, "default.web")) == 3

    api.apply(manifest("web", 5, busybox_image))
    wait_until(lambda: api.running("default.web", 5), what="5 running replicas")
    wait_until(lambda: len(containers(docker_client, cluster, "default.web", None)) == 5, what="5 containers")

    api.apply(manifest("web", 2, busybox_image))
    wait_until(lambda: api.running("default.web", 2), what="2 running replicas")
    wait_until(lambda: len(containers(docker_client, cluster, "default.web", None)) == 2, what="2 containers")

    api.delete("default", "web")
    wait_until(lambda: not containers(docker_client, cluster, "default.web", None), what="no containers left")
    wait_until(lambda: not api.tasks("default.web"), what="no tasks listed")


def test_killed_replica_is_replaced_and_restarted_agent_adopts(cluster, docker_client, busybox_image):
    api = Api(cluster)
    api.apply(manifest("heal", 3, busybox_image))
    wait_until(lambda: api.running("default.heal", 3), what="3 running")
    victim = containers(docker_client, cluster, "default.heal")[0]["Id"]
    docker_client.api.kill(victim)
    wait_until(
        lambda: len(containers(docker_client, cluster, "default.heal")) == 3
        and victim not in {c["Id"] for c in containers(docker_client, cluster, "default.heal")},
        what="the killed replica replaced",
    )
    wait_until(lambda: api.running("default.heal", 3), what="back at full count")

    before = started_at(docker_client, containers(docker_client, cluster, "default.heal"))
    node_id = cluster.config.node_ids()[0]
    cluster.kill(f"nodeagent-{node_id}", signal.SIGTERM)
    cluster.start_agent(node_id)
    cluster.wait_nodes()
    # Several resync periods of the new agent: nothing may be duplicated or restarted.
    time.sleep(3)
    after = started_at(docker_client, containers(docker_client, cluster, "default.heal", None))
    assert after == before
    api.delete("default", "heal")
    wait_until(lambda: not containers(docker_client, cluster, "default.heal", None), what="cleanup")


def test_one_apply_is_one_trace(cluster, busybox_image):
    api = Api(cluster)
    operation_id = api.apply(manifest("traced", 1, busybox_image, ports=False))["operation_id"]
    wait_until(lambda: api.running("default.traced", 1), what="running")

    def spans_of_trace():
        lines = Path(cluster.config.span_file).read_text().splitlines()
        spans = [s for s in map(json.loads, lines) if s["trace_id"] == operation_id]
        return spans if {"api", "scheduler", "nodeagent"} <= {s["service"] for s in spans} else None

    spans = wait_until(spans_of_trace, what="spans from api, scheduler and nodeagent in the apply's trace")
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent_id"] not in ids]
    assert len(roots) == 1 and roots[0]["service"] == "api", "one tree rooted at the API request"
    root = roots[0]
    all_spans = [json.loads(line) for line in Path(cluster.config.span_file).read_text().splitlines()]
    same_request = [
        s for s in all_spans
        if s["service"] == "api" and s["kind"] == "SERVER" and "apply" in s["name"] and s["start_ns"] <= root["end_ns"] and s["end_ns"] >= root["start_ns"]
    ]
    assert [s["trace_id"] for s in same_request] == [operation_id], "the request made exactly one server span"
    api.delete("default", "traced")


def test_missing_image_fails_with_a_clear_message_in_get_tasks(cluster):
    api = Api(cluster)
    api.apply(manifest("ghost", 1, "comp-missing/nope:1", ports=False))
    failed = wait_until(
        lambda: [t for t in api.tasks("default.ghost") if t["state"] == "failed"], timeout=60, what="failed task"
    )
    assert "comp-missing/nope:1" in failed[0]["message"]
    task_id = failed[0]["task_id"]

    def cli_row() -> str | None:
        out = subprocess.run(
            [sys.executable, "-m", "comp_cli.main", "--api", api.url, "get", "tasks"], capture_output=True, text=True, check=True
        ).stdout
        row = next((line for line in out.splitlines() if line.startswith(task_id)), None)
        # The agent retries with a backoff, so the task is now and then starting again.
        return row if row and "failed" in row and "comp-missing/nope:1" in row else None

    try:
        wait_until(cli_row, timeout=30, what=f"`comp get tasks` showing {task_id} failed with its image")
    except AssertionError as exc:
        # Seen once in CI: the task was missing from the listing altogether.  Say what the
        # scheduler did with it, for whoever meets this next.
        said = [line for line in (cluster.logs / "scheduler.log").read_text().splitlines() if "ghost" in line]
        raise AssertionError(f"{exc}\ntasks now: {api.tasks('default.ghost')}\nscheduler on ghost:\n" + "\n".join(said[-30:])) from None
    api.delete("default", "ghost")


def test_cli_apply_get_delete_and_bad_manifest(cluster, tmp_path, busybox_image):
    comp = [sys.executable, "-m", "comp_cli.main", "--api", cluster.config.api_url]
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest("bad", -1, busybox_image).replace("memory: 16Mi", "memory: 16Mb"))
    result = subprocess.run(comp + ["apply", "-f", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "spec.replicas" in result.stderr and "spec.resources.memory" in result.stderr
    deployments = json.loads(subprocess.run(comp + ["get", "deployments", "-o", "json"], capture_output=True, text=True, check=True).stdout)
    assert '"bad"' not in json.dumps(deployments), "nothing of a rejected manifest is stored"

    good = tmp_path / "good.yaml"
    good.write_text(manifest("clid", 1, busybox_image, ports=False))
    out = subprocess.run(comp + ["apply", "-f", str(good)], capture_output=True, text=True, check=True).stdout
    assert "deployment default/clid created" in out
    table = subprocess.run(comp + ["get", "deployments"], capture_output=True, text=True, check=True).stdout
    assert any(line.split()[:2] == ["default", "clid"] for line in table.splitlines()[1:]), table
    nodes = json.loads(subprocess.run(comp + ["get", "nodes", "-o", "json"], capture_output=True, text=True, check=True).stdout)
    assert [n["state"] for n in nodes] == ["ready"]
    out = subprocess.run(comp + ["delete", "deployment", "clid"], capture_output=True, text=True, check=True).stdout
    assert "deleted" in out


async def test_garbage_on_every_consumed_subject_is_dropped(cluster, busybox_image):
    nc = await nats.connect(cluster.config.nats_url)
    node_id = cluster.config.node_ids()[0]
    consumed = [
        subjects.deployment_event("default", "x"),
        subjects.node_heartbeat(node_id),
        subjects.task_event(node_id),
        subjects.node_nudge(node_id),
    ]
    for subject in consumed:
        for garbage in (b"\xff\xfe", b"{}", b"[]", b'{"node_id": null}', b"x" * 100_000):
            await nc.publish(subject, garbage)
    await nc.flush()
    await nc.close()
    api = Api(cluster)
    api.apply(manifest("after-garbage", 1, busybox_image, ports=False))
    wait_until(lambda: api.running("default.after-garbage", 1), what="still serving after garbage")
    assert all(pid for pid in cluster.running().values()), f"a process died: {cluster.running()}"
    api.delete("default", "after-garbage")


def test_describe_says_where_tasks_went_and_why_one_is_pending(cluster, busybox_image):
    comp = [sys.executable, "-m", "comp_cli.main", "--api", cluster.config.api_url]
    host_port = free_port()
    text = manifest("fixed", 2, busybox_image).replace(
        "- container_port: 8080", f"- container_port: 8080\n      host_port: {host_port}"
    )
    Api(cluster).apply(text)
    wait_until(lambda: [t for t in Api(cluster).tasks("default.fixed") if t["state"] == "running"], what="one running")
    out = wait_until(
        lambda: (o := subprocess.run(comp + ["describe", "deployment", "fixed"], capture_output=True, text=True, check=True).stdout)
        and "Pending:" in o and o,
        what="describe showing the pending reason",
    )
    assert "2 desired, 1 placed" in out
    assert "Pending:     no feasible node (1 node: host port in use)" in out
    assert f"placed  fixed-" in out and "best of 1 feasible node" in out
    Api(cluster).delete("default", "fixed")


def test_placement_of_a_deployment_never_placed_is_a_clear_404(cluster):
    response = httpx.get(f"{cluster.config.api_url}/v1/deployments/default/never-applied/placement", timeout=10)
    assert response.status_code == 404
    assert response.json()["detail"] == "no placement decision recorded for default/never-applied yet"
