"""The IPVS dataplane.  Its plan (services to virtual services, real servers, marks) and
its helper nftables table are checked everywhere; the kernel tests run only where the
kernel has ip_vs (skipped with the reason elsewhere), each in a network namespace of its
own so that they never touch the host's virtual services."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_lb.dataplane import DATAPLANES
from comp_lb.ipvs import MARK_BASE, IpvsDataplane, plan, published_mark
from comp_lb.ruleset import RulesetError

NODE = "node-h"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def web(*addresses: str, vip: str = "10.96.0.10", published: int | None = None, local: tuple[str, ...] = ()) -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace="d", name="web", vip=vip,
        ports=[EndpointPort(name="http", port=80, published=published), EndpointPort(name="udp-53", port=53, protocol="udp")],
        endpoints=[
            Endpoint(task_id=f"t{i}", node_id=NODE if a in local else "node-b", address=a, ports={"http": 8080})
            for i, a in enumerate(addresses)
        ],
    )


# ---- everywhere: the plan and the helper table -------------------------------------------

def test_the_plan_has_a_virtual_service_per_vip_port_and_a_mark_per_published_port():
    wanted = plan([web("10.1.0.2", "10.1.0.3", published=30080, local=("10.1.0.2",))], NODE)
    mark = published_mark("tcp", 30080)
    assert mark == MARK_BASE | 30080 and published_mark("udp", 30080) == MARK_BASE | 0x10000 | 30080
    assert dict(wanted.virtual) == {
        ("vip", "tcp", "10.96.0.10", 80): frozenset({("10.1.0.2", 8080), ("10.1.0.3", 8080)}),
        ("mark", "tcp", mark, 0): frozenset({("10.1.0.2", 8080), ("10.1.0.3", 8080)}),
        # no endpoint has the port: the virtual service stays, empty (IPVS then refuses)
        ("vip", "udp", "10.96.0.10", 53): frozenset(),
    }
    assert wanted.vips == {"10.96.0.10"} and dict(wanted.marks) == {("tcp", 30080): mark}
    assert wanted.hairpin == {"10.1.0.2"}
    assert wanted.owners[("mark", "tcp", mark, 0)] == ("d.web", "http")


def test_the_plan_refuses_what_the_nftables_dataplane_refuses():
    with pytest.raises(RulesetError, match="service d.web: vip address '10.96.0' is not an IPv4 address"):
        plan([web(vip="10.96.0")], NODE)


def test_the_helper_table_loads_on_this_kernel(tmp_path: Path):
    if shutil.which("nft") is None or shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs nft, unshare and root")
    script = plan([web("10.1.0.2", published=30080, local=("10.1.0.2",))], NODE).nft_script("comp_lb_ipvs_t")
    (tmp_path / "table.nft").write_text(script)
    done = subprocess.run(
        ["unshare", "-n", "sh", "-ec", "nft -f table.nft; nft -f table.nft; nft list table ip comp_lb_ipvs_t"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"tcp . 30080 : {MARK_BASE | 30080:#010x}" in done.stdout
    assert "10.1.0.2 . 10.1.0.2" in done.stdout
    assert "fib daddr type local meta mark set meta l4proto . th dport map @published" in done.stdout


# ---- where the kernel has ip_vs -------------------------------------------------------------

_REASON = IpvsDataplane(NODE).unavailable()
needs_ipvs = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@contextmanager
def netns() -> Iterator[str]:
    name = f"comp-lbt-ipvs-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield name
        finally:
            if _libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def held() -> dict[tuple[int, str, int], set[tuple[str, int]]]:
    from pyroute2 import IPVS, IPVSDest, IPVSService

    out = {}
    with IPVS() as ipvs:
        for message in ipvs.service("dump"):
            service = IPVSService.from_message(message)
            key = (service.get("fwmark") or 0, service.get("addr"), service.get("port"))
            probe = IPVSService(fwmark=key[0], af=socket.AF_INET) if key[0] else IPVSService(
                addr=key[1], port=key[2], protocol=service["protocol"])
            out[key] = {(d["addr"], d["port"]) for d in map(IPVSDest.from_message, ipvs.dest("dump", service=probe))}
    return out


@needs_ipvs
def test_sync_programs_virtual_services_incrementally_and_cleanup_removes_them():
    with netns():
        dataplane = DATAPLANES["ipvs"](node_id=NODE, table=f"comp_lb_t{uuid.uuid4().hex[:6]}")
        assert dataplane.sync([web("10.1.0.2", "10.1.0.3", published=30080)]).mode == "full"
        mark = published_mark("tcp", 30080)
        assert held() == {
            (0, "10.96.0.10", 80): {("10.1.0.2", 8080), ("10.1.0.3", 8080)},
            (0, "10.96.0.10", 53): set(),
            (mark, None, None): {("10.1.0.2", 8080), ("10.1.0.3", 8080)},
        }
        report = dataplane.sync([web("10.1.0.2", published=30080)])
        assert report.mode == "incremental" and report.elements == 2
        assert held()[(0, "10.96.0.10", 80)] == {("10.1.0.2", 8080)}
        assert dataplane.sync([web("10.1.0.2", published=30080)]).mode == "unchanged"
        assert "10.96.0.10/32" in subprocess.run(["ip", "addr", "show", "comp-ipvs0"], capture_output=True, text=True).stdout
        dataplane.cleanup()
        assert held() == {}
        assert subprocess.run(["ip", "link", "show", "comp-ipvs0"], capture_output=True).returncode != 0


@needs_ipvs
def test_traffic_to_the_vip_reaches_every_endpoint_and_is_counted(tmp_path: Path):
    with netns():
        subprocess.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        servers = []
        try:
            for device, address, name in (("v0", "10.1.0.2", "b1"), ("v1", "10.1.0.3", "b2")):
                subprocess.run(["ip", "addr", "add", f"{address}/24", "dev", device], check=True)
                subprocess.run(["ip", "link", "set", device, "up"], check=True)
                (tmp_path / name).mkdir()
                (tmp_path / name / "index.html").write_text(name)
                servers.append(subprocess.Popen(["busybox", "httpd", "-f", "-p", f"{address}:8080", "-h", str(tmp_path / name)]))
            time.sleep(0.5)
            dataplane = IpvsDataplane(NODE, table=f"comp_lb_t{uuid.uuid4().hex[:6]}")
            dataplane.sync([web("10.1.0.2", "10.1.0.3")])
            client = "import urllib.request; print(' '.join(urllib.request.urlopen('http://10.96.0.10/', timeout=2).read().decode() for _ in range(20)))"
            answers = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=60, check=True).stdout.split()
            assert set(answers) == {"b1", "b2"}
            counted = {c.target: c.packets for c in dataplane.counters("d", "web") if c.port == "http"}
            assert counted[""] == 20 and counted["10.1.0.2:8080"] + counted["10.1.0.3:8080"] == 20
            dataplane.cleanup()
        finally:
            for server in servers:
                server.kill()
                server.wait()
