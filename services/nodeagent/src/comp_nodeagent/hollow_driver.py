"""A simulated runtime: tasks "run" in memory, nothing is started on the host.

The hollow driver stands in for a container engine the way Kubernetes' kubemark stands
in for a kubelet's runtime: the agent's own logic (passes, plan_actions, statuses,
heartbeats, nudges, resync, backoff) runs unchanged, only the engine is missing.  It
lets one process host thousands of nodes, so the control plane can be measured at a
scale this machine could never run as containers.

A started task is *running* at once, or after ``start_seconds`` (a simulated engine
latency, paid inside the agent's engine slots as a real start would be).  Stopping a
task leaves it *exited* until it is removed, as an engine does.  :meth:`HollowDriver.exit`
ends a task from outside (a simulated crash) and tells the agent, as the docker driver's
event watch does, so the agent's restart path can be exercised too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import replace

from comp_common.messages import Capacity, TaskSpec

from .driver import RuntimeTask

DEFAULT_CPU = 8.0
DEFAULT_MEMORY = 32 * 1024**3
# Where the engine would pick free host ports for ports published without one.
_EPHEMERAL_PORTS_FROM = 32768


class _HollowWatch:
    """Nothing ends on its own in a hollow runtime; only :meth:`HollowDriver.exit` reports."""

    def __init__(self, driver: HollowDriver):
        self._driver = driver

    def close(self) -> None:
        self._driver._on_event = None


class HollowDriver:
    name = "hollow"

    def __init__(
        self,
        node_id: str,
        *,
        cpu: float = DEFAULT_CPU,
        memory: int = DEFAULT_MEMORY,
        start_seconds: float = 0.0,
        task_cpu: float = 0.0,
        task_memory: int = 0,
        clock: Callable[[], float] = time.time,
    ):
        """``task_cpu`` / ``task_memory``: the constant load every running task reports (cores,
        bytes), a stand-in for real use when what reads the metrics is under test."""
        self.node_id = node_id
        self._capacity = Capacity(cpu=cpu, memory=memory)
        self.start_seconds = start_seconds
        self.task_cpu = task_cpu
        self.task_memory = task_memory
        self._clock = clock
        self._containers: dict[str, RuntimeTask] = {}  # container id -> task
        self._container_numbers = itertools.count(1)
        self._free_ports = itertools.count(_EPHEMERAL_PORTS_FROM)
        self._on_event: Callable[[str | None], None] | None = None

    # ---- RuntimeDriver -----------------------------------------------------------------
    async def capacity(self) -> Capacity:
        return self._capacity

    async def list_tasks(self) -> list[RuntimeTask]:
        return list(self._containers.values())

    async def start(self, task: TaskSpec) -> RuntimeTask:
        if self.start_seconds > 0:
            await asyncio.sleep(self.start_seconds)
        container = RuntimeTask(
            task_id=task.task_id,
            # Unique across the nodes of one process, as engine ids are across hosts.
            container_id=f"hollow-{self.node_id}-{next(self._container_numbers)}",
            state="running",
            spec_hash=task.spec_hash,
            deployment=task.deployment,
            host_ports={
                f"{port.container_port}/{port.protocol}": port.host_port or next(self._free_ports) for port in task.ports
            },
            started_at=self._clock(),
        )
        self._containers[container.container_id] = container
        return container

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float) -> None:
        container = self._containers.get(runtime_task.container_id)
        if container is not None and container.alive:
            # 143: ended by SIGTERM within the grace, as a well-behaved process does.
            self._containers[container.container_id] = replace(
                container, state="exited", exit_code=143, finished_at=self._clock()
            )

    async def remove(self, runtime_task: RuntimeTask) -> None:
        self._containers.pop(runtime_task.container_id, None)

    async def watch(self, on_event: Callable[[str | None], None]) -> _HollowWatch:
        self._on_event = on_event
        return _HollowWatch(self)

    async def close(self) -> None:
        pass

    async def usage(self, container_ids: Collection[str]) -> dict[str, tuple[float, int]]:
        now = self._clock()
        out: dict[str, tuple[float, int]] = {}
        for container_id in container_ids:
            container = self._containers.get(container_id)
            if container is not None and container.alive:
                ran = max(0.0, now - (container.started_at or now))
                out[container_id] = (self.task_cpu * ran, self.task_memory)
        return out

    # ---- simulation --------------------------------------------------------------------
    def exit(self, task_id: str, exit_code: int = 1) -> bool:
        """End the task's running container as a crash would; False if none runs."""
        for container in self._containers.values():
            if container.task_id == task_id and container.alive:
                self._containers[container.container_id] = replace(
                    container, state="exited", exit_code=exit_code, finished_at=self._clock()
                )
                if self._on_event is not None:
                    self._on_event(task_id)
                return True
        return False
