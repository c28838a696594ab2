"""The node agent as users run it (the ``comp-nodeagent`` process) on the real engine and NATS.

The test plays the scheduler: it writes assignments into the KV bucket and nudges.  The
resync period is set far beyond every deadline here, so whatever the agent does within
one was caused by a nudge or by an engine event, never by the periodic resync.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import docker
import httpx
import pytest
from faststream.nats import NatsBroker
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from comp_cli.local import _bin
from comp_common.broker import server_caught_up
from comp_common import labels, subjects
from comp_common.kv import open_bucket
from comp_common.manifest import Port
from comp_common.messages import Heartbeat, NodeAssignments, Nudge, TaskSpec, TaskState, TaskStatus
from comp_nodeagent.docker_driver import DockerDriver
from comp_nodeagent.driver import StartError
from processes import stop_process

pytestmark = pytest.mark.docker

NODE_ID = "node-a"
T = TypeVar("T")


# ---- helpers ----------------------------------------------------------------------------


async def eventually(check: Callable[[], T | None], what: str, timeout: float = 30.0, logs: Path | None = None) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = "\n".join(logs.read_text(errors="replace").splitlines()[-30:]) if logs and logs.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        await asyncio.sleep(0.05)


def task(task_id: str, *, image: str, command: list[str], args: list[str] | None = None, **extra: Any) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        deployment="default.web",
        namespace="default",
        name="web",
        spec_hash=extra.pop("spec_hash", "hash1"),
        image=image,
        command=command,
        args=args,
        cpu=extra.pop("cpu", 0.25),
        memory=extra.pop("memory", 32 * 1024**2),
        **extra,
    )


def httpd(task_id: str, image: str) -> TaskSpec:
    return task(
        task_id,
        image=image,
        command=["httpd"],
        args=["-f", "-p", "8080", "-h", "/www"],
        ports=[Port(container_port=8080)],
        labels={"app": "web"},
    )


def sleeper(task_id: str, image: str) -> TaskSpec:
    return task(task_id, image=image, command=["sleep"], args=["3600"], cpu=0.5, memory=16 * 1024**2)


class Observer:
    """Everything the agent publishes about its node: task statuses and heartbeats."""

    def __init__(self) -> None:
        self.statuses: list[TaskStatus] = []
        self.heartbeats: list[Heartbeat] = []

    def last_full(self) -> Heartbeat | None:
        """The latest heartbeat that lists every task (the others list only changes)."""
        return next((hb for hb in reversed(self.heartbeats) if hb.full), None)

    async def subscribe(self, nc: NatsClient, node_id: str) -> None:
        async def on_status(msg: Any) -> None:
            self.statuses.append(TaskStatus.model_validate_json(msg.data))

        async def on_heartbeat(msg: Any) -> None:
            self.heartbeats.append(Heartbeat.model_validate_json(msg.data))

        await nc.subscribe(subjects.task_event(node_id), cb=on_status)
        await nc.subscribe(subjects.node_heartbeat(node_id), cb=on_heartbeat)
        await server_caught_up(nc)

    def latest(self, task_id: str) -> TaskStatus | None:
        return next((s for s in reversed(self.statuses) if s.task_id == task_id), None)

    def in_state(self, task_id: str, state: TaskState, **fields: Any) -> TaskStatus | None:
        status = self.latest(task_id)
        if status and status.state == state and all(getattr(status, k) == v for k, v in fields.items()):
            return status
        return None

    def history(self, task_id: str) -> list[TaskState]:
        return [s.state for s in self.statuses if s.task_id == task_id]


class Cluster:
    """The scheduler's side of the contract, played by the test."""

    def __init__(self, broker: NatsBroker, kv: KeyValue, nats_url: str, name: str, tmp_path: Path):
        self.broker = broker
        self.nc: NatsClient = broker.connection
        self.kv = kv
        self.nats_url = nats_url
        self.name = name
        self.tmp_path = tmp_path
        self.version = 0
        self.agents: list[subprocess.Popen] = []
        self.log: Path | None = None

    async def assign(self, tasks: list[TaskSpec], node_id: str = NODE_ID, nudge: bool = True) -> None:
        self.version += 1
        value = NodeAssignments(node_id=node_id, version=self.version, tasks=tasks)
        await self.kv.put(node_id, value.model_dump_json().encode())
        if nudge:
            await self.nudge(node_id)

    async def nudge(self, node_id: str = NODE_ID, headers: dict[str, str] | None = None) -> None:
        body = Nudge(node_id=node_id, version=self.version).model_dump_json().encode()
        await self.nc.publish(subjects.node_nudge(node_id), body, headers=headers)
        await self.nc.flush()

    def start_agent(self, node_id: str = NODE_ID, **env: str) -> subprocess.Popen:
        self.log = self.tmp_path / f"nodeagent-{len(self.agents)}.log"
        environment = {
            **os.environ,
            "COMP_NATS__URL": self.nats_url,
            "COMP_CLUSTER": self.name,
            "COMP_NODEAGENT__NODE_ID": node_id,
            "COMP_LIVENESS__HEARTBEAT_SECONDS": "0.2",
            "COMP_NODEAGENT__RESYNC_SECONDS": "3600",
            "COMP_NODEAGENT__STOP_GRACE_SECONDS": "1",
            "COMP_NODEAGENT__LABELS": json.dumps({"zone": "test"}),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with open(self.log, "wb") as out:
            proc = subprocess.Popen(
                [_bin("comp-nodeagent")], env=environment, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.agents.append(proc)
        return proc

    def stop_agent(self, proc: subprocess.Popen) -> int:
        return stop_process(proc)

    def containers(self, docker_client: docker.DockerClient) -> list[dict[str, Any]]:
        """The engine's summaries (Id, State, Labels) of this cluster's containers, from one call:
        unlike the SDK's objects they need no inspect, which races a container's removal."""
        return docker_client.api.containers(all=True, filters={"label": f"{labels.CLUSTER}={self.name}"})


@pytest.fixture
async def cluster(nats_url: str, cluster_name: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    broker = NatsBroker(nats_url)
    await broker.connect()
    kv = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
    cluster = Cluster(broker, kv, nats_url, cluster_name, tmp_path)
    try:
        yield cluster
    finally:
        for proc in cluster.agents:
            cluster.stop_agent(proc)
        await broker.stop()


@pytest.fixture
async def observer(cluster: Cluster) -> Observer:
    observer = Observer()
    await observer.subscribe(cluster.nc, NODE_ID)
    return observer


def http_body(port: int) -> str | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


# ---- tests ------------------------------------------------------------------------------


async def test_runs_assigned_tasks_with_labels_limits_and_ports(
    cluster: Cluster, observer: Observer, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    agent = cluster.start_agent()
    await eventually(lambda: observer.heartbeats, "a first heartbeat", logs=cluster.log)
    web, worker = httpd("web-1", busybox_image), sleeper("worker-1", busybox_image)
    await cluster.assign([web, worker])

    running = await eventually(lambda: observer.in_state("web-1", TaskState.RUNNING), "web-1 running", logs=cluster.log)
    await eventually(lambda: observer.in_state("worker-1", TaskState.RUNNING), "worker-1 running", logs=cluster.log)
    assert observer.history("web-1")[:2] == [TaskState.STARTING, TaskState.RUNNING]

    container = docker_client.containers.get(running.container_id)
    assert container.name == f"comp-{cluster.name}-web-1"
    assert container.labels[labels.CLUSTER] == cluster.name
    assert container.labels[labels.NODE] == NODE_ID
    assert container.labels[labels.TASK_ID] == "web-1"
    assert container.labels[labels.DEPLOYMENT] == "default.web"
    assert container.labels[labels.SPEC_HASH] == "hash1"
    assert container.labels["app"] == "web"
    assert container.attrs["HostConfig"]["NanoCpus"] == 250_000_000
    assert container.attrs["HostConfig"]["Memory"] == 32 * 1024**2
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
    assert container.attrs["Config"]["Entrypoint"] == ["httpd"]
    assert container.attrs["Config"]["Cmd"] == ["-f", "-p", "8080", "-h", "/www"]

    host_port = running.host_ports["8080/tcp"]
    published = container.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"]
    assert host_port == int(published)
    body = await eventually(lambda: http_body(host_port), f"httpd answering on host port {host_port}")
    assert "COMP busybox" in body

    def full_heartbeat() -> Heartbeat | None:
        hb = observer.last_full()
        states = {s.task_id: s.state for s in hb.tasks} if hb else {}
        return hb if states == {"web-1": TaskState.RUNNING, "worker-1": TaskState.RUNNING} else None

    heartbeat = await eventually(full_heartbeat, "a heartbeat listing both tasks running")
    assert heartbeat.node_id == NODE_ID
    assert heartbeat.driver == "docker"
    assert heartbeat.labels == {"zone": "test"}
    assert heartbeat.capacity.cpu > 0 and heartbeat.capacity.memory > 0
    assert heartbeat.allocated.cpu == pytest.approx(0.75)
    assert heartbeat.allocated.memory == 48 * 1024**2
    seqs = [hb.seq for hb in observer.heartbeats]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert agent.poll() is None


async def test_capacity_overrides_from_settings(cluster: Cluster, observer: Observer) -> None:
    cluster.start_agent(COMP_NODEAGENT__CPU="1500m", COMP_NODEAGENT__MEMORY="2Gi")
    heartbeat = await eventually(lambda: observer.heartbeats and observer.heartbeats[-1], "a heartbeat", logs=cluster.log)
    assert heartbeat.capacity.cpu == 1.5
    assert heartbeat.capacity.memory == 2 * 1024**3
    assert heartbeat.allocated.cpu == 0 and heartbeat.tasks == []


async def test_killed_container_comes_back_without_a_nudge(
    cluster: Cluster, observer: Observer, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_agent()
    await cluster.assign([sleeper("worker-1", busybox_image)])
    first = await eventually(lambda: observer.in_state("worker-1", TaskState.RUNNING), "worker-1 running", logs=cluster.log)

    docker_client.containers.get(first.container_id).kill()

    again = await eventually(
        lambda: observer.in_state("worker-1", TaskState.RUNNING, restarts=1), "worker-1 running again", logs=cluster.log
    )
    assert again.container_id != first.container_id
    exited = next(s for s in observer.statuses if s.task_id == "worker-1" and s.state == TaskState.EXITED)
    assert exited.exit_code == 137
    assert exited.container_id == first.container_id
    assert [c["Id"] for c in cluster.containers(docker_client)] == [again.container_id]
    assert docker_client.containers.get(again.container_id).status == "running"


async def test_missing_image_fails_with_the_reason(
    cluster: Cluster, observer: Observer, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_agent()
    await cluster.assign([task("ghost-1", image="comp-missing/nope:1", command=["true"]), sleeper("worker-1", busybox_image)])

    failed = await eventually(lambda: observer.in_state("ghost-1", TaskState.FAILED), "ghost-1 failed", logs=cluster.log)
    assert 'image "comp-missing/nope:1" is not present locally and could not be pulled' in failed.message
    assert failed.container_id is None
    # One bad task does not hold up the others.
    await eventually(lambda: observer.in_state("worker-1", TaskState.RUNNING), "worker-1 running", logs=cluster.log)
    # It is retried (with backoff), failing again for the same reason.
    await eventually(lambda: observer.history("ghost-1").count(TaskState.FAILED) >= 2, "a retry of ghost-1", logs=cluster.log)
    assert [c["Labels"][labels.TASK_ID] for c in cluster.containers(docker_client)] == ["worker-1"]


async def test_unassigned_task_is_stopped_and_removed(
    cluster: Cluster, observer: Observer, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_agent()
    keep, drop = sleeper("keep-1", busybox_image), sleeper("drop-1", busybox_image)
    await cluster.assign([keep, drop])
    kept = await eventually(lambda: observer.in_state("keep-1", TaskState.RUNNING), "keep-1 running", logs=cluster.log)
    dropped = await eventually(lambda: observer.in_state("drop-1", TaskState.RUNNING), "drop-1 running", logs=cluster.log)

    await cluster.assign([keep])

    stopped = await eventually(lambda: observer.in_state("drop-1", TaskState.STOPPED), "drop-1 stopped", logs=cluster.log)
    assert stopped.container_id == dropped.container_id
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(dropped.container_id)
    assert [c["Id"] for c in cluster.containers(docker_client)] == [kept.container_id]
    assert observer.history("keep-1") == [TaskState.STARTING, TaskState.RUNNING]
    await eventually(
        lambda: (hb := observer.last_full()) and [s.task_id for s in hb.tasks] == ["keep-1"], "a full heartbeat without drop-1"
    )
    assert observer.heartbeats[-1].allocated.cpu == pytest.approx(0.5)

    # An absent key means no tasks at all.
    await cluster.kv.delete(NODE_ID)
    await cluster.nudge()
    await eventually(lambda: observer.in_state("keep-1", TaskState.STOPPED), "keep-1 stopped", logs=cluster.log)
    await eventually(lambda: not cluster.containers(docker_client), "no containers left")


async def test_restarted_agent_adopts_running_containers(
    cluster: Cluster, observer: Observer, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    first_agent = cluster.start_agent()
    await cluster.assign([httpd("web-1", busybox_image), sleeper("worker-1", busybox_image)])
    web = await eventually(lambda: observer.in_state("web-1", TaskState.RUNNING), "web-1 running", logs=cluster.log)
    worker = await eventually(lambda: observer.in_state("worker-1", TaskState.RUNNING), "worker-1 running", logs=cluster.log)
    before = sorted(c["Id"] for c in cluster.containers(docker_client))

    assert cluster.stop_agent(first_agent) == 0
    # The agent leaves its containers running when it goes.
    assert all(c["State"] == "running" for c in cluster.containers(docker_client))
    old_started_at = observer.heartbeats[-1].started_at
    observer.statuses.clear()

    cluster.start_agent()

    def adopted_heartbeat() -> Heartbeat | None:
        hb = observer.last_full()
        if hb is None or hb.started_at == old_started_at:
            return None
        states = {s.task_id: s.state for s in hb.tasks}
        return hb if states == {"web-1": TaskState.RUNNING, "worker-1": TaskState.RUNNING} else None

    heartbeat = await eventually(adopted_heartbeat, "the new agent reporting both tasks", logs=cluster.log)
    reported = {s.task_id: s for s in heartbeat.tasks}
    assert reported["web-1"].container_id == web.container_id
    assert reported["worker-1"].container_id == worker.container_id
    assert reported["web-1"].host_ports == web.host_ports
    assert all(s.restarts == 0 for s in reported.values())
    assert sorted(c["Id"] for c in cluster.containers(docker_client)) == before
    assert not [s for s in observer.statuses if s.state != TaskState.RUNNING]
    assert "COMP busybox" in (await eventually(lambda: http_body(web.host_ports["8080/tcp"]), "httpd still answering"))


async def test_garbage_nudges_are_dropped(cluster: Cluster, observer: Observer, busybox_image: str) -> None:
    agent = cluster.start_agent()
    await eventually(lambda: observer.heartbeats, "a first heartbeat", logs=cluster.log)
    for garbage in (b"\xff garbage", b"{}", secrets.token_bytes(2048)):
        await cluster.nc.publish(subjects.node_nudge(NODE_ID), garbage)
    await cluster.nc.flush()

    await cluster.assign([sleeper("worker-1", busybox_image)])

    await eventually(lambda: observer.in_state("worker-1", TaskState.RUNNING), "worker-1 running", logs=cluster.log)
    assert agent.poll() is None
    seq = observer.heartbeats[-1].seq
    await eventually(lambda: observer.heartbeats[-1].seq > seq, "heartbeats still flowing")


async def test_start_span_is_a_child_of_the_nudge(cluster: Cluster, observer: Observer, busybox_image: str, tmp_path: Path) -> None:
    span_file = tmp_path / "spans.jsonl"
    cluster.start_agent(COMP_TELEMETRY__SPAN_FILE=str(span_file))
    await eventually(lambda: observer.heartbeats, "a first heartbeat", logs=cluster.log)

    def spans() -> dict[str, dict]:
        lines = span_file.read_text().splitlines() if span_file.exists() else []
        return {s["span_id"]: s for s in map(json.loads, filter(None, lines))}

    def start_span_of(task_id: str) -> dict | None:
        return next((s for s in spans().values() if s["name"] == "nodeagent.start_task" and s["attributes"]["comp.task_id"] == task_id), None)

    # The agent's own passes (at start-up, after each action) also read the assignments, and
    # one of them may see a new task before the nudge's pass does.  Such a start belongs to
    # that pass's root span; the test tries again until the nudge's pass is the one.
    assigned: list[TaskSpec] = []
    for attempt in range(5):
        task_id = f"worker-{attempt}"
        assigned.append(sleeper(task_id, busybox_image))
        await cluster.assign(assigned, nudge=False)
        trace_id, nudge_span_id = secrets.token_hex(16), secrets.token_hex(8)
        await cluster.nudge(headers={"traceparent": f"00-{trace_id}-{nudge_span_id}-01"})
        await eventually(lambda: observer.in_state(task_id, TaskState.RUNNING), f"{task_id} running", logs=cluster.log)
        start_span = await eventually(lambda: start_span_of(task_id), f"the start_task span of {task_id}")
        parent = spans()[start_span["parent_id"]]
        if start_span["trace_id"] == trace_id:
            break
        assert parent["name"] == "nodeagent.reconcile" and parent["parent_id"] is None
    else:
        raise AssertionError("no start was made by a nudge's pass in 5 attempts")

    assert parent["kind"] == "CONSUMER"
    assert parent["name"] == f"{subjects.node_nudge(NODE_ID)} process"
    assert parent["parent_id"] == nudge_span_id
    assert parent["trace_id"] == trace_id


async def test_crashing_task_is_restarted_and_reported_each_time(
    cluster: Cluster, observer: Observer, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    cluster.start_agent(COMP_NODEAGENT__RESTART_BACKOFF_MAX_SECONDS="1")
    await cluster.assign([task("crash-1", image=busybox_image, command=["sh", "-c", "exit 3"])])

    def exits() -> list[TaskStatus]:
        return [s for s in observer.statuses if s.task_id == "crash-1" and s.state == TaskState.EXITED]

    await eventually(lambda: len(exits()) >= 3, "three exits of crash-1", logs=cluster.log)
    assert all(s.exit_code == 3 for s in exits())
    assert [s.restarts for s in exits()][:3] == [0, 1, 2]
    # Each exited container is removed before the next one starts.
    assert len(cluster.containers(docker_client)) <= 1


# ---- the docker driver on its own ------------------------------------------------------


@pytest.fixture
async def driver(cluster_name: str) -> AsyncIterator[DockerDriver]:
    driver = DockerDriver(cluster=cluster_name, node_id=NODE_ID)
    yield driver
    await driver.close()


async def test_driver_lists_only_its_own_node(
    driver: DockerDriver, cluster_name: str, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    mine = await driver.start(sleeper("mine-1", busybox_image))
    other = DockerDriver(cluster=cluster_name, node_id="node-b")
    theirs = await other.start(sleeper("theirs-1", busybox_image))
    assert [t.task_id for t in await other.list_tasks()] == ["theirs-1"]
    await other.close()

    assert [(t.task_id, t.container_id, t.state) for t in await driver.list_tasks()] == [("mine-1", mine.container_id, "running")]

    await driver.stop(mine, grace_seconds=0)
    [ended] = await driver.list_tasks()
    assert ended.state == "exited" and ended.exit_code is not None and ended.finished_at is not None
    await driver.remove(ended)
    await driver.remove(ended)  # already gone: no error
    assert await driver.list_tasks() == []
    assert docker_client.containers.get(theirs.container_id).status == "running"


async def test_driver_replaces_a_leftover_and_adopts_its_own_running_container(
    driver: DockerDriver, cluster_name: str, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    spec = sleeper("dup-1", busybox_image)
    name = f"comp-{cluster_name}-dup-1"
    leftover = docker_client.containers.create(busybox_image, ["true"], name=name, labels={labels.CLUSTER: cluster_name})

    started = await driver.start(spec)
    assert started.container_id != leftover.id and started.state == "running"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(leftover.id)

    # Starting again while it runs (a start whose result was lost) finds the same container.
    again = await driver.start(spec)
    assert again.container_id == started.container_id
    assert [t.container_id for t in await driver.list_tasks()] == [started.container_id]


async def test_driver_start_errors_are_clear(driver: DockerDriver, busybox_image: str) -> None:
    with pytest.raises(StartError, match='image "comp-missing/nope:1" is not present locally and could not be pulled: .+'):
        await driver.start(task("ghost-1", image="comp-missing/nope:1", command=["true"]))
    with pytest.raises(StartError, match="could not start"):
        await driver.start(task("bad-1", image=busybox_image, command=["/no/such/binary"]))
    # A failed start leaves nothing behind.
    assert await driver.list_tasks() == []
