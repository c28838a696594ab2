"""The nftables dataplane on the real kernel, with real traffic, in network namespaces of
the test's own (``ip netns``), so it never touches the host's ruleset or a running lb.

The lab: a "host" namespace where the dataplane runs (this test's thread enters it, so
nft and iptables run there), a "backends" namespace holding the endpoints (busybox httpd
on 10.1.0.2-4, on one veth), and a "client" namespace (10.2.0.2, on another veth); the
host routes between them.  Each endpoint answers ``/cgi-bin/who`` with its own name and
the client address it saw, so a test can tell where each request went and from where.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_lb.dataplane import DATAPLANES, DataplaneError
from comp_lb.nftables import NftablesDataplane
from comp_lb.ruleset import RulesetError

NODE = "node-h"
BACKENDS = {"b1": "10.1.0.2", "b2": "10.1.0.3", "b3": "10.1.0.4"}
HOST_TO_BACKENDS, HOST_TO_CLIENT, CLIENT = "10.1.0.1", "10.2.0.1", "10.2.0.2"
VIP, OTHER_VIP = "10.96.0.10", "10.96.0.11"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _unusable() -> str | None:
    for tool in ("nft", "ip", "iptables", "busybox"):
        if shutil.which(tool) is None:
            return f"no {tool} binary"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    name = f"comp-lbt-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        probe = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "tables"], capture_output=True, text=True)
        return None if probe.returncode == 0 else f"cannot run nft in a network namespace: {probe.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


_REASON = _unusable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def sh(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """This thread (and every process it starts) in ``netns``; back where it was after."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        yield
    finally:
        if _libc.setns(own, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")  # never carry on in the wrong namespace
        os.close(own)
        os.close(target)


CLIENT_SCRIPT = """
import http.client, json, socket, sys, time
host, port, count, timeout, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
out = []
for _ in range(count):
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0) if source else None)
        conn.request("GET", "/cgi-bin/who")
        out.append(conn.getresponse().read().decode().strip())
        conn.close()
    except ConnectionRefusedError:
        out.append("refused")
    except (socket.timeout, TimeoutError):
        out.append("timeout")
    except OSError as error:
        out.append(f"error {error.errno}")
    out[-1] += f" {time.monotonic() - start:.3f}"
print(json.dumps(out))
"""


class Lab:
    def __init__(self, tmp: Path):
        tag = uuid.uuid4().hex[:6]
        self.host, self.backends, self.client = (f"comp-lbt-{tag}-{n}" for n in ("h", "b", "c"))
        self.table = f"comp_lb_t{tag}"
        self.tmp = tmp
        self.servers: list[subprocess.Popen] = []

    def start(self) -> None:
        for ns in (self.host, self.backends, self.client):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        sh("ip", "link", "add", "hb", "netns", self.host, "type", "veth", "peer", "name", "eth0", "netns", self.backends)
        sh("ip", "link", "add", "hc", "netns", self.host, "type", "veth", "peer", "name", "eth0", "netns", self.client)
        for cmd in (
            ("ip", "addr", "add", f"{HOST_TO_BACKENDS}/24", "dev", "hb"), ("ip", "addr", "add", f"{HOST_TO_CLIENT}/24", "dev", "hc"),
            ("ip", "link", "set", "hb", "up"), ("ip", "link", "set", "hc", "up"),
            # VIPs without an endpoint are not DNATed: like a real host's, this one routes them on
            # (where the filter hooks must refuse them).
            ("ip", "route", "add", "default", "via", BACKENDS["b1"]),
            ("sysctl", "-qw", "net.ipv4.ip_forward=1"),
        ):
            sh(*cmd, netns=self.host)
        for address in BACKENDS.values():
            sh("ip", "addr", "add", f"{address}/24", "dev", "eth0", netns=self.backends)
        sh("ip", "link", "set", "eth0", "up", netns=self.backends)
        sh("ip", "route", "add", "default", "via", HOST_TO_BACKENDS, netns=self.backends)
        sh("ip", "addr", "add", f"{CLIENT}/24", "dev", "eth0", netns=self.client)
        sh("ip", "link", "set", "eth0", "up", netns=self.client)
        sh("ip", "route", "add", "default", "via", HOST_TO_CLIENT, netns=self.client)
        for name, address in BACKENDS.items():
            www = self.tmp / name / "cgi-bin"
            www.mkdir(parents=True)
            (www / "who").write_text(f'#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "{name} $REMOTE_ADDR"\n')
            (www / "who").chmod(0o755)
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", self.backends, "busybox", "httpd", "-f", "-p", f"{address}:8080", "-h", str(self.tmp / name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        for address in BACKENDS.values():
            deadline = time.monotonic() + 10
            while not self.get(address, 8080, 1, netns=self.backends)[0].startswith("b"):
                assert time.monotonic() < deadline, f"busybox httpd on {address}:8080 did not answer"
                time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        for ns in (self.host, self.backends, self.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def get(self, host: str, port: int, count: int, *, netns: str | None = None, timeout: float = 2.0, source: str = "") -> list[str]:
        """``count`` requests, each on a new connection: "<backend> <client address seen>",
        "refused", "timeout" or "error <errno>" each (the elapsed seconds cut off)."""
        done = sh(sys.executable, "-c", CLIENT_SCRIPT, host, str(port), str(count), str(timeout), source, netns=netns or self.client)
        return [r.rsplit(" ", 1)[0] for r in json.loads(done.stdout)]

    def timed(self, host: str, port: int) -> tuple[str, float]:
        done = sh(sys.executable, "-c", CLIENT_SCRIPT, host, str(port), "1", "3", "", netns=self.client)
        result, seconds = json.loads(done.stdout)[0].rsplit(" ", 1)
        return result, float(seconds)

    def dataplane(self, **kwargs) -> NftablesDataplane:
        return DATAPLANES["nftables"](node_id=NODE, table=self.table, **kwargs)  # type: ignore[return-value]

    def nft(self, *argv: str) -> str:
        return sh("nft", *argv, netns=self.host).stdout


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        lab.start()
        with inside(lab.host):
            yield lab
    finally:
        lab.stop()


def web(*names: str, vip: str = VIP, published: int | None = None, local: tuple[str, ...] = ()) -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace="d", name="web", vip=vip,
        ports=[EndpointPort(name="http", port=80, published=published)],
        endpoints=[
            Endpoint(task_id=f"web-{n}", node_id=NODE if n in local else "node-b", address=BACKENDS[n], ports={"http": 8080})
            for n in names
        ],
    )


def empty(vip: str = OTHER_VIP) -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace="d", name="empty", vip=vip,
        ports=[EndpointPort(name="http", port=80), EndpointPort(name="udp-53", port=53, protocol="udp")],
    )


def seen(results: list[str]) -> Counter:
    return Counter(r.split()[0] for r in results)


def test_requests_to_the_vip_spread_over_every_endpoint_and_keep_the_client_address(lab):
    dataplane = lab.dataplane()
    report = dataplane.sync([web("b1", "b2", "b3"), empty()])
    assert report.mode == "full" and report.elements > 0
    results = lab.get(VIP, 80, 60)
    assert seen(results).keys() == {"b1", "b2", "b3"}, results
    assert min(seen(results).values()) >= 5, f"uneven spread: {seen(results)}"
    # no masquerade on the way: the endpoint sees the client's own address
    assert {r.split()[1] for r in results} == {CLIENT}


def test_zero_endpoints_is_refused_at_once_not_a_black_hole(lab):
    lab.dataplane().sync([web("b1"), empty()])
    result, seconds = lab.timed(OTHER_VIP, 80)
    assert result == "refused" and seconds < 1.0, (result, seconds)
    # UDP: an ICMP port unreachable, which a connected UDP socket reports as refused
    probe = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect((sys.argv[1], 53))
s.send(b"x")
try:
    s.recv(10); print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""
    assert sh(sys.executable, "-c", probe, OTHER_VIP, netns=lab.client).stdout.strip() == "refused"
    # from the host itself too (filter output)
    assert lab.get(OTHER_VIP, 80, 1, netns=lab.host) == ["refused"]


def test_a_published_port_reaches_the_endpoints_on_the_hosts_addresses(lab):
    lab.dataplane().sync([web("b1", "b2", published=30080)])
    for address in (HOST_TO_CLIENT, HOST_TO_BACKENDS):
        assert seen(lab.get(address, 30080, 20)).keys() <= {"b1", "b2"}
        assert sum(seen(lab.get(address, 30080, 20)).values()) == 20
    lab.dataplane().sync([web(published=30080)])  # a new instance: reconciles to no endpoints
    assert lab.get(HOST_TO_CLIENT, 30080, 1) == ["refused"]


def test_removing_an_endpoint_is_an_incremental_change_and_new_connections_stop_going_there(lab):
    dataplane = lab.dataplane()
    dataplane.sync([web("b1", "b2", "b3"), empty()])
    assert seen(lab.get(VIP, 80, 30)).keys() == {"b1", "b2", "b3"}
    report = dataplane.sync([web("b1", "b2"), empty()])
    assert report.mode == "incremental"
    # 2 slots + the group entry re-pointed, 3 old slots and b3's counter gone
    assert report.elements == 2 + 2 + 3 + 1, report
    results = lab.get(VIP, 80, 30)
    assert seen(results).keys() == {"b1", "b2"} and sum(seen(results).values()) == 30
    # the emptied 3-endpoint group is gone with it: one group chain left
    assert [line.split()[1] for line in lab.nft("list", "chains", "ip").splitlines() if line.strip().startswith("chain svc_n")] == ["svc_n2"]
    assert dataplane.sync([web("b1", "b2"), empty()]).mode == "unchanged"


def test_a_restarted_dataplane_finds_the_kernel_right_and_changes_nothing(lab):
    services = [web("b1", "b2", local=("b1",)), empty()]
    lab.dataplane().sync(services)
    lab.get(VIP, 80, 5)
    before = lab.nft("list", "table", "ip", lab.table)
    again = lab.dataplane()  # a new process's dataplane
    report = again.sync(services)
    assert report.mode == "unchanged" and report.commands == 0
    assert lab.nft("list", "table", "ip", lab.table) == before, "not even the counters moved"
    assert lab.nft("list", "tables").split().count(lab.table) == 1
    # and it goes on incrementally from there
    assert again.sync([web("b1"), empty()]).mode == "incremental"
    assert seen(lab.get(VIP, 80, 10)) == {"b1": 10}


def test_a_restart_with_other_services_replaces_the_table_whole_and_keeps_the_counters(lab):
    lab.dataplane().sync([web("b1", "b2"), empty()])
    lab.get(VIP, 80, 12)
    again = lab.dataplane(counters_max_age=0)
    assert again.sync([web("b1", "b2", "b3")]).mode == "full"
    assert lab.nft("list", "tables").split().count(lab.table) == 1
    assert OTHER_VIP not in lab.nft("list", "table", "ip", lab.table)
    counted = {c.target: c.packets for c in again.counters("d", "web")}
    assert counted[""] == 12, counted
    assert counted[f"{BACKENDS['b1']}:8080"] + counted[f"{BACKENDS['b2']}:8080"] == 12
    assert counted[f"{BACKENDS['b3']}:8080"] == 0


def test_counters_per_service_and_endpoint_count_connections(lab):
    dataplane = lab.dataplane(counters_max_age=0)
    dataplane.sync([web("b1", "b2", "b3", published=30080), empty()])
    results = lab.get(VIP, 80, 30) + lab.get(HOST_TO_CLIENT, 30080, 10)
    counters = {(c.port, c.target): (c.packets, c.bytes) for c in dataplane.counters("d", "web")}
    assert counters[("http", "")][0] == 40
    assert counters[("http", "")][1] >= 40 * 60, "bytes of the first packets (SYNs) at least"
    by_backend = seen(results)
    for name, address in BACKENDS.items():
        assert counters[("http", f"{address}:8080")][0] == by_backend[name], (name, counters, by_backend)
    assert {c.node_id for c in dataplane.counters("d", "web")} == {NODE}
    # attempts at a port without endpoints are counted too, though refused
    lab.get(OTHER_VIP, 80, 3)
    assert {(c.port, c.target): c.packets for c in dataplane.counters("d", "empty")} == {("http", ""): 3, ("udp-53", ""): 0}
    # an endpoint moving between groups (3 -> 2 endpoints) keeps its count
    dataplane.sync([web("b1", "b2", published=30080), empty()])
    after = {(c.port, c.target): c.packets for c in dataplane.counters("d", "web")}
    assert after[("http", "")] == 40 and after[("http", f"{BACKENDS['b1']}:8080")] == by_backend["b1"]
    assert dataplane.counters("d", "nothing") == []


def test_hairpin_an_endpoint_on_this_host_reaches_itself_through_the_vip(lab):
    dataplane = lab.dataplane()
    dataplane.sync([web("b1", local=("b1",))])
    # masqueraded: b1 sees the host's address, and its reply comes back through the DNAT
    assert lab.get(VIP, 80, 3, netns=lab.backends, source=BACKENDS["b1"]) == [f"b1 {HOST_TO_BACKENDS}"] * 3
    # (a client elsewhere keeps its own address: see the spread test)
    # an endpoint on another host is not masqueraded here; reaching itself through this
    # host would then fail (its own address coming back in is a martian): why the set exists
    dataplane.sync([web("b1")])
    assert lab.get(VIP, 80, 1, netns=lab.backends, source=BACKENDS["b1"], timeout=1) == ["timeout"]


def test_a_refused_change_leaves_the_ruleset_whole_names_the_service_and_the_next_sync_repairs(lab):
    dataplane = lab.dataplane()
    dataplane.sync([web("b1", "b2", "b3"), empty()])
    # Someone else removes one of the table's elements (b3's slot): the next change, which
    # deletes it too, is refused by the kernel as a whole.
    lab.nft("delete", "element", "ip", lab.table, "svc_ep_n3", "{", f"{VIP} . tcp . 80 . 2", "}")
    before = lab.nft("list", "table", "ip", lab.table)
    with pytest.raises(DataplaneError, match=r"service d\.web\b.*No such file or directory"):
        dataplane.sync([web("b1", "b2"), empty()])
    assert lab.nft("list", "table", "ip", lab.table) == before, "nothing of the refused change applied"
    report = dataplane.sync([web("b1", "b2"), empty()])
    assert report.mode == "full", "after a refusal the next sync starts from what the kernel holds"
    results = lab.get(VIP, 80, 20)
    assert seen(results).keys() == {"b1", "b2"} and sum(seen(results).values()) == 20


def test_a_service_the_kernel_could_not_serve_is_refused_before_anything_is_applied(lab):
    dataplane = lab.dataplane()
    dataplane.sync([web("b1"), empty()])
    before = lab.nft("list", "table", "ip", lab.table)
    clash = empty(vip=VIP)  # port 80 on web's VIP
    with pytest.raises(RulesetError, match=r"service d\.web: 10\.96\.0\.10 tcp port 80 is also d\.empty's|service d\.empty: 10\.96\.0\.10 tcp port 80 is also d\.web's"):
        dataplane.sync([web("b1"), clash])
    assert lab.nft("list", "table", "ip", lab.table) == before
    assert dataplane.sync([web("b1", "b2"), empty()]).mode == "incremental", "the refusal did not cost a full resync"


def test_dockers_forward_drop_is_opened_for_dnat_once_and_closed_on_cleanup(lab):
    # Docker's shape: FORWARD policy DROP, and a DOCKER-USER chain jumped to first.
    for cmd in (("-N", "DOCKER-USER"), ("-A", "DOCKER-USER", "-j", "RETURN"), ("-P", "FORWARD", "DROP"), ("-A", "FORWARD", "-j", "DOCKER-USER")):
        sh("iptables", *cmd)
    assert lab.dataplane(docker_user_rule=False).sync([web("b1")]).mode == "full"
    assert lab.get(VIP, 80, 1, timeout=1) == ["timeout"], "dropped by Docker's FORWARD policy"
    dataplane = lab.dataplane()
    dataplane.sync([web("b1")])
    lab.dataplane().sync([web("b1")])  # another instance: still one copy
    rules = sh("iptables", "-S", "DOCKER-USER").stdout.splitlines()
    ours = [r for r in rules if f"comp-lb:{lab.table}" in r]
    assert ours == [f'-A DOCKER-USER -m conntrack --ctstate DNAT -m comment --comment "comp-lb:{lab.table}" -j ACCEPT'], rules
    assert rules.index(ours[0]) < rules.index("-A DOCKER-USER -j RETURN")
    assert seen(lab.get(VIP, 80, 3)) == {"b1": 3}
    dataplane.cleanup()
    assert sh("iptables", "-S", "DOCKER-USER").stdout.splitlines() == ["-N DOCKER-USER", "-A DOCKER-USER -j RETURN"]
    assert lab.table not in lab.nft("list", "tables")


def test_cleanup_removes_the_table_and_the_next_sync_starts_over(lab):
    dataplane = lab.dataplane()
    assert dataplane.unavailable() is None
    dataplane.sync([web("b1")])
    dataplane.cleanup()
    assert lab.table not in lab.nft("list", "tables")
    assert lab.get(VIP, 80, 1, timeout=1) != ["b1 " + CLIENT]
    dataplane.cleanup()  # nothing left to remove: no error
    assert dataplane.sync([web("b2")]).mode == "full"
    assert seen(lab.get(VIP, 80, 3)) == {"b2": 3}
