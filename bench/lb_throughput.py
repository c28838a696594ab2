"""bench lb_throughput: HTTP requests/s through a service VIP against the same backends addressed directly.

Everything runs in network namespaces this bench creates (and deletes, even on Ctrl-C):

    client-direct --veth--+           +--veth-- backend-0   nginx (default) or busybox
                          +- router --+--veth-- backend-1   httpd on ADDR:80, a 512-byte
    client-vip    --veth--+           +--veth-- backend-2   page

The router forwards; clients and backends route everything through it, the VIP included
(a client's default route; the router holds no address for it). COMP's nftables
dataplane programs the router, run inside the router's namespace by a small Python
process that keeps one dataplane object for the whole run, as the lb service would, and
syncs one service: VIP 10.96.0.10:80/tcp with the three backends as endpoints. Direct
rounds run with those rules loaded, as all traffic crossing a host that runs the lb
does; the difference is what the VIP adds: its lookup, the spread, the counters and the
DNAT.  A third figure replaces COMP's table with one hand-written DNAT rule (no
counters, no refusal, no groups): the least any nftables balancer costs.

The load is the same in all: 3 wrk processes at once, 1 thread each, the connections
split among them (32 -> 11 + 11 + 10), for the same duration. Direct, process i targets
backend i; through the VIP all 3 target the VIP, which spreads the connections over the
backends. Only the destination differs. (Running one wrk per backend one after another
and summing would not be the same load: each backend would have the whole machine to
itself in turn, and the sum would count the machine three times.) By default every
request is a new connection (``Connection: close``): a new DNAT decision, conntrack
entry and counter update each, the balancer's worst case; ``--keep-alive`` reuses them.

The two loads come from two identical client namespaces. From one, a VIP connection
and an earlier direct one could share an address pair and port at a backend, which
still holds the direct one in TIME_WAIT, but with TCP timestamps from another clock
(Linux offsets them per destination address: the VIP's, the backend's): the backend
refuses the SYN as old and the connection stalls for a second. Measured on one client:
~4,700 SYN retransmissions in a direct round after VIP rounds, ~20 otherwise.

Each round also prints the SYNs the backends dropped because their accept queue was
full. nginx listens here with a backlog of 4096. busybox httpd (``--server busybox``)
listens with one of 9: through the VIP, where connections are assigned without regard to
how far behind a backend is, it dropped ~200 SYNs a round (~20 direct), each a second's
stall counted against the VIP: a property of that server, not of the rules.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from netns import Namespace, add_route, enable_forwarding, require_netns, veth_link, wait_for_http  # noqa: E402

from comp_common.messages import Endpoint, EndpointCounter, EndpointPort, ServiceEndpoints  # noqa: E402

VIP = "10.96.0.10"
BACKENDS = 3
SERVICE = ServiceEndpoints(namespace="bench", name="web", mode="vip", vip=VIP,
                           ports=[EndpointPort(name="http", port=80, protocol="tcp")])
TABLE = "comp_lb_bench"

# Runs in the router's namespace: one dataplane object, driven by JSON lines on stdin,
# one JSON reply per line on stdout.
_DATAPLANE_SERVER = """
import json, sys, traceback
from comp_common.messages import ServiceEndpoints
from comp_lb.dataplane import DATAPLANES
dataplane = DATAPLANES["nftables"](node_id=sys.argv[1], table=sys.argv[2])
for line in sys.stdin:
    request = json.loads(line)
    try:
        if request["op"] == "sync":
            dataplane.sync([ServiceEndpoints.model_validate(s) for s in request["services"]])
            reply = {}
        elif request["op"] == "counters":
            counters = dataplane.counters(request["namespace"], request["name"])
            reply = {"counters": [c.model_dump(mode="json") for c in counters]}
        elif request["op"] == "cleanup":
            dataplane.cleanup()
            reply = {}
        else:
            reply = {"error": "unknown op " + request["op"]}
    except Exception:
        reply = {"error": traceback.format_exc()}
    print(json.dumps(reply), flush=True)
"""


class RouterDataplane:
    """COMP's nftables dataplane, living in ``router``'s network namespace."""

    def __init__(self, router: Namespace, log: Path) -> None:
        self._log = log
        with open(log, "wb") as stderr:
            self._process = router.popen(
                [sys.executable, "-c", _DATAPLANE_SERVER, "router", TABLE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )

    def _call(self, **request: Any) -> dict:
        assert self._process.stdin and self._process.stdout
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the dataplane process exited: {self._log.read_text().strip()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"dataplane {request['op']}: {reply['error']}")
        return reply

    def sync(self, services: list[ServiceEndpoints]) -> None:
        self._call(op="sync", services=[s.model_dump(mode="json") for s in services])

    def counters(self, namespace: str, name: str) -> list[EndpointCounter]:
        return [EndpointCounter.model_validate(c) for c in self._call(op="counters", namespace=namespace, name=name)["counters"]]

    def cleanup(self) -> None:
        self._call(op="cleanup")

    def close(self) -> None:
        """Remove the rules (the dataplane's own ``cleanup``) and stop its process. Not
        raising when that fails: deleting the router's namespace removes the table anyway,
        and an error here must not hide the one that unwound the bench."""
        try:
            if self._process.poll() is None:
                self._call(op="cleanup")
        except (RuntimeError, OSError) as error:
            print(f"lb_throughput: dataplane cleanup failed: {error}", file=sys.stderr)
        finally:
            if self._process.stdin:
                self._process.stdin.close()


@dataclass
class Topology:
    router: Namespace
    direct_client: Namespace
    vip_client: Namespace
    backends: list[Namespace]
    backend_addresses: list[str]


PLAIN_DNAT = """
table ip bench_plain {{
    chain prerouting {{
        type nat hook prerouting priority dstnat;
        ip daddr {vip} tcp dport 80 dnat ip to numgen random mod {count} map {{ {targets} }}
    }}
}}
"""

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{ listen {address}:80 backlog=4096; root {www}; }}
}}
"""


def serve(backend: Namespace, address: str, www: Path, server: str) -> None:
    if server == "busybox":
        backend.popen(["busybox", "httpd", "-f", "-p", f"{address}:80", "-h", str(www)])
        return
    # nginx: a listen backlog of 4096, where busybox httpd's is 9 (see the module's notes).
    conf_dir = www.parent / f"nginx-{address}"
    conf_dir.mkdir()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, address=address, www=www))
    backend.popen(["nginx", "-c", str(conf), "-e", str(conf_dir / "error.log")])


def build(stack: ExitStack, www: Path, server: str) -> Topology:
    router = stack.enter_context(Namespace("router"))
    enable_forwarding(router)
    clients = []
    for purpose in ("direct", "vip"):
        client = stack.enter_context(Namespace(f"client-{purpose}"))
        uplink = veth_link(client, router)
        # The default route carries the VIP to the router: the client knows nothing of it.
        add_route(client, "0.0.0.0/0", uplink.b_ip)
        clients.append(client)
    backends, addresses = [], []
    for i in range(BACKENDS):
        backend = stack.enter_context(Namespace(f"backend{i}"))
        link = veth_link(backend, router)
        # Replies must cross the router too, or the DNAT could not be undone on the way back.
        add_route(backend, "0.0.0.0/0", link.b_ip)
        serve(backend, link.a_ip, www, server)
        backends.append(backend)
        addresses.append(link.a_ip)
    router_addresses = router.run(["ip", "-4", "-o", "addr", "show"], check=True).stdout
    assert f" {VIP}/" not in router_addresses, "the router must reach the VIP by its rules, not own it"
    for address in addresses:
        wait_for_http(clients[0], f"http://{address}/")
    return Topology(router, clients[0], clients[1], backends, addresses)


@dataclass
class Load:
    requests_per_s: float
    requests: int
    errors: int
    listen_overflows: int = 0


def listen_overflows(backends: list[Namespace]) -> int:
    """SYNs the backends dropped because their accept queue was full (the kernel's
    TcpExt ListenOverflows, per namespace): each one stalls a connection for the 1 s of
    the SYN's first retransmission."""
    total = 0
    for backend in backends:
        lines = backend.run(["cat", "/proc/net/netstat"], check=True).stdout.splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            if names.startswith("TcpExt:"):
                total += int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return total


def split(connections: int, parts: int) -> list[int]:
    return [connections // parts + (i < connections % parts) for i in range(parts)]


def load(client: Namespace, urls: list[str], connections: int, duration: int, backends: list[Namespace], close: bool) -> Load:
    """One wrk per URL, all at once, 1 thread each, ``connections`` split among them."""
    overflows_before = listen_overflows(backends)
    # Connection: close makes every request a new connection, so a new DNAT decision and
    # conntrack entry: the lb's worst case.  Without it wrk keeps its connections open.
    header = ["-H", "Connection: close"] if close else []
    processes = [
        client.popen(["wrk", "-t1", f"-c{share}", f"-d{duration}s", *header, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for url, share in zip(urls, split(connections, len(urls)), strict=True)
    ]
    outputs = [p.communicate(timeout=duration + 30)[0] for p in processes]
    total = Load(0.0, 0, 0)
    for url, output in zip(urls, outputs, strict=True):
        rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
        count = re.search(r"(\d+) requests in", output)
        if not rate or not count:
            raise RuntimeError(f"wrk against {url} printed no figures:\n{output}")
        total.requests_per_s += float(rate.group(1))
        total.requests += int(count.group(1))
        socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        total.errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
        total.errors += int(non_2xx.group(1)) if non_2xx else 0
    total.listen_overflows = listen_overflows(backends) - overflows_before
    return total


def connections_by_endpoint(dataplane: RouterDataplane) -> dict[str, int]:
    # The nat chain sees only a connection's first packet: its packets are connections.
    return {c.target: c.packets for c in dataplane.counters(SERVICE.namespace, SERVICE.name) if c.target}


def _interrupt(signum: int, frame: object) -> None:
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, through the clean-up of every
    # namespace and process this bench made.
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="direct/VIP pairs (default 3)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections in all (default 32)")
    parser.add_argument("--server", choices=("nginx", "busybox"), default="nginx", help="backend HTTP server (default nginx)")
    parser.add_argument("--keep-alive", action="store_true", help="reuse connections (default: one connection per request)")
    args = parser.parse_args()
    if reason := require_netns():
        sys.exit(f"lb_throughput: {reason}")
    if args.connections < BACKENDS:
        sys.exit(f"lb_throughput: --connections must be at least {BACKENDS} (one per wrk)")
    signal.signal(signal.SIGTERM, _interrupt)

    with tempfile.TemporaryDirectory(prefix="comp-bench-lb-") as tmp, ExitStack() as stack:
        www = Path(tmp) / "www"
        www.mkdir()
        (www / "index.html").write_text("x" * 511 + "\n")
        topology = build(stack, www, args.server)
        dataplane = RouterDataplane(topology.router, Path(tmp) / "dataplane.log")
        # Registered after the namespaces, so it runs before they are deleted.
        stack.callback(dataplane.close)
        endpoints = [
            Endpoint(task_id=f"web-{i}", node_id=f"backend-{i}", address=address, ports={"http": 80})
            for i, address in enumerate(topology.backend_addresses)
        ]
        service = SERVICE.model_copy(update={"endpoints": endpoints})
        plain_rules = PLAIN_DNAT.format(
            vip=VIP, count=len(endpoints),
            targets=", ".join(f"{i} : {e.address} . 80" for i, e in enumerate(endpoints)),
        )

        direct_urls = [f"http://{address}/" for address in topology.backend_addresses]
        vip_urls = [f"http://{VIP}/"] * BACKENDS
        shares = "+".join(map(str, split(args.connections, BACKENDS)))
        direct, vip, plain = [], [], []
        vip_requests = 0
        counted: dict[str, int] = {}
        for r in range(args.rounds):
            # Direct traffic crosses the router with COMP's rules loaded, as it would cross a
            # host running the lb: both pay for conntrack and the filter hooks alike.
            dataplane.sync([service])
            wait_for_http(topology.vip_client, f"http://{VIP}/")
            direct.append(load(topology.direct_client, direct_urls, args.connections, args.duration, topology.backends, not args.keep_alive))
            before = connections_by_endpoint(dataplane)
            vip.append(load(topology.vip_client, vip_urls, args.connections, args.duration, topology.backends, not args.keep_alive))
            for target, connections in connections_by_endpoint(dataplane).items():
                counted[target] = counted.get(target, 0) + connections - before.get(target, 0)
            vip_requests += vip[-1].requests
            # The floor for any nftables DNAT: one rule, no counting, no refusal, no groups.
            dataplane.cleanup()
            topology.router.run(["nft", "-f", "-"], input=plain_rules, check=True)
            plain.append(load(topology.vip_client, vip_urls, args.connections, args.duration, topology.backends, not args.keep_alive))
            topology.router.run(["nft", "delete", "table", "ip", "bench_plain"], check=True)
            print(f"round {r + 1}: direct {direct[-1].requests_per_s:.0f} req/s "
                  f"({direct[-1].errors} errors, {direct[-1].listen_overflows} SYNs dropped by full listen queues); "
                  f"vip {vip[-1].requests_per_s:.0f} req/s ({vip[-1].errors} errors, {vip[-1].listen_overflows} dropped); "
                  f"one plain DNAT rule {plain[-1].requests_per_s:.0f} req/s ({plain[-1].errors} errors)")

        d = statistics.median(x.requests_per_s for x in direct)
        v = statistics.median(x.requests_per_s for x in vip)
        p = statistics.median(x.requests_per_s for x in plain)
        mode = "keep-alive" if args.keep_alive else "a new connection per request"
        print(f"lb throughput ({BACKENDS} {args.server} backends, wrk x{BACKENDS} at once, {shares} connections, {mode}, "
              f"{args.duration} s, median of {args.rounds}): vip {v:.0f} req/s vs direct {d:.0f} req/s; "
              f"ratio vip/direct = {v / d:.2f} (target >= 0.9); one plain DNAT rule {p:.0f} req/s, ratio {p / d:.2f}")
        print(f"connections per endpoint during the VIP rounds (dataplane counters; wrk completed {vip_requests} requests):")
        for target, connections in sorted(counted.items()):
            share = connections / max(1, sum(counted.values()))
            print(f"  {target}: {connections} ({share:.0%})")


if __name__ == "__main__":
    main()
