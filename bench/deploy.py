"""bench deploy: N replicas through COMP against N plain `docker run -d` on the same engine.

COMP's figure runs from the apply request until the API reports all N tasks running.
The baseline is N `docker run -d` of the same image and command issued 4 at a time,
from the first call until the last returns (docker run -d returns once started).
Each container is limited to 0.1 cores and 16 MiB in both.
Both run in the same process on the same engine, baseline first, then COMP, per round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import httpx

from comp_cli.images import import_busybox
from comp_cli.local import ClusterConfig, LocalCluster, remove_cluster_containers

IMAGE = "comp/busybox:bench"
MANIFEST = """
apiVersion: comp/v1
kind: Deployment
metadata: {{name: sleepers}}
spec:
  replicas: {n}
  image: {image}
  command: [sleep, "3600"]
  resources: {{cpu: 0.1, memory: 16Mi}}
"""


def baseline(n: int, parallel: int) -> float:
    label = f"comp.bench={uuid.uuid4().hex[:8]}"

    def run(_: int) -> None:
        subprocess.run(
            ["docker", "run", "-d", "--label", label, "--cpus", "0.1", "--memory", "16m", IMAGE, "sleep", "3600"],
            check=True, capture_output=True,
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run, range(n)))
    elapsed = time.perf_counter() - start
    client = docker.from_env()
    running = client.containers.list(filters={"label": label, "status": "running"})
    assert len(running) == n, f"baseline: {len(running)} of {n} running"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: c.remove(force=True), client.containers.list(all=True, filters={"label": label})))
    return elapsed


def comp(n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        # 50 x 0.1 cores is more than this machine's 2: the node declares 8 so that the
        # scheduler places them all. Smaller quotas would slow the engine's own container
        # start (runc runs inside the quota), which measures the kernel, not COMP.
        config = ClusterConfig.private(Path(tmp), "bench", nodes=1, extra_env={"COMP_NODEAGENT__CPU": "8"})
        local = LocalCluster(config)
        local.start()
        try:
            api = config.api_url
            start = time.perf_counter()
            response = httpx.post(f"{api}/v1/apply", content=MANIFEST.format(n=n, image=IMAGE), timeout=30)
            response.raise_for_status()
            deadline = start + 300
            while True:
                tasks = httpx.get(f"{api}/v1/tasks", timeout=10).json()
                if sum(t["state"] == "running" for t in tasks) >= n:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"only {sum(t['state'] == 'running' for t in tasks)} of {n} running after 300 s")
                # Polling costs the API (and so the 2 cores the engine needs) CPU; 0.1 s bounds
                # the error it adds to the figure.
                time.sleep(0.1)
            elapsed = time.perf_counter() - start
        finally:
            local.stop(purge_workloads=True)
            remove_cluster_containers(config.cluster)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=50, help="replicas (default 50)")
    parser.add_argument("--parallel", type=int, default=4, help="baseline docker runs at once (default 4)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    import_busybox(IMAGE)
    base, ours = [], []
    for r in range(args.rounds):
        base.append(baseline(args.n, args.parallel))
        ours.append(comp(args.n))
        print(f"round {r + 1}: docker run x{args.n} ({args.parallel} at a time) {base[-1]:.2f} s; comp {ours[-1]:.2f} s")
    b, o = statistics.median(base), statistics.median(ours)
    print(f"deploy N={args.n}: comp {o:.2f} s ({args.n / o:.1f}/s) vs docker run {b:.2f} s ({args.n / b:.1f}/s); "
          f"ratio comp/docker = {o / b:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
