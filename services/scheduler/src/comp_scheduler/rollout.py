"""``plan_rollout``: one step of replacing a deployment's old tasks with new ones.

Pure, like ``reconcile``: the same inputs give the same step, and nothing here keeps
state between rounds; whatever must be remembered (that a rollout failed, that a task was
once healthy) is the service's to keep and pass back in.

The rules, after Kubernetes' Deployment controller and Nomad's update stanza:

* ``max_surge`` and ``max_unavailable`` are counts or shares of ``replicas``; a share of
  surge rounds up and one of unavailability rounds down (as Kubernetes does), so a small
  deployment errs towards an extra task rather than a missing one.  When both come to 0
  the surge becomes 1: the rollout must be able to start something, and an extra task
  costs room where a missing one costs service.
* Starting a new task never takes the deployment above ``replicas + surge`` tasks, and
  stopping an old one never takes it below ``replicas - unavailable`` healthy ones.  A new
  task is healthy once it has been ready for ``min_healthy_time``; an old one while it
  serves (ready where its version has a readiness check, else running).  Each step stops
  as many old tasks as that slack allows and starts as many new ones as the room allows,
  so stops and starts overlap rather than alternate.  Tasks stopped in a step no longer
  count towards the total: their replacements may be placed in the same round.
* Old tasks that do not serve (not running, or failing their readiness check) count as
  unavailable and are stopped first, without waiting for slack: stopping them costs
  nothing and makes room.
* Canaries (Nomad): while the rollout is not promoted, ``canary`` new tasks run beside
  all the old ones, beyond the surge, and no old task is stopped (not even one that does
  not serve: the agent restarts it, and nothing else may yet take its place); once they
  are healthy the rollout pauses.  Replicas the old tasks no longer cover (a scale up)
  start as the new version.  After promotion the canaries count as new tasks of an ordinary
  rolling update.  Canaries are capped at ``replicas`` (canary = replicas is blue/green)
  and only happen when there are old tasks to protect.
* The bounds always follow the current ``replicas``: scaling during a rollout moves them.
  Surplus new tasks (scaled below their count) are stopped, the least useful first.
* A new task that has finished for good (exited, and its restart policy will not run it
  again) counts as healthy if it exited 0: it did what it was run for, and waiting for it
  to serve would wait for ever.  One that exited otherwise fails the rollout.
* A new task that is failed, crash-looping, or not healthy by ``healthy_deadline`` after its
  creation fails the rollout: nothing more starts or stops, except what a scale down puts
  beyond ``replicas + surge``, so the service can revert to a known version
  (``auto_revert``) or the user can act.
* Zero replicas stops everything at once.

O(tasks): every task is looked at a constant number of times and nothing is sorted.  Where
several tasks are equally good to stop, the caller's order decides (reconcile passes them
sorted by id), which keeps the step deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum, StrEnum

from comp_common.manifest import UpdatePolicy
from comp_common.messages import TaskState
from comp_common.quantities import format_duration


class RolloutState(StrEnum):
    # The same words as RolloutEvent.state.
    PROGRESSING = "progressing"
    PAUSED = "paused"  # canaries healthy, waiting for `comp rollout promote`
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RolloutTask:
    task_id: str
    generation: int
    state: TaskState
    created_at: float
    ready: bool = False
    ready_since: float | None = None
    # Whether the task's version has a readiness check (TaskStatus.readiness is not NONE).
    # Without one, running is serving: agents that predate readiness never report ``ready``.
    readiness_check: bool = True
    crash_loop: bool = False
    # Counted healthy by an earlier step of this rollout.  Optional: the deadline then no
    # longer applies to it, so a later blip of readiness does not fail the rollout (Nomad
    # sets an allocation's deployment health once).  See RolloutStep.healthy.
    was_healthy: bool = False
    # Exited, and its restart policy will not start it again (never, or on-failure after
    # exit code 0); exit_code says how it ended.
    finished: bool = False
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class TaskReason:
    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Bounds:
    """``max_surge`` and ``max_unavailable`` resolved against a replica count."""

    replicas: int
    surge: int
    unavailable: int

    @property
    def max_total(self) -> int:
        return self.replicas + self.surge

    @property
    def min_healthy(self) -> int:
        return self.replicas - self.unavailable


@dataclass(frozen=True, slots=True)
class RolloutStep:
    state: RolloutState
    message: str
    bounds: Bounds
    # How many new tasks to place now.
    start: int = 0
    # Tasks to stop now, each with why; surplus new tasks may be among them after a scale down.
    stops: tuple[TaskReason, ...] = ()
    # New tasks that fail the rollout (set exactly when state is FAILED).
    failed_tasks: tuple[TaskReason, ...] = ()
    # New tasks counted healthy in this step: what the service remembers for was_healthy.
    healthy: tuple[str, ...] = ()
    # When the step would change with no event at all (a task's min_healthy_time ends, or
    # its deadline comes): the service runs a round then rather than wait for a resync.
    wake_at: float | None = None


# Reasons, so that events and tests name the same things.
STOP_NOT_SERVING = "generation {generation} task is {what}; replaced first"
# The same, for an old task whose generation the caller does not know (generation 0).
STOP_NOT_SERVING_UNKNOWN = "outdated task is {what}; replaced first"
STOP_REPLACED = "rolling update to generation {generation}; {healthy} stay healthy (min {min_healthy})"
STOP_SCALED_DOWN = "scaled down to {replicas}"
FAIL_FAILED = "{task_id} could not start"
FAIL_CRASH_LOOP = "{task_id} is crash-looping"
FAIL_EXITED = "{task_id} exited with code {exit_code} and is not restarted (restart policy)"
FAIL_DEADLINE = "{task_id} not healthy within {deadline} of its creation (healthy_deadline)"


class _Rank(IntEnum):
    """How little a task is worth keeping; the lowest are stopped first."""

    FAILING = 0  # a new task that fails the rollout
    NOT_RUNNING = 1
    NOT_READY = 2
    SETTLING = 3  # ready, not yet for min_healthy_time
    HEALTHY = 4


def resolve_bounds(policy: UpdatePolicy, replicas: int) -> Bounds:
    replicas = max(0, replicas)
    surge = _resolve(policy.max_surge, replicas, round_up=True)
    # More unavailable than there are replicas means none need stay healthy.
    unavailable = min(_resolve(policy.max_unavailable, replicas, round_up=False), replicas)
    if surge == 0 and unavailable == 0:
        surge = 1
    return Bounds(replicas, surge, unavailable)


def _resolve(amount: int | str, replicas: int, *, round_up: bool) -> int:
    if isinstance(amount, int):
        return amount
    percent = int(amount.strip().rstrip("%"))
    # Integer arithmetic: 10 * 25% must be exactly 2.5 before rounding, not 2.4999.
    return -(-replicas * percent // 100) if round_up else replicas * percent // 100


def _serves(task: RolloutTask) -> bool:
    if task.state is not TaskState.RUNNING:
        return False
    return task.ready if task.readiness_check else True


def _rank_old(task: RolloutTask) -> _Rank:
    if task.state is not TaskState.RUNNING:
        return _Rank.NOT_RUNNING
    return _Rank.HEALTHY if _serves(task) else _Rank.NOT_READY


def _rank_new(task: RolloutTask, policy: UpdatePolicy, now: float) -> tuple[_Rank, str | None, float | None]:
    """The task's rank; why it fails the rollout, if it does; and when, with nothing else
    happening, its verdict changes by the clock alone (healthy, or past its deadline)."""
    if task.state is TaskState.FAILED:
        return _Rank.FAILING, FAIL_FAILED.format(task_id=task.task_id), None
    if task.crash_loop:
        return _Rank.FAILING, FAIL_CRASH_LOOP.format(task_id=task.task_id), None
    if task.finished:
        if task.exit_code == 0:
            return _Rank.HEALTHY, None, None
        return _Rank.FAILING, FAIL_EXITED.format(task_id=task.task_id, exit_code=task.exit_code), None
    wake: float | None = None
    if _serves(task):
        # An agent that predates readiness sends no ready_since: creation is the best bound.
        since = task.ready_since if task.ready_since is not None else task.created_at
        if now - since >= policy.min_healthy_time:
            return _Rank.HEALTHY, None, None
        rank = _Rank.SETTLING
        wake = since + policy.min_healthy_time
    else:
        rank = _Rank.NOT_RUNNING if task.state is not TaskState.RUNNING else _Rank.NOT_READY
    if not task.was_healthy:
        deadline_at = task.created_at + policy.healthy_deadline
        if now >= deadline_at:
            deadline = format_duration(policy.healthy_deadline)
            return _Rank.FAILING, FAIL_DEADLINE.format(task_id=task.task_id, deadline=deadline), None
        wake = deadline_at if wake is None else min(wake, deadline_at)
    return rank, None, wake


def _worst_first(ranked: Iterable[tuple[RolloutTask, _Rank]], count: int) -> list[RolloutTask]:
    """The ``count`` lowest-ranked tasks, ties in the given order: buckets, not a sort."""
    if count <= 0:
        return []
    buckets: list[list[RolloutTask]] = [[] for _ in _Rank]
    for task, rank in ranked:
        buckets[rank].append(task)
    chosen: list[RolloutTask] = []
    for bucket in buckets:
        chosen.extend(bucket[: count - len(chosen)])
        if len(chosen) == count:
            break
    return chosen


def plan_rollout(
    policy: UpdatePolicy,
    replicas: int,
    generation: int,
    promoted: bool,
    old: Sequence[RolloutTask],
    new: Sequence[RolloutTask],
    now: float,
) -> RolloutStep:
    """The next step of rolling ``old`` (any other generation) over to ``new`` (``generation``).

    ``promoted``: the deployment's promoted_generation is ``generation``.  Every task given
    is assigned; the step's stops are to be removed from the assignments in the same round
    as ``start`` new tasks are placed.
    """
    replicas = max(0, replicas)
    bounds = resolve_bounds(policy, replicas)
    new_ranked: list[tuple[RolloutTask, _Rank, str | None]] = []
    wake_at: float | None = None
    for task in new:
        rank, failure, wake = _rank_new(task, policy, now)
        new_ranked.append((task, rank, failure))
        if wake is not None and (wake_at is None or wake < wake_at):
            wake_at = wake
    healthy = tuple(task.task_id for task, rank, _ in new_ranked if rank is _Rank.HEALTHY)

    if replicas == 0:
        return _scale_to_zero(bounds, generation, old, new, healthy)
    failed = tuple(TaskReason(task.task_id, why) for task, _, why in new_ranked if why is not None)
    if failed:
        return _failed(bounds, generation, old, new_ranked, failed, healthy)
    canaries = min(policy.canary, replicas) if old else 0
    if canaries and not promoted:
        step = _canary(bounds, generation, canaries, old, new_ranked, healthy)
    else:
        step = _rolling(bounds, policy, generation, old, new_ranked, healthy)
    return step if wake_at is None else replace(step, wake_at=wake_at)


def _scale_to_zero(
    bounds: Bounds, generation: int, old: Sequence[RolloutTask], new: Sequence[RolloutTask], healthy: tuple[str, ...]
) -> RolloutStep:
    reason = STOP_SCALED_DOWN.format(replicas=0)
    stops = tuple(TaskReason(task.task_id, reason) for task in (*old, *new))
    if not stops:
        return RolloutStep(RolloutState.COMPLETE, f"generation {generation}: scaled to 0", bounds)
    return RolloutStep(
        RolloutState.PROGRESSING, f"generation {generation}: scaling to 0, stopping {len(stops)}", bounds, stops=stops, healthy=healthy
    )


def _failed(
    bounds: Bounds,
    generation: int,
    old: Sequence[RolloutTask],
    new_ranked: list[tuple[RolloutTask, _Rank, str | None]],
    failed: tuple[TaskReason, ...],
    healthy: tuple[str, ...],
) -> RolloutStep:
    # Frozen: starting more of a failing version or stopping the old one would only make
    # the revert longer.  A scale down below what the bounds allow is still honoured, the
    # failing version going first and the old one, known to work, last.  (Stopping down to
    # ``replicas`` would remove the failing task and with it the failure: the rollout would
    # resume, and fail again, round after round.)
    surplus = len(old) + len(new_ranked) - bounds.max_total
    old_ranked = [(task, _rank_old(task)) for task in old]
    order: list[RolloutTask] = []
    for rank in _Rank:  # a constant number of passes
        order.extend(task for task, r, _ in new_ranked if r is rank)
        order.extend(task for task, r in old_ranked if r is rank)
    reason = STOP_SCALED_DOWN.format(replicas=bounds.replicas)
    stops = tuple(TaskReason(task.task_id, reason) for task in order[: max(0, surplus)])
    message = f"generation {generation} failed: " + "; ".join(f.reason for f in failed)
    return RolloutStep(RolloutState.FAILED, message, bounds, stops=stops, failed_tasks=failed, healthy=healthy)


def _canary(
    bounds: Bounds,
    generation: int,
    canaries: int,
    old: Sequence[RolloutTask],
    new_ranked: list[tuple[RolloutTask, _Rank, str | None]],
    healthy: tuple[str, ...],
) -> RolloutStep:
    scaled_down = STOP_SCALED_DOWN.format(replicas=bounds.replicas)
    # Old tasks are left alone until promotion (the agent restarts those that exit), except
    # what a scale down removes.
    old_stops = _worst_first(((task, _rank_old(task)) for task in old), len(old) - bounds.replicas)
    old_kept = len(old) - len(old_stops)
    # A replica the old version no longer provides (scaled up, or one lost) can only be
    # started as the new version: it joins the canaries.
    target = canaries + max(0, bounds.replicas - old_kept)
    new_stops = _worst_first(((task, rank) for task, rank, _ in new_ranked), len(new_ranked) - target)
    start = max(0, target - len(new_ranked))
    stopped_new = {task.task_id for task in new_stops}
    healthy_kept = sum(1 for task_id in healthy if task_id not in stopped_new)
    stops = tuple(TaskReason(task.task_id, scaled_down) for task in (*old_stops, *new_stops))
    if start == 0 and healthy_kept >= target:
        state = RolloutState.PAUSED
        message = f"generation {generation}: {healthy_kept}/{target} canaries healthy; waiting for promotion"
    else:
        state = RolloutState.PROGRESSING
        message = f"generation {generation}: {healthy_kept}/{target} canaries healthy"
    return RolloutStep(state, message, bounds, start=start, stops=stops, healthy=healthy)


def _rolling(
    bounds: Bounds,
    policy: UpdatePolicy,
    generation: int,
    old: Sequence[RolloutTask],
    new_ranked: list[tuple[RolloutTask, _Rank, str | None]],
    healthy: tuple[str, ...],
) -> RolloutStep:
    replicas = bounds.replicas
    stops: list[TaskReason] = []

    surplus_new = _worst_first(((task, rank) for task, rank, _ in new_ranked), len(new_ranked) - replicas)
    stopped_new = {task.task_id for task in surplus_new}
    stops.extend(TaskReason(task.task_id, STOP_SCALED_DOWN.format(replicas=replicas)) for task in surplus_new)
    new_kept = len(new_ranked) - len(surplus_new)
    new_healthy = sum(1 for task_id in healthy if task_id not in stopped_new)
    settling = sum(1 for task, rank, _ in new_ranked if rank is _Rank.SETTLING and task.task_id not in stopped_new)

    serving: list[RolloutTask] = []
    for task in old:
        if _serves(task):
            serving.append(task)
        else:
            what = task.state.value if task.state is not TaskState.RUNNING else "not ready"
            if task.generation > 0:
                reason = STOP_NOT_SERVING.format(generation=task.generation, what=what)
            else:
                reason = STOP_NOT_SERVING_UNKNOWN.format(what=what)
            stops.append(TaskReason(task.task_id, reason))

    healthy_now = new_healthy + len(serving)
    retire = min(max(0, healthy_now - bounds.min_healthy), len(serving))
    healthy_after = healthy_now - retire
    for task in serving[:retire]:
        stops.append(
            TaskReason(task.task_id, STOP_REPLACED.format(generation=generation, healthy=healthy_after, min_healthy=bounds.min_healthy))
        )

    total = new_kept + len(serving) - retire
    start = max(0, min(replicas - new_kept, bounds.max_total - total))

    if not old and not stops and start == 0 and new_healthy == replicas:
        return RolloutStep(RolloutState.COMPLETE, f"generation {generation}: all {replicas} replicas healthy", bounds, healthy=healthy)
    old_left = len(serving) - retire
    message = (
        f"generation {generation}: {new_healthy}/{replicas} new healthy, {old_left} old serving; "
        f"healthy {healthy_after} (min {bounds.min_healthy}), tasks {total + start} (max {bounds.max_total})"
    )
    if settling:
        message += f"; {settling} ready, waiting min_healthy_time {format_duration(policy.min_healthy_time)}"
    return RolloutStep(RolloutState.PROGRESSING, message, bounds, start=start, stops=tuple(stops), healthy=healthy)


__all__ = [
    "Bounds",
    "RolloutState",
    "RolloutStep",
    "RolloutTask",
    "TaskReason",
    "plan_rollout",
    "resolve_bounds",
]
