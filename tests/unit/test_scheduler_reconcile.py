"""reconcile() as tables, and its properties under Hypothesis."""

from __future__ import annotations

import random
from collections import Counter
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import DeploymentSpec
from comp_common.messages import TaskState
from comp_scheduler.model import Desired, Node, NodeStatus, Observed, Task
from comp_scheduler.placement import DEFAULT_FILTERS, Request, Usage
from comp_scheduler.reconcile import node_status, reconcile

MI = 1024**2


def desired(name="web", replicas=3, image="img:1", cpu=0.5, memory="128Mi", ports=(), namespace="default"):
    spec = DeploymentSpec(
        replicas=replicas,
        image=image,
        resources={"cpu": cpu, "memory": memory},
        ports=[{"container_port": c, "host_port": h} for c, h in ports],
    )
    key = f"{namespace}.{name}"
    return key, Desired(key=key, name=name, spec=spec, spec_hash=spec.task_hash())


def nodes(*ids, status=NodeStatus.READY, cpu=4.0, memory=4096 * MI):
    return {i: Node(i, status, cpu, memory) for i in ids}


def task(task_id, node_id, want: Desired, state=TaskState.RUNNING, created_at=0.0, spec_hash=None):
    return Task(
        task_id=task_id,
        deployment=want.key,
        node_id=node_id,
        spec_hash=spec_hash or want.spec_hash,
        cpu=want.spec.resources.cpu,
        memory=want.spec.resources.memory,
        host_ports=want.host_ports,
        created_at=created_at,
        state=state,
    )


def observed(node_map, *tasks):
    return Observed(MappingProxyType(node_map), MappingProxyType({t.task_id: t for t in tasks}))


KEY, WEB = desired()
_, WEB_V2 = desired(image="img:2")
_, WEB_1 = desired(replicas=1)
_, WEB_0 = desired(replicas=0)


@pytest.mark.parametrize(
    "case, want, obs, places, stops, stop_reason, pending",
    [
        ("fresh deploy places all", {KEY: WEB}, observed(nodes("a", "b")), 3, [], None, None),
        ("converged does nothing", {KEY: WEB}, observed(nodes("a"), task("t1", "a", WEB), task("t2", "a", WEB), task("t3", "a", WEB)), 0, [], None, None),
        ("one missing is placed", {KEY: WEB}, observed(nodes("a"), task("t1", "a", WEB), task("t2", "a", WEB)), 1, [], None, None),
        ("scale down stops newest", {KEY: WEB_1}, observed(nodes("a"), task("t1", "a", WEB, created_at=1), task("t2", "a", WEB, created_at=2)), 0, ["t2"], "scaled down to 1", None),
        ("scale down stops failed before running", {KEY: WEB_1}, observed(nodes("a"), task("t1", "a", WEB, state=TaskState.FAILED, created_at=1), task("t2", "a", WEB, created_at=2)), 0, ["t1"], "scaled down to 1", None),
        ("scale to zero", {KEY: WEB_0}, observed(nodes("a"), task("t1", "a", WEB)), 0, ["t1"], "scaled down to 0", None),
        ("deleted deployment stops all", {}, observed(nodes("a"), task("t1", "a", WEB), task("t2", "a", WEB)), 0, ["t1", "t2"], "deployment deleted", None),
        ("task on down node replaced", {KEY: WEB_1}, observed({**nodes("a", status=NodeStatus.DOWN), **nodes("b")}, task("t1", "a", WEB)), 1, ["t1"], "node a is down; replaced by web-", None),
        ("task on down node kept while nothing can replace it", {KEY: WEB_1}, observed(nodes("a", status=NodeStatus.DOWN), task("t1", "a", WEB)), 0, [], None, "no feasible node (1 node: node not ready); keeping 1 task(s) on down nodes until they can be replaced"),
        ("surplus task on down node stopped", {KEY: WEB_1}, observed({**nodes("a", status=NodeStatus.DOWN), **nodes("b")}, task("t1", "a", WEB), task("t2", "b", WEB)), 0, ["t1"], "node a is down; not needed", None),
        ("task on unknown node kept", {KEY: WEB_1}, observed({**nodes("a", status=NodeStatus.UNKNOWN), **nodes("b")}, task("t1", "a", WEB)), 0, [], None, None),
        ("task on vanished node replaced", {KEY: WEB_1}, observed(nodes("b"), task("t1", "a", WEB)), 1, ["t1"], "node a is down; replaced by web-", None),
        ("spec change replaces", {KEY: WEB_V2}, observed(nodes("a"), task("t1", "a", WEB), task("t2", "a", WEB), task("t3", "a", WEB)), 3, ["t1", "t2", "t3"], "spec changed (generation 1); replacing", None),
        ("no nodes: pending", {KEY: WEB}, observed({}), 0, [], None, "no nodes in the cluster"),
        ("too small: pending with reason", {KEY: WEB}, observed(nodes("a", cpu=1.0)), 2, [], None, "no feasible node (1 node: insufficient cpu)"),
    ],
)
def test_reconcile_table(case, want, obs, places, stops, stop_reason, pending):
    plan = reconcile(want, obs, now=100.0, rng=random.Random(1))
    assert len(plan.places) == places, case
    assert sorted(s.task_id for s in plan.stops) == stops, case
    if stop_reason:
        assert all(s.reason.startswith(stop_reason) for s in plan.stops), case
    if pending:
        assert [p.reason for p in plan.pending] == [pending], case
    else:
        assert plan.pending == (), case


def test_spread_across_nodes():
    plan = reconcile({KEY: desired(replicas=6)[1]}, observed(nodes("a", "b", "c")), 0, random.Random(0))
    assert Counter(p.node_id for p in plan.places) == {"a": 2, "b": 2, "c": 2}


def test_freed_room_is_reused_in_the_same_round():
    small = nodes("a", cpu=1.0)
    key2, other = desired(name="other", replicas=1, cpu=1.0)
    plan = reconcile({key2: other}, observed(small, task("old", "a", WEB)), 0, random.Random(0))
    assert [s.task_id for s in plan.stops] == ["old"]
    assert [p.node_id for p in plan.places] == ["a"]


def test_fixed_host_port_one_per_node():
    key, web = desired(replicas=3, ports=[(8080, 18080)])
    plan = reconcile({key: web}, observed(nodes("a", "b")), 0, random.Random(0))
    assert sorted(p.node_id for p in plan.places) == ["a", "b"]
    assert plan.pending[0].count == 1 and "host port in use" in plan.pending[0].reason


def test_node_status():
    assert node_status(last_heartbeat=9.0, known_since=0, now=10.0, grace=3) is NodeStatus.READY
    assert node_status(last_heartbeat=6.0, known_since=0, now=10.0, grace=3) is NodeStatus.DOWN
    assert node_status(last_heartbeat=None, known_since=8.0, now=10.0, grace=3) is NodeStatus.UNKNOWN
    assert node_status(last_heartbeat=None, known_since=1.0, now=10.0, grace=3) is NodeStatus.DOWN


# ---- properties -----------------------------------------------------------------------------

node_st = st.builds(
    lambda i, status, cpu, mem: Node(f"n{i}", status, cpu, mem * 64 * MI),
    st.integers(0, 7),
    st.sampled_from(list(NodeStatus)),
    st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    st.integers(1, 32),
)
deployment_st = st.builds(
    lambda i, replicas, cpu, mem, image: desired(name=f"d{i}", replicas=replicas, cpu=cpu, memory=f"{mem * 32}Mi", image=image),
    st.integers(0, 4),
    st.integers(0, 12),
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    st.integers(1, 8),
    st.sampled_from(["img:1", "img:2"]),
)


@st.composite
def worlds(draw):
    node_map = {n.node_id: n for n in draw(st.lists(node_st, max_size=6))}
    want = dict(draw(st.lists(deployment_st, max_size=4)))
    old = dict(draw(st.lists(deployment_st, max_size=4)))  # what earlier rounds placed
    tasks = []
    node_ids = sorted(node_map) + ["gone"]
    for j, (key, dep) in enumerate(old.items()):
        for k in range(draw(st.integers(0, 5))):
            tasks.append(task(f"{key}-{j}-{k}", draw(st.sampled_from(node_ids)), dep, created_at=float(k)))
    return want, observed(node_map, *tasks)


def converge(want, obs, seed, rounds=4):
    rng = random.Random(seed)
    tasks = dict(obs.tasks)
    plans = []
    for _ in range(rounds):
        plan = reconcile(want, Observed(obs.nodes, MappingProxyType(dict(tasks))), 0.0, rng)
        plans.append(plan)
        for stop in plan.stops:
            del tasks[stop.task_id]
        for place in plan.places:
            tasks[place.task_id] = task(place.task_id, place.node_id, want[place.deployment], state=TaskState.RUNNING)
    return tasks, plans


@settings(max_examples=300, deadline=None)
@given(worlds(), st.integers(0, 2**32))
def test_converged_never_more_than_desired_and_then_stable(world, seed):
    want, obs = world
    tasks, plans = converge(want, obs, seed)
    per_deployment = Counter(t.deployment for t in tasks.values())
    for key, count in per_deployment.items():
        assert key in want and count <= want[key].spec.replicas
    assert plans[-1].empty  # a converged world plans nothing


@settings(max_examples=300, deadline=None)
@given(worlds(), st.integers(0, 2**32))
def test_never_places_on_an_infeasible_node(world, seed):
    want, obs = world
    plan = reconcile(want, obs, 0.0, random.Random(seed))
    stopped = {s.task_id for s in plan.stops}
    usage = Usage()
    for t in obs.tasks.values():
        if t.task_id not in stopped:
            usage.add(t.node_id, Request(t.deployment, t.cpu, t.memory, t.host_ports))
    for place in plan.places:
        node = obs.nodes[place.node_id]
        d = want[place.deployment]
        request = Request(d.key, d.spec.resources.cpu, d.spec.resources.memory, d.host_ports)
        assert all(f.feasible(node, usage.of(node.node_id), request) for f in DEFAULT_FILTERS)
        usage.add(node.node_id, request)


@settings(max_examples=100, deadline=None)
@given(worlds(), st.integers(0, 2**32))
def test_deterministic_for_a_seed(world, seed):
    want, obs = world
    assert reconcile(want, obs, 0.0, random.Random(seed)) == reconcile(want, obs, 0.0, random.Random(seed))
