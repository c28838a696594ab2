"""plan_rollout() as tables, and its properties under Hypothesis (a simulated cluster)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from comp_common.manifest import UpdatePolicy
from comp_common.messages import TaskState
from comp_scheduler.rollout import (
    STOP_NOT_SERVING,
    STOP_SCALED_DOWN,
    RolloutState,
    RolloutStep,
    RolloutTask,
    plan_rollout,
    resolve_bounds,
)

NOW = 10_000.0
GEN = 2


def policy(surge: int | str = "25%", unavailable: int | str = 0, **kw) -> UpdatePolicy:
    return UpdatePolicy(max_surge=surge, max_unavailable=unavailable, **kw)


def olds(n: int, state=TaskState.RUNNING, ready=True, generation=1, prefix="old", **kw) -> list[RolloutTask]:
    return [
        RolloutTask(f"{prefix}-{i}", generation, state, created_at=0.0, ready=ready, ready_since=0.0 if ready else None, **kw)
        for i in range(n)
    ]


def healthy_new(n: int, prefix="new", since=NOW - 100) -> list[RolloutTask]:
    return [RolloutTask(f"{prefix}-{i}", GEN, TaskState.RUNNING, created_at=since - 1, ready=True, ready_since=since) for i in range(n)]


def starting_new(n: int, prefix="starting", created_at=NOW - 1) -> list[RolloutTask]:
    return [RolloutTask(f"{prefix}-{i}", GEN, TaskState.STARTING, created_at=created_at) for i in range(n)]


def plan(pol: UpdatePolicy, replicas: int, old=(), new=(), promoted=False, now=NOW) -> RolloutStep:
    return plan_rollout(pol, replicas, GEN, promoted, list(old), list(new), now)


def stopped(step: RolloutStep) -> set[str]:
    return {s.task_id for s in step.stops}


# --- bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "replicas, surge, unavailable, want_surge, want_unavailable",
    [
        (10, "25%", "25%", 3, 2),  # 2.5 each way: surge up, unavailable down
        (1, "25%", "25%", 1, 0),
        (4, "25%", "25%", 1, 1),
        (3, "25%", 0, 1, 0),
        (3, "34%", "34%", 2, 1),
        (3, "33%", "33%", 1, 0),  # 0.99: surge 1, unavailable 0
        (7, "100%", "100%", 7, 7),
        (10, 2, "50%", 2, 5),
        (10, 5, 0, 5, 0),
        (3, 0, 5, 0, 3),  # never more unavailable than there are replicas
        (10, "0%", "10%", 0, 1),
        (5, "0%", "10%", 1, 0),  # both come to 0: the surge becomes 1
        (0, "25%", "25%", 1, 0),
        (100_000, "1%", "1%", 1000, 1000),
    ],
)
def test_bounds_resolve_percentages_surge_up_unavailable_down(replicas, surge, unavailable, want_surge, want_unavailable):
    bounds = resolve_bounds(policy(surge, unavailable), replicas)
    assert (bounds.surge, bounds.unavailable) == (want_surge, want_unavailable)
    assert bounds.max_total == replicas + want_surge
    assert bounds.min_healthy == replicas - want_unavailable


# --- the first step of a rollout -----------------------------------------------------------


@pytest.mark.parametrize(
    "replicas, surge, unavailable, want_start, want_stops",
    [
        (10, "25%", "25%", 5, 2),  # 3 surge + 2 in place of the 2 stopped
        (10, 5, 0, 5, 0),  # surge only: nothing stops before a new task is healthy
        (10, 0, 3, 3, 3),  # no surge: stop 3, and start 3 into the room they leave
        (1, "25%", "25%", 1, 0),
        (3, 0, 1, 1, 1),
        (10, "100%", 0, 10, 0),  # blue/green
        (10, 0, "100%", 10, 10),  # recreate
        (4, "50%", "50%", 4, 2),
    ],
)
def test_first_step(replicas, surge, unavailable, want_start, want_stops):
    step = plan(policy(surge, unavailable), replicas, old=olds(replicas))
    assert step.state is RolloutState.PROGRESSING
    assert (step.start, len(step.stops)) == (want_start, want_stops)
    bounds = step.bounds
    assert replicas - len(step.stops) + step.start <= bounds.max_total
    assert replicas - len(step.stops) >= bounds.min_healthy


def test_surge_stops_one_old_per_new_task_that_becomes_healthy_and_starts_the_next():
    pol = policy(5, 0)
    # 5 started: one is healthy, four still starting.
    step = plan(pol, 10, old=olds(10), new=healthy_new(1) + starting_new(4))
    assert (step.start, len(step.stops)) == (1, 1)
    # Three healthy at once: three stops and three starts in the same step.
    step = plan(pol, 10, old=olds(9), new=healthy_new(3) + starting_new(3))
    assert (step.start, len(step.stops)) == (2, 2)  # healthy 12, min 10: 2 stops; 13 tasks, max 15: 2 starts
    step = plan(pol, 10, old=olds(9), new=healthy_new(4) + starting_new(2))
    assert (step.start, len(step.stops)) == (3, 3)


def test_zero_unavailable_stops_nothing_until_a_new_task_is_healthy():
    pol = policy(1, 0)
    not_ready = [RolloutTask("new-0", GEN, TaskState.RUNNING, created_at=NOW - 5)]
    step = plan(pol, 3, old=olds(3), new=not_ready)
    assert (step.start, step.stops) == (0, ())
    step = plan(pol, 3, old=olds(3), new=healthy_new(1))
    assert (step.start, len(step.stops)) == (1, 1)


def test_zero_surge_stops_before_it_starts_and_never_exceeds_replicas():
    pol = policy(0, 1)
    step = plan(pol, 4, old=olds(4))
    assert (step.start, len(step.stops)) == (1, 1)
    # The replacement is not healthy yet: healthy is at its floor, nothing more moves.
    step = plan(pol, 4, old=olds(3), new=starting_new(1))
    assert (step.start, step.stops) == (0, ())
    step = plan(pol, 4, old=olds(3), new=healthy_new(1))
    assert (step.start, len(step.stops)) == (1, 1)


def test_old_tasks_that_do_not_serve_are_stopped_first_whatever_the_slack():
    pol = policy(1, 0)
    old = [
        RolloutTask("exited", 1, TaskState.EXITED, 0.0),
        RolloutTask("failed", 1, TaskState.FAILED, 0.0),
        RolloutTask("pending", 1, TaskState.PENDING, 0.0),
        RolloutTask("unready", 1, TaskState.RUNNING, 0.0, ready=False),
        # No readiness check: running is serving (agents that predate readiness send no ready).
        RolloutTask("unchecked", 1, TaskState.RUNNING, 0.0, ready=False, readiness_check=False),
        *olds(1),
    ]
    step = plan(pol, 6, old=old)
    reasons = {s.task_id: s.reason for s in step.stops}
    assert set(reasons) == {"exited", "failed", "pending", "unready"}
    assert reasons["exited"] == STOP_NOT_SERVING.format(generation=1, what="exited")
    assert reasons["unready"] == STOP_NOT_SERVING.format(generation=1, what="not ready")
    # 2 old left serving; 6 + 1 allowed: 5 starts.
    assert step.start == 5


def test_generations_of_old_tasks_are_named_in_reasons():
    step = plan(policy(0, "100%"), 2, old=olds(1, generation=1, prefix="a") + olds(1, generation=3, prefix="b", state=TaskState.EXITED))
    reasons = {s.task_id: s.reason for s in step.stops}
    assert "generation 3 task is exited" in reasons["b-0"]
    assert reasons["a-0"] == f"rolling update to generation {GEN}; 0 stay healthy (min 0)"


def test_an_old_task_of_unknown_generation_is_called_outdated():
    step = plan(policy(1, 0), 1, old=[RolloutTask("x", 0, TaskState.EXITED, 0.0)])
    assert [s.reason for s in step.stops] == ["outdated task is exited; replaced first"]


def test_a_finished_new_task_is_healthy_if_it_exited_0_and_fails_the_rollout_otherwise():
    done = RolloutTask("done", GEN, TaskState.EXITED, NOW - 1, finished=True, exit_code=0)
    step = plan(policy(1, 0), 1, old=olds(1), new=[done])
    assert step.healthy == ("done",) and [s.task_id for s in step.stops] == ["old-0"]
    crashed = replace(done, exit_code=2)
    step = plan(policy(1, 0), 1, old=olds(1), new=[crashed])
    assert step.state is RolloutState.FAILED
    assert [f.reason for f in step.failed_tasks] == ["done exited with code 2 and is not restarted (restart policy)"]


# --- min_healthy_time and readiness ---------------------------------------------------------


@pytest.mark.parametrize(
    "ready_since, healthy",
    [(NOW - 9.9, False), (NOW - 10, True), (NOW, False), (NOW - 50, True)],
)
def test_a_new_task_is_healthy_only_after_min_healthy_time(ready_since, healthy):
    pol = policy(1, 0, min_healthy_time=10)
    new = [RolloutTask("new-0", GEN, TaskState.RUNNING, created_at=NOW - 60, ready=True, ready_since=ready_since)]
    step = plan(pol, 2, old=olds(2), new=new)
    assert step.healthy == (("new-0",) if healthy else ())
    assert len(step.stops) == (1 if healthy else 0)
    if not healthy:
        assert "waiting min_healthy_time 10s" in step.message


def test_without_ready_since_a_running_task_of_a_version_without_readiness_counts_from_creation():
    pol = policy(1, 0, min_healthy_time=10)
    young = RolloutTask("young", GEN, TaskState.RUNNING, created_at=NOW - 5, readiness_check=False)
    old_enough = RolloutTask("old-enough", GEN, TaskState.RUNNING, created_at=NOW - 10, readiness_check=False)
    assert plan(pol, 2, old=olds(2), new=[young]).healthy == ()
    assert plan(pol, 2, old=olds(2), new=[old_enough]).healthy == ("old-enough",)


def test_a_ready_flag_without_running_state_is_not_serving():
    odd = RolloutTask("odd", GEN, TaskState.STARTING, created_at=NOW - 5, ready=True, ready_since=NOW - 5)
    assert plan(policy(1, 0), 2, old=olds(2), new=[odd]).healthy == ()


@pytest.mark.parametrize(
    "new, wake_at",
    [
        ([], None),
        (healthy_new(2), None),
        # Ready since NOW - 4: healthy at NOW + 6, well before its deadline.
        ([RolloutTask("a", GEN, TaskState.RUNNING, created_at=NOW - 5, ready=True, ready_since=NOW - 4)], NOW + 6),
        ([RolloutTask("a", GEN, TaskState.STARTING, created_at=NOW - 5)], NOW + 295),
        (
            [
                RolloutTask("a", GEN, TaskState.STARTING, created_at=NOW - 5),
                RolloutTask("b", GEN, TaskState.STARTING, created_at=NOW - 50),
                RolloutTask("c", GEN, TaskState.RUNNING, created_at=NOW - 9, ready=True, ready_since=NOW - 1),
            ],
            NOW + 9,
        ),
        # Ready late: its deadline comes before its min_healthy_time ends.
        ([RolloutTask("a", GEN, TaskState.RUNNING, created_at=NOW - 299, ready=True, ready_since=NOW - 1)], NOW + 1),
        # Healthy once: no deadline, nothing the clock alone changes.
        ([RolloutTask("a", GEN, TaskState.RUNNING, created_at=NOW - 5, was_healthy=True)], None),
    ],
)
def test_wake_at_is_when_the_clock_alone_changes_the_step(new, wake_at):
    step = plan(policy(1, 0, min_healthy_time=10, healthy_deadline=300), 3, old=olds(3), new=new)
    assert step.wake_at == wake_at
    if wake_at is not None:
        later = plan(policy(1, 0, min_healthy_time=10, healthy_deadline=300), 3, old=olds(3), new=new, now=wake_at)
        assert (later.state, later.healthy, later.stops) != (step.state, step.healthy, step.stops)


# --- failure --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, fails, reason",
    [
        (RolloutTask("n", GEN, TaskState.STARTING, created_at=NOW - 300), True, "n not healthy within 5m of its creation"),
        (RolloutTask("n", GEN, TaskState.STARTING, created_at=NOW - 299.9), False, None),
        (RolloutTask("n", GEN, TaskState.RUNNING, created_at=NOW - 301, ready=False), True, "not healthy within"),
        # Ready, but not for min_healthy_time before the deadline: that is not healthy either.
        (RolloutTask("n", GEN, TaskState.RUNNING, created_at=NOW - 301, ready=True, ready_since=NOW - 1), True, "not healthy within"),
        (RolloutTask("n", GEN, TaskState.RUNNING, created_at=NOW - 301, ready=True, ready_since=NOW - 20), False, None),
        # Healthy once in this rollout: a later readiness blip does not fail it.
        (RolloutTask("n", GEN, TaskState.RUNNING, created_at=NOW - 301, was_healthy=True), False, None),
        (RolloutTask("n", GEN, TaskState.FAILED, created_at=NOW - 1), True, "n could not start"),
        (RolloutTask("n", GEN, TaskState.RUNNING, created_at=NOW - 1, crash_loop=True), True, "n is crash-looping"),
        (RolloutTask("n", GEN, TaskState.EXITED, created_at=NOW - 1, crash_loop=True, was_healthy=True), True, "crash-looping"),
        # One exit is the agent's to restart, not a failure.
        (RolloutTask("n", GEN, TaskState.EXITED, created_at=NOW - 1), False, None),
    ],
)
def test_failure_of_a_new_task_fails_the_rollout(task, fails, reason):
    pol = policy(1, 0, healthy_deadline=300, min_healthy_time=10)
    step = plan(pol, 3, old=olds(3), new=[task])
    if fails:
        assert step.state is RolloutState.FAILED
        assert [f.task_id for f in step.failed_tasks] == ["n"]
        assert reason in step.failed_tasks[0].reason
        assert reason in step.message
        assert (step.start, step.stops) == (0, ())  # frozen
    else:
        assert step.state is not RolloutState.FAILED
        assert step.failed_tasks == ()


def test_every_failing_task_is_named():
    new = [
        RolloutTask("a", GEN, TaskState.FAILED, created_at=NOW),
        RolloutTask("b", GEN, TaskState.RUNNING, created_at=NOW, crash_loop=True),
        *healthy_new(1),
    ]
    step = plan(policy(), 4, old=olds(4), new=new)
    assert [f.task_id for f in step.failed_tasks] == ["a", "b"]


def test_a_failed_rollout_still_honours_a_scale_down_failing_version_first_old_last():
    new = [RolloutTask("bad", GEN, TaskState.FAILED, created_at=NOW), *starting_new(1), *healthy_new(1)]
    # 6 tasks within 5 replicas + 1 surge: frozen as they are.
    step = plan(policy(1, 0), 5, old=olds(3), new=new)
    assert (step.state, step.start, step.stops) == (RolloutState.FAILED, 0, ())
    step = plan(policy(1, 0), 2, old=olds(3), new=new)  # 6 tasks for 2 + 1
    assert step.state is RolloutState.FAILED
    assert [s.task_id for s in step.stops] == ["bad", "starting-0", "new-0"]
    assert {s.reason for s in step.stops} == {STOP_SCALED_DOWN.format(replicas=2)}
    step = plan(policy(1, 0), 1, old=olds(3), new=new)
    assert stopped(step) == {"bad", "starting-0", "new-0", "old-0"}
    assert step.start == 0


# --- canaries -------------------------------------------------------------------------------


def test_canaries_start_beside_the_old_tasks_beyond_the_surge_and_pause():
    pol = policy(1, 0, canary=2)
    step = plan(pol, 4, old=olds(4))
    assert (step.state, step.start, step.stops) == (RolloutState.PROGRESSING, 2, ())
    step = plan(pol, 4, old=olds(4), new=healthy_new(1) + starting_new(1))
    assert (step.state, step.start, step.stops) == (RolloutState.PROGRESSING, 0, ())
    assert "1/2 canaries healthy" in step.message
    step = plan(pol, 4, old=olds(4), new=healthy_new(2))
    assert (step.state, step.start, step.stops) == (RolloutState.PAUSED, 0, ())
    assert "waiting for promotion" in step.message


def test_while_paused_old_tasks_are_left_alone_even_when_not_serving():
    pol = policy(1, "50%", canary=1)
    old = olds(3) + [RolloutTask("exited", 1, TaskState.EXITED, 0.0)]
    step = plan(pol, 4, old=old, new=healthy_new(1))
    assert (step.state, step.start, step.stops) == (RolloutState.PAUSED, 0, ())


def test_promotion_continues_as_a_rolling_update_counting_canaries_as_new():
    pol = policy(1, 0, canary=2)
    step = plan(pol, 4, old=olds(4), new=healthy_new(2), promoted=True)
    # healthy 6, min 4: two stops; 4 tasks left, max 5: one start (2 new + 1 <= 4 replicas).
    assert (step.state, len(step.stops), step.start) == (RolloutState.PROGRESSING, 2, 1)
    # Promoted before the canaries were even healthy: nothing old stops yet, no room to start.
    step = plan(pol, 4, old=olds(4), new=starting_new(2), promoted=True)
    assert (len(step.stops), step.start) == (0, 0)


@pytest.mark.parametrize(
    "replicas, canary, old, want_start, want_stops",
    [
        (3, 5, 3, 3, 0),  # capped at replicas: blue/green
        (5, 1, 3, 3, 0),  # scaled up while paused: the new replicas are the new version
        (2, 1, 3, 1, 1),  # scaled down while paused: an old one goes
        (3, 2, 0, 3, 0),  # nothing old to protect: no canary phase
    ],
)
def test_canary_counts(replicas, canary, old, want_start, want_stops):
    step = plan(policy(1, 0, canary=canary), replicas, old=olds(old))
    assert (step.start, len(step.stops)) == (want_start, want_stops)


def test_scaled_down_while_paused_stops_surplus_canaries_and_the_least_useful_old_first():
    pol = policy(1, 0, canary=2)
    old = olds(2) + [RolloutTask("exited", 1, TaskState.EXITED, 0.0)]
    step = plan(pol, 1, old=old, new=healthy_new(1) + starting_new(1))
    # 1 replica: 2 old go (the exited one first); 1 canary, the one still starting goes.
    assert stopped(step) == {"exited", "old-0", "starting-0"}
    assert step.start == 0 and step.state is RolloutState.PAUSED


# --- scaling during a rollout, zero, complete -------------------------------------------------


def test_scaled_up_during_a_rollout_the_bounds_follow():
    step = plan(policy("25%", "25%"), 20, old=olds(8), new=healthy_new(5))
    assert (step.bounds.surge, step.bounds.unavailable) == (5, 5)
    # healthy 13 < min 15: no stops; 13 tasks, max 25: 12 starts but only 15 more new wanted.
    assert (len(step.stops), step.start) == (0, 12)


def test_scaled_down_during_a_rollout_old_go_then_surplus_new_least_useful_first():
    new = healthy_new(4) + starting_new(2)
    step = plan(policy("25%", "25%"), 4, old=olds(4), new=new)
    assert stopped(step) == {"old-0", "old-1", "old-2", "old-3", "starting-0", "starting-1"}
    assert step.start == 0
    assert {s.reason for s in step.stops if s.task_id.startswith("starting")} == {STOP_SCALED_DOWN.format(replicas=4)}


def test_scaled_down_with_more_healthy_new_than_replicas():
    step = plan(policy(), 2, old=olds(1), new=healthy_new(4))
    assert stopped(step) == {"old-0", "new-0", "new-1"}


@pytest.mark.parametrize("old, new", [(3, 0), (0, 2), (2, 2), (0, 0)])
def test_zero_replicas_stops_everything_and_starts_nothing(old, new):
    failing = [RolloutTask("bad", GEN, TaskState.FAILED, created_at=0.0)]
    step = plan(policy(canary=2), 0, old=olds(old), new=healthy_new(new) + (failing if new else []))
    assert step.start == 0
    assert len(step.stops) == old + (new + 1 if new else 0)
    assert {s.reason for s in step.stops} <= {STOP_SCALED_DOWN.format(replicas=0)}
    assert step.state is (RolloutState.COMPLETE if not (old or new) else RolloutState.PROGRESSING)


def test_complete_once_only_new_healthy_tasks_remain():
    step = plan(policy(), 3, new=healthy_new(3))
    assert (step.state, step.start, step.stops) == (RolloutState.COMPLETE, 0, ())
    assert step.healthy == ("new-0", "new-1", "new-2")
    assert "all 3 replicas healthy" in step.message
    # The last old task is being stopped: not complete until it is gone.
    assert plan(policy(), 3, old=olds(1), new=healthy_new(3)).state is RolloutState.PROGRESSING
    assert plan(policy(), 3, new=healthy_new(2) + starting_new(1)).state is RolloutState.PROGRESSING


def test_with_nothing_old_the_missing_replicas_start_at_once_whatever_the_surge():
    step = plan(policy(1, 0), 10, new=healthy_new(2))
    assert step.start == 8


# --- properties: a simulated cluster ----------------------------------------------------------

AMOUNTS = st.one_of(st.integers(0, 4), st.sampled_from(["0%", "10%", "25%", "34%", "50%", "100%"]))


@dataclass
class SimTask:
    task_id: str
    generation: int
    created_at: float
    ready_at: float | None  # when it becomes ready; None: it is ready since 0 (old) or never
    state: TaskState = TaskState.RUNNING

    def view(self, now: float) -> RolloutTask:
        ready = self.ready_at is not None and self.ready_at <= now
        state = TaskState.RUNNING if ready or self.state is not TaskState.STARTING else TaskState.STARTING
        if state is TaskState.STARTING:
            return RolloutTask(self.task_id, self.generation, state, self.created_at)
        if self.state is not TaskState.RUNNING and self.ready_at is None:
            return RolloutTask(self.task_id, self.generation, self.state, self.created_at)
        return RolloutTask(
            self.task_id, self.generation, TaskState.RUNNING, self.created_at, ready=ready, ready_since=self.ready_at if ready else None
        )


@st.composite
def scenarios(draw):
    replicas = draw(st.integers(0, 12))
    surge, unavailable = draw(AMOUNTS), draw(AMOUNTS)
    assume(not (surge in (0, "0%") and unavailable in (0, "0%")))
    pol = policy(
        surge,
        unavailable,
        min_healthy_time=draw(st.sampled_from([0.0, 1.0, 2.5])),
        healthy_deadline=1e9,
        canary=draw(st.integers(0, 4)),
    )
    broken = draw(st.integers(0, replicas))  # old tasks that do not serve at the start
    delays = draw(st.lists(st.integers(0, 4), min_size=1, max_size=30))
    promote_at = draw(st.integers(0, 10))
    return pol, replicas, broken, delays, promote_at


def _world(replicas: int, broken: int) -> dict[str, SimTask]:
    tasks = {}
    for i in range(replicas):
        state = TaskState.EXITED if i < broken else TaskState.RUNNING
        tasks[f"old-{i}"] = SimTask(f"old-{i}", 1, 0.0, None if i < broken else 0.0, state)
    return tasks


def _simulate(pol, replicas_at, broken, delays, promote_at, steps, settle_after=0):
    """Run the rollout until complete (not before step ``settle_after``); yield (step,
    tasks after it, now, replicas) each step."""
    replicas = replicas_at(0)
    tasks = _world(replicas, broken)
    started = 0
    for n in range(steps):
        now = float(n)
        replicas = replicas_at(n)
        old = [t.view(now) for t in tasks.values() if t.generation != GEN]
        new = [t.view(now) for t in tasks.values() if t.generation == GEN]
        step = plan_rollout(pol, replicas, GEN, n >= promote_at, old, new, now)
        assert step == plan_rollout(pol, replicas, GEN, n >= promote_at, old, new, now)
        if step.state is RolloutState.COMPLETE and n >= settle_after:
            yield step, tasks, now, replicas
            return
        assert step.state is not RolloutState.FAILED, step.message
        for s in step.stops:
            del tasks[s.task_id]
        for _ in range(step.start):
            delay = delays[started % len(delays)]
            task_id = f"new-{started}"
            tasks[task_id] = SimTask(task_id, GEN, now, now + 1 + delay, TaskState.STARTING)
            started += 1
        yield step, tasks, now, replicas
    raise AssertionError(f"not complete after {steps} steps")


def _healthy(tasks, now, pol) -> int:
    count = 0
    for t in tasks.values():
        view = t.view(now)
        if view.state is not TaskState.RUNNING or not view.ready:
            continue
        if t.generation != GEN or now - view.ready_since >= pol.min_healthy_time:
            count += 1
    return count


def _step_limit(pol, replicas, delays, promote_at) -> int:
    # Each wave replaces at least one task and takes at most the longest start plus
    # min_healthy_time plus a step for the stop to land.
    wave = max(delays) + int(pol.min_healthy_time) + 3
    return (replicas + 2) * wave + promote_at + 2


@given(scenarios())
@settings(max_examples=300, deadline=None)
def test_rollout_of_a_healthy_version_completes_within_bounds(scenario):
    pol, replicas, broken, delays, promote_at = scenario
    bounds = resolve_bounds(pol, replicas)
    canaries = min(pol.canary, replicas)
    satisfied = False
    for step, tasks, now, _ in _simulate(pol, lambda n: replicas, broken, delays, promote_at, _step_limit(pol, replicas, delays, promote_at)):
        assert len(tasks) <= bounds.max_total + max(0, canaries - bounds.surge)
        if canaries == 0 or now >= promote_at:
            # Canaries are the one thing allowed beyond the surge; only until promotion
            # has stops to make room (they never start more then).
            assert step.start == 0 or len(tasks) <= bounds.max_total
        healthy = _healthy(tasks, now, pol)
        satisfied = satisfied or healthy >= bounds.min_healthy
        if satisfied:
            assert healthy >= bounds.min_healthy, step.message
    assert step.state is RolloutState.COMPLETE
    assert len(tasks) == replicas and all(t.generation == GEN for t in tasks.values())


@given(scenarios(), st.integers(0, 12), st.integers(0, 8))
@settings(max_examples=200, deadline=None)
def test_scaled_during_a_rollout_it_still_completes_and_starts_within_the_new_bounds(scenario, scaled_to, scale_at):
    pol, replicas, broken, delays, promote_at = scenario

    def replicas_at(n: int) -> int:
        return replicas if n < scale_at else scaled_to

    limit = _step_limit(pol, max(replicas, scaled_to), delays, promote_at) + scale_at
    for step, tasks, now, current in _simulate(pol, replicas_at, broken, delays, promote_at, limit, settle_after=scale_at):
        if step.start and (min(pol.canary, current) == 0 or now >= promote_at):
            assert len(tasks) <= step.bounds.max_total
    assert len(tasks) == scaled_to


def _random_task(rng: random.Random, i: int, generation: int) -> RolloutTask:
    state = rng.choice(list(TaskState))
    ready = state is TaskState.RUNNING and rng.random() < 0.7
    return RolloutTask(
        f"t-{generation}-{i}",
        generation,
        state,
        created_at=NOW - rng.uniform(0, 400),
        ready=ready,
        ready_since=NOW - rng.uniform(0, 30) if ready else None,
        readiness_check=rng.random() < 0.8,
        crash_loop=rng.random() < 0.03,
        was_healthy=rng.random() < 0.2,
    )


@given(
    st.integers(0, 2**32),
    st.integers(0, 20),
    AMOUNTS,
    AMOUNTS,
    st.integers(0, 3),
    st.booleans(),
    st.integers(0, 20),
    st.integers(0, 20),
)
@settings(max_examples=300, deadline=None)
def test_any_step_is_deterministic_bounded_and_blind_to_task_order(seed, replicas, surge, unavailable, canary, promoted, n_old, n_new):
    assume(not (surge in (0, "0%") and unavailable in (0, "0%")))
    rng = random.Random(seed)
    pol = policy(surge, unavailable, canary=canary, min_healthy_time=10, healthy_deadline=rng.choice([60, 300, 1e9]))
    old = [_random_task(rng, i, 1) for i in range(n_old)]
    new = [_random_task(rng, i, GEN) for i in range(n_new)]
    step = plan_rollout(pol, replicas, GEN, promoted, old, new, NOW)
    assert step == plan_rollout(pol, replicas, GEN, promoted, list(old), list(new), NOW)

    ids = stopped(step)
    assert len(ids) == len(step.stops)  # nothing stopped twice
    assert ids <= {t.task_id for t in old + new}
    assert step.start >= 0
    assert (step.state is RolloutState.FAILED) == bool(step.failed_tasks)
    if step.state is RolloutState.FAILED:
        assert step.start == 0
        assert len(step.stops) == max(0, n_old + n_new - step.bounds.max_total)
    if replicas == 0:
        assert step.start == 0 and len(ids) == n_old + n_new
    if step.state is RolloutState.PROGRESSING and not (canary and old and not promoted) and replicas:
        # Rolling: stopping never takes healthy below the floor unless it was below already.
        kept_healthy = sum(1 for t in old if t.task_id not in ids and t.state is TaskState.RUNNING and (t.ready or not t.readiness_check))
        kept_healthy += sum(1 for i in step.healthy if i not in ids)
        was_healthy = sum(1 for t in old if t.state is TaskState.RUNNING and (t.ready or not t.readiness_check)) + len(step.healthy)
        assert kept_healthy >= min(step.bounds.min_healthy, was_healthy)
        if step.start:
            assert n_old + n_new - len(ids) + step.start <= step.bounds.max_total

    shuffled = plan_rollout(pol, replicas, GEN, promoted, rng.sample(old, len(old)), rng.sample(new, len(new)), NOW)
    assert (shuffled.state, shuffled.start, len(shuffled.stops)) == (step.state, step.start, len(step.stops))
    assert sorted(s.reason for s in shuffled.stops) == sorted(s.reason for s in step.stops)
    assert sorted(f.task_id for f in shuffled.failed_tasks) == sorted(f.task_id for f in step.failed_tasks)


# --- O(tasks) ----------------------------------------------------------------------------------


def _fleet(n: int) -> tuple[list[RolloutTask], list[RolloutTask]]:
    rng = random.Random(n)
    old = [replace(_random_task(rng, i, 1), crash_loop=False) for i in range(n)]
    new = [RolloutTask(f"n-{i}", GEN, TaskState.RUNNING, NOW - 10, ready=i % 3 != 0, ready_since=NOW - 5) for i in range(n)]
    return old, new


def test_plan_rollout_is_linear_in_tasks():
    pol = policy("25%", "25%", healthy_deadline=1e9)

    def best_of(n: int) -> float:
        old, new = _fleet(n)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            plan_rollout(pol, n, GEN, True, old, new, NOW)
            times.append(time.perf_counter() - began)
        return min(times)

    small, large = best_of(1_000), best_of(16_000)
    # 16 times the tasks: linear is ~16x, n log n ~20x, quadratic 256x.  Generous for a shared machine.
    assert large / small < 64, (small, large)
    assert large < 1.0
