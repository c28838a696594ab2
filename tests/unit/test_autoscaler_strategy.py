"""The autoscaler's strategy (decide) as tables, and its properties under Hypothesis."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_autoscaler.strategy import (
    WHOLE_DEPLOYMENT,
    Bound,
    Memory,
    Sample,
    decide,
    deployment_sample,
)
from comp_common.manifest import Autoscale, ScalingRules

NOW = 1_000.0
STALE = 30.0
TARGET = 0.5
# Rules that never hold anything back, so a table row isolates the rule it is about.
FREE = ScalingRules(stabilization=0, max_replicas=1000, max_percent=1000, period=15)


def policy(min=1, max=20, up=FREE, down=FREE, **kw):
    kw.setdefault("target", TARGET)
    return Autoscale(min=min, max=max, scale_up=up, scale_down=down, **kw)


def load(*values, at=NOW):
    return [Sample(f"t{i}", at, v) for i, v in enumerate(values)]


def run(pol, samples, current, ready=None, memory=Memory(), now=NOW):
    return decide(pol, samples, now, current, current if ready is None else ready, memory, stale_after=STALE)


# -- the tolerance band ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected, within",
    [
        (0.55, 10, True),  # ratio exactly 1.10: on the edge is inside
        (0.45, 10, True),  # ratio exactly 0.90
        (0.5, 10, True),
        (0.56, 12, False),  # ratio 1.12: ceil(11.2)
        (0.44, 9, False),  # ratio 0.88: ceil(8.8)
        (0.7, 14, False),  # ceil(10 * 1.4) is 14, not 15 from float noise
    ],
)
def test_tolerance_band(value, expected, within):
    decision, _ = run(policy(tolerance=0.1), load(*[value] * 10), current=10)
    assert decision.replicas == expected
    assert ("within tolerance" in decision.reason) is within
    assert decision.changed is (expected != 10)
    assert decision.observed == pytest.approx(value)


def test_reason_names_metric_target_ratio_and_move():
    decision, _ = run(policy(), load(0.82, 0.82, 0.82), current=3)
    assert decision.reason == "cpu 0.82 of target 0.50 (ratio 1.64): 3 -> 5"
    assert decision.recommendation == 5 and decision.bounds == ()


# -- stabilization -----------------------------------------------------------------------


def test_scale_up_window_zero_is_immediate():
    decision, _ = run(policy(), load(1.0, 1.0, 1.0, 1.0), current=4)
    assert (decision.replicas, decision.changed) == (8, True)


@pytest.mark.parametrize("age, expected", [(30.0, 4), (59.0, 4), (60.0, 8), (61.0, 8)])
def test_scale_up_window_follows_lowest_recommendation(age, expected):
    up = ScalingRules(stabilization=60, max_replicas=100, period=15)
    memory = Memory(recommendations=((NOW - age, 4),))
    decision, _ = run(policy(up=up), load(1.0, 1.0, 1.0, 1.0), current=4, memory=memory)
    assert decision.replicas == expected
    assert (Bound.UP_STABILIZATION in decision.bounds) is (expected == 4)
    if expected == 4:
        assert "scale-up held by the 60 s stabilization window (lowest recommendation 4)" in decision.reason


def test_scale_down_window_holds_until_it_passes_then_scales_down():
    down = ScalingRules(stabilization=300, max_replicas=100, period=15)
    pol, memory, current, seen = policy(down=down), Memory(), 10, []
    for step in range(25):
        now = step * 15.0
        decision, memory = run(pol, load(*[0.25] * current, at=now), current, memory=memory, now=now)
        current = decision.replicas
        seen.append((now, current, decision.reason))
    # The first round stands for the count in place (HPA's first sight): it ages out at 300 s.
    assert all(count == 10 for now, count, _ in seen if now < 300)
    assert "scale-down held by the 300 s stabilization window (highest recommendation 10)" in seen[0][2]
    assert [count for now, count, _ in seen if now >= 300] == [5] * 5


def test_scale_down_goes_to_the_highest_recommendation_of_the_window():
    down = ScalingRules(stabilization=300, max_replicas=100, period=15)
    memory = Memory(recommendations=((NOW - 400, 10), (NOW - 200, 7), (NOW - 100, 6)))
    decision, _ = run(policy(down=down), load(*[0.1] * 10), current=10, memory=memory)
    assert decision.replicas == 7 and decision.recommendation == 2
    assert decision.bounds == (Bound.DOWN_STABILIZATION,)
    assert "recommends 2" in decision.reason and decision.reason.endswith("10 -> 7")


# -- rate limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, current, value, changes, expected, reason",
    [
        # up by count: max(2, ceil(10 x 10%)) = 2
        (ScalingRules(max_replicas=2, max_percent=10), 10, 1.0, (), 12, "limited to +2 per 15 s"),
        # up by percent: max(1, ceil(10 x 50%)) = 5
        (ScalingRules(max_replicas=1, max_percent=50), 10, 1.0, (), 15, "limited to +5 per 15 s"),
        # the period already spent its +2: nothing more until it passes
        (ScalingRules(max_replicas=2, max_percent=10), 12, 1.0, ((NOW - 5, 10, 12),), 12, "(10 at the period's start)"),
        (ScalingRules(max_replicas=2, max_percent=10), 12, 1.0, ((NOW - 15, 10, 12),), 14, "limited to +2 per 15 s"),
    ],
)
def test_scale_up_rate(rules, current, value, changes, expected, reason):
    decision, _ = run(policy(max=100, up=rules), load(*[value] * current), current, memory=Memory(changes=changes))
    assert decision.replicas == expected
    assert decision.bounds == (Bound.UP_RATE,)
    assert reason in decision.reason


@pytest.mark.parametrize(
    "rules, current, changes, expected, reason",
    [
        (ScalingRules(max_replicas=3, max_percent=10), 20, (), 17, "limited to -3 per 15 s"),
        (ScalingRules(max_replicas=1, max_percent=50), 20, (), 10, "limited to -10 per 15 s"),
        # HPA truncates 5 x (1 - 50%) to 2: 3 may go
        (ScalingRules(max_replicas=1, max_percent=50), 5, (), 2, "limited to -3 per 15 s"),
        # an earlier scale-up in the period raises what may go
        (ScalingRules(max_replicas=2, max_percent=1), 20, ((NOW - 5, 22, 20),), 20, "(22 at the period's start)"),
    ],
)
def test_scale_down_rate(rules, current, changes, expected, reason):
    down = ScalingRules(stabilization=0, max_replicas=rules.max_replicas, max_percent=rules.max_percent, period=15)
    decision, _ = run(policy(max=100, down=down), load(*[0.05] * current), current, memory=Memory(changes=changes))
    assert decision.replicas == expected
    assert decision.bounds == (Bound.DOWN_RATE,)
    assert reason in decision.reason


def test_scale_events_are_remembered_for_the_rate_limit():
    rules = ScalingRules(max_replicas=2, max_percent=1, period=60)
    pol, memory, current = policy(max=100, up=rules), Memory(), 4
    counts = []
    for step in range(6):
        now = NOW + step * 20
        decision, memory = run(pol, load(*[5.0] * current, at=now), current, memory=memory, now=now)
        current = decision.replicas
        counts.append(current)
    # +2 per 60 s: each period's allowance is spent once, then the next period opens.
    assert counts == [6, 6, 6, 8, 8, 8]


# -- clamping and bounds -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bounds, current, value, expected, reason, bound",
    [
        ((1, 10), 8, 1.0, 10, "clamped to max 10", Bound.MAX),
        ((3, 10), 4, 0.05, 3, "clamped to min 3", Bound.MIN),
    ],
)
def test_clamped_to_min_and_max(bounds, current, value, expected, reason, bound):
    decision, _ = run(policy(min=bounds[0], max=bounds[1]), load(*[value] * current), current)
    assert decision.replicas == expected and bound in decision.bounds
    assert reason in decision.reason


@pytest.mark.parametrize(
    "current, expected, reason",
    [(15, 10, "current 15 is above max 10: 15 -> 10"), (1, 2, "current 1 is below min 2: 1 -> 2"), (0, 2, "current 0 is below min 2: 0 -> 2")],
)
def test_current_outside_bounds_is_brought_in_at_once(current, expected, reason):
    slow = ScalingRules(stabilization=300, max_replicas=1, max_percent=1)
    memory = Memory(recommendations=((NOW - 10, 15),))
    decision, after = run(policy(min=2, max=10, up=slow, down=slow), [], current, memory=memory)
    assert (decision.replicas, decision.reason, decision.bounds) == (expected, reason, (Bound.OUT_OF_RANGE,))
    assert decision.recommendation is None
    assert after.changes[-1] == (NOW, current, expected)


# -- zero replicas -----------------------------------------------------------------------


def test_deployment_sample_divides_the_total_per_replica():
    assert deployment_sample(30.0, 3, NOW) == Sample(WHOLE_DEPLOYMENT, NOW, 10.0)
    assert deployment_sample(30.0, 0, NOW) == Sample(WHOLE_DEPLOYMENT, NOW, 30.0)


@pytest.mark.parametrize(
    "metric, samples, expected, reason",
    [
        ("cpu", [], 0, "no replicas to measure cpu at 0: holding at 0"),
        ("memory", [Sample(WHOLE_DEPLOYMENT, NOW, 3.0)], 0, "no replicas to measure memory at 0"),
        ("queue", [], 0, "no fresh metrics: holding at 0"),
        # per-task samples at zero replicas are from tasks already gone
        ("rps", load(50.0), 0, "no fresh metrics"),
        ("queue", [deployment_sample(0.0, 0, NOW)], 0, "queue 0.00 of target 5.00"),
        ("queue", [deployment_sample(23.0, 0, NOW)], 5, "queue 23.00 of target 5.00 (ratio 4.60): 0 -> 5"),
        ("rps", [deployment_sample(4.0, 0, NOW)], 1, "0 -> 1"),
    ],
)
def test_zero_replicas(metric, samples, expected, reason):
    decision, _ = run(policy(min=0, max=10, metric=metric, target=5.0 if metric != "memory" else 0.5), samples, current=0)
    assert decision.replicas == expected
    assert reason in decision.reason


def test_custom_metric_total_is_compared_per_replica():
    decision, _ = run(policy(metric="queue", target=5.0), [deployment_sample(40.0, 4, NOW)], current=4)
    assert (decision.replicas, decision.observed) == (8, 10.0)


def test_custom_metric_can_scale_to_zero_but_cpu_keeps_one():
    custom, _ = run(policy(min=0, metric="queue", target=5.0), [deployment_sample(0.0, 4, NOW)], current=4)
    cpu, _ = run(policy(min=0), load(0.0, 0.0, 0.0, 0.0), current=4)
    assert (custom.replicas, cpu.replicas) == (0, 1)


# -- missing and stale metrics -----------------------------------------------------------


def test_no_fresh_metrics_holds():
    decision, memory = run(policy(), [], current=6)
    assert (decision.replicas, decision.changed, decision.reason) == (6, False, "no fresh metrics: holding at 6")
    assert decision.observed is None and decision.recommendation is None
    assert memory == Memory()


@pytest.mark.parametrize(
    "current, ready, values, expected, reason",
    [
        # ratio 3 on 2 of 4: the 2 silent ones count as 0 -> ratio 1.5 -> ceil(1.5 x 4) = 6, not 12
        (4, 4, (1.5, 1.5), 6, "2 replica(s) without metrics counted as 0 (ratio 1.50)"),
        # ratio 2 on 1 of 4: counted as 0 it is 0.5, the other way: do nothing
        (4, 4, (1.0,), 4, "direction unsure"),
        # ratio 0.2 on 2 of 4: the silent ones count at target -> 0.6 -> 3, not 1
        (4, 4, (0.1, 0.1), 3, "2 replica(s) without metrics counted at target (ratio 0.60)"),
        # 2 unready of 6, ratio 1.6 on the 4 ready: counted as 0 -> 1.07, within tolerance
        (6, 4, (0.8, 0.8, 0.8, 0.8), 6, "within tolerance"),
        # unready ones are left out of a scale-down: ceil(4 x 0.4) = 2
        (6, 4, (0.2, 0.2, 0.2, 0.2), 2, "cpu 0.20 of target 0.50 (ratio 0.40): 6 -> 2"),
    ],
)
def test_missing_metrics_follow_hpa(current, ready, values, expected, reason):
    decision, _ = run(policy(), load(*values), current, ready=ready)
    assert decision.replicas == expected
    assert reason in decision.reason


@pytest.mark.parametrize(
    "samples, expected",
    [
        # stale highs are ignored: the fresh ones are on target
        (load(2.0, 2.0, at=NOW - 31) + [Sample("t0", NOW, 0.5), Sample("t1", NOW, 0.5)], 2),
        # a task's latest fresh sample is the one that counts
        ([Sample("t0", NOW - 10, 2.0), Sample("t0", NOW - 2, 0.5), Sample("t1", NOW - 20, 0.5)], 2),
        # exactly stale_after old is still fresh
        (load(1.0, 1.0, at=NOW - STALE), 4),
    ],
)
def test_stale_samples_are_ignored(samples, expected):
    decision, _ = run(policy(), samples, current=2)
    assert decision.replicas == expected


def test_only_stale_samples_hold():
    decision, _ = run(policy(), load(0.01, 0.01, at=NOW - 100), current=2)
    assert (decision.replicas, decision.reason) == (2, "no fresh metrics: holding at 2")


# -- memory ------------------------------------------------------------------------------


def test_memory_is_pruned_to_the_longest_window_and_period():
    up = ScalingRules(stabilization=60, max_replicas=4, period=15)
    down = ScalingRules(stabilization=300, max_replicas=1, period=60)
    memory = Memory(
        recommendations=((NOW - 400, 3), (NOW - 300, 3), (NOW - 299, 3), (NOW - 10, 3)),
        changes=((NOW - 100, 2, 3), (NOW - 60, 2, 3), (NOW - 59, 2, 3), (NOW - 5, 3, 3)),
    )
    _, after = run(policy(up=up, down=down), load(0.5, 0.5, 0.5), current=3, memory=memory)
    assert after.recommendations == ((NOW - 299, 3), (NOW - 10, 3), (NOW, 3))
    assert after.changes == ((NOW - 59, 2, 3), (NOW - 5, 3, 3))


def test_memory_stays_small_over_a_long_run():
    pol, memory, current = policy(max=50, down=ScalingRules(stabilization=300, max_replicas=2)), Memory(), 5
    rng = random.Random(7)
    for step in range(2_000):
        now = step * 10.0
        decision, memory = run(pol, load(*[rng.uniform(0.0, 1.5)] * current, at=now), current, memory=memory, now=now)
        current = decision.replicas
        assert len(memory.recommendations) <= 31 and len(memory.changes) <= 2


# -- properties --------------------------------------------------------------------------

rules_st = st.builds(
    ScalingRules,
    stabilization=st.sampled_from([0.0, 15.0, 60.0, 300.0]),
    max_replicas=st.integers(1, 10),
    max_percent=st.sampled_from([10.0, 50.0, 100.0, 400.0]),
    period=st.sampled_from([15.0, 60.0]),
)


@st.composite
def policies(draw, metric=st.sampled_from(["cpu", "memory", "rps", "queue"])):
    low = draw(st.integers(0, 10))
    high = draw(st.integers(max(low, 1), 40))
    name = draw(metric)
    target = draw(st.sampled_from([0.2, 0.5, 0.8] if name in ("cpu", "memory") else [1.0, 5.0, 100.0]))
    tolerance = draw(st.sampled_from([0.0, 0.05, 0.1, 0.3]))
    return Autoscale(min=low, max=high, metric=name, target=target, tolerance=tolerance, scale_up=draw(rules_st), scale_down=draw(rules_st))


samples_st = st.lists(
    st.builds(
        Sample,
        task_id=st.sampled_from(["t0", "t1", "t2", "t3", "t4", WHOLE_DEPLOYMENT]),
        at=st.floats(NOW - 120, NOW, allow_nan=False),
        value=st.floats(0, 500, allow_nan=False),
    ),
    max_size=12,
)
memory_st = st.builds(
    Memory,
    recommendations=st.lists(st.tuples(st.floats(NOW - 600, NOW, allow_nan=False), st.integers(0, 60)), max_size=6).map(
        lambda rs: tuple(sorted(rs))
    ),
    changes=st.lists(
        st.tuples(st.floats(NOW - 120, NOW, allow_nan=False), st.integers(0, 60), st.integers(0, 60)), max_size=4
    ).map(lambda cs: tuple(sorted(cs))),
)


@settings(max_examples=400)
@given(policies(), samples_st, st.integers(0, 50), st.integers(0, 50), memory_st)
def test_result_is_always_within_min_and_max(pol, samples, current, ready, memory):
    decision, _ = decide(pol, samples, NOW, current, ready, memory, stale_after=STALE)
    assert pol.min <= decision.replicas <= pol.max
    assert decision.changed is (decision.replicas != current)


@settings(max_examples=200)
@given(policies(), samples_st, st.integers(0, 50), st.integers(0, 50), memory_st, st.randoms(use_true_random=False))
def test_decide_is_deterministic_and_ignores_sample_order(pol, samples, current, ready, memory, rng):
    first = decide(pol, samples, NOW, current, ready, memory, stale_after=STALE)
    again = decide(pol, list(samples), NOW, current, ready, memory, stale_after=STALE)
    shuffled = list(samples)
    rng.shuffle(shuffled)
    assert first == again == decide(pol, shuffled, NOW, current, ready, memory, stale_after=STALE)


@settings(max_examples=200)
@given(policies(), st.data(), memory_st)
def test_constant_load_within_tolerance_never_changes_the_count(pol, data, memory):
    current = data.draw(st.integers(pol.min, pol.max))
    offset = data.draw(st.floats(-0.99, 0.99)) * pol.tolerance
    value = pol.target * (1 + offset)
    for step in range(20):
        now = NOW + step * 15.0
        decision, memory = decide(pol, load(*[value] * current, at=now), now, current, current, memory, stale_after=STALE)
        assert decision.replicas == current and not decision.changed


def _oscillating_policy(draw_policy):
    # A scale-down window longer than the oscillation's step, as the property needs.
    return draw_policy.filter(lambda p: p.scale_down.stabilization >= 60)


@settings(max_examples=150, deadline=None)
@given(_oscillating_policy(policies(metric=st.just("cpu"))), st.data())
def test_oscillating_load_never_brings_the_count_down(pol, data):
    """Observed alternates between 0.2x and 1.8x target every 15 s, far faster than the
    scale-down window: the window always holds a recent high recommendation, so after the
    count has risen it never falls again (no flapping)."""
    current = data.draw(st.integers(pol.min, pol.max))
    high_first = data.draw(st.booleans())
    memory, counts = Memory(), [current]
    for step in range(80):
        now = step * 15.0
        value = pol.target * (1.8 if (step % 2 == 0) == high_first else 0.2)
        decision, memory = decide(pol, load(*[value] * current, at=now), now, current, current, memory, stale_after=STALE)
        current = decision.replicas
        counts.append(current)
    assert counts == sorted(counts)


@settings(max_examples=150, deadline=None)
@given(policies(metric=st.just("cpu")), st.data())
def test_no_decrease_while_the_window_holds_a_higher_recommendation(pol, data):
    """Under any load, a fall to n at time t means no recommendation of the last
    scale-down window was above n: HPA's scale-down stabilization."""
    current = data.draw(st.integers(pol.min, pol.max))
    loads = data.draw(st.lists(st.floats(0.0, 3.0), min_size=10, max_size=60))
    memory, history = Memory(), []
    window = pol.scale_down.stabilization
    for step, factor in enumerate(loads):
        now = step * 10.0
        decision, memory = decide(pol, load(*[pol.target * factor] * current, at=now), now, current, current, memory, stale_after=STALE)
        if step == 0:
            history.append((now, current))  # the count in place stands for the first round
        if decision.replicas < current:
            # This round's own recommendation counts even with a window of 0.
            recent = [decision.recommendation] + [r for at, r in history if at > now - window]
            assert max(recent) <= decision.replicas
        if decision.recommendation is not None:
            history.append((now, decision.recommendation))
        current = decision.replicas
