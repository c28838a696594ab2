"""Namespace quotas at placement time and dominant resource fairness across namespaces."""

from __future__ import annotations

import random
from collections import Counter
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import DeploymentSpec
from comp_common.messages import NamespaceRecord, TaskState
from comp_common.quota import Quota
from comp_scheduler.model import Desired, Node, NodeStatus, Observed, Task
from comp_scheduler.reconcile import reconcile
from scheduler_checks import assert_feasible_everywhere

MI = 1024**2
GI = 1024**3


def desired(namespace, name="web", replicas=4, cpu=0.5, memory="128Mi", priority=0, **placement):
    spec = DeploymentSpec(
        replicas=replicas, image="img:1", resources={"cpu": cpu, "memory": memory}, priority=priority, placement=placement
    )
    key = f"{namespace}.{name}"
    return key, Desired(key=key, name=name, spec=spec, spec_hash=spec.task_hash())


def node(node_id, cpu=4.0, memory=4 * GI, status=NodeStatus.READY, **flags):
    return Node(node_id, status, cpu, memory, MappingProxyType({}), **flags)


def task(task_id, node_id, want: Desired, state=TaskState.RUNNING, created_at=0.0):
    return Task(task_id, want.key, node_id, want.spec_hash, want.spec.resources.cpu, want.spec.resources.memory,
                created_at=created_at, state=state)


def world(node_list, *tasks):
    return Observed(MappingProxyType({n.node_id: n for n in node_list}), MappingProxyType({t.task_id: t for t in tasks}))


def placed(plan):
    return Counter(p.deployment for p in plan.places)


# ---- quotas -----------------------------------------------------------------------------------

A_KEY, A_WEB = desired("team-a", replicas=6)
A_DOWN_KEY, A_ONE = desired("team-a", replicas=1)

QUOTA_CASES = [
    ("cpu bound holds the rest pending", {A_KEY: A_WEB}, world([node("n")]), {"team-a": Quota(cpu=2)},
     4, "namespace team-a quota: cpu 2/2 cores used, a task needs 0.5"),
    ("memory bound", {A_KEY: A_WEB}, world([node("n")]), {"team-a": Quota(memory="384Mi")},
     3, "namespace team-a quota: memory 384Mi/384Mi used, a task needs 128Mi"),
    ("task-count bound", {A_KEY: A_WEB}, world([node("n")]), {"team-a": Quota(tasks=5)},
     5, "namespace team-a quota: tasks 5/5 used"),
    ("a stored namespace record works the same", {A_KEY: A_WEB}, world([node("n")]),
     {"team-a": NamespaceRecord(name="team-a", quota=Quota(tasks=1), created_at=0, updated_at=0)},
     1, "namespace team-a quota: tasks 1/1 used"),
    ("no bound, no limit", {A_KEY: A_WEB}, world([node("n")]), {"team-a": Quota()}, 6, None),
    ("another namespace's quota does not apply", {A_KEY: A_WEB}, world([node("n")]), {"team-b": Quota(tasks=0)}, 6, None),
    ("a lowered quota stops nothing and places nothing", {A_KEY: A_WEB},
     world([node("n")], *(task(f"t{i}", "n", A_WEB) for i in range(4))), {"team-a": Quota(cpu=1)},
     0, "namespace team-a quota: cpu 2/1 cores used, a task needs 0.5"),
    ("replacing a task on a down node is not growth", {A_DOWN_KEY: A_ONE},
     world([node("gone", status=NodeStatus.DOWN), node("n")], task("t", "gone", A_ONE)), {"team-a": Quota(tasks=1)}, 1, None),
    ("replacing a task on a draining node is not growth", {A_DOWN_KEY: A_ONE},
     world([node("old", cordoned=True, draining=True), node("n")], task("t", "old", A_ONE)), {"team-a": Quota(tasks=1)}, 1, None),
]


@pytest.mark.parametrize("case, want, obs, quotas, places, pending", QUOTA_CASES, ids=[c[0] for c in QUOTA_CASES])
def test_quota_table(case, want, obs, quotas, places, pending):
    plan = reconcile(want, obs, 0.0, random.Random(1), namespaces=quotas)
    assert len(plan.places) == places, case
    assert not [s for s in plan.stops if s.reason.startswith(("scaled", "preempted"))], case
    assert [p.reason for p in plan.pending] == ([pending] if pending else []), case


def test_quota_held_deployment_lets_the_next_smaller_one_in():
    big_key, big = desired("team-a", name="big", replicas=1, cpu=2.0)
    small_key, small = desired("team-a", name="small", replicas=2, cpu=0.5)
    plan = reconcile({big_key: big, small_key: small}, world([node("n")]), 0.0, random.Random(1), namespaces={"team-a": Quota(cpu=1)})
    assert placed(plan) == {small_key: 2}
    assert [(p.deployment, p.count) for p in plan.pending] == [(big_key, 1)]


def test_a_rebalancing_move_is_not_held_by_a_full_quota():
    key, web = desired("team-a", replicas=4)
    tasks = [task(f"t{i}", "a", web) for i in range(4)]
    plan = reconcile({key: web}, world([node("a"), node("b")], *tasks), 0.0, random.Random(1), namespaces={"team-a": Quota(tasks=4)})
    assert [p.reason.split(":")[0] for p in plan.places] == ["rebalancing"]


# ---- dominant resource fairness ---------------------------------------------------------------


def test_two_namespaces_share_a_full_cluster_evenly():
    a_key, a = desired("team-a", replicas=10, cpu=1.0)
    b_key, b = desired("team-b", replicas=10, cpu=1.0)
    plan = reconcile({a_key: a, b_key: b}, world([node("n1"), node("n2")]), 0.0, random.Random(1))
    # Before fairness, team-a (first by key) took all eight cores.
    assert placed(plan) == {a_key: 4, b_key: 4}
    assert [p.reason for p in plan.pending] == [
        "no feasible node (2 nodes: insufficient cpu); room shared across namespaces by dominant resource fairness "
        f"(namespace {ns} at 50%)" for ns in ("team-a", "team-b")
    ]


def test_the_textbook_drf_example():
    # Ghodsi et al.: 9 cpu, 18 GB; A's tasks <1 cpu, 4 GB>, B's <3 cpu, 1 GB>: A runs 3, B runs 2.
    a_key, a = desired("a", replicas=10, cpu=1.0, memory="4Gi")
    b_key, b = desired("b", replicas=10, cpu=3.0, memory="1Gi")
    plan = reconcile({a_key: a, b_key: b}, world([node("n", cpu=9.0, memory=18 * GI)]), 0.0, random.Random(1))
    assert placed(plan) == {a_key: 3, b_key: 2}


def test_what_a_namespace_already_holds_counts():
    a_key, a = desired("team-a", replicas=10, cpu=1.0)
    b_key, b = desired("team-b", replicas=10, cpu=1.0)
    holding = [task(f"a{i}", "n1", a) for i in range(4)]
    plan = reconcile({a_key: a, b_key: b}, world([node("n1"), node("n2")], *holding), 0.0, random.Random(1))
    assert placed(plan) == {b_key: 4}


def test_priority_comes_before_fairness():
    a_key, a = desired("team-a", replicas=10, cpu=1.0, priority=5)
    b_key, b = desired("team-b", replicas=10, cpu=1.0)
    plan = reconcile({a_key: a, b_key: b}, world([node("n1"), node("n2")]), 0.0, random.Random(1))
    assert placed(plan) == {a_key: 8}


def test_within_a_namespace_deployments_go_in_key_order():
    first_key, first = desired("team-a", name="a-first", replicas=3, cpu=1.0)
    second_key, second = desired("team-a", name="b-second", replicas=3, cpu=1.0)
    other_key, other = desired("team-b", replicas=4, cpu=1.0)
    plan = reconcile({first_key: first, second_key: second, other_key: other}, world([node("n1"), node("n2")]), 0.0, random.Random(1))
    assert placed(plan) == {first_key: 3, second_key: 1, other_key: 4}


def test_placements_interleave_one_task_at_a_time_with_ties_by_name():
    a_key, a = desired("team-a", replicas=3, cpu=1.0)
    b_key, b = desired("team-b", replicas=3, cpu=1.0)
    plan = reconcile({b_key: b, a_key: a}, world([node("n1", cpu=16.0)]), 0.0, random.Random(1))
    assert [p.deployment for p in plan.places] == [a_key, b_key] * 3


# ---- properties -------------------------------------------------------------------------------


@st.composite
def contended(draw):
    """Two namespaces, tasks all the same size, on nodes of one size: nothing favours either."""
    cpu = draw(st.sampled_from([0.5, 1.0]))
    node_list = [node(f"n{i}", cpu=draw(st.sampled_from([2.0, 4.0]))) for i in range(draw(st.integers(1, 4)))]
    want = {}
    for ns in ("team-a", "team-b"):
        for d in range(draw(st.integers(1, 3))):
            key, dep = desired(ns, name=f"d{d}", replicas=draw(st.integers(0, 12)), cpu=cpu,
                               strategy=draw(st.sampled_from(["spread", "binpack"])))
            want[key] = dep
    return want, world(node_list)


@settings(max_examples=200, deadline=None)
@given(contended(), st.integers(0, 2**32))
def test_contending_namespaces_end_within_one_task_of_each_other(w, seed):
    want, obs = w
    plan = reconcile(want, obs, 0.0, random.Random(seed))
    tasks = Counter(want[p.deployment].namespace for p in plan.places)
    short = {want[p.deployment].namespace for p in plan.pending}
    if short == {"team-a", "team-b"}:  # both wanted more than they got: the cluster is full
        assert abs(tasks["team-a"] - tasks["team-b"]) <= 1, plan


quota_st = st.builds(
    Quota,
    cpu=st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
    memory=st.one_of(st.none(), st.sampled_from([256 * MI, GI])),
    tasks=st.one_of(st.none(), st.integers(0, 6)),
)
deployment_st = st.builds(
    lambda ns, i, replicas, cpu, priority, strategy: desired(ns, name=f"d{i}", replicas=replicas, cpu=cpu, priority=priority, strategy=strategy),
    st.sampled_from(["team-a", "team-b", "team-c"]), st.integers(0, 2), st.integers(0, 8),
    st.sampled_from([0.25, 0.5, 1.0]), st.sampled_from([0, 0, 3]), st.sampled_from(["spread", "binpack"]),
)


@st.composite
def quota_worlds(draw):
    node_list = [
        node(f"n{i}", cpu=draw(st.sampled_from([1.0, 2.0, 4.0])), status=draw(st.sampled_from([NodeStatus.READY] * 4 + [NodeStatus.DOWN])),
             cordoned=draw(st.integers(0, 5)) == 0)
        for i in range(draw(st.integers(0, 4)))
    ]
    want = dict(draw(st.lists(deployment_st, max_size=5)))
    tasks = []
    node_ids = [n.node_id for n in node_list] + ["gone"]
    for key, dep in want.items():
        for k in range(draw(st.integers(0, dep.spec.replicas + 1))):
            tasks.append(task(f"{key}-{k}", draw(st.sampled_from(node_ids)), dep, created_at=float(k)))
    quotas = draw(st.dictionaries(st.sampled_from(["team-a", "team-b", "team-c"]), quota_st))
    return want, world(node_list, *tasks), quotas


def _steady_usage(want, tasks, extra_places=()):
    """Per namespace (cpu, memory, tasks): min(replicas, held) of each deployment, as quotas count."""
    held = Counter(t.deployment for t in tasks if t.deployment in want and t.spec_hash == want[t.deployment].spec_hash)
    held.update(p.deployment for p in extra_places)
    usage: dict[str, list[float]] = {}
    for key, dep in want.items():
        n = min(held[key], dep.spec.replicas)
        used = usage.setdefault(dep.namespace, [0.0, 0, 0])
        used[0] += n * dep.spec.resources.cpu
        used[1] += n * dep.spec.resources.memory
        used[2] += n
    return usage


@settings(max_examples=300, deadline=None)
@given(quota_worlds(), st.integers(0, 2**32))
def test_placements_never_take_a_namespace_past_its_quota(w, seed):
    want, obs, quotas = w
    plan = reconcile(want, obs, 0.0, random.Random(seed), namespaces=quotas)
    stopped = {s.task_id for s in plan.stops}
    before = _steady_usage(want, obs.tasks.values())
    after = _steady_usage(want, [t for t in obs.tasks.values() if t.task_id not in stopped], plan.places)
    for ns, quota in quotas.items():
        if ns not in after:
            continue
        for bound, was, now in zip((quota.cpu, quota.memory, quota.tasks), before[ns], after[ns]):
            if bound is not None:
                # Never raised past the bound; what already ran over a lowered quota may stay.
                assert now <= max(bound, was) + 1e-9, (ns, quota, before[ns], after[ns], plan)


@settings(max_examples=200, deadline=None)
@given(quota_worlds(), st.integers(0, 2**32))
def test_with_quotas_still_deterministic_and_feasible(w, seed):
    want, obs, quotas = w
    plan = reconcile(want, obs, 0.0, random.Random(seed), namespaces=quotas)
    assert plan == reconcile(want, obs, 0.0, random.Random(seed), namespaces=quotas)
    assert_feasible_everywhere(want, obs, plan)
