"""bench placement: the scheduler's pure placement core, placements per second at 5,000 nodes.

One process, one core, no I/O.  The cluster: N nodes (default 5,000) in zones a..e, with a
disk label (ssd/hdd), varied capacity (4-32 cores, 16-128 GiB), 5% tainted
dedicated=gpu:NoSchedule (and labelled gpu=true), 1% down.  The work: D deployments
(default 100) of T/D replicas each (T default 50,000), every one spread_by zone and most
with constraints (zone in / zone != / disk = ssd / gpu exists), a tenth tolerating the
gpu taint, a fifth binpacking, some with max_per_node; all placed by one
``reconcile(desired, observed, now, rng)`` call from an empty cluster, timed from the call
to the plan (the node snapshot's classes, the heaps, the task ids and the plan included).

Also timed, for information: the next round after every deployment grows by 10% (the
incremental case: one heap build per growing deployment, whatever it adds).  With
``--namespaces K`` the deployments are dealt round-robin into K namespaces, so placements
interleave across them by dominant resource fairness (each turn may re-score the nodes the
other namespaces changed); the default, 1, is the figure to compare across versions.

Printed beside it, measured in the same run: the original full-scan placer (every filter
and scorer on every node for every placement) on the first replicas of the same
deployments, and the ratio.  Anchors from elsewhere: kube-scheduler's CI floor at 5,000
nodes, 680 pods/s; Nomad's C1M, 3,750 placements/s with 5 servers.  Target: 10,000/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from types import MappingProxyType

from comp_common.manifest import DeploymentSpec
from comp_scheduler.model import Desired, Node, NodeStatus, Observed, Plan, Taint, Task
from comp_scheduler.placement import FullScanPlacer, Request, Usage
from comp_scheduler.reconcile import reconcile

KUBE_SCHEDULER_5000_NODES = 680.0
NOMAD_C1M = 3750.0
TARGET = 10_000.0
GI = 1024**3
ZONES = "abcde"
GPU_TAINT = Taint("dedicated", "gpu", "NoSchedule")


def build_nodes(count: int, rng: random.Random) -> list[Node]:
    nodes = []
    for i in range(count):
        tainted = rng.random() < 0.05
        labels = {"zone": rng.choice(ZONES), "disk": rng.choice(("ssd", "hdd"))}
        if tainted:
            labels["gpu"] = "true"
        status = NodeStatus.DOWN if rng.random() < 0.01 else NodeStatus.READY
        nodes.append(
            Node(
                f"node-{i:05d}",
                status,
                rng.choice((4.0, 8.0, 16.0, 32.0)),
                rng.choice((16, 32, 64, 128)) * GI,
                MappingProxyType(labels),
                frozenset({GPU_TAINT}) if tainted else frozenset(),
            )
        )
    return nodes


CONSTRAINTS = [
    [],
    [{"label": "zone", "op": "in", "values": ["a", "b", "c"]}],
    [{"label": "zone", "op": "!=", "value": "e"}],
    [{"label": "disk", "value": "ssd"}],
    [{"label": "zone", "op": "in", "values": ["b", "d"]}, {"label": "disk", "op": "!=", "value": "hdd"}],
]


def build_deployments(count: int, tasks: int, rng: random.Random, namespaces: int = 1) -> dict[str, Desired]:
    desired = {}
    per = tasks // count
    for i in range(count):
        placement: dict = {"spread_by": "zone", "constraints": CONSTRAINTS[i % len(CONSTRAINTS)]}
        if i % 10 == 0:
            placement["tolerations"] = [{"key": "dedicated", "value": "gpu"}]
            placement["constraints"] = [{"label": "gpu", "op": "exists"}]
        if i % 5 == 1:
            placement["strategy"] = "binpack"
        if i % 7 == 3:
            placement["max_per_node"] = 2
        if i % 4 == 2:
            placement["affinity"] = [{"label": "disk", "value": "ssd", "weight": 3}]
        spec = DeploymentSpec(
            replicas=per + (1 if i < tasks % count else 0),
            image="bench:1",
            resources={"cpu": rng.choice((0.1, 0.25, 0.5)), "memory": f"{rng.choice((64, 128, 256, 512))}Mi"},
            placement=placement,
        )
        key = f"bench{i % namespaces}.d{i:03d}" if namespaces > 1 else f"bench.d{i:03d}"
        desired[key] = Desired(key=key, name=f"d{i:03d}", spec=spec, spec_hash=spec.task_hash())
    return desired


def run_reconcile(desired: dict[str, Desired], nodes: list[Node], seed: int) -> tuple[float, float, Plan]:
    """(wall seconds, CPU seconds of this process, the plan) of one reconcile call."""
    observed = Observed(MappingProxyType({n.node_id: n for n in nodes}), MappingProxyType({}))
    start, start_cpu = time.perf_counter(), time.process_time()
    plan = reconcile(desired, observed, 0.0, random.Random(seed))
    return time.perf_counter() - start, time.process_time() - start_cpu, plan


def run_scale_up(desired: dict[str, Desired], nodes: list[Node], plan: Plan, seed: int) -> tuple[float, int]:
    """Every deployment +10% on the cluster ``plan`` filled: (CPU seconds, placed) of that round.

    The incremental case (an autoscaler's round): every deployment that gains replicas
    costs one pass over the nodes to build its heap, however few it gains.
    """
    tasks = {
        p.task_id: Task(p.task_id, p.deployment, p.node_id, desired[p.deployment].spec_hash,
                        desired[p.deployment].spec.resources.cpu, desired[p.deployment].spec.resources.memory)
        for p in plan.places
    }
    observed = Observed(MappingProxyType({n.node_id: n for n in nodes}), MappingProxyType(tasks))
    bigger = {
        key: dataclasses.replace(d, spec=d.spec.model_copy(update={"replicas": d.spec.replicas + d.spec.replicas // 10}))
        for key, d in desired.items()
    }
    start = time.process_time()
    placed = len(reconcile(bigger, observed, 0.0, random.Random(seed)).places)
    return time.process_time() - start, placed


def run_full_scan(desired: dict[str, Desired], nodes: list[Node], placements: int) -> tuple[float, float, int]:
    """The original placer on the same deployments, round-robin: (wall s, CPU s, placed)."""
    placer = FullScanPlacer(nodes, Usage())
    requests = [Request.of(d) for d in desired.values()]
    placed = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(placements):
        if placer.place(requests[i % len(requests)]).node_id is not None:
            placed += 1
    return time.perf_counter() - start, time.process_time() - start_cpu, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="timed reconcile calls; the median is reported")
    parser.add_argument("--baseline", type=int, default=300, help="placements timed with the full-scan placer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--namespaces", type=int, default=1, help="namespaces the deployments are dealt into")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    nodes = build_nodes(args.nodes, rng)
    desired = build_deployments(args.deployments, args.tasks, rng, args.namespaces)
    print(
        f"cluster: {args.nodes} nodes ({sum(n.status is NodeStatus.READY for n in nodes)} ready, "
        f"{sum(bool(n.taints) for n in nodes)} tainted, zones {'/'.join(ZONES)}); "
        f"{args.deployments} deployments in {args.namespaces} namespace(s), {args.tasks} tasks, all spread_by zone, "
        f"{sum(bool(d.spec.placement.constraints) for d in desired.values())} with constraints"
    )

    walls, cpus = [], []
    for r in range(args.rounds):
        wall, cpu, plan = run_reconcile(desired, nodes, args.seed + r)
        walls.append(wall)
        cpus.append(cpu)
        placed, pending = len(plan.places), sum(p.count for p in plan.pending)
        print(f"round {r + 1}: reconcile placed {placed} ({pending} pending) in {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"= {placed / cpu:,.0f}/s")
    for p in plan.pending[:3]:
        print(f"  pending {p.deployment} x{p.count}: {p.reason}")
    # CPU seconds of this one-threaded process: the figure for one core, whatever else the
    # machine is running at the time (the wall-clock figure is printed beside it).
    fast = placed / statistics.median(cpus)
    fast_wall = placed / statistics.median(walls)

    scale_cpu, scale_placed = run_scale_up(desired, nodes, plan, args.seed)
    print(f"scale-up round: every deployment +10% on the {placed}-task cluster: {scale_placed} placed in {scale_cpu:.2f} s CPU "
          f"= {scale_placed / scale_cpu:,.0f}/s ({args.deployments} heap builds over {args.nodes} nodes dominate)")

    base_wall, base_cpu, base_placed = run_full_scan(desired, nodes, args.baseline)
    base = base_placed / base_cpu
    print(f"baseline: full-scan placer, {base_placed} placements in {base_wall:.2f} s wall, {base_cpu:.2f} s CPU = {base:,.0f}/s")

    print()
    print(f"placement core at {args.nodes} nodes, constraints + spread by zone: {fast:,.0f} placements/s "
          f"per CPU second ({fast_wall:,.0f}/s wall clock)")
    print(f"  vs full-scan placer (same run)     {base:>10,.0f}/s   ratio {fast / base:,.1f}x")
    print(f"  vs kube-scheduler CI floor (5,000) {KUBE_SCHEDULER_5000_NODES:>10,.0f}/s   ratio {fast / KUBE_SCHEDULER_5000_NODES:,.1f}x")
    print(f"  vs Nomad C1M (5 servers)           {NOMAD_C1M:>10,.0f}/s   ratio {fast / NOMAD_C1M:,.1f}x")
    print(f"  target                             {TARGET:>10,.0f}/s   {'met' if fast >= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
