"""What the agent needs from a container runtime, and the registry of runtimes.

The agent core only ever talks to a :class:`RuntimeDriver`; drivers are chosen by name
from :data:`DRIVERS` so that a host without an engine (or a scale test) can plug in
another one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from comp_common.messages import Capacity, TaskSpec

if TYPE_CHECKING:
    from .settings import NodeAgentSettings

# Engine states in which the task's process exists; anything else has ended or never began.
ALIVE_STATES = frozenset({"running", "paused", "restarting"})


@dataclass(frozen=True)
class RuntimeTask:
    """One container of this node, as the runtime reports it."""

    task_id: str
    container_id: str
    state: str  # the engine's word: created, running, exited, dead, removing...
    exit_code: int | None = None
    spec_hash: str = ""
    deployment: str = ""
    # "8080/tcp" -> 32768, as published by the engine
    host_ports: Mapping[str, int] = field(default_factory=dict)
    # Wall-clock seconds; for a listed running container the creation time (the agent starts
    # what it creates at once), for an ended one the engine's own start and finish times.
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES


class StartError(RuntimeError):
    """A task could not be started; the message is shown to users as the FAILED reason."""


class EventWatch(Protocol):
    def close(self) -> None: ...


class RuntimeDriver(Protocol):
    """A container runtime as the agent drives it.  Every method is safe to await on the loop."""

    name: str

    async def capacity(self) -> Capacity: ...

    async def list_tasks(self) -> list[RuntimeTask]:
        """This cluster's containers on this node only, running or not."""
        ...

    async def start(self, task: TaskSpec) -> RuntimeTask:
        """Create and start the task's container; raises :class:`StartError` with a user-facing reason."""
        ...

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float) -> None:
        """Ask the process to end, kill it after ``grace_seconds``; a gone container is no error."""
        ...

    async def remove(self, runtime_task: RuntimeTask) -> None:
        """Delete the container; a gone container is no error."""
        ...

    async def watch(self, on_event: Callable[[str | None], None]) -> EventWatch:
        """Call ``on_event(task_id)`` on the running loop whenever one of this node's containers
        ends or disappears, and ``on_event(None)`` when events may have been missed (the
        watch reconnected), so the caller re-lists everything."""
        ...

    async def close(self) -> None: ...


def _docker(settings: NodeAgentSettings) -> RuntimeDriver:
    # Imported here so that other drivers do not need the docker SDK or an engine.
    from .docker_driver import DockerDriver

    return DockerDriver(
        cluster=settings.cluster,
        node_id=settings.nodeagent.node_id,
        max_concurrency=settings.nodeagent.parallelism,
    )


def _hollow(settings: NodeAgentSettings) -> RuntimeDriver:
    from .hollow_driver import HollowDriver

    group = settings.nodeagent
    # Its "engine" reports the default size; COMP_NODEAGENT__CPU / __MEMORY override it in
    # the agent, as they do for a real engine.
    return HollowDriver(group.node_id, start_seconds=group.hollow_start_seconds)


DRIVERS: dict[str, Callable[[NodeAgentSettings], RuntimeDriver]] = {"docker": _docker, "hollow": _hollow}


def make_driver(settings: NodeAgentSettings) -> RuntimeDriver:
    name = settings.nodeagent.driver
    try:
        factory = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ValueError(f"unknown runtime driver {name!r}; known drivers: {known}") from None
    return factory(settings)
