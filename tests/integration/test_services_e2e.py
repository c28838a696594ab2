"""Services end to end on real parts: Docker replicas, discovery, the lb's nftables rules
in the host's kernel, and a client host in a network namespace behind a veth pair.

A prober inside the client namespace makes one HTTP request every 20 ms to the VIP and
records when each was made and which replica answered (each replica serves its own
hostname), so that the tests can say what the client saw and when."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

import netns
from comp_cli.local import ClusterConfig, LocalCluster
from comp_common import subjects
from comp_common.kv import list_keys
from waiting import wait_until

pytestmark = pytest.mark.docker

PROBE = r"""
import json, sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
while True:
    started = time.time()
    try:
        body = urllib.request.urlopen(url, timeout=0.5).read().decode().strip()
        line = {"t": started, "body": body}
    except Exception as error:
        line = {"t": started, "error": type(error).__name__}
    print(json.dumps(line), flush=True)
    time.sleep(max(0.0, interval - (time.time() - started)))
"""


PUBLISHED = random.randrange(20000, 30000)


def web(image: str, replicas: int) -> str:
    return f"""
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {replicas}
  image: {image}
  command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && touch /www/ready && exec httpd -f -p 8080 -h /www"]
  resources: {{cpu: 0.05, memory: 16Mi}}
  ports: [{{container_port: 8080, name: http}}]
  stop_grace_period: 1s
  health:
    readiness: {{http: {{path: /ready, port: http}}, interval: 0.3s, failure_threshold: 1}}
---
kind: Service
metadata: {{name: web}}
spec:
  selector: {{deployment: web}}
  ports: [{{name: http, port: 80, target_port: http, published: {PUBLISHED}}}]
"""


class Prober:
    def __init__(self, ns: netns.Namespace, url: str, out: Path):
        self.out = out
        self.process = ns.popen([sys.executable, "-c", PROBE, url, "0.02"], stdout=open(out, "w"))

    def lines(self, since: float = 0.0, until: float = float("inf")) -> list[dict]:
        found = []
        for raw in self.out.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # the line being written
            if since <= line["t"] < until:
                found.append(line)
        return found

    def wait_past(self, moment: float) -> None:
        wait_until(lambda: any(line["t"] >= moment for line in self.lines()), timeout=10, what=f"probes past {moment}")


@pytest.fixture
def cluster(tmp_path: Path, docker_client, busybox_image) -> Iterator[LocalCluster]:
    if reason := netns.require_netns():
        pytest.skip(reason)
    config = ClusterConfig.private(
        tmp_path / "cluster", "svc", nodes=1, networking=True,
        vip_cidr=f"10.99.{random.randrange(256)}.0/24",
        # The client namespace asks the DNS server across its veth link.
        extra_env={"COMP_DISCOVERY__DNS_HOST": "0.0.0.0"},
    )
    local = LocalCluster(config)
    local.start()
    try:
        yield local
    finally:
        local.stop(purge_workloads=True)
        assert _nft_table(config.lb_table) is None, "the lb removes its table on exit"


@pytest.fixture
def client() -> Iterator[tuple[netns.Namespace, netns.VethLink]]:
    with netns.Namespace("client") as ns:
        link = netns.veth_link(ns, None)
        netns.add_route(ns, "0.0.0.0/0", link.b_ip)
        yield ns, link


def apply(cluster: LocalCluster, manifest: str) -> None:
    answer = httpx.post(f"{cluster.config.api_url}/v1/apply", content=manifest, timeout=10)
    assert answer.status_code < 300, answer.text


def service_view(cluster: LocalCluster) -> dict:
    return httpx.get(f"{cluster.config.api_url}/v1/namespaces/default/services/web", timeout=5).json()


def ready_endpoints(cluster: LocalCluster, count: int) -> dict:
    def check():
        view = service_view(cluster)
        return view if view.get("vip") and len(view.get("endpoints") or []) == count else None

    return wait_until(check, timeout=60, what=f"{count} ready endpoints")


def hostnames(docker_client, cluster: LocalCluster) -> dict[str, str]:
    """Hostname -> container id of each running replica."""
    out = {}
    for container in docker_client.containers.list(filters={"label": f"comp.cluster={cluster.config.cluster}"}):
        out[container.attrs["Config"]["Hostname"]] = container.id
    return out


def _nft_table(table: str) -> str | None:
    done = subprocess.run(["nft", "list", "table", "ip", table], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def test_a_client_reaches_the_service_by_vip_and_dns_and_traffic_follows_the_replicas(cluster, client, docker_client, tmp_path):
    ns, link = client
    apply(cluster, web("comp/busybox:test", 3))
    view = ready_endpoints(cluster, 3)
    vip = view["vip"]
    assert vip.startswith("10.99.")

    # By DNS name: ask discovery's server across the link, then connect to what it said.
    resolved = ns.run([sys.executable, "-c", (
        "import sys, dns.resolver; r = dns.resolver.Resolver(configure=False); "
        f"r.nameservers = ['{link.b_ip}']; r.port = {cluster.config.dns_port}; "
        "print(r.resolve('web.default.svc.comp.local', 'A')[0].address)"
    )], check=True).stdout.strip()
    assert resolved == vip
    status, body = netns.wait_for_http(ns, f"http://{resolved}/", timeout=10)
    assert status == 200 and body.strip() in hostnames(docker_client, cluster)

    # Spread: every ready replica answers some of the requests.
    prober = Prober(ns, f"http://{vip}/", tmp_path / "probe.jsonl")
    start = time.time()
    prober.wait_past(start + 2)
    seen = [line.get("body") for line in prober.lines(since=start)]
    names_before = hostnames(docker_client, cluster)
    assert set(seen) == set(names_before), f"answers came from {set(seen)}"

    # Published: the host's own address answers on the published port.
    status, body = netns.http_get(ns, f"http://{link.b_ip}:{PUBLISHED}/", timeout=2)
    assert status == 200 and body.strip() in names_before

    # An unready replica gets no new connection 1 s after the agent said so.
    unready_name, unready = sorted(names_before.items())[1]
    docker_client.containers.get(unready).exec_run(["rm", "/www/ready"])
    container_id = unready

    def reported_unready():
        tasks = httpx.get(f"{cluster.config.api_url}/v1/tasks", timeout=5).json()
        return next((t for t in tasks if t["container_id"] == container_id and not t["ready"]), None)

    status_of_unready = wait_until(reported_unready, timeout=10, what="the replica reported unready")
    unready_at = status_of_unready["updated_at"]
    prober.wait_past(unready_at + 3)
    after = prober.lines(since=unready_at + 1.0)
    assert after and all(line.get("body") not in (None, unready_name) for line in after), (
        f"1 s after it was unready: {[line for line in after if line.get('body') in (None, unready_name)][:5]}"
    )
    docker_client.containers.get(unready).exec_run(["touch", "/www/ready"])

    # A killed replica gets no new connection 1 s after it died.
    victim_name, victim = sorted(names_before.items())[0]
    docker_client.containers.get(victim).kill()
    killed_at = time.time()
    prober.wait_past(killed_at + 3)
    after = prober.lines(since=killed_at + 1.0)
    assert after and all(line.get("body") not in (None, victim_name) for line in after), (
        f"1 s after the kill: {[line for line in after if line.get('body') in (None, victim_name)][:5]}"
    )

    # Its replacement (the agent restarts it) and a new replica get traffic within 1 s of ready.
    apply(cluster, web("comp/busybox:test", 4))
    view = ready_endpoints(cluster, 4)
    # The api's task view (the scheduler's, in Redis) can trail discovery's: wait until it
    # too has all four ready, so that the newest ready_since is the fourth replica's.
    tasks = wait_until(
        lambda: (ts := httpx.get(f"{cluster.config.api_url}/v1/tasks", timeout=5).json()) and sum(t["ready"] for t in ts) == 4 and ts,
        timeout=20, what="four ready tasks in the api",
    )
    newest_ready = max(t["ready_since"] for t in tasks if t["ready"])
    prober.wait_past(newest_ready + 2)
    current = hostnames(docker_client, cluster)
    late = {line.get("body") for line in prober.lines(since=newest_ready + 1.0)}
    assert late == set(current), f"after every replica was ready 1 s: answers from {late}, replicas {set(current)}"

    # Restarting the lb: traffic keeps flowing, and there is one copy of the rules after.
    before = _nft_table(cluster.config.lb_table)
    log_size = (cluster.logs / "lb.log").stat().st_size
    cluster.kill("lb", signal.SIGKILL)
    down_at = time.time()
    cluster.start_service("lb")
    prober.wait_past(down_at + 3)
    during = prober.lines(since=down_at)
    assert during and all("body" in line for line in during), f"failed during the restart: {[l for l in during if 'body' not in l][:5]}"
    wait_until(lambda: "synced" in (cluster.logs / "lb.log").read_text()[log_size:], timeout=10, what="the new lb synced")
    after_restart = _nft_table(cluster.config.lb_table)
    assert after_restart is not None and after_restart.count(f"{vip} . tcp . 80") == before.count(f"{vip} . tcp . 80")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert tables.split().count(cluster.config.lb_table) == 1
    accepts = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True).stdout
    assert accepts.count(f"comp-lb:{cluster.config.lb_table}") <= 1
    prober.process.kill()

    # Deleting the service removes its rules and frees its VIP.
    answer = httpx.delete(f"{cluster.config.api_url}/v1/namespaces/default/services/web", timeout=5)
    assert answer.status_code < 300, answer.text
    wait_until(lambda: vip not in (_nft_table(cluster.config.lb_table) or ""), timeout=10, what="the VIP's rules removed")
    with pytest.raises(ConnectionError):
        netns.http_get(ns, f"http://{vip}/", timeout=1.0)
    wait_until(lambda: vip not in asyncio.run(_vips(cluster)), timeout=10, what="the VIP freed")


async def _vips(cluster: LocalCluster) -> list[str]:
    nc = await nats.connect(cluster.config.nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.VIPS_BUCKET)
        return await list_keys(kv)
    finally:
        await nc.close()
