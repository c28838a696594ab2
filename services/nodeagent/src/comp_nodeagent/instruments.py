"""The node agent's Prometheus families (beside the shared message families of
:mod:`comp_common.metrics`, on the same process registry).

Tasks by state are read from the tracked agents when scraped (one agent, or a hollow
fleet's thousands: their sum), so a status change costs nothing more than it did.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Awaitable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from comp_common.messages import TaskState
from comp_common.metrics import DURATION_BUCKETS, REGISTRY

if TYPE_CHECKING:
    from .agent import Agent

T = TypeVar("T")

CONTAINER_START_SECONDS = Histogram(
    "comp_nodeagent_container_start_seconds",
    "The runtime driver's start of one task's container (create, start, pull if missing), by outcome",
    ["outcome"],
    buckets=DURATION_BUCKETS,
)
SYNC_SECONDS = Histogram(
    "comp_nodeagent_sync_seconds",
    "One reconcile pass of the host against its assignments (read, list, plan, launch), waiting for a pass under way included",
    buckets=DURATION_BUCKETS,
)


class _AgentGauges(Collector):
    def __init__(self) -> None:
        self.agents: Sequence[Agent] = ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tasks = GaugeMetricFamily("comp_nodeagent_tasks", "Tasks this process's agents hold, by state", labels=["state"])
        agents = GaugeMetricFamily("comp_nodeagent_agents", "Agents (nodes) this process runs")
        by_state: Tally[str] = Tally()
        for agent in self.agents:
            # A copy (C-level, under the GIL): the loop's thread changes the statuses meanwhile.
            by_state.update(str(status.state) for status in agent.statuses.values())
        for state in TaskState:
            tasks.add_metric([state.value], by_state.get(state.value, 0))
        agents.add_metric([], len(self.agents))
        yield from (tasks, agents)


_GAUGES = _AgentGauges()
REGISTRY.register(_GAUGES)


def track(agents: Sequence[Agent]) -> None:
    """Count the tasks of ``agents`` (this process's) when scraped."""
    _GAUGES.agents = tuple(agents)


async def start_container(start: Awaitable[T]) -> T:
    """Await a driver's start, observed into ``CONTAINER_START_SECONDS`` by its outcome."""
    began = time.perf_counter()
    try:
        started = await start
    except Exception:
        CONTAINER_START_SECONDS.labels("failed").observe(time.perf_counter() - began)
        raise
    CONTAINER_START_SECONDS.labels("started").observe(time.perf_counter() - began)
    return started
