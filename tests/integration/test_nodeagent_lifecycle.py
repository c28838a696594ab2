"""Restart policy and graceful stop on the real engine, with statuses over a real nats-server.

The agent runs in this process over the docker driver (as in test_nodeagent_health.py);
delays are read from the statuses the agent published and from the engine's own
timestamps, never by sleeping a fixed time and looking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest

from live_agent import LiveAgent, live_agent
from waiting import eventually
from comp_common.manifest import RestartPolicy
from comp_common.messages import TaskSpec, TaskState
from comp_nodeagent.docker_driver import DockerDriver, _parse_engine_time
from comp_nodeagent.driver import RuntimeTask

pytestmark = pytest.mark.docker

NODE = "node-l"
WAIT = 30.0
# PID 1 ignores SIGTERM unless it handles it; the trap says so explicitly.
STUBBORN = "trap '' TERM; while :; do sleep 1; done"


class RecordingDriver(DockerDriver):
    """The docker driver, noting each container's engine times just before it is removed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ended: dict[str, dict[str, Any]] = {}

    async def remove(self, runtime_task: RuntimeTask) -> None:
        try:
            attrs = await asyncio.to_thread(self._client.api.inspect_container, runtime_task.container_id)
            self.ended[runtime_task.container_id] = attrs["State"]
        except docker.errors.NotFound:
            pass
        await super().remove(runtime_task)


@pytest.fixture
async def live(nats_url: str, cluster_name: str) -> AsyncIterator[LiveAgent]:
    async with live_agent(nats_url, RecordingDriver(cluster=cluster_name, node_id=NODE), NODE) as agent:
        yield agent


def task(task_id: str, image: str, script: str, **fields: Any) -> TaskSpec:
    fields.setdefault("stop_grace_seconds", 1)
    return TaskSpec(
        task_id=task_id, deployment="default.jobs", namespace="default", name="jobs", spec_hash="h1",
        image=image, command=["sh", "-c"], args=[script], cpu=0.1, memory=16 * 1024**2, **fields,
    )


async def test_a_crashing_task_backs_off_longer_each_time(live: LiveAgent, busybox_image: str) -> None:
    await live.assign(task("crash-1", busybox_image, "exit 1", restart=RestartPolicy(max_delay=4)))

    exits = await eventually(lambda: (e := live.of("crash-1", TaskState.EXITED)) and len(e) >= 5 and e, "five exits", WAIT)
    waits = [None if e.next_restart_at is None else round(e.next_restart_at - e.updated_at) for e in exits[:5]]
    assert waits == [None, 1, 2, 4, 4]  # at once, then 1, 2, 4 s, capped at max_delay
    assert [e.crash_loop for e in exits[:5]] == [False, True, True, True, True]
    assert [(e.exit_code, e.restarts) for e in exits[:5]] == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]
    # Each wait was kept: the next start came no earlier than announced.
    for exited in exits[1:4]:
        restart = next(s for s in live.of("crash-1", TaskState.STARTING) if s.updated_at > exited.updated_at)
        assert restart.updated_at >= exited.next_restart_at - 0.05
        assert not restart.crash_loop and restart.next_restart_at is None


@pytest.mark.parametrize(("condition", "exit_code"), [("on-failure", 0), ("never", 3)])
async def test_a_task_the_policy_does_not_restart_stays_exited(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient, condition: str, exit_code: int
) -> None:
    await live.assign(task("job-1", busybox_image, f"sleep 0.2; exit {exit_code}", restart=RestartPolicy(condition=condition)))
    exited = await eventually(lambda: live.latest("job-1", TaskState.EXITED), "job-1 exited", WAIT)
    assert (exited.exit_code, exited.restarts, exited.crash_loop) == (exit_code, 0, False)
    assert exited.message == f"container exited with code {exit_code}; not restarted (restart policy {condition})"
    # The container is kept, as the record of the run; further passes leave it so.
    await live.agent.reconcile("test")
    await live.agent.reconcile("test")
    assert docker_client.api.inspect_container(exited.container_id)["State"]["ExitCode"] == exit_code
    assert [s.state for s in live.of("job-1")] == [TaskState.STARTING, TaskState.RUNNING, TaskState.EXITED]

    # Unassigned, it is removed and reported stopped.
    await live.assign()
    await eventually(lambda: live.latest("job-1", TaskState.STOPPED), "job-1 stopped", WAIT)
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(exited.container_id)


async def test_on_failure_restarts_a_failure(live: LiveAgent, busybox_image: str) -> None:
    await live.assign(task("job-1", busybox_image, "sleep 0.2; exit 3", restart=RestartPolicy(condition="on-failure")))
    await eventually(lambda: len(live.of("job-1", TaskState.EXITED)) >= 2, "job-1 restarted and exited again", WAIT)
    assert all(e.exit_code == 3 for e in live.of("job-1", TaskState.EXITED))


async def test_container_gets_the_stop_signal_and_grace(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    # Ends cleanly on SIGUSR1 only: a stop that sent SIGTERM would take the whole grace.
    polite = "trap 'exit 0' USR1; trap '' TERM; touch /trapped; while :; do sleep 0.1; done"
    await live.assign(task("polite-1", busybox_image, polite, stop_signal="SIGUSR1", stop_grace_seconds=20))
    running = await eventually(lambda: live.latest("polite-1", TaskState.RUNNING), "polite-1 running", WAIT)
    # As PID 1 the shell ignores a signal it has no trap for yet: stop only once it has one.
    await eventually(
        lambda: docker_client.containers.get(running.container_id).exec_run(["test", "-f", "/trapped"]).exit_code == 0,
        "polite-1's traps set", WAIT,
    )
    config = docker_client.api.inspect_container(running.container_id)["Config"]
    assert (config["StopSignal"], config["StopTimeout"]) == ("SIGUSR1", 20)

    await live.assign()
    await eventually(lambda: live.latest("polite-1", TaskState.STOPPED), "polite-1 stopped", WAIT)
    state = live.driver.ended[running.container_id]
    assert state["ExitCode"] == 0  # its own exit on the signal, not SIGKILL's 137


async def test_stops_of_stubborn_tasks_wait_their_grace_together(
    live: LiveAgent, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    grace = 2
    ids = [f"stubborn-{i}" for i in range(10)]
    await live.assign(*(task(t, busybox_image, STUBBORN, stop_grace_seconds=grace) for t in ids))
    running = {t: await eventually(lambda t=t: live.latest(t, TaskState.RUNNING), f"{t} running", WAIT) for t in ids}

    stop_issued = time.time()
    await live.assign()
    await eventually(lambda: all(live.latest(t, TaskState.STOPPED) for t in ids), "all stopped", 60)

    states = [live.driver.ended[running[t].container_id] for t in ids]
    assert all(s["ExitCode"] == 137 for s in states), "SIGTERM is ignored: each was killed after its grace"
    # The engine's own times: each ran until killed, and the kills came together.
    finished = [_parse_engine_time(s["FinishedAt"]) for s in states]
    started = [_parse_engine_time(s["StartedAt"]) for s in states]
    assert all(f is not None and s is not None for f, s in zip(finished, started))
    assert min(finished) - stop_issued >= grace * 0.9  # type: ignore[operator]
    # Ten graces one after another would take 20 s; together they take about one.
    assert max(finished) - stop_issued < 3 * grace  # type: ignore[operator]
