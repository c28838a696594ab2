"""What the agent needs from a container runtime, and the registry of runtimes.

The agent core only ever talks to a :class:`RuntimeDriver`; drivers are chosen by name
from :data:`DRIVERS` so that a host without an engine (or a scale test) can plug in
another one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

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


@dataclass(frozen=True)
class ExecOutcome:
    """How a command run inside a container ended: its exit code, or None and why not."""

    exit_code: int | None
    output: str = ""


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

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float | None) -> None:
        """Send the task's stop signal, kill the process after ``grace_seconds`` (None: the
        grace the container was created with); a gone container is no error.

        Returns once the process has ended, so it may take the whole grace: callers run
        stops concurrently and must not hold anything scarce while one waits."""
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

    # Optional.  A driver without it has ended containers removed before their
    # replacement starts.
    async def set_aside(self, runtime_task: RuntimeTask) -> None:
        """Make the ended container's name free for the task's next container, cheaply; the
        container is removed with :meth:`remove` later, meanwhile it is not listed as a task
        once it is no longer in flight."""
        ...

    # Health probes.  Optional: see :func:`can_probe`.
    async def probe_target(self, container_id: str) -> str | None:
        """The address at which HTTP and TCP checks reach the container's ports, or None if
        it has none (not running, or on no network)."""
        ...

    async def exec_check(self, container_id: str, command: Sequence[str], timeout: float) -> ExecOutcome:
        """Run ``command`` in the container; its exit code, or None (with the reason as output)
        when it did not end within ``timeout`` or could not run."""
        ...

    # Resource metrics.  Optional: see :func:`can_measure`.
    async def usage(self, container_ids: Collection[str]) -> dict[str, tuple[float, int]]:
        """Cumulative CPU seconds and current (working-set) memory bytes of each of these
        containers that still runs; one that ended or cannot be measured is left out.  Called
        every metrics period with every running task's container, so it must be cheap."""
        ...


def can_probe(driver: Any) -> bool:
    """Whether health checks can reach the runtime's containers.

    A runtime that runs no processes (the hollow driver) has nothing to probe; without
    ``probe_target`` and ``exec_check`` its tasks pass every check, so readiness and
    liveness still run through the agent's logic, only the probe is skipped.
    """
    return callable(getattr(driver, "probe_target", None)) and callable(getattr(driver, "exec_check", None))


def can_measure(driver: Any) -> bool:
    """Whether the runtime reports its containers' resource use (no metrics are sent otherwise)."""
    return callable(getattr(driver, "usage", None))


def _docker(settings: NodeAgentSettings) -> RuntimeDriver:
    # Imported here so that other drivers do not need the docker SDK or an engine.
    from .docker_driver import DockerDriver

    return DockerDriver(
        cluster=settings.cluster,
        node_id=settings.nodeagent.node_id,
        max_concurrency=settings.nodeagent.parallelism,
        cgroup_root=settings.nodeagent.cgroup_root,
    )


def _hollow(settings: NodeAgentSettings) -> RuntimeDriver:
    from .hollow_driver import HollowDriver

    group = settings.nodeagent
    # Its "engine" reports the default size; COMP_NODEAGENT__CPU / __MEMORY override it in
    # the agent, as they do for a real engine.
    return HollowDriver(
        group.node_id,
        start_seconds=group.hollow_start_seconds,
        task_cpu=group.hollow_task_cpu,
        task_memory=group.hollow_task_memory,
    )


DRIVERS: dict[str, Callable[[NodeAgentSettings], RuntimeDriver]] = {"docker": _docker, "hollow": _hollow}


def make_driver(settings: NodeAgentSettings) -> RuntimeDriver:
    name = settings.nodeagent.driver
    try:
        factory = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ValueError(f"unknown runtime driver {name!r}; known drivers: {known}") from None
    return factory(settings)
