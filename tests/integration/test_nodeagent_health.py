"""Health checks on the real engine: HTTP, TCP and exec probes of busybox containers, on their
address on the default bridge, with statuses and health events over a real nats-server.

The agent runs in this process over the docker driver; the test plays the scheduler by
handing it assignments, and watches what it publishes.  Checks flip because the test
changes the container (removes a file, ends a server), never because time passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest

from live_agent import LiveAgent, live_agent
from waiting import eventually
from comp_common.manifest import Health, HealthCheck, Port
from comp_common.messages import HealthState, TaskSpec, TaskState
from comp_nodeagent.docker_driver import DockerDriver

pytestmark = pytest.mark.docker

NODE = "node-h"
WAIT = 30.0


@pytest.fixture
async def live(nats_url: str, cluster_name: str) -> AsyncIterator[LiveAgent]:
    async with live_agent(nats_url, DockerDriver(cluster=cluster_name, node_id=NODE), NODE) as agent:
        yield agent


def task(task_id: str, image: str, script: str, **fields: Any) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash="h1",
        image=image, command=["sh", "-c"], args=[script], cpu=0.25, memory=32 * 1024**2,
        stop_grace_seconds=1, **fields,
    )


def fast(**probe: Any) -> HealthCheck:
    return HealthCheck(interval=0.2, timeout=1, failure_threshold=2, **probe)


def run_in(docker_client: docker.DockerClient, container_id: str, *command: str) -> None:
    result = docker_client.containers.get(container_id).exec_run(list(command))
    assert result.exit_code == 0, result.output


WEB = "echo ready > /www/ready.html && exec httpd -f -p 80 -h /www"
PORTS = [Port(container_port=80, name="http")]


async def test_http_readiness_follows_a_file_in_the_web_root(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    readiness = fast(http={"path": "/ready.html", "port": "http"})
    await live.assign(task("web-1", busybox_image, WEB, ports=PORTS, health=Health(readiness=readiness)))

    ready = await eventually(lambda: live.running("web-1", ready=True), "web-1 ready", WAIT)
    assert ready.readiness == HealthState.HEALTHY and ready.ready_since is not None

    run_in(docker_client, ready.container_id, "rm", "/www/ready.html")
    unready = await eventually(lambda: live.running("web-1", readiness=HealthState.UNHEALTHY), "web-1 unready", WAIT)
    assert not unready.ready and unready.ready_since is None
    assert unready.message == "readiness check failed: GET /ready.html on :80 answered 404, expected 200"

    run_in(docker_client, ready.container_id, "sh", "-c", "echo ready > /www/ready.html")
    again = await eventually(lambda: live.running("web-1", ready=True), "web-1 ready again", WAIT)
    # Readiness never restarts anything.
    assert (again.container_id, again.restarts) == (ready.container_id, 0)
    assert live.health("web-1") == [
        ("readiness", HealthState.STARTING, HealthState.HEALTHY),
        ("readiness", HealthState.HEALTHY, HealthState.UNHEALTHY),
        ("readiness", HealthState.UNHEALTHY, HealthState.HEALTHY),
    ]


async def test_http_liveness_failure_restarts_the_container(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    liveness = fast(http={"path": "/index.html", "port": 80})
    await live.assign(task("web-1", busybox_image, WEB, ports=PORTS, health=Health(liveness=liveness)))
    first = await eventually(lambda: live.running("web-1", liveness=HealthState.HEALTHY), "web-1 live", WAIT)

    run_in(docker_client, first.container_id, "rm", "/www/index.html")

    # The image's web root has the file again in the new container: healthy again.
    again = await eventually(lambda: live.running("web-1", restarts=1, liveness=HealthState.HEALTHY), "web-1 restarted", WAIT)
    assert again.container_id != first.container_id
    [exited] = [s for s in live.statuses if s.task_id == "web-1" and s.state == TaskState.EXITED]
    assert exited.container_id == first.container_id
    assert exited.message == "liveness check failed: GET /index.html on :80 answered 404, expected 200"
    assert exited.exit_code is not None
    assert ("liveness", HealthState.HEALTHY, HealthState.UNHEALTHY) in live.health("web-1")
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(first.container_id)


async def test_tcp_liveness_failure_restarts_the_container(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    # httpd without -f goes to the background: the shell stays as the container's process
    # when the server is ended.
    script = "httpd -p 9000 -h /www; exec sleep 3600"
    liveness = fast(tcp={"port": 9000})
    await live.assign(task("tcp-1", busybox_image, script, health=Health(liveness=liveness)))
    first = await eventually(lambda: live.running("tcp-1", liveness=HealthState.HEALTHY), "tcp-1 live", WAIT)

    run_in(docker_client, first.container_id, "killall", "httpd")

    again = await eventually(lambda: live.running("tcp-1", restarts=1, liveness=HealthState.HEALTHY), "tcp-1 restarted", WAIT)
    assert again.container_id != first.container_id
    exited = next(s for s in live.statuses if s.task_id == "tcp-1" and s.state == TaskState.EXITED)
    assert exited.message.startswith("liveness check failed: TCP connect to :9000 failed")


async def test_exec_liveness_failure_restarts_the_container(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    script = "touch /tmp/alive && exec sleep 3600"
    liveness = fast(exec={"command": ["cat", "/tmp/alive"]})
    await live.assign(task("exec-1", busybox_image, script, health=Health(liveness=liveness)))
    first = await eventually(lambda: live.running("exec-1", liveness=HealthState.HEALTHY), "exec-1 live", WAIT)

    run_in(docker_client, first.container_id, "rm", "/tmp/alive")

    again = await eventually(lambda: live.running("exec-1", restarts=1, liveness=HealthState.HEALTHY), "exec-1 restarted", WAIT)
    assert again.container_id != first.container_id
    exited = next(s for s in live.statuses if s.task_id == "exec-1" and s.state == TaskState.EXITED)
    assert exited.message.startswith("liveness check failed: cat /tmp/alive exited 1: cat: can't open '/tmp/alive'")


async def test_exec_check_that_hangs_fails_by_its_timeout(live: LiveAgent, busybox_image: str) -> None:
    readiness = HealthCheck(exec={"command": ["sleep", "30"]}, interval=0.2, timeout=0.3, failure_threshold=1)
    await live.assign(task("slow-1", busybox_image, "exec sleep 3600", health=Health(readiness=readiness)))
    unready = await eventually(lambda: live.running("slow-1", readiness=HealthState.UNHEALTHY), "slow-1 unready", WAIT)
    assert unready.message == "readiness check failed: sleep 30: no exit within 0.3s"


async def test_driver_reaches_the_container_on_its_bridge_address(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    await live.assign(task("web-1", busybox_image, WEB, ports=PORTS))
    running = await eventually(lambda: live.running("web-1"), "web-1 running", WAIT)
    address = await live.driver.probe_target(running.container_id)
    attrs = docker_client.api.inspect_container(running.container_id)
    assert address == attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
    outcome = await live.driver.exec_check(running.container_id, ["sh", "-c", "echo hi; exit 3"], timeout=5)
    assert (outcome.exit_code, outcome.output) == (3, "hi")
