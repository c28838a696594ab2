"""Done when: `comp trace` of a `comp apply` (a deployment and a service) shows, in one tree,
the spans of api, scheduler, nodeagent, discovery and lb, on a real private local cluster
with networking on (nftables rules in this host's kernel), spans collected over NATS."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns
from comp_cli.local import ClusterConfig, LocalCluster
from waiting import wait_until

pytestmark = pytest.mark.docker

EVERY_SERVICE = {"api", "scheduler", "nodeagent", "discovery", "lb"}


def manifest(image: str) -> str:
    return f"""
kind: Deployment
metadata: {{name: traced}}
spec:
  replicas: 1
  image: {image}
  command: [httpd, -f, -p, "8080", -h, /www]
  resources: {{cpu: 0.05, memory: 16Mi}}
  ports: [{{container_port: 8080, name: http}}]
  stop_grace_period: 1s
---
kind: Service
metadata: {{name: traced}}
spec:
  selector: {{deployment: traced}}
  ports: [{{name: http, port: 80, target_port: http}}]
"""


@pytest.fixture
def cluster(tmp_path: Path, docker_client, busybox_image) -> Iterator[LocalCluster]:
    if reason := netns.require_netns():
        pytest.skip(reason)
    config = ClusterConfig.private(tmp_path / "cluster", "trc", nodes=1, networking=True, vip_cidr=f"10.97.{random.randrange(256)}.0/24")
    local = LocalCluster(config)
    local.start()
    try:
        yield local
    finally:
        local.stop(purge_workloads=True)


def comp(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "comp_cli.main", "--api", cluster.config.api_url, *args], capture_output=True, text=True, timeout=60
    )


def test_comp_trace_of_an_apply_shows_every_service_in_one_tree(cluster, busybox_image, tmp_path):
    path = tmp_path / "traced.yaml"
    path.write_text(manifest(busybox_image))
    applied = comp(cluster, "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    [operation_id] = re.findall(r"operation ([0-9a-f]{32})", applied.stdout)

    def whole_trace() -> dict | None:
        shown = comp(cluster, "trace", operation_id, "-o", "json")
        if shown.returncode != 0:
            return None
        view = json.loads(shown.stdout)
        # Whole: every service in, and no span waiting for its parent.
        return view if EVERY_SERVICE <= set(view["services"]) and len(view["tree"]) == 1 else None

    try:
        view = wait_until(whole_trace, timeout=90, what="the apply's trace with spans of every service, in one tree")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n`comp trace` now:\n{comp(cluster, 'trace', operation_id).stdout}") from None
    [root] = view["tree"]
    assert (root["service"], root["kind"], root["parent_id"]) == ("api", "SERVER", None)

    # The lb's sync sits under discovery's endpoint write, which sits under the agent's work.
    def path_to(node: dict, name: str, trail: tuple[str, ...] = ()) -> tuple[str, ...] | None:
        trail = (*trail, f"{node['service']}:{node['name']}")
        if node["name"] == name:
            return trail
        for child in node["children"]:
            if found := path_to(child, name, trail):
                return found
        return None

    to_lb = path_to(root, "lb.sync")
    assert to_lb is not None
    services_on_the_way = [step.split(":")[0] for step in to_lb]
    assert services_on_the_way[0] == "api" and services_on_the_way[-2:] == ["discovery", "lb"]
    assert {"scheduler", "nodeagent"} <= set(services_on_the_way), to_lb

    text = comp(cluster, "trace", operation_id, "--wait", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"trace {operation_id}: ")
    assert "extra roots" not in text.stdout
    assert lines[1].startswith("api "), "the root first, unindented"
    assert all(line.startswith("  ") for line in lines[2:]), "every other span below it"
    for service in EVERY_SERVICE:
        assert any(line.split()[0] == service for line in lines[1:]), f"no {service} line in:\n{text.stdout}"
    lb_line = next(line for line in lines if "lb.sync" in line)
    assert re.search(r"\+\d+\.\d ms +\d+\.\d ms +(unset|ok)$", lb_line), lb_line
