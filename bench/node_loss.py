"""bench node_loss: SIGKILL of a node agent until all its tasks run elsewhere, on real Docker.

Two node agents share this machine's engine.  A deployment is spread over both; the
agent of one is SIGKILLed and the clock runs until the API reports every replica
running on the survivor.  The figure is bounded below by the heartbeat grace (printed);
the anchors are the defaults of the other orchestrators, which cannot run here.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from comp_cli.images import import_busybox
from comp_cli.local import ClusterConfig, LocalCluster

IMAGE = "comp/busybox:bench"
MANIFEST = """
apiVersion: comp/v1
kind: Deployment
metadata: {{name: victims}}
spec:
  replicas: {n}
  image: {image}
  command: [sleep, "3600"]
  resources: {{cpu: 0.1, memory: 16Mi}}
"""
ANCHORS = "Swarm ~15 s to mark a node down, Nomad ~20 s, Kubernetes 50 s + 300 s before eviction"


def one_round(replicas: int, heartbeat: float, grace: float) -> float:
    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        config = ClusterConfig.private(
            Path(tmp), "loss", nodes=2, heartbeat_seconds=heartbeat, grace_seconds=grace,
            extra_env={"COMP_NODEAGENT__CPU": "8"},
        )
        local = LocalCluster(config)
        local.start()
        try:
            api = config.api_url
            victim, survivor = config.node_ids()
            httpx.post(f"{api}/v1/apply", content=MANIFEST.format(n=replicas, image=IMAGE), timeout=30).raise_for_status()

            def tasks() -> list[dict]:
                return [t for t in httpx.get(f"{api}/v1/tasks", timeout=10).json() if t["deployment"] == "default.victims"]

            deadline = time.monotonic() + 120
            while sum(t["state"] == "running" for t in tasks()) < replicas:
                if time.monotonic() > deadline:
                    raise RuntimeError("deployment never ran")
                time.sleep(0.1)
            on_victim = sum(t["node_id"] == victim for t in tasks())
            start = time.perf_counter()
            local.kill(f"nodeagent-{victim}", signal.SIGKILL)
            while True:
                current = tasks()
                if sum(t["state"] == "running" and t["node_id"] == survivor for t in current) >= replicas:
                    break
                if time.perf_counter() - start > 60:
                    raise RuntimeError("tasks never moved")
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            print(f"  {on_victim} of {replicas} tasks were on the killed node; all running on {survivor} after {elapsed:.2f} s")
            return elapsed
        finally:
            local.stop(purge_workloads=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--grace", type=float, default=3.0)
    args = parser.parse_args()
    import_busybox(IMAGE)
    times = [one_round(args.replicas, args.heartbeat, args.grace) for _ in range(args.rounds)]
    print(f"node loss: SIGKILL -> all tasks running elsewhere: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}) with heartbeat {args.heartbeat:g} s, grace {args.grace:g} s; "
          f"target < 4 s; anchors: {ANCHORS}")


if __name__ == "__main__":
    main()
