"""Every service's Prometheus /metrics on a real private local cluster (nats-server,
redis-server, Docker, every service its own process): each process scraped on the port
the cluster config saved for it (the api on its own port), before and after a deployment
is applied; the counts move with what was done."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster, _bin, free_port
from comp_common import subjects

pytestmark = pytest.mark.docker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SLEEPER = """
kind: Deployment
metadata: {name: %s}
spec:
  replicas: %d
  image: %s
  command: [sleep, "3600"]
  resources: {cpu: 0.05, memory: 16Mi}
"""

SERVICE = """
kind: Service
metadata: {name: %s}
spec:
  selector: {deployment: %s}
  ports: [{port: 80}]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, docker_client, busybox_image: str) -> Iterator[LocalCluster]:
    state = tmp_path_factory.mktemp("metrics-cluster")
    # No lb (it programs the host's nftables); discovery is started on its own below.
    local = LocalCluster(ClusterConfig.private(state, "metrics", nodes=1))
    local.start()
    try:
        local.start_service("discovery")
        yield local
    finally:
        local.stop(purge_workloads=True)


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:200]}"
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def url_of(local: LocalCluster, process: str) -> str:
    # Read back from the saved config, as `comp status` or another process would.
    return ClusterConfig.load(local.config.state_dir).metrics_urls()[process]


def agent_process(local: LocalCluster) -> str:
    return f"nodeagent-{local.config.node_ids()[0]}"


def apply(local: LocalCluster, text: str) -> None:
    response = httpx.post(f"{local.config.api_url}/v1/apply", content=text, timeout=30)
    assert response.status_code == 200, response.text


def running(local: LocalCluster, deployment: str, n: int) -> list[str] | None:
    tasks = [t for t in httpx.get(f"{local.config.api_url}/v1/tasks", timeout=10).json() if t["deployment"].endswith(f".{deployment}")]
    states = [t["state"] for t in tasks]
    return states if states == ["running"] * n else None


def test_every_process_serves_its_own_metrics(cluster: LocalCluster) -> None:
    urls = ClusterConfig.load(cluster.config.state_dir).metrics_urls()
    expected = {"api", "scheduler", "autoscaler", "discovery", "audit", agent_process(cluster)}
    assert expected <= set(urls)
    assert urls["api"] == f"{cluster.config.api_url}/metrics", "the api serves on its own port, no second one"
    assert len({url for url in urls.values()}) == len(urls), "one port each"
    for process in expected:
        samples = wait_until(lambda: _try_scrape(urls[process]), 30, f"{process} serving /metrics")
        assert ("process_cpu_seconds_total", frozenset()) in samples, process


def _try_scrape(url: str) -> Samples | None:
    try:
        return scrape(url)
    except httpx.HTTPError:
        return None


def test_a_deployment_moves_the_scheduler_agent_and_api_counts(cluster: LocalCluster) -> None:
    scheduler, agent, api = (url_of(cluster, p) for p in ("scheduler", agent_process(cluster), "api"))
    wait_until(lambda: value(scrape(scheduler), "comp_scheduler_leader") == 1, 30, "the scheduler leading")
    before = {name: scrape(url) for name, url in (("scheduler", scheduler), ("agent", agent), ("api", api))}

    apply(cluster, SLEEPER % ("sleepers", 2, "comp/busybox:test"))
    wait_until(lambda: running(cluster, "sleepers", 2), 90, "both replicas running")
    # The agent's view can trail what the api shows by a status write.
    wait_until(lambda: value(scrape(agent), "comp_nodeagent_tasks", state="running")
               == value(before["agent"], "comp_nodeagent_tasks", state="running") + 2, 30, "the agent counting 2 more running")
    after = {name: scrape(url) for name, url in (("scheduler", scheduler), ("agent", agent), ("api", api))}

    def moved(process: str, name: str, **labels: str) -> float:
        return value(after[process], name, **labels) - value(before[process], name, **labels)

    # Scheduler: rounds ran and were timed; the apply's event and the tasks' statuses came in.
    assert moved("scheduler", "comp_scheduler_round_seconds_count", phase="reconcile") >= 1
    assert moved("scheduler", "comp_scheduler_round_seconds_count", phase="apply") >= 1
    assert moved("scheduler", "comp_scheduler_placements_total") == 2
    assert moved("scheduler", "comp_messages_received_total", subject=subjects.DEPLOYMENT_EVENTS) >= 1
    assert moved("scheduler", "comp_messages_received_total", subject=subjects.TASK_EVENTS) >= 2
    assert moved("scheduler", "comp_message_handler_seconds_count", subject=subjects.DEPLOYMENT_EVENTS) >= 1
    assert moved("scheduler", "comp_messages_published_total", subject=subjects.node_nudge("*")) >= 1
    assert value(after["scheduler"], "comp_scheduler_pending_replicas") == 0
    assert value(after["scheduler"], "comp_scheduler_leader") == 1

    # Agent: two containers started and timed, the nudge taken, statuses sent.
    assert moved("agent", "comp_nodeagent_container_start_seconds_count", outcome="started") == 2
    assert moved("agent", "comp_nodeagent_sync_seconds_count") >= 1
    assert moved("agent", "comp_messages_received_total", subject=subjects.node_nudge("*")) >= 1
    assert moved("agent", "comp_messages_published_total", subject=subjects.TASK_EVENTS) >= 2
    assert value(after["agent"], "comp_nodeagent_agents") == 1

    # Api: the one apply, by route template; its deployment event published.
    assert moved("api", "comp_api_requests_total", route="/v1/apply", method="POST", status="200") == 1
    assert moved("api", "comp_api_request_seconds_count", route="/v1/apply", method="POST") == 1
    assert moved("api", "comp_messages_published_total", subject=subjects.DEPLOYMENT_EVENTS) == 1
    # No concrete subject became a label value anywhere.
    for samples in after.values():
        for _, labels in samples:
            assert all(not (k == "subject" and cluster.config.node_ids()[0] in v) for k, v in labels)


def test_api_requests_are_labelled_by_route_template_not_path(cluster: LocalCluster) -> None:
    api = url_of(cluster, "api")
    before = scrape(api)
    base = cluster.config.api_url
    assert httpx.get(f"{base}/v1/deployments/default/no-such-one", timeout=10).status_code == 404
    assert httpx.get(f"{base}/v1/deployments/team-x/other", timeout=10).status_code == 404
    assert httpx.get(f"{base}/not/a/route/at/all", timeout=10).status_code == 404
    after = scrape(api)
    template = "/v1/deployments/{namespace}/{name}"
    assert value(after, "comp_api_requests_total", route=template, method="GET", status="404") == (
        value(before, "comp_api_requests_total", route=template, method="GET", status="404") + 2
    )
    assert value(after, "comp_api_requests_total", route="unmatched", method="GET", status="404") == (
        value(before, "comp_api_requests_total", route="unmatched", method="GET", status="404") + 1
    )
    assert not any(dict(labels).get("route", "").startswith("/v1/deployments/default") for _, labels in after)


def test_garbage_on_the_wire_is_counted_and_the_scheduler_serves_on(cluster: LocalCluster) -> None:
    scheduler = url_of(cluster, "scheduler")
    before = scrape(scheduler)

    async def send_garbage() -> None:
        connection = await nats.connect(cluster.config.nats_url)
        try:
            await connection.publish(subjects.task_event("nowhere"), b"\x00 not a task status")
            await connection.publish(subjects.deployment_event("default", "x"), b'{"action": 7}')
            await connection.flush()
        finally:
            await connection.drain()

    asyncio.run(send_garbage())

    def dropped() -> Samples | None:
        samples = scrape(scheduler)
        task = value(samples, "comp_messages_dropped_total", subject=subjects.TASK_EVENTS, reason="invalid")
        deployment = value(samples, "comp_messages_dropped_total", subject=subjects.DEPLOYMENT_EVENTS, reason="invalid")
        if (task, deployment) == (
            value(before, "comp_messages_dropped_total", subject=subjects.TASK_EVENTS, reason="invalid") + 1,
            value(before, "comp_messages_dropped_total", subject=subjects.DEPLOYMENT_EVENTS, reason="invalid") + 1,
        ):
            return samples
        return None

    wait_until(dropped, 30, "both garbage messages counted as dropped")
    # Still serving: a new deployment is placed and its round counted.
    rounds = value(scrape(scheduler), "comp_scheduler_round_seconds_count", phase="reconcile")
    apply(cluster, SLEEPER % ("after-garbage", 1, "comp/busybox:test"))
    wait_until(lambda: running(cluster, "after-garbage", 1), 90, "the next deployment running")
    assert value(scrape(scheduler), "comp_scheduler_round_seconds_count", phase="reconcile") > rounds


def test_discovery_counts_vips_and_endpoint_writes(cluster: LocalCluster) -> None:
    discovery = url_of(cluster, "discovery")
    before = scrape(discovery)
    apply(cluster, SLEEPER % ("served", 1, "comp/busybox:test") + "---\n" + SERVICE % ("served", "served"))
    wait_until(
        lambda: value(scrape(discovery), "comp_discovery_vips") == value(before, "comp_discovery_vips") + 1,
        30, "one more virtual IP held",
    )
    wait_until(
        lambda: value(scrape(discovery), "comp_discovery_endpoint_writes_total", change="updated")
        > value(before, "comp_discovery_endpoint_writes_total", change="updated"),
        30, "the service's endpoints written",
    )
    assert value(scrape(discovery), "comp_discovery_services") == value(before, "comp_discovery_services") + 1


def test_comp_status_lists_each_running_process_metrics_url(cluster: LocalCluster) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "comp_cli.main", "--state-dir", str(cluster.config.state_dir), "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shown = result.stdout.split("metrics (Prometheus):", 1)[1]
    for process, url in ClusterConfig.load(cluster.config.state_dir).metrics_urls().items():
        assert any(line.split() == [process, url] for line in shown.splitlines()), (process, url, result.stdout)


AUTOSCALED = """
kind: Deployment
metadata: {name: %s}
spec:
  replicas: 1
  image: comp/busybox:test
  command: [sleep, "3600"]
  resources: {cpu: 0.05, memory: 16Mi}
  autoscale: {min: 1, max: 3, metric: cpu, target: 0.5}
"""


def test_the_autoscaler_times_evaluations_and_counts_decisions(cluster: LocalCluster) -> None:
    autoscaler = url_of(cluster, "autoscaler")

    def decisions(samples: Samples) -> float:
        return sum(value(samples, "comp_autoscaler_decisions_total", result=r) for r in ("up", "down", "held", "steady"))

    before = scrape(autoscaler)
    apply(cluster, AUTOSCALED % "scaled")
    # Every evaluation decides once per autoscaled deployment, whatever its metric says.
    def decided() -> Samples | None:
        samples = scrape(autoscaler)
        return samples if decisions(samples) > decisions(before) else None

    after = wait_until(decided, 60, "a decision on the autoscaled deployment")
    assert value(after, "comp_autoscaler_evaluation_seconds_count") > value(before, "comp_autoscaler_evaluation_seconds_count")


def test_a_metrics_port_in_use_stops_the_service_with_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [_bin("comp-autoscaler")], capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "COMP_METRICS__PORT": str(port), "COMP_NATS__URL": f"nats://127.0.0.1:{free_port()}"},
        )
    assert result.returncode == 1
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
