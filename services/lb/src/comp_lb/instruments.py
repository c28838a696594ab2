"""The lb's Prometheus families (beside the shared message families of
:mod:`comp_common.metrics`, on the same process registry)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from comp_common.messages import ServiceEndpoints
from comp_common.metrics import DURATION_BUCKETS

from .dataplane import SyncReport

SYNC_SECONDS = Histogram(
    "comp_lb_sync_seconds",
    "One dataplane sync (a whole transaction), by outcome: applied, refused (a service or the kernel said no), failed",
    ["outcome"],
    buckets=DURATION_BUCKETS,
)
SYNC_CHANGES = Counter(
    "comp_lb_sync_changes_total",
    "Set/map elements (nftables) or services and real servers (ipvs) added or removed, by sync mode",
    ["mode"],
)
SERVICES = Gauge("comp_lb_services", "Services programmed into this host's dataplane by the last applied sync")
ENDPOINTS = Gauge("comp_lb_endpoints", "Ready endpoints programmed into this host's dataplane by the last applied sync")
REFUSED_SERVICES = Gauge(
    "comp_lb_refused_services", "Services the dataplane refused, held out until their value changes"
)


def synced(services: Sequence[ServiceEndpoints], report: SyncReport, seconds: float, refused: int) -> None:
    SYNC_SECONDS.labels("applied").observe(seconds)
    SYNC_CHANGES.labels(report.mode).inc(report.elements)
    SERVICES.set(len(services))
    ENDPOINTS.set(sum(len(service.endpoints) for service in services))
    REFUSED_SERVICES.set(refused)


def not_synced(outcome: str, seconds: float) -> None:
    # The refused gauge moves with the next applied sync, the one without the refused service.
    SYNC_SECONDS.labels(outcome).observe(seconds)
