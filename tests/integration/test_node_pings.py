"""Pings on real processes: a SIGKILLed agent's node is down long before its grace, because
the NATS server answers "no responders" for its ping subject; a stopped (SIGSTOP) agent
still holds its connection, its ping times out, and it keeps the whole grace."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster

GRACE = 30.0  # far beyond the waits below: only a ping can take a node down within them


@pytest.fixture
def hollow_pair(tmp_path):
    config = ClusterConfig.private(
        tmp_path / "cluster", "ping", nodes=2, grace_seconds=GRACE,
        extra_env={"COMP_NODEAGENT__DRIVER": "hollow", "COMP_LIVENESS__PING_AFTER_SECONDS": "1.5"},
    )
    local = LocalCluster(config)
    local.start()
    yield local
    local.stop(purge_workloads=True)


def node_states(local: LocalCluster) -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in httpx.get(f"{local.config.api_url}/v1/nodes", timeout=10).json()}


def test_a_killed_agents_node_is_down_without_waiting_out_its_grace(hollow_pair):
    killed, other = hollow_pair.config.node_ids()
    hollow_pair.kill(f"nodeagent-{killed}", signal.SIGKILL)
    started = time.monotonic()
    wait_until(lambda: node_states(hollow_pair)[killed] == "down", timeout=GRACE - 10, what="the killed node down")
    assert time.monotonic() - started < GRACE, "down by its ping, not its grace"
    assert node_states(hollow_pair)[other] == "ready"

    hollow_pair.start_agent(killed)
    wait_until(lambda: node_states(hollow_pair)[killed] == "ready", timeout=20, what="the node ready again")


def test_a_stopped_agent_that_still_holds_its_connection_keeps_its_grace(hollow_pair):
    stopped, _ = hollow_pair.config.node_ids()
    pid = hollow_pair.pid_of(f"nodeagent-{stopped}")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        # Past its ping (1.5 s late) and the ping's timeout, with room for a slow machine.
        time.sleep(6)
        assert node_states(hollow_pair)[stopped] == "ready", "a ping that times out is no verdict"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: node_states(hollow_pair)[stopped] == "ready", timeout=10, what="the node still ready")
