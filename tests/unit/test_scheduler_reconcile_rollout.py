"""reconcile() with rolling updates and start order wired in: tables, and a simulated
cluster under Hypothesis (placed tasks come up after random delays, stopped ones vanish)."""

from __future__ import annotations

import random
from dataclasses import replace
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import DeploymentSpec
from comp_common.messages import TaskState
from comp_common.quota import Quota
from comp_scheduler import reconcile as reconcile_module
from comp_scheduler.model import Desired, Node, NodeStatus, Observed, Plan, RebalancePolicy, Task
from comp_scheduler.reconcile import reconcile
from comp_scheduler.rollout import RolloutState, resolve_bounds

MI = 1024**2
NOW = 1_000.0
NO_REBALANCE = RebalancePolicy(enabled=False)


def desired(
    name="web", replicas=4, image="img:1", cpu=0.1, namespace="default", priority=0, update=None, depends_on=(),
    restart="always", generation=2, promoted=False, settled=True, seen_healthy=frozenset(), **placement,
) -> tuple[str, Desired]:
    spec = DeploymentSpec(
        replicas=replicas, image=image, resources={"cpu": cpu, "memory": "64Mi"}, priority=priority,
        update=update or {}, depends_on=list(depends_on), restart={"condition": restart}, placement=placement,
    )
    key = f"{namespace}.{name}"
    return key, Desired(
        key=key, name=name, spec=spec, spec_hash=spec.task_hash(), generation=generation,
        promoted=promoted, settled=settled, seen_healthy=seen_healthy,
    )


def nodes(*ids, cpu=16.0, status=NodeStatus.READY, **flags) -> dict[str, Node]:
    return {i: Node(i, status, cpu, 64 * 1024 * MI, MappingProxyType({}), **flags) for i in ids}


def task(task_id, node_id, want: Desired, state=TaskState.RUNNING, ready=None, created_at=0.0, ready_since=0.0, **kw) -> Task:
    ready = state is TaskState.RUNNING if ready is None else ready
    return Task(
        task_id=task_id, deployment=want.key, node_id=node_id, spec_hash=want.spec_hash,
        cpu=want.spec.resources.cpu, memory=want.spec.resources.memory, created_at=created_at, state=state,
        ready=ready, ready_since=ready_since if ready else None, readiness_check=True, restart=want.spec.restart.condition, **kw,
    )


def many(prefix, count, want, node_ids=("a", "b", "c", "d"), **kw) -> list[Task]:
    return [task(f"{prefix}-{i:03d}", node_ids[i % len(node_ids)], want, **kw) for i in range(count)]


def world(node_map, *tasks) -> Observed:
    return Observed(MappingProxyType(node_map), MappingProxyType({t.task_id: t for t in tasks}))


def run(want: dict[str, Desired], obs: Observed, now=NOW, seed=0, **kw) -> Plan:
    kw.setdefault("rebalance", NO_REBALANCE)
    return reconcile(want, obs, now, random.Random(seed), **kw)


def step_of(plan: Plan, key: str):
    return dict(plan.rollouts)[key]


KEY, V1 = desired(image="img:1", generation=1)
_, V2 = desired(image="img:2")
FOUR = nodes("a", "b", "c", "d")


# ---- rolling updates as tables ---------------------------------------------------------------


def test_surge_5_of_50_first_round_places_5_and_stops_none():
    key, v1 = desired(replicas=50, generation=1)
    _, v2 = desired(replicas=50, image="img:2", update={"max_surge": 5})
    plan = run({key: v2}, world(FOUR, *many("old", 50, v1)))
    assert (len(plan.places), len(plan.stops)) == (5, 0)
    step = step_of(plan, key)
    assert (step.state, step.start) == (RolloutState.PROGRESSING, 5)


def test_once_5_new_run_and_are_ready_5_old_stop_and_5_more_start():
    key, v1 = desired(replicas=50, generation=1)
    _, v2 = desired(replicas=50, image="img:2", update={"max_surge": 5})
    plan = run({key: v2}, world(FOUR, *many("old", 50, v1), *many("new", 5, v2, created_at=NOW - 10, ready_since=NOW - 5)))
    assert (len(plan.places), len(plan.stops)) == (5, 5)
    assert all(s.task_id.startswith("old-") and s.reason.startswith("rolling update to generation 2") for s in plan.stops)


def test_zero_surge_stops_one_and_places_its_replacement_in_the_freed_room():
    # The node holds exactly 4: the replacement only fits in the room the stop frees.
    _, v2 = desired(image="img:2", cpu=1.0, update={"max_surge": 0, "max_unavailable": 1})
    _, v1_full = desired(image="img:1", cpu=1.0, generation=1)
    plan = run({KEY: v2}, world(nodes("a", cpu=4.0), *many("old", 4, v1_full, node_ids=("a",))))
    assert [s.task_id for s in plan.stops] == ["old-000"]
    assert [p.node_id for p in plan.places] == ["a"]
    assert step_of(plan, KEY).bounds == resolve_bounds(v2.spec.update, 4)


def test_canaries_start_beside_every_old_task_then_pause():
    _, v2 = desired(image="img:2", update={"canary": 2})
    first = run({KEY: v2}, world(FOUR, *many("old", 4, V1)))
    assert (len(first.places), first.stops, step_of(first, KEY).state) == (2, (), RolloutState.PROGRESSING)
    paused = run({KEY: v2}, world(FOUR, *many("old", 4, V1), *many("new", 2, v2, created_at=NOW - 10)))
    assert (paused.places, paused.stops) == ((), ())
    assert step_of(paused, KEY).state is RolloutState.PAUSED
    assert "waiting for promotion" in step_of(paused, KEY).message


def test_promotion_releases_the_rollout():
    _, v2 = desired(image="img:2", update={"canary": 2}, promoted=True)
    plan = run({KEY: v2}, world(FOUR, *many("old", 4, V1), *many("new", 2, v2, created_at=NOW - 10)))
    # 6 healthy, 4 must stay: 2 old go; 4 left + 1 start = 5 = replicas + surge (25% of 4 -> 1).
    assert (len(plan.stops), len(plan.places)) == (2, 1)
    assert step_of(plan, KEY).state is RolloutState.PROGRESSING


@pytest.mark.parametrize(
    "replicas, new_tasks, stops, places",
    [
        (2, 1, 2, 0),  # scaled down: old ones go down to 2 healthy; 3 tasks = 2 + surge 1
        (8, 0, 0, 6),  # scaled up: 4 old + 6 new = 10 = 8 + surge 2
        (0, 1, 5, 0),  # scaled to 0: everything goes at once
    ],
)
def test_scaling_during_a_rollout_moves_its_bounds(replicas, new_tasks, stops, places):
    _, v2 = desired(replicas=replicas, image="img:2")
    new = many("new", new_tasks, v2, state=TaskState.STARTING, created_at=NOW - 1)
    plan = run({KEY: v2}, world(FOUR, *many("old", 4, V1), *new))
    assert (len(plan.stops), len(plan.places)) == (stops, places)


def test_a_failed_new_task_fails_the_rollout_and_freezes_it():
    _, v2 = desired(image="img:2")
    failed = task("new-0", "a", v2, state=TaskState.FAILED, created_at=NOW - 1)
    plan = run({KEY: v2}, world(FOUR, *many("old", 4, V1), failed))
    step = step_of(plan, KEY)
    assert step.state is RolloutState.FAILED
    assert [f.task_id for f in step.failed_tasks] == ["new-0"]
    assert (plan.places, plan.stops) == ((), ())


def test_past_its_deadline_a_new_task_fails_the_rollout_and_wake_at_says_when():
    _, v2 = desired(image="img:2", update={"healthy_deadline": 60})
    slow = task("new-0", "a", v2, state=TaskState.STARTING, created_at=NOW - 10)
    step = step_of(run({KEY: v2}, world(FOUR, *many("old", 4, V1), slow)), KEY)
    assert (step.state, step.wake_at) == (RolloutState.PROGRESSING, NOW + 50)
    late = step_of(run({KEY: v2}, world(FOUR, *many("old", 4, V1), slow), now=NOW + 50), KEY)
    assert late.state is RolloutState.FAILED and "healthy_deadline" in late.failed_tasks[0].reason


def test_a_second_change_mid_rollout_treats_both_older_specs_as_old():
    _, v3 = desired(image="img:3", generation=3)
    tasks = [*many("v1", 3, V1), *many("v2", 2, V2, created_at=NOW - 10)]
    plan = run({KEY: v3}, world(FOUR, *tasks))
    # 5 healthy old-or-older, 4 must stay: the first v1 goes; 4 + 1 start = replicas + surge.
    assert [s.task_id for s in plan.stops] == ["v1-000"]
    assert len(plan.places) == 1
    assert "0/4 new healthy, 4 old serving" in step_of(plan, KEY).message


def test_an_old_task_on_a_down_node_is_stopped_not_kept_as_a_replacement_candidate():
    node_map = {**nodes("a", "b", "c"), **nodes("d", status=NodeStatus.DOWN)}
    plan = run({KEY: V2}, world(node_map, *many("old", 4, V1)))
    stopped = {s.task_id: s.reason for s in plan.stops}
    assert stopped == {"old-003": "node d is down; outdated (generation 2 rolling out)"}
    # 3 old serve; 1 + surge 1 new start (nothing is placed on d).
    assert len(plan.places) == 2 and all(p.node_id != "d" for p in plan.places)


def test_an_old_task_on_a_draining_node_is_old_and_goes_first():
    node_map = {**nodes("a", "b", "c"), **nodes("d", cordoned=True, draining=True)}
    plan = run({KEY: V2}, world(node_map, *many("old", 4, V1), *many("new", 1, V2, node_ids=("a",), created_at=NOW - 10)))
    assert [s.task_id for s in plan.stops] == ["old-003"]  # the one on d, though the last by id
    assert all(p.node_id != "d" for p in plan.places)


def test_a_deployment_mid_rollout_is_not_rebalanced():
    key, v1 = desired(replicas=6, generation=1)
    _, v2 = desired(replicas=6, image="img:2", update={"canary": 1})
    skewed = [*many("cur", 5, v2, node_ids=("a",), created_at=NOW - 10), *many("old", 1, v1, node_ids=("a",))]
    plan = reconcile({key: v2}, world(nodes("a", "b", "c"), *skewed), NOW, random.Random(0))
    assert not any(p.reason.startswith("rebalancing") for p in plan.places)
    # Settled and all current, the same layout is spread out.
    _, settled = desired(replicas=6, image="img:2")
    converged = [*many("cur", 6, settled, node_ids=("a",), created_at=NOW - 10)]
    moves = reconcile({key: settled}, world(nodes("a", "b", "c"), *converged), NOW, random.Random(0))
    assert any(p.reason.startswith("rebalancing") for p in moves.places)
    unsettled = replace(settled, settled=False)
    assert not reconcile({key: unsettled}, world(nodes("a", "b", "c"), *converged), NOW, random.Random(0)).places


def test_preemption_may_stop_an_old_task_of_lower_priority():
    low_key, low_v1 = desired(name="low", replicas=3, cpu=1.0, generation=1)
    _, low_v2 = desired(name="low", replicas=3, cpu=1.0, image="img:2")
    high_key, high = desired(name="high", replicas=1, cpu=1.0, priority=10, image="vip")
    plan = run({low_key: low_v2, high_key: high}, world(nodes("a", cpu=3.0), *many("old", 3, low_v1, node_ids=("a",))))
    assert [(s.task_id, s.reason) for s in plan.stops] == [("old-000", "preempted by default.high (priority 10 > 0)")]
    assert [p.deployment for p in plan.places] == [high_key]
    # The rollout's surge task, and the replica the old one was, wait for room.
    assert [(p.deployment, p.count) for p in plan.pending] == [(low_key, 2)]


def test_quota_counts_old_tasks_during_surge_and_holds_the_rollout_with_its_reason():
    quota = {"default": Quota(tasks=4)}
    plan = run({KEY: V2}, world(FOUR, *many("old", 4, V1)), namespaces=quota)
    assert plan.places == () and plan.stops == ()
    assert [(p.count, p.reason) for p in plan.pending] == [(1, "namespace default quota: tasks 4/4 used")]
    assert step_of(plan, KEY).state is RolloutState.PROGRESSING
    # Unavailability instead of surge: the stop frees the quota the start needs.
    _, v2 = desired(image="img:2", update={"max_surge": 0, "max_unavailable": 1})
    plan = run({KEY: v2}, world(FOUR, *many("old", 4, V1)), namespaces=quota)
    assert (len(plan.stops), len(plan.places), plan.pending) == (1, 1, ())


def test_a_converged_settled_deployment_takes_the_cheap_path(monkeypatch):
    def no_placer(*args, **kwargs):
        raise AssertionError("a converged round builds no placer")

    monkeypatch.setattr(reconcile_module, "Placer", no_placer)
    plan = run({KEY: V2}, world(FOUR, *many("new", 4, V2, created_at=NOW - 10)))
    assert plan == Plan()
    # Not settled yet, nothing missing: still cheap, and the step says complete.
    plan = run({KEY: replace(V2, settled=False)}, world(FOUR, *many("new", 4, V2, created_at=NOW - 10)))
    assert (plan.places, plan.stops) == ((), ())
    assert step_of(plan, KEY).state is RolloutState.COMPLETE


def test_an_unsettled_generation_without_old_tasks_places_its_replicas_as_ever():
    unsettled = replace(V2, settled=False)
    failing = task("new-0", "a", V2, state=TaskState.FAILED, created_at=NOW - 1)
    plan = run({KEY: unsettled}, world(FOUR, failing))
    assert len(plan.places) == 3  # a first deploy keeps its replicas whatever the rollout says
    assert step_of(plan, KEY).state is RolloutState.FAILED


def test_no_rollout_step_when_all_current_and_settled():
    assert run({KEY: V2}, world(FOUR, *many("new", 3, V2))).rollouts == ()


# ---- finished tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "restart, exit_code",
    [
        ("never", 0),
        ("never", 1),  # never means never: not by the agent, nor by a replacement
        ("on-failure", 0),
        ("on-failure", 1),  # the agent restarts it: an ordinary replica meanwhile
        ("always", 0),  # the same
    ],
)
def test_an_exited_task_is_not_missing(restart, exit_code):
    key, job = desired(name="job", replicas=2, restart=restart)
    tasks = [task("j-0", "a", job), task("j-1", "b", job, state=TaskState.EXITED, ready=False, exit_code=exit_code)]
    assert tasks[1].finished is (restart == "never" or (restart, exit_code) == ("on-failure", 0))
    assert run({key: job}, world(FOUR, *tasks)) == Plan()


def test_a_finished_task_on_a_draining_node_stays():
    key, job = desired(name="job", replicas=1, restart="never")
    node_map = {**nodes("a", cordoned=True, draining=True), **nodes("b")}
    assert run({key: job}, world(node_map, task("j-0", "a", job, state=TaskState.EXITED, ready=False, exit_code=0))) == Plan()


def test_a_current_task_on_a_draining_node_mid_rollout_leaves_as_drained_tasks_do():
    node_map = {**nodes("a", "b", "c"), **nodes("d", cordoned=True, draining=True)}
    current = task("new-d", "d", V2, created_at=NOW - 10)
    plan = run({KEY: V2}, world(node_map, *many("old", 3, V1, node_ids=("a", "b", "c")), current))
    # Not the step's: it sees 3 old, no new, and starts 1 + surge 1; new-d stays until
    # enough run elsewhere (4 replicas: 3 old running there, so not yet).
    assert plan.stops == () and len(plan.places) == 2
    assert all(p.node_id != "d" for p in plan.places)


def test_a_finished_task_on_a_down_node_is_not_lost():
    key, job = desired(name="job", replicas=1, restart="never")
    node_map = {**nodes("a", status=NodeStatus.DOWN), **nodes("b")}
    plan = run({key: job}, world(node_map, task("j-0", "a", job, state=TaskState.EXITED, ready=False, exit_code=0)))
    assert plan == Plan()


def test_in_a_rollout_a_finished_new_task_counts_healthy_if_it_exited_0():
    key, v1 = desired(name="job", replicas=1, restart="never", generation=1)
    _, v2 = desired(name="job", replicas=1, restart="never", image="img:2")
    old = task("j-old", "a", v1)
    done = task("j-new", "b", v2, state=TaskState.EXITED, ready=False, exit_code=0, created_at=NOW - 10)
    plan = run({key: v2}, world(FOUR, old, done))
    assert [s.task_id for s in plan.stops] == ["j-old"] and plan.places == ()
    crashed = replace(done, exit_code=3)
    step = step_of(run({key: v2}, world(FOUR, old, crashed)), key)
    assert step.state is RolloutState.FAILED and "exited with code 3" in step.failed_tasks[0].reason


# ---- start order ------------------------------------------------------------------------------

DB_KEY, DB = desired(name="db", replicas=2, image="pg")
APP_KEY, APP = desired(name="app", replicas=3, depends_on=["db"])


@pytest.mark.parametrize(
    "case, want, tasks, places, reason",
    [
        ("dependency missing", {APP_KEY: APP}, [], 0, "waiting for db, which does not exist"),
        ("dependency not ready", {APP_KEY: APP, DB_KEY: DB}, [task("db-0", "a", DB), task("db-1", "b", DB, ready=False)], 0, "waiting for db to be healthy: 1/2 ready"),
        ("dependency scaled to 0", {APP_KEY: APP, DB_KEY: desired(name="db", replicas=0, image="pg")[1]}, [], 0, "waiting for db, which is scaled to 0"),
        ("started is enough", {APP_KEY: desired(name="app", replicas=3, depends_on=[{"name": "db", "condition": "started"}])[1], DB_KEY: DB},
         [task("db-0", "a", DB, ready=False), task("db-1", "b", DB, ready=False)], 3, None),
        ("started, one starting", {APP_KEY: desired(name="app", replicas=3, depends_on=[{"name": "db", "condition": "started"}])[1], DB_KEY: DB},
         [task("db-0", "a", DB), task("db-1", "b", DB, state=TaskState.STARTING)], 0, "waiting for db to be started: 1/2 running"),
        ("dependency ready", {APP_KEY: APP, DB_KEY: DB}, [task("db-0", "a", DB), task("db-1", "b", DB)], 3, None),
        ("one of its own runs: not gated", {APP_KEY: APP, DB_KEY: DB}, [task("app-0", "a", APP)], 2, None),
        ("a finished one-shot dependency is met", {APP_KEY: APP, DB_KEY: desired(name="db", replicas=2, image="pg", restart="never")[1]},
         [task(f"db-{i}", "a", desired(name="db", replicas=2, image="pg", restart="never")[1], state=TaskState.EXITED, ready=False, exit_code=0) for i in range(2)], 3, None),
    ],
)
def test_start_order(case, want, tasks, places, reason):
    plan = run(want, world(FOUR, *tasks))
    assert sum(p.deployment == APP_KEY for p in plan.places) == places, case
    app_pending = [p for p in plan.pending if p.deployment == APP_KEY]
    if reason is None:
        assert app_pending == [], case
    else:
        assert [(p.count, p.reason) for p in app_pending] == [(3, reason)], case


def test_a_dependency_cycle_is_reported_not_waited_on_silently():
    a_key, a = desired(name="a", replicas=1, depends_on=["b"])
    b_key, b = desired(name="b", replicas=1, depends_on=["a"])
    c_key, c = desired(name="c", replicas=1, depends_on=["a"])
    plan = run({a_key: a, b_key: b, c_key: c}, world(FOUR))
    assert {p.deployment: p.reason for p in plan.pending} == {
        a_key: "depends_on cycle: a -> b -> a",
        b_key: "depends_on cycle: b -> a -> b",
        c_key: "waiting for a to be healthy: 0/1 ready",
    }
    assert plan.places == ()


def test_start_order_looks_only_in_the_same_namespace():
    other_db_key, other_db = desired(name="db", replicas=1, image="pg", namespace="other")
    plan = run({APP_KEY: APP, other_db_key: other_db}, world(FOUR, task("db-0", "a", other_db)))
    assert [p.reason for p in plan.pending] == ["waiting for db, which does not exist"]


# ---- a simulated cluster ------------------------------------------------------------------------


def simulate(replicas, policy, seed, second_change, max_rounds=300):
    """Roll V1 -> V2 (-> V3 at round ``second_change``, if set) on a roomy cluster: each
    placed task comes up ready 0-3 rounds later, each stopped one is gone by the next round,
    the "service" promotes a paused rollout and settles a complete one.  Returns the trace
    (round, tasks, ready, step state) and the final tasks."""
    rng = random.Random(seed)
    key, v1 = desired(replicas=replicas, generation=1)
    spec_of = lambda image, generation: desired(replicas=replicas, image=image, update=policy, generation=generation, settled=False)[1]
    want = spec_of("img:2", 2)
    node_map = nodes("a", "b", "c", "d", cpu=64.0)
    tasks = {t.task_id: t for t in many("v1", replicas, v1)}
    up_at: dict[str, int] = {}
    seen: set[str] = set()
    trace = []
    plan_rng = random.Random(seed)
    for round_ in range(max_rounds):
        now = NOW + round_
        if second_change is not None and round_ == second_change:
            want, seen = spec_of("img:3", 3), set()
        for task_id, at in list(up_at.items()):
            if at <= round_ and task_id in tasks:
                tasks[task_id] = replace(tasks[task_id], state=TaskState.RUNNING, ready=True, ready_since=now)
                del up_at[task_id]
        want = replace(want, seen_healthy=frozenset(seen))
        plan = reconcile({key: want}, world(node_map, *tasks.values()), now, plan_rng, rebalance=NO_REBALANCE)
        step = dict(plan.rollouts).get(key)
        for stop in plan.stops:
            del tasks[stop.task_id]
        for place in plan.places:
            tasks[place.task_id] = replace(task(place.task_id, place.node_id, want, state=TaskState.STARTING, created_at=now), ready=False, ready_since=None)
            up_at[place.task_id] = round_ + rng.randint(0, 3)
        ready = sum(t.ready for t in tasks.values())
        trace.append((round_, len(tasks), ready, step.state if step else None, len(plan.places), len(plan.stops)))
        if step is not None:
            seen.update(step.healthy)
            if step.state is RolloutState.PAUSED:
                want = replace(want, promoted=True)
            elif step.state is RolloutState.COMPLETE:
                want = replace(want, settled=True)
        elif want.settled and (second_change is None or round_ > second_change):
            return trace, tasks, want
    raise AssertionError(f"the rollout did not finish in {max_rounds} rounds: {trace[-5:]}")


amounts = st.one_of(st.integers(0, 3), st.sampled_from(["0%", "25%", "50%", "100%"]))
policies = st.fixed_dictionaries(
    {"max_surge": amounts, "max_unavailable": amounts, "canary": st.integers(0, 3), "min_healthy_time": st.sampled_from([0, 2])}
).filter(lambda p: p["max_surge"] not in (0, "0%") or p["max_unavailable"] not in (0, "0%"))


@settings(max_examples=120, deadline=None)
@given(replicas=st.integers(1, 12), policy=policies, seed=st.integers(0, 2**16), second_change=st.none() | st.integers(0, 8))
def test_every_rollout_completes_within_its_bounds(replicas, policy, seed, second_change):
    trace, tasks, want = simulate(replicas, policy, seed, second_change)
    bounds = resolve_bounds(want.spec.update, replicas)
    ceiling = replicas + bounds.surge + min(policy["canary"], replicas)
    floor_reached = False
    for round_, count, ready, state, _, _ in trace:
        assert count <= ceiling, (round_, trace)
        if ready >= bounds.min_healthy:
            floor_reached = True
        elif floor_reached:
            raise AssertionError(f"round {round_}: {ready} ready, below {bounds.min_healthy}: {trace}")
    assert sorted(t.spec_hash for t in tasks.values()) == [want.spec_hash] * replicas
    assert all(t.ready for t in tasks.values())


@settings(max_examples=15, deadline=None)
@given(replicas=st.integers(1, 12), policy=policies, seed=st.integers(0, 2**16), second_change=st.none() | st.integers(0, 8))
def test_a_simulated_rollout_is_deterministic_for_a_seed(replicas, policy, seed, second_change):
    first = simulate(replicas, policy, seed, second_change)
    again = simulate(replicas, policy, seed, second_change)
    assert first[0] == again[0] and sorted(first[1]) == sorted(again[1])
