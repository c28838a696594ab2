"""Rebalancing in reconcile(): moves as tables, and their safety and convergence under Hypothesis."""

from __future__ import annotations

import random
from collections import Counter
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import DeploymentSpec
from comp_common.messages import TaskState
from comp_scheduler.model import Desired, Node, NodeStatus, Observed, RebalancePolicy, Task
from comp_scheduler.reconcile import reconcile
from scheduler_checks import assert_feasible_everywhere

MI = 1024**2


def desired(name="web", replicas=4, cpu=0.5, memory="128Mi", namespace="default", priority=0, **placement):
    spec = DeploymentSpec(
        replicas=replicas, image="img:1", resources={"cpu": cpu, "memory": memory}, priority=priority, placement=placement
    )
    key = f"{namespace}.{name}"
    return key, Desired(key=key, name=name, spec=spec, spec_hash=spec.task_hash())


def node(node_id, cpu=4.0, zone=None, **flags):
    labels = {"zone": zone} if zone else {}
    return Node(node_id, NodeStatus.READY, cpu, 4096 * MI, MappingProxyType(labels), **flags)


def task(task_id, node_id, want: Desired, state=TaskState.RUNNING, created_at=0.0):
    return Task(task_id, want.key, node_id, want.spec_hash, want.spec.resources.cpu, want.spec.resources.memory,
                created_at=created_at, state=state)


def world(node_list, *tasks):
    return Observed(MappingProxyType({n.node_id: n for n in node_list}), MappingProxyType({t.task_id: t for t in tasks}))


def stacked(want, layout, state=TaskState.RUNNING):
    """Tasks of ``want`` laid out as {node: count}, oldest first in node order."""
    out, n = [], 0
    for node_id, count in layout.items():
        for _ in range(count):
            out.append(task(f"{want.name}-{n}", node_id, want, state=state, created_at=float(n)))
            n += 1
    return out


KEY, WEB = desired()
_, BINPACK = desired(strategy="binpack")
_, WEB_3 = desired(replicas=3)
_, WEB_2 = desired(replicas=2)
_, WEB_1 = desired(replicas=1)
_, ONLY_X = desired(constraints=[{"label": "zone", "value": "x"}])
_, ZONED = desired(replicas=2, spread_by="zone")
_, ZONED_5 = desired(replicas=5, spread_by="zone")
_, BIG = desired(cpu=1.0)

# (case, want, nodes, tasks, policy, now, places as [(node, reason prefix)], stops as [(task, reason)])
CASES = [
    ("a joined node takes one replica from the busiest", WEB, [node("a"), node("b"), node("c")],
     stacked(WEB, {"a": 2, "b": 2}), RebalancePolicy(), 0.0, [("c", "rebalancing: a holds 2, c 0")], []),
    ("within the margin nothing moves", WEB, [node("a"), node("b"), node("c")],
     stacked(WEB, {"a": 2, "b": 1, "c": 1}), RebalancePolicy(), 0.0, [], []),
    ("a wider margin holds back a move of 2", WEB, [node("a"), node("b"), node("c")],
     stacked(WEB, {"a": 2, "b": 2}), RebalancePolicy(margin=3), 0.0, [], []),
    ("binpack deployments are not spread", BINPACK, [node("a"), node("b")],
     stacked(BINPACK, {"a": 4}), RebalancePolicy(), 0.0, [], []),
    ("disabled: nothing moves", WEB, [node("a"), node("b")],
     stacked(WEB, {"a": 4}), RebalancePolicy(enabled=False), 0.0, [], []),
    ("not while a replica is still starting", WEB, [node("a"), node("b")],
     stacked(WEB, {"a": 3}) + [task("s", "a", WEB, state=TaskState.STARTING, created_at=9)], RebalancePolicy(), 0.0, [], []),
    ("constraints are honoured", ONLY_X, [node("a", zone="x"), node("b", zone="y")],
     stacked(ONLY_X, {"a": 4}), RebalancePolicy(), 0.0, [], []),
    ("a target without room is no target", BIG, [node("a"), node("b", cpu=0.5)],
     stacked(BIG, {"a": 4}), RebalancePolicy(), 0.0, [], []),
    ("cordoned nodes are no target", WEB, [node("a"), node("b", cordoned=True)],
     stacked(WEB, {"a": 4}), RebalancePolicy(), 0.0, [], []),
    ("a move in flight is waited for", WEB_3, [node("a"), node("b")],
     stacked(WEB_3, {"a": 3}) + [task("new", "b", WEB_3, state=TaskState.PENDING, created_at=10)], RebalancePolicy(), 20.0, [], []),
    ("a move completes once its copy runs", WEB_3, [node("a"), node("b")],
     stacked(WEB_3, {"a": 3}) + [task("new", "b", WEB_3, created_at=10)], RebalancePolicy(), 20.0,
     [], [("web-2", "rebalanced to node b")]),
    ("a copy that never starts is given up", WEB_3, [node("a"), node("b")],
     stacked(WEB_3, {"a": 3}) + [task("new", "b", WEB_3, state=TaskState.PENDING, created_at=10)],
     RebalancePolicy(start_timeout=60), 100.0, [], [("new", "scaled down to 3")]),
    ("scaling down during a move keeps the new copy", WEB_2, [node("a"), node("b")],
     stacked(WEB_2, {"a": 3}) + [task("new", "b", WEB_2, state=TaskState.PENDING, created_at=10)], RebalancePolicy(), 20.0,
     [], [("web-2", "scaled down to 2")]),
    ("a single replica's scale-down waits for nothing", WEB_1, [node("a"), node("b")],
     [task("old", "a", WEB_1), task("new", "b", WEB_1, state=TaskState.PENDING, created_at=10)], RebalancePolicy(), 20.0,
     [], [("new", "scaled down to 1")]),
    ("spread_by: a domain two behind gets a replica", ZONED, [node("a1", zone="a"), node("a2", zone="a"), node("b1", zone="b")],
     stacked(ZONED, {"a1": 1, "a2": 1}), RebalancePolicy(), 0.0, [("b1", "rebalancing: a1 holds 1, b1 0; zone a holds 2, b 0")], []),
    ("spread_by: no move into a busier domain, one within a domain instead", ZONED_5,
     [node("a1", zone="a"), node("b1", zone="b"), node("b2", zone="b"), node("b3", zone="b")],
     stacked(ZONED_5, {"a1": 2, "b1": 2, "b2": 1}), RebalancePolicy(), 0.0, [("b3", "rebalancing: b1 holds 2, b3 0")], []),
]


@pytest.mark.parametrize("case, want, node_list, tasks, policy, now, places, stops", CASES, ids=[c[0] for c in CASES])
def test_rebalance_table(case, want, node_list, tasks, policy, now, places, stops):
    plan = reconcile({want.key: want}, world(node_list, *tasks), now, random.Random(1), rebalance=policy)
    assert [(p.node_id, p.reason[: len(reason)]) for p, (_, reason) in zip(plan.places, places)] == places, case
    assert len(plan.places) == len(places), case
    assert sorted((s.task_id, s.reason) for s in plan.stops) == sorted(stops), case
    assert plan.pending == ()


def test_moves_are_bounded_cluster_wide_counting_those_in_flight():
    deployments = dict(desired(name=f"d{i}") for i in range(4))
    nodes = [node("a", cpu=32.0), node("b", cpu=32.0)]
    tasks = [t for want in deployments.values() for t in stacked(want, {"a": 4})]
    plan = reconcile(deployments, world(nodes, *tasks), 0.0, random.Random(1), rebalance=RebalancePolicy(max_moves=2))
    assert [(p.deployment, p.node_id) for p in plan.places] == [("default.d0", "b"), ("default.d1", "b")]

    # d0's copy is still starting: it counts against the two, so only one new move starts.
    [d0_copy] = [p for p in plan.places if p.deployment == "default.d0"]
    starting = task(d0_copy.task_id, "b", deployments["default.d0"], state=TaskState.STARTING, created_at=1.0)
    plan = reconcile(deployments, world(nodes, *tasks, starting), 1.0, random.Random(1), rebalance=RebalancePolicy(max_moves=2))
    assert [(p.deployment, p.node_id) for p in plan.places] == [("default.d1", "b")]
    assert plan.stops == ()


def test_per_deployment_bound():
    nodes = [node(i, cpu=16.0) for i in "abcde"]
    want = desired(replicas=8)[1]
    policy = RebalancePolicy(max_moves_per_deployment=3)
    plan = reconcile({want.key: want}, world(nodes, *stacked(want, {"a": 8})), 0.0, random.Random(1), rebalance=policy)
    assert sorted(p.node_id for p in plan.places) == ["b", "c", "d"]
    assert [p.node_id for p in reconcile({want.key: want}, world(nodes, *stacked(want, {"a": 8})), 0.0, random.Random(1)).places] == ["b"]


def test_a_completed_move_then_starts_the_next_in_the_same_round():
    want = desired(replicas=4)[1]
    tasks = stacked(want, {"a": 4}) + [task("copy", "b", want, created_at=10)]
    plan = reconcile({want.key: want}, world([node("a"), node("b"), node("c")], *tasks), 20.0, random.Random(1))
    assert [(s.node_id, s.reason) for s in plan.stops] == [("a", "rebalanced to node b")]
    assert [p.node_id for p in plan.places] == ["c"]


def test_scale_down_keeps_the_newest_when_it_spreads_better_and_says_so():
    want = desired(replicas=2)[1]
    # Three running: two on a, the newest alone on b.  Stopping the newest (the old rule)
    # would leave both on a; one on a goes instead.
    tasks = [task("old1", "a", want, created_at=1), task("old2", "a", want, created_at=2), task("new", "b", want, created_at=3)]
    plan = reconcile({want.key: want}, world([node("a"), node("b")], *tasks), 5.0, random.Random(1))
    assert [(s.task_id, s.reason) for s in plan.stops] == [("old2", "rebalanced to node b")]


def test_failed_surplus_goes_before_any_spreading():
    want = desired(replicas=2)[1]
    tasks = [task("a1", "a", want, created_at=1), task("a2", "a", want, created_at=2),
             task("b1", "b", want, state=TaskState.FAILED, created_at=3)]
    plan = reconcile({want.key: want}, world([node("a"), node("b")], *tasks), 5.0, random.Random(1))
    assert [(s.task_id, s.reason) for s in plan.stops] == [("b1", "scaled down to 2")]


# ---- properties -------------------------------------------------------------------------------

zone_st = st.sampled_from(["a", "b", "c"])
node_st = st.builds(
    lambda i, cpu, zone, cordoned: node(f"n{i}", cpu=cpu, zone=zone, cordoned=cordoned),
    st.integers(0, 6), st.sampled_from([2.0, 4.0, 8.0]), zone_st, st.integers(0, 5).map(lambda n: n == 0),
)
placement_st = st.fixed_dictionaries(
    {},
    optional={
        "spread_by": st.just("zone"),
        "strategy": st.sampled_from(["spread", "binpack"]),
        "max_per_node": st.integers(1, 4),
        "constraints": st.just([{"label": "zone", "op": "!=", "value": "c"}]),
    },
)
deployment_st = st.builds(
    lambda i, replicas, cpu, priority, placement: desired(name=f"d{i}", replicas=replicas, cpu=cpu, priority=priority, **placement),
    st.integers(0, 3), st.integers(0, 10), st.sampled_from([0.25, 0.5]), st.sampled_from([0, 0, 3]), placement_st,
)
state_st = st.sampled_from([TaskState.RUNNING] * 12 + [TaskState.PENDING, TaskState.STARTING, TaskState.FAILED])
policy_st = st.builds(
    RebalancePolicy, max_moves=st.integers(0, 4), max_moves_per_deployment=st.integers(0, 3), margin=st.integers(2, 3)
)


@st.composite
def skewed_worlds(draw, states=state_st):
    """Deployments whose tasks sit on a few of the nodes (as after nodes joined or recovered)."""
    node_map = {n.node_id: n for n in draw(st.lists(node_st, min_size=1, max_size=6))}
    want = dict(draw(st.lists(deployment_st, min_size=1, max_size=3)))
    crowded = sorted(node_map)[: draw(st.integers(1, len(node_map)))]
    tasks = []
    for key, dep in want.items():
        # Mostly exactly the replicas (what moves start from), else a few more (a move in
        # flight, or a scale-down) or fewer.
        count = dep.spec.replicas + draw(st.sampled_from([0, 0, 0, 1, 1, 2, -1]))
        for k in range(max(count, 0)):
            tasks.append(task(f"{key}-{k}", draw(st.sampled_from(crowded)), dep, state=draw(states), created_at=float(k)))
    return want, world(list(node_map.values()), *tasks)


def _running(tasks, key):
    return sum(t.deployment == key and t.state is TaskState.RUNNING for t in tasks)


@settings(max_examples=300, deadline=None)
@given(skewed_worlds(), st.integers(0, 2**32), policy_st)
def test_a_plan_never_lowers_running_replicas(w, seed, policy):
    want, obs = w
    plan = reconcile(want, obs, 5.0, random.Random(seed), rebalance=policy)
    stopped = {s.task_id for s in plan.stops}
    preempted = {s.deployment for s in plan.stops if s.reason.startswith("preempted by")}
    after = [t for t in obs.tasks.values() if t.task_id not in stopped]
    for key, dep in want.items():
        if key in preempted:
            continue  # preemption is allowed to lower a lower-priority deployment
        assert _running(after, key) >= min(dep.spec.replicas, _running(obs.tasks.values(), key)), (key, plan)


@settings(max_examples=150, deadline=None)
@given(skewed_worlds(states=st.just(TaskState.RUNNING)), st.integers(0, 2**32), policy_st, st.integers(0, 2**32))
def test_no_round_lowers_running_replicas_while_moves_come_up_slowly(w, seed, policy, start_seed):
    """Rounds in a row, new tasks starting after a random number of rounds (some failing):
    moves are in flight, waited for, completed, and abandoned, and every plan is checked."""
    want, obs = w
    rng, starts = random.Random(seed), random.Random(start_seed)
    tasks = dict(obs.tasks)
    for now in range(30):
        current = Observed(obs.nodes, MappingProxyType(dict(tasks)))
        plan = reconcile(want, current, float(now), rng, rebalance=policy)
        stopped = {s.task_id for s in plan.stops}
        preempted = {s.deployment for s in plan.stops if s.reason.startswith("preempted by")}
        after = [t for t in tasks.values() if t.task_id not in stopped]
        for key, dep in want.items():
            if key not in preempted:
                assert _running(after, key) >= min(dep.spec.replicas, _running(tasks.values(), key)), (now, key, plan)
        for task_id in stopped:
            del tasks[task_id]
        for place in plan.places:
            tasks[place.task_id] = task(place.task_id, place.node_id, want[place.deployment], state=TaskState.PENDING, created_at=float(now))
        for task_id, t in sorted(tasks.items()):
            if t.state is TaskState.PENDING and starts.random() < 0.4:
                tasks[task_id] = task(task_id, t.node_id, want[t.deployment], created_at=t.created_at,
                                      state=TaskState.FAILED if starts.random() < 0.1 else TaskState.RUNNING)


def _apply(want, tasks, plan, now):
    for stop in plan.stops:
        del tasks[stop.task_id]
    for place in plan.places:
        # What was placed runs by the next round.
        tasks[place.task_id] = task(place.task_id, place.node_id, want[place.deployment], created_at=now)


@settings(max_examples=200, deadline=None)
@given(skewed_worlds(states=st.just(TaskState.RUNNING)), st.integers(0, 2**32), policy_st)
def test_rebalancing_converges_and_stays_converged(w, seed, policy):
    want, obs = w
    rng = random.Random(seed)
    tasks = dict(obs.tasks)
    quiet = 0
    for now in range(80):
        current = Observed(obs.nodes, MappingProxyType(dict(tasks)))
        plan = reconcile(want, current, float(now), rng, rebalance=policy)
        assert_feasible_everywhere(want, current, plan)
        for key, dep in want.items():
            # A move holds one extra copy at most per allowed move, never more.
            holding = sum(t.deployment == key for t in tasks.values())
            assert holding <= max(dep.spec.replicas + policy.max_moves_per_deployment, len([t for t in obs.tasks.values() if t.deployment == key]))
        quiet = quiet + 1 if plan.empty else 0
        if quiet == 2:
            break
        _apply(want, tasks, plan, float(now))
    assert quiet == 2, "still moving after 80 rounds: ping-pong"
    per_deployment = Counter(t.deployment for t in tasks.values())
    assert all(per_deployment[key] <= dep.spec.replicas for key, dep in want.items())


@settings(max_examples=100, deadline=None)
@given(skewed_worlds(), st.integers(0, 2**32), policy_st)
def test_rebalancing_is_deterministic_for_a_seed(w, seed, policy):
    want, obs = w
    assert reconcile(want, obs, 5.0, random.Random(seed), rebalance=policy) == reconcile(
        want, obs, 5.0, random.Random(seed), rebalance=policy
    )
