"""bench lb_sync: the nftables dataplane's full sync and one endpoint change at S services
x E endpoints, against plain `nft -f` loads of the same elements.

It runs in a network namespace of its own (it re-runs itself under `unshare -n`), so the
host's ruleset is never touched and the namespace goes when it ends.

COMP's figures are NftablesDataplane.sync from call to return: building the table from
the services (Python), reading the kernel (first sync), and `nft -f`.
The baseline is the smallest table that does the same DNAT, one set of service ports and
one map of (service port, slot) -> endpoint, written to a file beforehand and loaded with
`nft -f` (only nft's and the kernel's time); its one-change figure is one map element
deleted and added back with `nft -f -`.  The baseline table is deleted before COMP's
sync, so the kernel never holds more than one table of this size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_lb.nftables import NftablesDataplane

INSIDE = "COMP_LB_BENCH_NETNS"
NODE = "bench-node"
TABLE = "comp_lb_bench"
BASELINE_TABLE = "plain_bench"
LIMIT = 10_000 * 10  # endpoints: a bigger ruleset once left a netns clean-up stuck for minutes


def vip(i: int) -> str:
    return f"10.96.{i // 256}.{i % 256}"


def address(n: int) -> str:
    return f"10.{64 + n // 65536}.{(n // 256) % 256}.{n % 256}"


def make_services(count: int, per: int) -> list[ServiceEndpoints]:
    return [
        ServiceEndpoints(
            namespace="bench", name=f"s{i}", vip=vip(i), ports=[EndpointPort(name="http", port=80)],
            endpoints=[
                # one endpoint in ten on this host: some hairpin elements, as on a real node
                Endpoint(task_id=f"t{i}-{j}", node_id=NODE if j == 0 else "other", address=address(i * per + j), ports={"http": 8080})
                for j in range(per)
            ],
        )
        for i in range(count)
    ]


def baseline_script(count: int, per: int) -> str:
    lines = [f"table ip {BASELINE_TABLE} {{", "\tset services {",
             "\t\ttypeof ip daddr . meta l4proto . th dport; counter;", "\t\telements = {"]
    lines += [f"\t\t\t{vip(i)} . tcp . 80," for i in range(count)]
    lines += ["\t\t}", "\t}", "\tmap endpoints {",
              f"\t\ttypeof ip daddr . meta l4proto . th dport . numgen random mod {per} : ip daddr . th dport; counter;",
              "\t\telements = {"]
    lines += [f"\t\t\t{vip(i)} . tcp . 80 . {j} : {address(i * per + j)} . 8080," for i in range(count) for j in range(per)]
    lines += ["\t\t}", "\t}", "\tchain output {", "\t\ttype nat hook output priority -100; policy accept;",
              f"\t\tip daddr . meta l4proto . th dport @services dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {per} map @endpoints",
              "\t}", "}"]
    return "\n".join(lines) + "\n"


def nft(script: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"nft -f: {done.stderr.strip()}")
    return elapsed


def run(args: argparse.Namespace) -> None:
    count, per = args.services, args.endpoints
    services = make_services(count, per)
    with tempfile.TemporaryDirectory(prefix="comp-lb-bench-") as tmp:
        plain = Path(tmp) / "plain.nft"
        plain.write_text(baseline_script(count, per))
        start = time.perf_counter()
        subprocess.run(["nft", "-f", str(plain)], check=True)
        base_full = time.perf_counter() - start
    base_changes = []
    for k in range(args.changes):
        i, j = (k * 7919) % count, k % per
        element = f"{vip(i)} . tcp . 80 . {j}"
        base_changes.append(nft(
            f"delete element ip {BASELINE_TABLE} endpoints {{ {element} }}\n"
            f"add element ip {BASELINE_TABLE} endpoints {{ {element} : {address(i * per + j)} . 8080 }}\n"
        ))
    nft(f"delete table ip {BASELINE_TABLE}\n")

    dataplane = NftablesDataplane(NODE, table=TABLE, docker_user_rule=False)
    report = dataplane.sync(services)
    assert report.mode == "full", report
    print(f"full sync: {report.elements} elements; {report.seconds:.2f} s")

    ours = []
    for k in range(args.changes):
        # Take one endpoint out of a service (it moves to the 9-endpoint group), then put
        # it back: each sync is one change.
        i = (k * 7919) % count
        changed = list(services)
        changed[i] = services[i].model_copy(update={"endpoints": services[i].endpoints[1:]})
        for state in (changed, services):
            step = dataplane.sync(state)
            assert step.mode == "incremental", step
            ours.append(step.seconds)
    if args.restart:
        again = NftablesDataplane(NODE, table=TABLE, docker_user_rule=False)
        restart = again.sync(services)
        print(f"restart: a new dataplane's first sync found the kernel {restart.mode} in {restart.seconds:.2f} s "
              "(reading the whole table back)")
    start = time.perf_counter()
    dataplane.cleanup()
    print(f"cleanup: table deleted in {time.perf_counter() - start:.2f} s")

    full, base = report.seconds, base_full
    change, base_change = statistics.median(ours), statistics.median(base_changes)
    print(f"full sync {count} services x {per} endpoints: comp {full:.2f} s vs plain nft -f of the same DNAT elements "
          f"{base:.2f} s; ratio comp/plain = {full / base:.2f} (target < 5 s; kube-proxy nftables mode: minutes at 5,000 services)")
    print(f"one endpoint change at that size: comp {change * 1000:.0f} ms (median of {len(ours)}, "
          f"min {min(ours) * 1000:.0f}, max {max(ours) * 1000:.0f}) vs plain nft -f element delete+add {base_change * 1000:.0f} ms; "
          f"ratio comp/plain = {change / base_change:.2f} (target < 100 ms; kube-proxy nftables mode: 141 ms for one added service at 10,000)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000, help="default 10000")
    parser.add_argument("--endpoints", type=int, default=10, help="per service, default 10")
    parser.add_argument("--changes", type=int, default=9, help="one-change samples (each a remove and a re-add), default 9")
    parser.add_argument("--restart", action="store_true", help="also time a new dataplane's first sync on the loaded kernel")
    args = parser.parse_args()
    if args.services * args.endpoints > LIMIT:
        parser.error(f"at most {LIMIT} endpoints in all: a bigger ruleset once left this machine's netns clean-up stuck")
    if os.environ.get(INSIDE) != "1":
        done = subprocess.run(["unshare", "-n", sys.executable, *sys.argv], env={**os.environ, INSIDE: "1"})
        raise SystemExit(done.returncode)
    run(args)


if __name__ == "__main__":
    main()
