"""`comp status` on a real local cluster with two schedulers: which one leads, which stands
by, and the standby shown leading once the leader is killed."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    # No nodes: this is about the schedulers, and a cluster without agents needs no Docker.
    config = ClusterConfig.private(tmp_path, "status", nodes=0, schedulers=2,
                                   extra_env={"COMP_SCHEDULER__LEASE_SECONDS": "1"})
    local = LocalCluster(config)
    local.start()
    try:
        yield local
    finally:
        local.stop(purge_workloads=False)


def status(local: LocalCluster) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "comp_cli.main", "--state-dir", str(local.config.state_dir), "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def roles(output: str) -> dict[str, str]:
    """Scheduler process -> its ROLE column."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(scheduler(?:-\d+)?)\s+\d+\s+running\s*(.*)$", line)
        if match:
            found[match[1]] = match[2].strip()
    return found


def leading(local: LocalCluster, among: set[str]) -> tuple[str, str] | None:
    output = status(local)
    shown = roles(output)
    leaders = [name for name, role in shown.items() if role.startswith("leader (epoch ")]
    if set(shown) != among or len(leaders) != 1 or any(shown[n] != "standby" for n in among - set(leaders)):
        return None
    return leaders[0], output


def test_status_shows_each_scheduler_and_the_leader(cluster: LocalCluster) -> None:
    both = {"scheduler", "scheduler-2"}
    leader, output = wait_until(lambda: leading(cluster, both), 30, "one scheduler leading, the other standing by")
    line = next(l for l in output.splitlines() if l.startswith("scheduler leader: "))
    assert line.startswith(f"scheduler leader: {leader} (epoch ")
    assert "not running" not in line
    assert "API " in output and "healthy" in output
    first_epoch = epoch(output)

    cluster.kill(leader, signal.SIGKILL)
    (survivor,) = both - {leader}
    new_leader, output = wait_until(lambda: leading(cluster, {survivor}), 30, f"{survivor} leading")
    assert new_leader == survivor
    assert f"scheduler leader: {survivor} (epoch " in output
    assert epoch(output) > first_epoch, "a new leader has a new, higher fencing epoch"


def epoch(output: str) -> int:
    match = re.search(r"^scheduler leader: \S+ \(epoch (\d+)", output, re.MULTILINE)
    assert match, output
    return int(match[1])
