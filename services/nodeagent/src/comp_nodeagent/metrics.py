"""Per-task resource use: the counters a runtime keeps, and the rates the agent reports.

A runtime gives cumulative CPU seconds and current memory per container
(:meth:`RuntimeDriver.usage`); CPU cores are the growth of the CPU counter over the wall
time between two samples, so :class:`UsageTracker` keeps each container's previous sample.
A container sampled for the first time has no rate yet and is reported from its second
sample on; so is one whose counter went backwards (its cgroup was made afresh, as a
``docker restart`` does).

The docker driver reads the counters from the container's cgroup files (:class:`CgroupUsage`):
a few small reads per container, where the engine's ``stats`` call waits for two rounds of
its collector (~2 s per container), and up to one round (1 s) even with ``one-shot``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comp_common.messages import TaskUsage

log = logging.getLogger(__name__)

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the CPU accounting controller alone or together with cpu, under either name.
_V1_CPUACCT_DIRS = ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")
# Where the engine puts a container's cgroup: under "docker" with the cgroupfs driver, as a
# transient scope unit with the systemd driver.
_CONTAINER_PARENTS = ("docker/{id}", "system.slice/docker-{id}.scope")

# cumulative CPU seconds, current memory bytes
Counters = tuple[float, int]


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    cpu_seconds: float  # cumulative since the container's cgroup was made
    memory_bytes: int


def cpu_cores(previous: Sample | None, current: Sample) -> float | None:
    """Average cores used between two samples of one container; None when there is no rate:
    no previous sample, no time between them, or a counter that went backwards (reset)."""
    if previous is None:
        return None
    elapsed = current.at - previous.at
    used = current.cpu_seconds - previous.cpu_seconds
    if elapsed <= 0 or used < 0:
        return None
    return used / elapsed


def share(used: float, limit: float) -> float | None:
    """``used`` as a fraction of ``limit``; None without a limit (0: unlimited)."""
    return used / limit if limit > 0 else None


@dataclass(frozen=True)
class RunningTask:
    """What the agent knows of a running task that its usage is measured against."""

    task_id: str
    deployment: str
    container_id: str
    cpu_limit: float  # cores
    memory_limit: int  # bytes


class UsageTracker:
    """Turns successive counter samples into :class:`TaskUsage`, remembering one sample per
    container: the previous one of every container in the last observation, no more."""

    def __init__(self) -> None:
        self._last: dict[str, Sample] = {}
        self._last_at: float | None = None

    def observe(self, at: float, counters: Mapping[str, Counters], tasks: Iterable[RunningTask]) -> tuple[list[TaskUsage], float | None]:
        """The usage of every task of ``tasks`` with counters now and a sample before, and the
        seconds since the previous observation (None for the first)."""
        since = None if self._last_at is None else at - self._last_at
        kept: dict[str, Sample] = {}
        usages: list[TaskUsage] = []
        for task in tasks:
            found = counters.get(task.container_id)
            if found is None:
                continue  # ended since, or not measurable: nothing to say about it
            current = Sample(at, found[0], found[1])
            cores = cpu_cores(self._last.get(task.container_id), current)
            kept[task.container_id] = current
            if cores is None:
                continue
            usages.append(
                TaskUsage(
                    task_id=task.task_id,
                    deployment=task.deployment,
                    cpu_cores=round(cores, 4),
                    cpu_share=_rounded(share(cores, task.cpu_limit)),
                    memory_bytes=current.memory_bytes,
                    memory_share=_rounded(share(current.memory_bytes, task.memory_limit)),
                )
            )
        self._last = kept
        self._last_at = at
        return usages, since


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ---- cgroup files ------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupFiles:
    """Where one container's counters are."""

    version: int  # 1 or 2
    cpu: Path  # v1 cpuacct.usage (ns), v2 cpu.stat (usage_usec)
    memory: Path  # v1 memory.usage_in_bytes, v2 memory.current
    memory_stat: Path  # for the inactive page cache, which is not counted as used

    def read(self) -> Counters:
        """Cumulative CPU seconds and working-set memory bytes; OSError once the cgroup is gone."""
        if self.version == 1:
            cpu_seconds = int(self.cpu.read_text()) / 1e9
            inactive_key = "total_inactive_file"
        else:
            cpu_seconds = _stat_value(self.cpu.read_text(), "usage_usec") / 1e6
            inactive_key = "inactive_file"
        usage = int(self.memory.read_text())
        # The working set, as docker stats and the kubelet report it: page cache the kernel
        # can drop at once is no memory the task needs, and counting it would make every
        # task that reads files look as if it were near its limit.
        inactive = _stat_value(self.memory_stat.read_text(), inactive_key)
        return cpu_seconds, max(0, usage - inactive)


def _stat_value(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def find_cgroup(root: Path, container_id: str) -> CgroupFiles | None:
    """The container's cgroup files under ``root`` (cgroup v1 with the cgroupfs or the systemd
    driver, or v2), or None when none is there (another layout, or another cgroup namespace)."""
    for parent in _CONTAINER_PARENTS:
        relative = parent.format(id=container_id)
        memory = root / "memory" / relative
        for cpuacct in _V1_CPUACCT_DIRS:
            cpu = root / cpuacct / relative / "cpuacct.usage"
            if cpu.is_file() and (memory / "memory.usage_in_bytes").is_file():
                return CgroupFiles(1, cpu, memory / "memory.usage_in_bytes", memory / "memory.stat")
        unified = root / relative
        if (unified / "cpu.stat").is_file() and (unified / "memory.current").is_file():
            return CgroupFiles(2, unified / "cpu.stat", unified / "memory.current", unified / "memory.stat")
    return None


class CgroupUsage:
    """Reads containers' counters from their cgroup files, remembering where each one's are."""

    def __init__(self, root: Path = DEFAULT_CGROUP_ROOT):
        self.root = root
        self._found: dict[str, CgroupFiles | None] = {}

    def read(self, container_ids: Iterable[str]) -> tuple[dict[str, Counters], list[str]]:
        """The counters of each container found, and the ids of those with no cgroup here (for
        another source to measure).  A container whose files vanish while read has ended and is
        in neither."""
        counters: dict[str, Counters] = {}
        elsewhere: list[str] = []
        found: dict[str, CgroupFiles | None] = {}
        for container_id in container_ids:
            files = self._found[container_id] if container_id in self._found else find_cgroup(self.root, container_id)
            found[container_id] = files
            if files is None:
                elsewhere.append(container_id)
                continue
            try:
                counters[container_id] = files.read()
            except (OSError, ValueError):
                found.pop(container_id)  # looked for again should it run once more
        self._found = found  # only the containers still asked about
        return counters, elsewhere


def counters_from_engine_stats(stats: Mapping[str, Any]) -> Counters | None:
    """Counters from the engine's stats document (``GET /containers/<id>/stats``); None when it
    has none (a container that is not running reports zeros and no memory usage)."""
    cpu = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
    memory = stats.get("memory_stats") or {}
    if cpu is None or "usage" not in memory:
        return None
    detail = memory.get("stats") or {}
    inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    return cpu / 1e9, max(0, int(memory["usage"]) - int(inactive))
