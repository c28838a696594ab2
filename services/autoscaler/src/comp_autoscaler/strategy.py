"""``decide(policy, samples, now, current, ready, memory) -> (Decision, Memory)``: the
autoscaler's pure core, modelled on Kubernetes' HorizontalPodAutoscaler
(pkg/controller/podautoscaler: replica_calculator.go, and horizontal.go's
stabilizeRecommendationWithBehaviors / convertDesiredReplicasWithBehaviorRate).

No I/O and no clock: time, metrics and the remembered past all come in as arguments, and
the memory to keep for the next round goes out with the decision.

One round:

1. A current count outside [min, max] is brought into range at once: no metrics,
   stabilization or rate limit is consulted (HPA does the same).
2. ``observed``: each task's latest sample not older than ``stale_after``, averaged over the
   tasks that have one.  A sample whose ``task_id`` is ``WHOLE_DEPLOYMENT`` (see
   ``deployment_sample``) is a deployment-wide per-replica value instead (custom metrics,
   or rps read from a VIP's counters); the latest such sample wins over per-task ones.
3. Recommendation: ratio = observed / target; within ``tolerance`` of 1 the count is kept,
   else ceil(count x ratio).  Replicas without a fresh sample follow HPA: on a scale-up the
   ready ones without a sample, and the unready ones, count as 0 usage; on a scale-down the
   ready ones without a sample count as exactly the target and unready ones are left out.
   If that correction lands within tolerance or flips the direction, the count is kept.
   With no fresh sample at all the count is held: never scale on missing data.
4. Stabilization: the count may rise only to the lowest recommendation of the
   ``scale_up.stabilization`` window, and fall only to the highest of the
   ``scale_down.stabilization`` window (recommendations remembered in ``Memory``).
5. Rate: within any ``period`` a direction may move the count by at most
   max(max_replicas, ceil(count at the period's start x max_percent / 100)) (HPA's policies
   with selectPolicy Max), using the scale events remembered in ``Memory``.
6. Clamp to [min, max].

Zero replicas (min 0): cpu and memory cannot be measured without a replica, so 0 holds at 0
and a cpu/memory recommendation is never below 1 (going to 0 on them could never be undone).
A custom or rps metric given as a ``WHOLE_DEPLOYMENT`` sample can wake a deployment from 0:
at zero the base count is 1 and no tolerance applies, so any positive value scales up to
ceil(value / target), and a value of 0 holds (or scales down) to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from comp_common.manifest import Autoscale

# Not a valid DNS label, so no real task can carry it.
WHOLE_DEPLOYMENT = "*"

# Metrics that only exist while a replica runs: they cannot wake a deployment from zero.
PER_REPLICA_ONLY = frozenset({"cpu", "memory"})

# Float division of decimal values (0.55 / 0.5 = 1.1000000000000003) must not push a value
# written exactly on the tolerance edge, or an exact product onto the next integer, outside.
_EPSILON = 1e-9

NO_FRESH_METRICS = "no fresh metrics"
NO_REPLICAS_TO_MEASURE = "no replicas to measure {metric} at 0"
WITHIN_TOLERANCE = "within tolerance {tolerance:.2f}"
OBSERVED = "{metric} {observed:.2f} of target {target:.2f} (ratio {ratio:.2f})"
MISSING_AS_ZERO = "{count} replica(s) without metrics counted as 0 (ratio {ratio:.2f})"
MISSING_AS_TARGET = "{count} replica(s) without metrics counted at target (ratio {ratio:.2f})"
DIRECTION_UNSURE = "direction unsure once replicas without metrics are counted"
RECOMMENDS = "recommends {recommendation}"
ABOVE_MAX = "current {current} is above max {max}"
BELOW_MIN = "current {current} is below min {min}"
UP_STABILIZATION = "scale-up held by the {window:g} s stabilization window (lowest recommendation {value})"
DOWN_STABILIZATION = "scale-down held by the {window:g} s stabilization window (highest recommendation {value})"
UP_RATE = "limited to +{allowed} per {period:g} s ({start} at the period's start)"
DOWN_RATE = "limited to -{allowed} per {period:g} s ({start} at the period's start)"
CLAMPED_MAX = "clamped to max {max}"
CLAMPED_MIN = "clamped to min {min}"
MOVE = "{current} -> {replicas}"
HOLD = "holding at {replicas}"


class Bound(str, Enum):
    """What held the count back from the metric's recommendation."""

    OUT_OF_RANGE = "out-of-range"
    UP_STABILIZATION = "scale-up-stabilization"
    DOWN_STABILIZATION = "scale-down-stabilization"
    UP_RATE = "scale-up-rate"
    DOWN_RATE = "scale-down-rate"
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Sample:
    """One reading for one task: a share of its limit (cpu, memory), connections a second
    (rps) or a custom value; ``task_id`` ``WHOLE_DEPLOYMENT`` for a deployment-wide value
    already divided per replica."""

    task_id: str
    at: float
    value: float


@dataclass(frozen=True)
class Memory:
    """What the windows need from earlier rounds: ``(at, replicas)`` recommendations and
    ``(at, from, to)`` scale events, oldest first, pruned to the longest window and period."""

    recommendations: tuple[tuple[float, int], ...] = ()
    changes: tuple[tuple[float, int, int], ...] = ()


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    # The averaged metric, before any correction for replicas without metrics.
    observed: float | None
    # The metric's raw recommendation, before stabilization, rate limits and clamping.
    recommendation: int | None
    changed: bool
    bounds: tuple[Bound, ...] = ()


def deployment_sample(total: float, current: int, at: float) -> Sample:
    """A deployment-wide total (a custom metric, a VIP's connections a second) as the
    per-replica sample ``decide`` compares with the target; at 0 replicas the whole total
    is what one replica would get."""
    return Sample(WHOLE_DEPLOYMENT, at, total / max(current, 1))


def _fresh(samples: Sequence[Sample], now: float, stale_after: float) -> tuple[Sample | None, dict[str, float]]:
    """The latest whole-deployment sample and each task's latest value, stale ones dropped.
    Ties in time are broken by value so that the order of ``samples`` never matters."""
    latest: dict[str, Sample] = {}
    for sample in samples:
        if now - sample.at > stale_after:
            continue
        seen = latest.get(sample.task_id)
        if seen is None or (sample.at, sample.value) > (seen.at, seen.value):
            latest[sample.task_id] = sample
    whole = latest.pop(WHOLE_DEPLOYMENT, None)
    return whole, {task_id: s.value for task_id, s in latest.items()}


def _ceil(value: float) -> int:
    return max(0, math.ceil(value - _EPSILON))


def _within(ratio: float, tolerance: float) -> bool:
    return abs(1.0 - ratio) <= tolerance + _EPSILON


@dataclass(frozen=True)
class _Recommendation:
    replicas: int | None
    observed: float | None
    reason: str


def _recommend(policy: Autoscale, whole: Sample | None, values: dict[str, float], current: int, ready: int) -> _Recommendation:
    target, tolerance, metric = policy.target, policy.tolerance, policy.metric
    if current == 0:
        if metric in PER_REPLICA_ONLY:
            return _Recommendation(None, None, NO_REPLICAS_TO_MEASURE.format(metric=metric))
        # Per-task samples at zero replicas can only come from tasks already gone.
        if whole is None:
            return _Recommendation(None, None, NO_FRESH_METRICS)
        ratio = whole.value / target
        summary = OBSERVED.format(metric=metric, observed=whole.value, target=target, ratio=ratio)
        return _Recommendation(_ceil(ratio), whole.value, summary)

    if whole is not None:
        # A deployment-wide value covers every replica: nothing is missing.
        ratio = whole.value / target
        summary = OBSERVED.format(metric=metric, observed=whole.value, target=target, ratio=ratio)
        if _within(ratio, tolerance):
            return _Recommendation(current, whole.value, f"{summary}: {WITHIN_TOLERANCE.format(tolerance=tolerance)}")
        return _Recommendation(_floor(metric, _ceil(current * ratio)), whole.value, summary)

    if not values:
        return _Recommendation(None, None, NO_FRESH_METRICS)
    measured = len(values)
    total = math.fsum(values.values())
    observed = total / measured
    ratio = observed / target
    summary = OBSERVED.format(metric=metric, observed=observed, target=target, ratio=ratio)
    missing = max(0, ready - measured)
    unready = max(0, current - max(ready, measured))
    # Unready replicas matter only to a scale-up: they will take load once ready.
    if missing == 0 and (unready == 0 or ratio <= 1.0):
        if _within(ratio, tolerance):
            return _Recommendation(current, observed, f"{summary}: {WITHIN_TOLERANCE.format(tolerance=tolerance)}")
        return _Recommendation(_floor(metric, _ceil(measured * ratio)), observed, summary)

    if ratio > 1.0:
        counted = measured + missing + unready
        corrected = total / (counted * target)
        note = MISSING_AS_ZERO.format(count=missing + unready, ratio=corrected)
    elif ratio < 1.0:
        counted = measured + missing
        corrected = (total + missing * target) / (counted * target)
        note = MISSING_AS_TARGET.format(count=missing, ratio=corrected)
    else:
        counted, corrected, note = measured + missing, 1.0, ""
    summary = f"{summary}, {note}" if note else summary
    if _within(corrected, tolerance):
        return _Recommendation(current, observed, f"{summary}: {WITHIN_TOLERANCE.format(tolerance=tolerance)}")
    if (ratio < 1.0) != (corrected < 1.0):
        return _Recommendation(current, observed, f"{summary}: {DIRECTION_UNSURE}")
    replicas = _floor(metric, _ceil(corrected * counted))
    if (corrected < 1.0 and replicas > current) or (corrected > 1.0 and replicas < current):
        return _Recommendation(current, observed, f"{summary}: {DIRECTION_UNSURE}")
    return _Recommendation(replicas, observed, summary)


def _floor(metric: str, replicas: int) -> int:
    # Scaling a cpu/memory deployment to 0 could never be undone: nothing would report.
    return max(1, replicas) if metric in PER_REPLICA_ONLY else replicas


def _changed_within(changes: tuple[tuple[float, int, int], ...], now: float, period: float) -> tuple[int, int]:
    """Replicas added and removed by the scale events of the last ``period``."""
    added = removed = 0
    for at, before, after in changes:
        if at > now - period:
            if after > before:
                added += after - before
            else:
                removed += before - after
    return added, removed


def _prune(policy: Autoscale, memory: Memory, now: float) -> Memory:
    window = max(policy.scale_up.stabilization, policy.scale_down.stabilization)
    period = max(policy.scale_up.period, policy.scale_down.period)
    return Memory(
        recommendations=tuple(r for r in memory.recommendations if r[0] > now - window),
        changes=tuple(c for c in memory.changes if c[0] > now - period),
    )


def _finish(policy: Autoscale, memory: Memory, now: float, current: int, replicas: int, reason: str, observed: float | None, recommendation: int | None, bounds: tuple[Bound, ...] = ()) -> tuple[Decision, Memory]:
    tail = MOVE.format(current=current, replicas=replicas) if replicas != current else HOLD.format(replicas=replicas)
    if replicas != current:
        memory = Memory(memory.recommendations, memory.changes + ((now, current, replicas),))
    decision = Decision(replicas, f"{reason}: {tail}", observed, recommendation, replicas != current, bounds)
    return decision, _prune(policy, memory, now)


def decide(policy: Autoscale, samples: Sequence[Sample], now: float, current: int, ready: int, memory: Memory, *, stale_after: float) -> tuple[Decision, Memory]:
    """The replica count for this round and the memory to pass to the next one.

    ``current``: the deployment's desired replica count; ``ready``: how many of its tasks
    are ready (``samples`` should come from those).  The returned memory records this
    round's recommendation and scale event; keep it whether or not the scale is written
    (an unwritten change only makes the next rate limit stricter)."""
    whole, values = _fresh(samples, now, stale_after)

    if current > policy.max or current < policy.min:
        replicas = min(max(current, policy.min), policy.max)
        reason = ABOVE_MAX.format(current=current, max=policy.max) if current > policy.max else BELOW_MIN.format(current=current, min=policy.min)
        observed = whole.value if whole is not None else (math.fsum(values.values()) / len(values) if values else None)
        return _finish(policy, memory, now, current, replicas, reason, observed, None, (Bound.OUT_OF_RANGE,))

    raw = _recommend(policy, whole, values, current, ready)
    if raw.replicas is None:
        return _finish(policy, memory, now, current, current, raw.reason, raw.observed, None)

    # Like HPA's first sight of a target: the count in place is a recommendation made now,
    # so a restarted autoscaler waits a full window before it scales down.
    earlier = memory.recommendations or ((now, current),)
    up_window, down_window = policy.scale_up.stabilization, policy.scale_down.stabilization
    lowest = min([raw.replicas] + [r for at, r in earlier if at > now - up_window])
    highest = max([raw.replicas] + [r for at, r in earlier if at > now - down_window])
    memory = Memory(earlier + ((now, raw.replicas),), memory.changes)

    parts = [raw.reason]
    bounds: list[Bound] = []
    replicas = min(max(current, lowest), highest)
    if raw.replicas > current and replicas < raw.replicas:
        parts.append(UP_STABILIZATION.format(window=up_window, value=lowest))
        bounds.append(Bound.UP_STABILIZATION)
    elif raw.replicas < current and replicas > raw.replicas:
        parts.append(DOWN_STABILIZATION.format(window=down_window, value=highest))
        bounds.append(Bound.DOWN_STABILIZATION)

    if replicas > current:
        rules = policy.scale_up
        added, removed = _changed_within(memory.changes, now, rules.period)
        start = current - added + removed
        allowed = max(rules.max_replicas, math.ceil(start * rules.max_percent / 100 - _EPSILON))
        limit = max(start + allowed, current)
        if replicas > limit:
            replicas = limit
            parts.append(UP_RATE.format(allowed=allowed, period=rules.period, start=start))
            bounds.append(Bound.UP_RATE)
    elif replicas < current:
        rules = policy.scale_down
        added, removed = _changed_within(memory.changes, now, rules.period)
        start = current + removed - added
        allowed = max(rules.max_replicas, math.ceil(start * rules.max_percent / 100 - _EPSILON))
        limit = min(start - allowed, current)
        if replicas < limit:
            replicas = limit
            parts.append(DOWN_RATE.format(allowed=allowed, period=rules.period, start=start))
            bounds.append(Bound.DOWN_RATE)

    if replicas > policy.max:
        replicas = policy.max
        parts.append(CLAMPED_MAX.format(max=policy.max))
        bounds.append(Bound.MAX)
    elif replicas < policy.min:
        replicas = policy.min
        parts.append(CLAMPED_MIN.format(min=policy.min))
        bounds.append(Bound.MIN)

    if bounds:
        # Name what the metric asked for, since the count shown is not it.
        parts.insert(1, RECOMMENDS.format(recommendation=raw.replicas))
    return _finish(policy, memory, now, current, replicas, "; ".join(parts), raw.observed, raw.replicas, tuple(bounds))
