"""The path from a nudge to a reported running task, on the real engine and NATS.

What a replacement after a node loss waits for: a newly assigned task is started without
waiting for the engine's listing, its running status is published as soon as the engine
started it (not carried by the next heartbeat), and the driver runs as many engine calls at
once as the agent's parallelism allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest
from faststream.nats import NatsBroker

from comp_cli.local import _bin
from comp_common.broker import server_caught_up
from comp_common import subjects
from comp_common.kv import open_bucket
from comp_common.manifest import Port
from comp_common.messages import Heartbeat, NodeAssignments, Nudge, TaskSpec, TaskState, TaskStatus
from comp_nodeagent.agent import NEW_TASK_REASON
from comp_nodeagent.docker_driver import SPARE_ENGINE_THREADS, DockerDriver
from waiting import eventually

pytestmark = pytest.mark.docker

NODE_ID = "node-s"


class Node:
    """One ``comp-nodeagent`` process; the test plays the scheduler (assignments and nudges)
    and records what the agent publishes."""

    def __init__(self, broker: NatsBroker, nats_url: str, cluster: str, log: Path):
        self.broker = broker
        self.nats_url = nats_url
        self.cluster = cluster
        self.log = log
        self.version = 0
        self.proc: subprocess.Popen | None = None
        # Heartbeats and statuses in the one order this process received them: one
        # subscription, so NATS delivers them in the order the agent published them (two
        # subscriptions' callbacks may interleave either way).
        self.messages: list[Heartbeat | TaskStatus] = []

    async def subscribe(self) -> None:
        heartbeat_subject = subjects.node_heartbeat(NODE_ID)
        status_subject = subjects.task_event(NODE_ID)

        async def on_message(msg: Any) -> None:
            if msg.subject == heartbeat_subject:
                self.messages.append(Heartbeat.model_validate_json(msg.data))
            elif msg.subject == status_subject:
                self.messages.append(TaskStatus.model_validate_json(msg.data))

        await self.broker.connection.subscribe(">", cb=on_message)
        await server_caught_up(self.broker.connection)

    def start_agent(self, **env: str) -> None:
        environment = {
            **os.environ,
            "COMP_NATS__URL": self.nats_url,
            "COMP_CLUSTER": self.cluster,
            "COMP_NODEAGENT__NODE_ID": NODE_ID,
            "COMP_NODEAGENT__RESYNC_SECONDS": "3600",
            "COMP_NODEAGENT__STOP_GRACE_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [_bin("comp-nodeagent")], env=environment, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def stop_agent(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def assign(self, tasks: list[TaskSpec]) -> None:
        self.version += 1
        kv = await open_bucket(self.broker, subjects.ASSIGNMENTS_BUCKET)
        await kv.put(NODE_ID, NodeAssignments(node_id=NODE_ID, version=self.version, tasks=tasks).model_dump_json().encode())
        nudge = Nudge(node_id=NODE_ID, version=self.version)
        await self.broker.connection.publish(subjects.node_nudge(NODE_ID), nudge.model_dump_json().encode())
        await self.broker.connection.flush()

    def heartbeats(self) -> list[Heartbeat]:
        return [m for m in self.messages if isinstance(m, Heartbeat)]

    def running(self, task_id: str) -> TaskStatus | None:
        return next(
            (m for m in self.messages if isinstance(m, TaskStatus) and m.task_id == task_id and m.state == TaskState.RUNNING),
            None,
        )

    def actions(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("msg") == "action":
                entries.append(entry)
        return entries


@pytest.fixture
async def node(nats_url: str, cluster_name: str, tmp_path: Path) -> AsyncIterator[Node]:
    broker = NatsBroker(nats_url)
    await broker.connect()
    node = Node(broker, nats_url, cluster_name, tmp_path / "nodeagent.log")
    await node.subscribe()
    try:
        yield node
    finally:
        node.stop_agent()
        await broker.stop()


def sleeper(task_id: str, image: str, ports: list[Port] | None = None) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash="hash1",
        image=image, command=["sleep"], args=["3600"], cpu=0.1, memory=16 * 1024**2, ports=ports or [],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_new_tasks_start_at_once_and_running_is_published_before_the_next_heartbeat(
    node: Node, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    # One heartbeat when the agent starts and none after: whatever reports a task running
    # here is the task status itself.
    node.start_agent(COMP_LIVENESS__HEARTBEAT_SECONDS="3600")
    await eventually(lambda: node.heartbeats(), "the agent's first heartbeat", timeout=30)
    # A first task makes sure the host has been listed since the agent started (before that,
    # a task unknown to the agent may still have a container of the last agent's).
    warm = sleeper("warm-1", busybox_image)
    await node.assign([warm])
    await eventually(lambda: node.running("warm-1"), "warm-1 running", timeout=30)

    fixed_port = free_port()
    replacements = [sleeper(f"new-{i}", busybox_image) for i in range(1, 4)]
    replacements.append(sleeper("new-4", busybox_image, [Port(container_port=80, host_port=fixed_port)]))
    replacements.append(sleeper("new-5", busybox_image, [Port(container_port=80)]))
    await node.assign([warm, *replacements])
    for spec in replacements:
        await eventually(lambda: node.running(spec.task_id), f"{spec.task_id} running", timeout=30)

    # Every running status came after the agent's one heartbeat and before any other: none
    # waited for a heartbeat to be reported.
    assert len(node.heartbeats()) == 1
    assert isinstance(node.messages[0], Heartbeat)

    # Started from the agent's own records, not after a listing.
    reasons = {e["task_id"]: e["reason"] for e in node.actions() if e["task_id"].startswith("new-")}
    assert reasons == {s.task_id: NEW_TASK_REASON for s in replacements}

    # What a status says is what the engine runs, host ports included, whether the spec
    # fixed the port (reported without asking the engine) or the engine chose it.
    for spec in replacements:
        status = node.running(spec.task_id)
        assert status is not None and status.container_id
        attrs = docker_client.api.inspect_container(status.container_id)
        assert attrs["State"]["Running"]
        published = {k: int(v[0]["HostPort"]) for k, v in (attrs["NetworkSettings"]["Ports"] or {}).items() if v}
        assert status.host_ports == published, spec.task_id
    assert node.running("new-4").host_ports == {"80/tcp": fixed_port}  # type: ignore[union-attr]
    assert node.running("new-5").host_ports["80/tcp"] > 0  # type: ignore[union-attr]


async def test_driver_runs_as_many_engine_calls_at_once_as_its_parallelism(cluster_name: str) -> None:
    """The loop's default executor has cores + 4 threads, fewer than the default parallelism
    of 8 on a small host: the driver's own pool must let every slot's call run at once."""
    parallelism = 8
    driver = DockerDriver(cluster=cluster_name, node_id=NODE_ID, max_concurrency=parallelism)
    try:
        # Each call waits until all have begun: it passes only if they run at once.  The
        # timeout only ends a failing run instead of hanging it.
        together = threading.Barrier(parallelism + SPARE_ENGINE_THREADS, timeout=30)
        await asyncio.gather(*(driver._call(together.wait) for _ in range(parallelism + SPARE_ENGINE_THREADS)))
    finally:
        await driver.close()
