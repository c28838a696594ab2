"""Network namespaces for tests and benchmarks: a small topology of hosts, links and
routes on one machine, with real kernels paths (veth, forwarding, nftables) in between.

Everything here works through ``ip netns`` and ``ip netns exec``, so it needs root.
Call ``require_netns()`` first and skip with its reason when it returns one.

    with Namespace("router") as router, Namespace("client") as client:
        enable_forwarding(router)
        link = veth_link(client, router)
        add_route(client, "0.0.0.0/0", link.b_ip)
        client.run(["ping", "-c1", link.b_ip], check=True)

The host's own namespace is touched only where a caller passes ``None`` to
``veth_link`` (an address and a veth end on the host); ``add_route`` and
``enable_forwarding`` refuse it, so a topology cannot change the host's routing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Namespace",
    "VethLink",
    "veth_link",
    "add_route",
    "enable_forwarding",
    "http_get",
    "wait_for_http",
    "require_netns",
]

# Where automatic link subnets come from: private space that a test machine is unlikely
# to route, picked at random so that two test processes rarely draw the same /30.
_AUTO_POOL = ipaddress.ip_network("10.200.0.0/14")
_handed_out: set[ipaddress.IPv4Network] = set()


def _ip(argv: list[str], *, namespace: str | None = None) -> None:
    """Run an ``ip`` command, in ``namespace`` when given; raise with its stderr on failure."""
    full = ["ip", *(["-n", namespace] if namespace else []), *argv]
    done = subprocess.run(full, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {done.stderr.strip()}")


class Namespace:
    """A network namespace named ``comp-<purpose>-<random>``, created on construction.

    ``lo`` is brought up at once (a server bound to 127.0.0.1 in it works). Processes
    started with ``popen`` are killed by ``delete()``, as is anything else still running
    inside; a ``with`` block deletes on exit, exception or Ctrl-C alike.
    """

    def __init__(self, purpose: str) -> None:
        # Interface-style names stay short; the random part keeps parallel runs apart.
        self.name = f"comp-{purpose}-{secrets.token_hex(3)}"
        self._processes: list[subprocess.Popen] = []
        self._deleted = False
        _ip(["netns", "add", self.name])
        try:
            _ip(["link", "set", "lo", "up"], namespace=self.name)
        except BaseException:
            _ip(["netns", "del", self.name])
            raise

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the namespace; output is captured as text unless the
        caller says otherwise."""
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        return subprocess.run(self.exec_argv(argv), **kw)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start a long-running process inside the namespace (a server, a load generator).

        It gets a session of its own, so that ``delete()`` can signal it with whatever it
        forked, and a Ctrl-C in the terminal reaches the caller only, which then cleans up.
        Output goes to /dev/null unless ``stdout``/``stderr`` are given.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw["start_new_session"] = True
        process = subprocess.Popen(self.exec_argv(argv), **kw)
        self._processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one (ours or not)."""
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def delete(self) -> None:
        """Kill the processes started here (TERM, then KILL after 2 s), then anything else
        left inside, and delete the namespace. Its veth ends go with it, and so do their
        peers elsewhere. Safe to call twice."""
        if self._deleted:
            return
        for process in self._processes:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # A process started with ``run`` that outlived its caller (a timeout, a fork)
        # would keep the namespace alive after ``ip netns del``: it must not.
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip(["netns", "del", self.name])
        self._deleted = True

    def exists(self) -> bool:
        return os.path.exists(f"/run/netns/{self.name}")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class VethLink:
    """The two ends of a veth pair: interface names and addresses with their prefix
    (``a_addr``) and without (``a_ip``), ``a`` and ``b`` as passed to ``veth_link``."""

    a_if: str
    b_if: str
    a_addr: str
    b_addr: str

    @property
    def a_ip(self) -> str:
        return self.a_addr.split("/")[0]

    @property
    def b_ip(self) -> str:
        return self.b_addr.split("/")[0]


def _host_networks() -> list[ipaddress.IPv4Network]:
    done = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    networks = []
    for route in json.loads(done.stdout or "[]"):
        destination = route.get("dst", "")
        if destination in ("", "default"):
            continue
        try:
            networks.append(ipaddress.ip_network(destination, strict=False))
        except ValueError:
            pass
    return networks


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 from the pool that this process has not handed out and that the host does
    not already route (a host-side end would otherwise shadow a real route)."""
    taken = _host_networks()
    for _ in range(1000):
        index = random.randrange(_AUTO_POOL.num_addresses // 4)
        subnet = ipaddress.ip_network(f"{_AUTO_POOL.network_address + index * 4}/30")
        if subnet not in _handed_out and not any(subnet.overlaps(n) for n in taken):
            _handed_out.add(subnet)
            return subnet
    raise RuntimeError(f"no free /30 left in {_AUTO_POOL}")


def veth_link(a: Namespace | None, b: Namespace | None, a_addr: str | None = None, b_addr: str | None = None) -> VethLink:
    """Connect ``a`` and ``b`` (``None``: the host's own namespace) with a veth pair,
    address both ends and bring them up.

    Without addresses a fresh /30 is used, ``.1`` on ``a`` and ``.2`` on ``b``. Give both
    addresses or neither. ``lo`` is already up in every ``Namespace``.
    """
    if a is None and b is None:
        raise ValueError("at least one end of a veth link must be in a namespace")
    if (a_addr is None) != (b_addr is None):
        raise ValueError("give both addresses or neither")
    if a_addr is None:
        subnet = _free_subnet()
        a_addr = f"{subnet.network_address + 1}/30"
        b_addr = f"{subnet.network_address + 2}/30"
    assert b_addr is not None
    # Names are random, not derived from the namespaces: the host end must not collide
    # with anything on the host, and 15 characters leave no room for the purposes.
    token = secrets.token_hex(4)
    a_if, b_if = f"cva{token}", f"cvb{token}"
    a_ns = a.name if a else None
    b_ns = b.name if b else None
    # Created in one end's namespace with the peer placed straight into the other's, so
    # the host never holds an interface that belongs to neither end. When one end is the
    # caller's own namespace it is created there (``ip link add`` cannot name that one).
    if b_ns is None:
        _ip(["link", "add", b_if, "type", "veth", "peer", "name", a_if, "netns", str(a_ns)])
    else:
        _ip(["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b_ns], namespace=a_ns)
    try:
        for namespace, interface, address in ((a_ns, a_if, a_addr), (b_ns, b_if, b_addr)):
            _ip(["addr", "add", address, "dev", interface], namespace=namespace)
            _ip(["link", "set", interface, "up"], namespace=namespace)
    except BaseException:
        # Deleting one end deletes the pair.
        subprocess.run(["ip", *(["-n", a_ns] if a_ns else []), "link", "del", a_if], capture_output=True)
        raise
    return VethLink(a_if, b_if, a_addr, b_addr)


def add_route(ns: Namespace, cidr: str, via: str) -> None:
    """Route ``cidr`` (``"0.0.0.0/0"`` for the default) through the neighbour ``via``,
    inside ``ns`` only."""
    if not isinstance(ns, Namespace):
        raise TypeError("add_route changes a Namespace's routes, never the host's")
    _ip(["route", "add", "default" if cidr == "0.0.0.0/0" else cidr, "via", via], namespace=ns.name)


def enable_forwarding(ns: Namespace) -> None:
    """Make ``ns`` a router: IPv4 forwarding on, inside ``ns`` only (the sysctl is per
    network namespace). A new namespace copies the host's value, so forwarding may be on
    already; setting it keeps a topology from depending on how the host is configured."""
    if not isinstance(ns, Namespace):
        raise TypeError("enable_forwarding changes a Namespace, never the host")
    done = ns.run(["sysctl", "-w", "net.ipv4.ip_forward=1"])
    if done.returncode != 0:
        raise RuntimeError(f"sysctl in {ns.name}: {done.stderr.strip()}")


# Runs inside the namespace: prints one JSON line {"status": ..., "body": ...} or
# {"error": ...}. An HTTP error status is an answer (status and body), not an error.
_HTTP_GET = """
import json, sys, urllib.error, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        status, body = response.status, response.read()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read()
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
    sys.exit(0)
print(json.dumps({"status": status, "body": body.decode("utf-8", "replace")}))
"""


def http_get(ns: Namespace, url: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET ``url`` from inside ``ns``: (status, body). Raises ``ConnectionError`` when no
    HTTP answer came (refused, unreachable, timed out)."""
    # Python, not busybox wget: wget hides the status of an error answer and its body.
    # The interpreter is the caller's own, so no package has to exist in the namespace.
    done = ns.run([sys.executable, "-c", _HTTP_GET, url, str(timeout)], timeout=timeout + 10)
    if done.returncode != 0:
        raise RuntimeError(f"http_get in {ns.name} failed: {done.stderr.strip()}")
    answer = json.loads(done.stdout)
    if "error" in answer:
        raise ConnectionError(f"GET {url} from {ns.name}: {answer['error']}")
    return answer["status"], answer["body"]


def wait_for_http(ns: Namespace, url: str, timeout: float = 10.0) -> tuple[int, str]:
    """Poll ``url`` from inside ``ns`` until it answers at all (any status), each try
    with a short timeout; the first answer, or ``TimeoutError`` naming the last failure."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return http_get(ns, url, timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except ConnectionError as error:
            last = error
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer from {ns.name} within {timeout} s; last: {last}")


_netns_reason: list[str | None] = []


def require_netns() -> str | None:
    """Why namespaces cannot be used here (for ``pytest.skip``), or ``None`` when they can.

    Checked once per process by creating and deleting a namespace, since being root is
    not enough (a container without CAP_SYS_ADMIN, no /run/netns mount)."""
    if not _netns_reason:
        _netns_reason.append(_probe_netns())
    return _netns_reason[0]


def _probe_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no ip binary (apt-get install iproute2)"
    try:
        probe = Namespace("probe")
    except RuntimeError as error:
        return f"ip netns unusable: {error}"
    try:
        probe.delete()
    except RuntimeError as error:
        return f"ip netns unusable: {error}"
    return None
