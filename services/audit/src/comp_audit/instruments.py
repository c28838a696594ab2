"""The audit's Prometheus families (on the shared process registry of
:mod:`comp_common.metrics`, served by ``serve_metrics`` on ``COMP_METRICS__PORT``).  The
chain's head and what waits to be written are read from the tracked service when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from comp_common.metrics import REGISTRY

if TYPE_CHECKING:
    from .service import AuditService

RECORDS = Counter(
    "comp_audit_records_total",
    "Records appended to the audit chain (on disk), by kind: request, event, gap",
    ["kind"],
)
BATCH_WRITES = Histogram(
    "comp_audit_batch_write_seconds",
    "One batch's write and fsync to the current segment",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
WRITE_FAILURES = Counter("comp_audit_write_failures_total", "Batches whose write or fsync failed (retried whole)")
DUPLICATES = Counter("comp_audit_duplicates_dropped_total", "Deliveries at or below the log's position for their stream, not recorded again")


class _AuditGauges(Collector):
    def __init__(self) -> None:
        self.audit: AuditService | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        head = GaugeMetricFamily("comp_audit_head_seq", "Sequence of the last record on disk")
        signed = GaugeMetricFamily("comp_audit_checkpointed_seq", "Sequence of the last signed checkpoint")
        pending = GaugeMetricFamily("comp_audit_pending", "Messages received and not yet written")
        damaged = GaugeMetricFamily("comp_audit_not_recording", "1 when the log failed its last checkpoint at start and nothing is recorded")
        audit = self.audit
        if audit is not None:
            head.add_metric([], audit.head.seq)
            signed.add_metric([], audit.checkpointed_seq)
            pending.add_metric([], len(audit._pending))
            damaged.add_metric([], 1 if audit.damage is not None else 0)
        yield from (head, signed, pending, damaged)


_GAUGES = _AuditGauges()
REGISTRY.register(_GAUGES)


def track(audit: AuditService) -> None:
    _GAUGES.audit = audit
