"""bench autoscale_reaction: from a CPU load step to the new replica running, against the
configured periods plus one container start measured in the same run.

A local cluster (one Docker node agent, the autoscaler) runs one replica of a CPU burner
that idles until told to burn (a file appears in it), under an autoscale policy on cpu
with target 0.5, so that a burning replica (1.0 of its 0.2-core limit) asks for 2.  Each
round sets the load on with `docker exec` and times, on this machine's clock, until a
second replica's container is running (listed by the engine, polled every 50 ms); then turns it off,
scales back to 1 and waits for the extra container to go.

The baseline is what no autoscaler can avoid: a metrics period for the load to show in
the first sample with a full period of it, a second for the sample after (the worst case
of where the step falls in the period), and one container start, `docker run -d` of the
same image and command, measured here.  Target: reaction <= 2 x metrics period + start.
Kubernetes' HPA evaluates every 15 s behind metrics scraped every 15 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import docker
import httpx

from comp_cli.images import import_busybox
from comp_cli.local import ClusterConfig, LocalCluster
from comp_common import labels

IMAGE = "comp/busybox:test"
COMMAND = ["sh", "-c", "while :; do if [ -f /tmp/go ]; then :; else sleep 0.2; fi; done"]
MANIFEST = f"""
kind: Deployment
metadata: {{name: burn}}
spec:
  replicas: 1
  image: {IMAGE}
  command: {COMMAND!r}
  resources: {{cpu: 0.2, memory: 16Mi}}
  stop_grace_period: 0s
  autoscale:
    min: 1
    max: 2
    metric: cpu
    target: 0.5
    scale_up: {{period: 1s}}
    scale_down: {{stabilization: 0s, period: 1s}}
"""


def container_start_seconds(client: docker.DockerClient, rounds: int) -> float:
    """Median `docker run -d` of the same image and command until the engine says started."""
    times = []
    for _ in range(rounds):
        started = time.monotonic()
        container = client.containers.run(IMAGE, COMMAND, detach=True, nano_cpus=int(0.2e9), mem_limit="16m")
        times.append(time.monotonic() - started)
        container.remove(force=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics-seconds", type=float, default=2.0, help="the agents' metrics period (default 2)")
    args = parser.parse_args()
    client = docker.from_env()
    import_busybox(IMAGE, client)
    baseline = container_start_seconds(client, 3)

    with tempfile.TemporaryDirectory(prefix="comp-bench-autoscale-") as tmp:
        config = ClusterConfig.private(Path(tmp), "react", nodes=1, extra_env={
            "COMP_NODEAGENT__METRICS_SECONDS": str(args.metrics_seconds),
            "COMP_AUTOSCALER__METRICS_SECONDS": str(args.metrics_seconds),
        })
        cluster = LocalCluster(config)
        cluster.start()
        try:
            api = config.api_url
            assert httpx.post(f"{api}/v1/apply", content=MANIFEST, timeout=10).status_code < 300
            selector = {"label": [f"{labels.CLUSTER}={config.cluster}", f"{labels.DEPLOYMENT}=default.burn"]}

            def burners() -> list:
                return client.containers.list(filters=selector)

            def wait(check, what: str, timeout: float = 120) -> None:
                deadline = time.monotonic() + timeout
                while not check():
                    if time.monotonic() > deadline:
                        raise SystemExit(f"autoscale_reaction: timed out waiting for {what}")
                    time.sleep(0.05)

            wait(lambda: len(burners()) == 1, "the first replica")
            time.sleep(2 * args.metrics_seconds)  # its first samples, idle
            reactions = []
            for r in range(args.rounds):
                [first] = burners()
                stepped = time.monotonic()
                first.exec_run(["touch", "/tmp/go"])
                # Polled every 50 ms: the engine lists a container as running once started.
                wait(lambda: len(burners()) == 2, "a second replica", timeout=120)
                reaction = time.monotonic() - stepped
                reactions.append(reaction)
                print(f"round {r + 1}: load step to a second replica running: {reaction:.2f} s")
                first.exec_run(["rm", "-f", "/tmp/go"])
                wait(lambda: httpx.get(f"{api}/v1/deployments/default/burn", timeout=5).json()["manifest"]["spec"]["replicas"] == 1
                     and len(burners()) == 1, "the scale back to 1")
                time.sleep(2 * args.metrics_seconds)
        finally:
            cluster.stop(purge_workloads=True)

    reaction = statistics.median(reactions)
    target = 2 * args.metrics_seconds + baseline
    print(f"autoscale reaction (metrics every {args.metrics_seconds:g} s, evaluated every 0.5 s, median of {args.rounds}): "
          f"{reaction:.2f} s vs 2 x {args.metrics_seconds:g} s + one container start {baseline:.2f} s = {target:.2f} s; "
          f"ratio {reaction / target:.2f} (target <= 1; Kubernetes HPA: a 15 s loop behind 15 s metrics)")


if __name__ == "__main__":
    main()
