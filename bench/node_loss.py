"""bench node_loss: SIGKILL of a node agent until all its tasks run elsewhere, on real Docker.

Two node agents share this machine's engine.  A deployment is spread over both; the
agent of one is SIGKILLed and the clock runs until the API reports every replica
running on the survivor.  The killed agent's connection is gone, so the scheduler's ping of
the late node finds no responder and declares it down ``--ping-after`` seconds after its
last heartbeat; ``--ping-after 0`` measures the grace alone (the settings are printed);
the anchors are the defaults of the other orchestrators, which cannot run here.

Where the time goes, per round and as medians, from the kill (wall clock, as NATS
receipts in this process and the scheduler's log lines are stamped):
  last heartbeat   the victim's last heartbeat seen here (before the kill)
  node down        the scheduler's "node down" log line (its ping found no agent, or its grace ran out)
  placed           the placement event with the replacements (the round; its nudge to the
                   survivor went out just before)
  first starting   first task status STARTING of a replacement: the survivor's agent got the
                   nudge, read its assignments and began the start (agent overhead)
  first running    first task status RUNNING of a replacement (docker create and start)
  last running     the last of them (the engine's starts of all replacements)
  api              the API lists every replica running (scheduler flush to Redis, API read, poll)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import nats

from comp_cli.images import import_busybox
from comp_common.broker import server_caught_up
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
STAGES = ("last heartbeat", "node down", "placed", "first starting", "first running", "last running", "api")


class Listener:
    """Receipt times of the messages that mark each stage, on a loop of its own."""

    def __init__(self, url: str, victim: str, survivor: str):
        self.url, self.victim, self.survivor = url, victim, survivor
        self.heartbeats: list[float] = []
        self.placements: list[tuple[float, dict]] = []
        self.starting: dict[str, float] = {}  # task id -> first STARTING on the survivor
        self.running: dict[str, float] = {}  # task id -> first RUNNING on the survivor
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("could not subscribe to nats")

    def _run(self) -> None:
        self._loop.run_until_complete(self._subscribe())
        self._ready.set()
        self._loop.run_forever()

    async def _subscribe(self) -> None:
        self.nc = await nats.connect(self.url)

        async def heartbeat(msg) -> None:
            self.heartbeats.append(time.time())

        async def placement(msg) -> None:
            self.placements.append((time.time(), json.loads(msg.data)))

        async def task(msg) -> None:
            status = json.loads(msg.data)
            if status["state"] == "starting":
                self.starting.setdefault(status["task_id"], time.time())
            elif status["state"] == "running":
                self.running.setdefault(status["task_id"], time.time())

        await self.nc.subscribe(f"comp.node.{self.victim}.heartbeat", cb=heartbeat)
        await self.nc.subscribe("comp.evt.placement.default.victims", cb=placement)
        await self.nc.subscribe(f"comp.evt.task.{self.survivor}", cb=task)
        await server_caught_up(self.nc)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def node_down_at(log: Path, node_id: str) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"msg": "node down' in line:
            entry = json.loads(line)
            if entry.get("node") == node_id:
                return float(entry["ts"])
    return None


def one_round(replicas: int, heartbeat: float, grace: float, ping_after: float) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        config = ClusterConfig.private(
            Path(tmp), "loss", nodes=2, heartbeat_seconds=heartbeat, grace_seconds=grace,
            extra_env={"COMP_NODEAGENT__CPU": "8", "COMP_LIVENESS__PING_AFTER_SECONDS": str(ping_after)},
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
            before = tasks()
            on_victim = sum(t["node_id"] == victim for t in before)
            listener = Listener(config.nats_url, victim, survivor)
            time.sleep(heartbeat)  # at least one heartbeat of the victim seen
            start = time.perf_counter()
            killed_at = time.time()
            local.kill(f"nodeagent-{victim}", signal.SIGKILL)
            while True:
                current = tasks()
                if sum(t["state"] == "running" and t["node_id"] == survivor for t in current) >= replicas:
                    break
                if time.perf_counter() - start > 60:
                    raise RuntimeError("tasks never moved")
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            api_at = time.time()
            listener.close()
            down = node_down_at(local.logs / "scheduler.log", victim)
            placed = [at for at, event in listener.placements if event.get("placed") and at >= killed_at]
            replacements = {t["task_id"] for t in current} - {t["task_id"] for t in before}
            runs = sorted(at for task_id, at in listener.running.items() if task_id in replacements)
            starts = sorted(at for task_id, at in listener.starting.items() if task_id in replacements)
            marks = {
                "last heartbeat": max((at for at in listener.heartbeats if at <= killed_at), default=float("nan")),
                "node down": down if down is not None else float("nan"),
                "placed": placed[0] if placed else float("nan"),
                "first starting": starts[0] if starts else float("nan"),
                "first running": runs[0] if runs else float("nan"),
                "last running": runs[-1] if runs else float("nan"),
                "api": api_at,
            }
            stages = {name: at - killed_at for name, at in marks.items()}
            print(
                f"  {on_victim} of {replicas} tasks were on the killed node; all running on {survivor} after {elapsed:.2f} s: "
                + ", ".join(f"{name} {stages[name]:+.2f}" for name in STAGES)
            )
            return elapsed, stages
        finally:
            local.stop(purge_workloads=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--grace", type=float, default=3.0)
    parser.add_argument("--ping-after", type=float, default=1.5, help="seconds late before a ping (0: no pings)")
    args = parser.parse_args()
    import_busybox(IMAGE)
    results = [one_round(args.replicas, args.heartbeat, args.grace, args.ping_after) for _ in range(args.rounds)]
    times = [elapsed for elapsed, _ in results]
    medians = {name: statistics.median(stages[name] for _, stages in results) for name in STAGES}
    print("where the time goes (median s after the kill): " + ", ".join(f"{name} {medians[name]:+.2f}" for name in STAGES))
    print(f"node loss: SIGKILL -> all tasks running elsewhere: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}) with heartbeat {args.heartbeat:g} s, grace {args.grace:g} s, ping after {args.ping_after:g} s; "
          f"target < 4 s; anchors: {ANCHORS}")


if __name__ == "__main__":
    main()
