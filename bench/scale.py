"""bench scale: T tasks onto N hollow nodes, from the apply until all are reported running.

The whole control plane runs for real, each part as its own process: nats-server,
redis-server, comp-api, comp-scheduler, and one `comp-nodeagent --driver hollow --count N`
that hosts every node (real heartbeats, nudges, KV reads and task status over NATS; no
containers).  Once all N nodes are ready, one request applies D deployments of T/D
replicas each; the clock runs from that request until the scheduler's deployment
summaries in Redis (what `comp get deployments` shows) count T tasks running.

The anchor is HashiCorp's C2M run (Nomad, 1 million containers on 5,000 hosts), about
1,500 placements a second; the target is 100,000 tasks on 5,000 nodes in under 60 s.

Also printed: CPU seconds each process used during the run (what limits the figure),
what other processes on the machine used meanwhile, how often the scheduler declared a
node down (heartbeats handled later than the grace), and with --py-spy DIR sampled
profiles of the scheduler, the api and the hollow agents.

Defaults are the platform's (1 s heartbeats, 3 s grace, 5 s resync).  The hollow
process pays for all 5,000 nodes' resyncs on one core; --resync-seconds 30 takes most of
that simulator cost away without changing what the scheduler sees.  Smaller runs:
`scripts/bench scale --nodes 500 --tasks 10000`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from comp_cli.local import ClusterConfig, LocalCluster

NOMAD_C2M_PER_SECOND = 1500.0
TARGET_SECONDS = 60.0
TARGET_NODES, TARGET_TASKS = 5000, 100_000
HOLLOW_PREFIX = "hollow"
# Small enough that T/N tasks fit on a hollow node's default 8 cores and 32 GiB.
DEPLOYMENT = """\
apiVersion: comp/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  image: comp/hollow:bench
  resources: {{cpu: 0.1, memory: 64Mi}}
"""


def manifest(tasks: int, deployments: int) -> str:
    per, extra = divmod(tasks, deployments)
    return "---\n".join(
        DEPLOYMENT.format(name=f"scale-{i:04d}", replicas=per + (1 if i < extra else 0)) for i in range(deployments)
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used so far (all cores, not idle)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Cluster:
    def __init__(
        self, state_dir: Path, nodes: int, heartbeat_seconds: float, grace_seconds: float, agent_env: dict[str, str],
        log_level: str = "WARNING",
    ):
        self.config = ClusterConfig.private(
            state_dir, "scale", nodes=0,
            heartbeat_seconds=heartbeat_seconds, grace_seconds=grace_seconds,
            extra_env={"COMP_LOG__LEVEL": log_level},
        )
        self.local = LocalCluster(self.config)
        self.nodes = nodes
        self.agent_env = agent_env
        self.redis: redis.Redis | None = None

    def start(self) -> None:
        self.local.start()  # nats, redis, api, scheduler; no agents (nodes=0)
        self.local.start_agent(
            HOLLOW_PREFIX,
            # Per-action log lines from 5,000 nodes would cost the run more than the work.
            {"COMP_NODEAGENT__DRIVER": "hollow", "COMP_NODEAGENT__COUNT": str(self.nodes), "COMP_LOG__LEVEL": "WARNING", **self.agent_env},
        )
        self.redis = redis.Redis.from_url(self.config.redis_url)

    def stop(self) -> None:
        self.local.stop(purge_workloads=False)

    def pids(self) -> dict[str, int]:
        return {name: pid for name, pid in self.local.running().items() if pid}

    def ready_nodes(self) -> int:
        assert self.redis is not None
        now = time.time()
        # Each node's latest heartbeat time (its record is written only when it changes).
        seen = self.redis.hvals(f"comp:{self.config.cluster}:nodes:seen")
        return sum(now - float(v) <= self.config.grace_seconds for v in seen)

    def totals(self) -> tuple[int, int]:
        """(placed, running) over every deployment, from the scheduler's summaries."""
        assert self.redis is not None
        statuses = [json.loads(v) for v in self.redis.hvals(f"comp:{self.config.cluster}:deployments")]
        return sum(s["placed"] for s in statuses), sum(s["running"] for s in statuses)


def wait_ready(cluster: Cluster, timeout: float) -> float:
    start = time.perf_counter()
    deadline = start + timeout
    ready = 0
    while time.perf_counter() < deadline:
        ready = cluster.ready_nodes()
        if ready >= cluster.nodes:
            return time.perf_counter() - start
        time.sleep(0.5)
    raise RuntimeError(f"only {ready} of {cluster.nodes} hollow nodes ready after {timeout:.0f} s")


def start_profilers(cluster: Cluster, out: Path, seconds: float) -> list[subprocess.Popen]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("--py-spy needs py-spy (uv pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, pid in cluster.pids().items():
        if name in ("scheduler", "api", f"nodeagent-{HOLLOW_PREFIX}"):
            procs.append(subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50", "--format", "raw",
                 "--output", str(out / f"{name}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
    return procs


def node_down_warnings(cluster: Cluster) -> int:
    """How often the scheduler declared a node down: each one is heartbeats that came too late."""
    log = cluster.local.logs / "scheduler.log"
    return log.read_text(errors="replace").count('"msg": "node down"') if log.exists() else 0


def run(args: argparse.Namespace) -> bool:
    deployments = args.deployments or max(1, args.tasks // 1000)
    agent_env = {
        "COMP_NODEAGENT__HOLLOW_START_SECONDS": str(args.start_seconds),
        "COMP_NODEAGENT__RESYNC_SECONDS": str(args.resync_seconds),
    }
    elapsed: float | None = None
    with tempfile.TemporaryDirectory(prefix="comp-scale-") as tmp:
        state_dir = args.keep or Path(tmp)
        cluster = Cluster(state_dir, args.nodes, args.heartbeat_seconds, args.grace_seconds, agent_env, args.log_level)
        try:
            cluster.start()
            up = wait_ready(cluster, args.ready_timeout)
            print(f"{args.nodes} hollow nodes ready {up:.1f} s after the agent process started", flush=True)
            pids = cluster.pids()
            time.sleep(args.settle)
            # Idle cost: what heartbeats alone take, before any task exists.
            idle_from = {name: cpu_seconds(pid) for name, pid in pids.items()}
            time.sleep(args.idle_seconds)
            idle = {name: (cpu_seconds(pid) - idle_from[name]) / args.idle_seconds for name, pid in pids.items()}
            down_before = node_down_warnings(cluster)

            profilers = start_profilers(cluster, args.py_spy, args.timeout) if args.py_spy else []
            cpu_from = {name: cpu_seconds(pid) for name, pid in pids.items()}
            machine_from = machine_busy_seconds()
            start = time.perf_counter()
            response = httpx.post(f"{cluster.config.api_url}/v1/apply", content=manifest(args.tasks, deployments), timeout=120)
            response.raise_for_status()
            applied = time.perf_counter() - start
            all_placed = None
            next_report = start + 5
            while True:
                placed, running = cluster.totals()
                now = time.perf_counter()
                if all_placed is None and placed >= args.tasks:
                    all_placed = now - start
                if running >= args.tasks:
                    elapsed = now - start
                    break
                if now >= next_report:
                    print(f"  {now - start:6.1f} s: {placed} placed, {running} running", flush=True)
                    next_report += 5
                if now - start > args.timeout:
                    print(f"gave up after {args.timeout:.0f} s: {running} of {args.tasks} running, {placed} placed")
                    break
                # The scheduler's summaries in Redis: this poll reads D small values.
                time.sleep(0.1)
            took = time.perf_counter() - start
            used = {name: cpu_seconds(pid) - cpu_from[name] for name, pid in pids.items()}
            others = machine_busy_seconds() - machine_from - sum(used.values())
            down = node_down_warnings(cluster) - down_before
            for proc in profilers:
                proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                proc.wait(30)
        finally:
            cluster.stop()

    print(f"apply request answered in {applied:.2f} s; all {args.tasks} placed at "
          + (f"{all_placed:.1f} s" if all_placed is not None else "(never)"))
    print(f"nodes declared down during the run (heartbeats later than {args.grace_seconds:g} s): {down}")
    print("CPU per process, seconds during the run (and cores while idle, heartbeats only):")
    for name in sorted(used, key=lambda n: -used[n]):
        print(f"  {name:24s} {used[name]:7.1f} s  ({used[name] / took:4.2f} cores)   idle {idle[name]:4.2f} cores")
    # The figure is only as good as the machine was quiet: say what else ran meanwhile.
    print(f"  {'(other processes)':24s} {max(others, 0.0):7.1f} s  ({max(others, 0.0) / took:4.2f} cores) of {os.cpu_count()} cores")
    shape = f"scale N={args.nodes} nodes, T={args.tasks} tasks in {deployments} deployments"
    target = f"target {TARGET_TASKS} on {TARGET_NODES} in < {TARGET_SECONDS:.0f} s (>= {TARGET_TASKS / TARGET_SECONDS:.0f}/s)"
    if elapsed is None:
        print(f"{shape}: comp did not finish in {args.timeout:.0f} s vs Nomad C2M ~{NOMAD_C2M_PER_SECOND:.0f}/s; {target}")
        return False
    rate = args.tasks / elapsed
    print(
        f"{shape}: comp {elapsed:.1f} s ({rate:.0f}/s) vs Nomad C2M ~{NOMAD_C2M_PER_SECOND:.0f}/s; "
        f"ratio comp/nomad = {rate / NOMAD_C2M_PER_SECOND:.2f}; {target}"
    )
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=TARGET_NODES, help=f"hollow nodes (default {TARGET_NODES})")
    parser.add_argument("--tasks", type=int, default=TARGET_TASKS, help=f"tasks in all (default {TARGET_TASKS})")
    parser.add_argument("--deployments", type=int, default=0, help="deployments the tasks are split over (default tasks/1000)")
    parser.add_argument("--start-seconds", type=float, default=0.0, help="simulated engine time per task start (default 0)")
    parser.add_argument("--heartbeat-seconds", type=float, default=1.0, help="node heartbeat period (default 1, the platform's)")
    parser.add_argument("--grace-seconds", type=float, default=3.0, help="heartbeat grace before a node is down (default 3)")
    parser.add_argument("--resync-seconds", type=float, default=5.0, help="agents' repairing pass period (default 5, the platform's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long (default 600 s)")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between all nodes ready and the idle measurement")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="seconds of idle CPU measurement before the apply")
    parser.add_argument("--keep", type=Path, help="state dir (logs of every process) to keep, instead of a temporary one")
    parser.add_argument(
        "--log-level", default="WARNING",
        help="log level of the api and scheduler (default WARNING; INFO logs each round with where its time went)",
    )
    parser.add_argument("--py-spy", type=Path, help="record py-spy profiles of the scheduler, api and agents into this dir")
    sys.exit(0 if run(parser.parse_args()) else 1)


if __name__ == "__main__":
    main()
