"""The autoscaler's Prometheus families (beside the shared message families of
:mod:`comp_common.metrics`, on the same process registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from comp_common.metrics import DURATION_BUCKETS

from .strategy import Decision

EVALUATION_SECONDS = Histogram(
    "comp_autoscaler_evaluation_seconds",
    "One evaluation of every autoscaled deployment (the leader's; writes of new counts included)",
    buckets=DURATION_BUCKETS,
)
DECISIONS = Counter(
    "comp_autoscaler_decisions_total",
    "Per deployment and evaluation, what the policy decided: up, down, held (a window or limit kept "
    "the count from the recommendation) or steady (the count is right)",
    ["result"],
)
SCALE_REFUSED = Counter(
    "comp_autoscaler_scale_refused_total", "New counts that could not be written (a quota, the deployment gone)"
)


def decision_result(decision: Decision, current: int) -> str:
    if decision.changed:
        return "up" if decision.replicas > current else "down"
    return "held" if decision.bounds else "steady"


def decided(decision: Decision, current: int) -> None:
    DECISIONS.labels(decision_result(decision, current)).inc()
