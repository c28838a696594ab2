"""The scheduler's Prometheus families (beside the shared message families of
:mod:`comp_common.metrics`, on the same process registry).

Durations and counts are recorded where rounds run; queue depths and leadership are read
from the tracked :class:`~comp_scheduler.service.Scheduler` when scraped, so keeping them
costs the scheduler nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from comp_common.metrics import DURATION_BUCKETS, REGISTRY, subject_pattern

if TYPE_CHECKING:
    from .service import Scheduler

ROUND_SECONDS = Histogram(
    "comp_scheduler_round_seconds",
    "A reconcile round's phases: snapshot (reading the state), reconcile (planning and placement), "
    "apply (writing assignments; only rounds that changed something)",
    ["phase"],
    buckets=DURATION_BUCKETS,
)
ROUND_ERRORS = Counter("comp_scheduler_round_errors_total", "Rounds that raised (retried on the next change or resync)")
PENDING_REPLICAS = Gauge(
    "comp_scheduler_pending_replicas", "Replicas the last round could not place (waiting for room, quota or order)"
)
PLACED = Counter("comp_scheduler_placements_total", "Tasks placed on a node by a round")
STOPPED = Counter("comp_scheduler_stops_total", "Tasks a round took off a node")


def planned(snapshot_seconds: float, reconcile_seconds: float, places: int, stops: int, pending_replicas: int) -> None:
    ROUND_SECONDS.labels("snapshot").observe(snapshot_seconds)
    ROUND_SECONDS.labels("reconcile").observe(reconcile_seconds)
    PENDING_REPLICAS.set(pending_replicas)
    PLACED.inc(places)
    STOPPED.inc(stops)


def applied(seconds: float) -> None:
    ROUND_SECONDS.labels("apply").observe(seconds)


class _SchedulerGauges(Collector):
    """Read from the scheduler at scrape time: whether it leads, and what waits on it."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        scheduler = self.scheduler
        leader = GaugeMetricFamily("comp_scheduler_leader", "1 while this scheduler leads (holds the lease, took over)")
        wanted = GaugeMetricFamily(
            "comp_scheduler_round_requests_pending", "Asks for a round (events, resyncs, timers) the next round will take"
        )
        handling = GaugeMetricFamily(
            "comp_scheduler_deployment_events_in_progress", "Deployment events being read in (a round waits for them)"
        )
        backlog = GaugeMetricFamily(
            "comp_scheduler_input_backlog_messages",
            "Heartbeats and task statuses received but not yet handled, by subject pattern",
            labels=["subject"],
        )
        if scheduler is not None:
            leader.add_metric([], 1.0 if scheduler.leading else 0.0)
            wanted.add_metric([], len(scheduler._wanted))
            handling.add_metric([], scheduler._deployment_events_handling)
            for subscription in scheduler.inputs:
                backlog.add_metric([subject_pattern(subscription.subject)], subscription.pending_msgs)
        yield from (leader, wanted, handling, backlog)


_GAUGES = _SchedulerGauges()
REGISTRY.register(_GAUGES)


def track(scheduler: Scheduler) -> None:
    """Read the scrape-time gauges from ``scheduler`` (the process's one; the last tracked wins)."""
    _GAUGES.scheduler = scheduler
