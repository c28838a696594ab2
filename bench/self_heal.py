"""bench self_heal: `docker kill` of a replica until its replacement runs, COMP vs Docker Swarm.

Both run the same image and command on this machine's engine, in the same run: a
COMP deployment (one node agent) and a Swarm service (`docker swarm init` first if the
engine is not in swarm mode, `docker swarm leave --force` at the end if this bench
initialised it), each with one replica per round.  Each round SIGKILLs a replica that
has not been killed before (so every kill is a first exit: COMP restarts that at once,
a repeat within its restart policy's reset_after would back off) and waits for the
replacement.

The figure is measured on the engine's own clock, from its event stream: from the
killed container's ``die`` to the ``start`` of the container that replaces it (same
COMP task id; same Swarm service slot).  Swarm waits its restart delay (5 s unless
``--restart-delay`` is given) before it starts a replacement.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import httpx

from comp_cli.images import import_busybox
from comp_cli.local import ClusterConfig, LocalCluster, remove_cluster_containers
from comp_common import labels

IMAGE = "comp/busybox:test"
MANIFEST = """
apiVersion: comp/v1
kind: Deployment
metadata: {{name: healers}}
spec:
  replicas: {n}
  image: {image}
  command: [sleep, "3600"]
  resources: {{cpu: 0.1, memory: 16Mi}}
"""
TARGET_SECONDS = 1.0
SWARM_SLOT = "com.docker.swarm.task.name"  # "<service>.<slot>.<task id>"
SWARM_SERVICE = "com.docker.swarm.service.name"


class Events:
    """The engine's container die/start events, read by a thread of its own."""

    def __init__(self, client: docker.DockerClient):
        self._stream = client.events(decode=True, filters={"type": "container", "event": ["die", "start"]})
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                self._queue.put(event)
        except Exception:  # closed
            pass

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no {what} within {timeout:.0f} s")
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if match(event):
                return event

    def close(self) -> None:
        self._stream.close()


def attributes(event: dict[str, Any]) -> dict[str, str]:
    return (event.get("Actor") or {}).get("Attributes") or {}


def seconds(event: dict[str, Any]) -> float:
    return int(event["timeNano"]) / 1e9


def kill_and_time(
    client: docker.DockerClient, events: Events, victim: dict[str, Any], same_replica: Callable[[dict[str, str]], bool], timeout: float
) -> float:
    """Seconds on the engine's clock from the victim's death to its replacement's start."""
    victim_id = victim["Id"]
    client.api.kill(victim_id)
    died = events.wait_for(lambda e: e["Action"] == "die" and e.get("id") == victim_id, timeout, "die of the victim")
    started = events.wait_for(
        lambda e: e["Action"] == "start" and e.get("id") != victim_id and same_replica(attributes(e)),
        timeout,
        "start of a replacement",
    )
    return seconds(started) - seconds(died)


def wait_running(client: docker.DockerClient, filters: dict[str, Any], n: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        running = client.api.containers(filters={**filters, "status": "running"})
        if len(running) >= n:
            return running
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(running)} of {n} containers running after {timeout:.0f} s")
        time.sleep(0.1)


def comp(client: docker.DockerClient, rounds: int) -> list[float]:
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        config = ClusterConfig.private(Path(tmp), "heal", nodes=1, extra_env={"COMP_NODEAGENT__CPU": "8"})
        local = LocalCluster(config)
        local.start()
        try:
            response = httpx.post(f"{config.api_url}/v1/apply", content=MANIFEST.format(n=rounds, image=IMAGE), timeout=30)
            response.raise_for_status()
            ours = {"label": [f"{labels.CLUSTER}={config.cluster}"]}
            containers = wait_running(client, ours, rounds, 120)
            events = Events(client)
            try:
                for victim in containers[:rounds]:
                    task_id = victim["Labels"][labels.TASK_ID]
                    elapsed = kill_and_time(client, events, victim, lambda a, t=task_id: a.get(labels.TASK_ID) == t, 60)
                    times.append(elapsed)
                    print(f"  comp: task {task_id} replaced in {elapsed:.3f} s")
            finally:
                events.close()
        finally:
            local.stop(purge_workloads=True)
            remove_cluster_containers(config.cluster)
    return times


def swarm(client: docker.DockerClient, rounds: int, restart_delay: str | None) -> list[float]:
    name = f"comp-bench-heal-{uuid.uuid4().hex[:6]}"
    argv = ["docker", "service", "create", "--detach", "--quiet", "--no-resolve-image", "--name", name,
            "--replicas", str(rounds), "--limit-cpu", "0.1", "--limit-memory", "16m"]
    if restart_delay is not None:
        argv += ["--restart-delay", restart_delay]
    subprocess.run([*argv, IMAGE, "sleep", "3600"], check=True, capture_output=True)
    times: list[float] = []
    try:
        theirs = {"label": [f"{SWARM_SERVICE}={name}"]}
        containers = wait_running(client, theirs, rounds, 120)
        events = Events(client)
        try:
            for victim in containers[:rounds]:
                # "<service>.<slot>.<task id>": a replacement keeps the slot, with a new task id.
                slot = victim["Labels"][SWARM_SLOT].rsplit(".", 1)[0]
                same = lambda a, s=slot: a.get(SWARM_SLOT, "").rsplit(".", 1)[0] == s  # noqa: E731
                elapsed = kill_and_time(client, events, victim, same, 60)
                times.append(elapsed)
                print(f"  swarm: slot {slot} replaced in {elapsed:.3f} s")
        finally:
            events.close()
    finally:
        subprocess.run(["docker", "service", "rm", name], capture_output=True)
        # The service's containers go with it, asynchronously: wait so the next run starts clean.
        deadline = time.monotonic() + 30
        while client.api.containers(all=True, filters={"label": f"{SWARM_SERVICE}={name}"}) and time.monotonic() < deadline:
            time.sleep(0.2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="kills per orchestrator, each of another replica (default 5)")
    parser.add_argument("--restart-delay", help="Swarm's --restart-delay (default: Swarm's own, 5 s)")
    args = parser.parse_args()
    client = docker.from_env()
    import_busybox(IMAGE, client)

    ours = comp(client, args.rounds)

    initialised = False
    if client.info()["Swarm"]["LocalNodeState"] != "active":
        subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], check=True, capture_output=True)
        initialised = True
    try:
        theirs = swarm(client, args.rounds, args.restart_delay)
    finally:
        if initialised:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True)

    o, s = statistics.median(ours), statistics.median(theirs)
    print(f"comp:  median {o:.3f} s (min {min(ours):.3f}, max {max(ours):.3f}) over {len(ours)} kills")
    print(f"swarm: median {s:.3f} s (min {min(theirs):.3f}, max {max(theirs):.3f}) over {len(theirs)} kills"
          f" (restart delay {args.restart_delay or 'default 5s'})")
    print(f"self heal, docker kill -> replacement started: comp {o:.3f} s vs swarm {s:.3f} s; "
          f"ratio comp/swarm = {o / s:.3f}; target comp < {TARGET_SECONDS:g} s: {'met' if o < TARGET_SECONDS else 'NOT met'}")


if __name__ == "__main__":
    main()
