"""Table tests for every placement filter and scorer, for the Placer and preemption, and the
fast Placer against the full-scan reference under Hypothesis."""

from __future__ import annotations

from collections import Counter
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import Constraint, Placement
from comp_scheduler.model import Node, NodeStatus, Taint
from dataclasses import replace

from comp_scheduler.placement import (
    NodeSchedulable,
    STRATEGIES,
    FitsCpu,
    FitsMemory,
    FullScanPlacer,
    HostPortsFree,
    LabelAffinity,
    LabelConstraint,
    LeastAllocated,
    MaxPerNode,
    MostAllocated,
    NodeReady,
    NodeUsage,
    Placer,
    ReplicaAntiAffinity,
    Request,
    Resident,
    Spread,
    TaintToleration,
    TopologySpread,
    Usage,
    explain_rejections,
    filters_for,
    victims_needed,
)

MI = 1024**2
GPU = Taint("dedicated", "gpu")
SPOT = Taint("spot")


def node(node_id="n1", status=NodeStatus.READY, cpu=2.0, memory=1024 * MI, labels=None, taints=()):
    return Node(node_id, status, cpu, memory, MappingProxyType(dict(labels or {})), frozenset(taints))


def req(cpu=0.5, memory=128 * MI, ports=(), deployment="default.web", priority=0, **placement):
    return Request(deployment, cpu, memory, frozenset(ports), Placement.model_validate(placement), priority)


def constraint(**fields):
    return LabelConstraint(Constraint.model_validate(fields))


# ---- filters ----------------------------------------------------------------------------

ZONE_B = {"zone": "b", "disk": "ssd"}

FILTER_CASES = [
    (NodeReady(), node(status=NodeStatus.READY), NodeUsage(), req(), True),
    (NodeReady(), node(status=NodeStatus.DOWN), NodeUsage(), req(), False),
    (NodeSchedulable(), node(), NodeUsage(), req(), True),
    (NodeSchedulable(), replace(node(), cordoned=True), NodeUsage(), req(), False),
    (NodeSchedulable(), replace(node(), cordoned=True, draining=True), NodeUsage(), req(), False),
    (NodeReady(), node(status=NodeStatus.UNKNOWN), NodeUsage(), req(), False),
    (FitsCpu(), node(cpu=2.0), NodeUsage(cpu=1.5), req(cpu=0.5), True),  # exactly full
    (FitsCpu(), node(cpu=2.0), NodeUsage(cpu=1.6), req(cpu=0.5), False),
    (FitsCpu(), node(cpu=1.0), NodeUsage(cpu=0.1 * 9), req(cpu=0.1), True),  # float sums
    (FitsMemory(), node(memory=256 * MI), NodeUsage(memory=128 * MI), req(memory=128 * MI), True),
    (FitsMemory(), node(memory=256 * MI), NodeUsage(memory=129 * MI), req(memory=128 * MI), False),
    (HostPortsFree(), node(), NodeUsage(host_ports={(8080, "tcp")}), req(ports=[(8080, "tcp")]), False),
    (HostPortsFree(), node(), NodeUsage(host_ports={(8080, "udp")}), req(ports=[(8080, "tcp")]), True),
    (HostPortsFree(), node(), NodeUsage(host_ports={(8080, "tcp")}), req(), True),
    (constraint(label="zone", value="b"), node(labels=ZONE_B), NodeUsage(), req(), True),
    (constraint(label="zone", value="a"), node(labels=ZONE_B), NodeUsage(), req(), False),
    (constraint(label="zone", value="a"), node(), NodeUsage(), req(), False),  # no label
    (constraint(label="zone", op="!=", value="a"), node(labels=ZONE_B), NodeUsage(), req(), True),
    (constraint(label="zone", op="!=", value="b"), node(labels=ZONE_B), NodeUsage(), req(), False),
    (constraint(label="zone", op="in", values=["a", "b"]), node(labels=ZONE_B), NodeUsage(), req(), True),
    (constraint(label="zone", op="in", values=["a", "c"]), node(labels=ZONE_B), NodeUsage(), req(), False),
    (constraint(label="zone", op="not_in", values=["a", "c"]), node(labels=ZONE_B), NodeUsage(), req(), True),
    (constraint(label="zone", op="not_in", values=["b"]), node(labels=ZONE_B), NodeUsage(), req(), False),
    (constraint(label="disk", op="exists"), node(labels=ZONE_B), NodeUsage(), req(), True),
    (constraint(label="disk", op="exists"), node(), NodeUsage(), req(), False),
    (constraint(label="gpu", op="not_exists"), node(labels=ZONE_B), NodeUsage(), req(), True),
    (constraint(label="gpu", op="not_exists"), node(labels={"gpu": "a100"}), NodeUsage(), req(), False),
    (TaintToleration(GPU), node(), NodeUsage(), req(), True),  # node without the taint
    (TaintToleration(GPU), node(taints=[GPU]), NodeUsage(), req(), False),
    (TaintToleration(GPU), node(taints=[GPU]), NodeUsage(), req(tolerations=[{"key": "dedicated", "value": "gpu"}]), True),
    (TaintToleration(GPU), node(taints=[GPU]), NodeUsage(), req(tolerations=[{"key": "dedicated"}]), True),
    (TaintToleration(GPU), node(taints=[GPU]), NodeUsage(), req(tolerations=[{"key": "dedicated", "value": "batch"}]), False),
    (TaintToleration(GPU), node(taints=[GPU, SPOT]), NodeUsage(), req(tolerations=[{"key": "dedicated"}]), True),  # one taint each
    (MaxPerNode(2), node(), NodeUsage(per_deployment=Counter({"default.web": 1})), req(), True),
    (MaxPerNode(2), node(), NodeUsage(per_deployment=Counter({"default.web": 2})), req(), False),
    (MaxPerNode(1), node(), NodeUsage(per_deployment=Counter({"default.other": 3})), req(), True),
]


@pytest.mark.parametrize("filt, n, usage, request_, feasible", FILTER_CASES)
def test_filters(filt, n, usage, request_, feasible):
    assert filt.feasible(n, usage, request_) is feasible
    # The batch form the fast placer uses gives the same answer.
    assert filt.feasible_all([n, n], [usage, usage], request_) == [feasible, feasible]
    assert filt.name and filt.reason


@pytest.mark.parametrize(
    "filt, reason",
    [
        (NodeReady(), "node not ready"),
        (FitsCpu(), "insufficient cpu"),
        (FitsMemory(), "insufficient memory"),
        (HostPortsFree(), "host port in use"),
        (constraint(label="zone", value="b"), "constraint zone=b"),
        (constraint(label="zone", op="in", values=["a", "b"]), "constraint zone in (a, b)"),
        (constraint(label="gpu", op="exists"), "constraint gpu exists"),
        (TaintToleration(GPU), "untolerated taint dedicated=gpu:NoSchedule"),
        (TaintToleration(SPOT), "untolerated taint spot:NoSchedule"),
        (MaxPerNode(2), "max_per_node 2 reached"),
    ],
)
def test_filter_reasons_are_constant_per_instance(filt, reason):
    assert filt.reason == reason


def test_filters_for_a_request_in_order():
    request = req(ports=[(80, "tcp")], constraints=[{"label": "zone", "value": "b"}], max_per_node=1)
    names = [f.name for f in filters_for(request, [SPOT, GPU])]
    assert names == ["node-ready", "node-schedulable", "constraint", "taint-toleration", "taint-toleration", "fits-cpu", "fits-memory", "host-ports-free", "max-per-node"]
    assert [f.reason for f in filters_for(request, [SPOT, GPU]) if f.name == "taint-toleration"] == [
        "untolerated taint dedicated=gpu:NoSchedule", "untolerated taint spot:NoSchedule",
    ]
    # Without host ports the port filter would never reject: it is left out.
    assert "host-ports-free" not in [f.name for f in filters_for(req())]
    assert all(f.static for f in filters_for(request, [GPU])[:4]) and not any(f.static for f in filters_for(request)[3:])


# ---- scorers ----------------------------------------------------------------------------

WEB_1 = Counter({"default.web": 1})

SCORER_CASES = [
    (Spread(), node(), NodeUsage(), req(), 1.0),
    (Spread(), node(), NodeUsage(per_deployment=WEB_1), req(), 0.5),
    (Spread(), node(), NodeUsage(per_deployment=Counter({"default.web": 3})), req(), 0.25),
    (Spread(), node(), NodeUsage(per_deployment=Counter({"default.other": 3})), req(), 1.0),
    (ReplicaAntiAffinity(), node(), NodeUsage(), req(), 1.0),
    (ReplicaAntiAffinity(), node(), NodeUsage(per_deployment=WEB_1), req(), 0.0),
    (ReplicaAntiAffinity(), node(), NodeUsage(per_deployment=Counter({"default.other": 1})), req(), 1.0),
    (LeastAllocated(), node(), NodeUsage(), req(cpu=1.0, memory=512 * MI), 0.5),
    (LeastAllocated(), node(), NodeUsage(cpu=1.0, memory=512 * MI), req(cpu=1.0, memory=512 * MI), 0.0),
    (LeastAllocated(), node(), NodeUsage(), req(cpu=0.0, memory=0), 1.0),
    (LeastAllocated(), node(), NodeUsage(cpu=0.5), req(cpu=0.5, memory=0), 0.75),
    (LeastAllocated(), node(cpu=0.0, memory=0), NodeUsage(), req(), 0.0),  # no capacity: never preferred
    (MostAllocated(), node(), NodeUsage(), req(cpu=1.0, memory=512 * MI), 0.5),
    (MostAllocated(), node(), NodeUsage(cpu=1.0, memory=512 * MI), req(cpu=1.0, memory=512 * MI), 1.0),
    (MostAllocated(), node(), NodeUsage(), req(cpu=0.0, memory=0), 0.0),
    (MostAllocated(), node(), NodeUsage(cpu=0.5), req(cpu=0.5, memory=0), 0.25),
    (MostAllocated(), node(cpu=0.0, memory=0), NodeUsage(), req(), 1.0),
    (LabelAffinity(), node(labels=ZONE_B), NodeUsage(), req(affinity=[{"label": "disk", "value": "ssd"}]), 1.0),
    (LabelAffinity(), node(labels=ZONE_B), NodeUsage(), req(affinity=[{"label": "disk", "value": "hdd"}]), 0.0),
    (
        LabelAffinity(),
        node(labels=ZONE_B),
        NodeUsage(),
        req(affinity=[{"label": "disk", "value": "ssd", "weight": 3}, {"label": "zone", "value": "a", "weight": 1}]),
        0.75,
    ),
    (
        LabelAffinity(),
        node(labels=ZONE_B),
        NodeUsage(),
        req(affinity=[{"label": "zone", "op": "in", "values": ["b", "c"], "weight": 1}, {"label": "gpu", "op": "exists", "weight": 1}]),
        0.5,
    ),
]


@pytest.mark.parametrize("scorer, n, usage, request_, expected", SCORER_CASES)
def test_scorers(scorer, n, usage, request_, expected):
    assert scorer.score(n, usage, request_) == pytest.approx(expected)
    # The batch form the fast placer uses gives exactly the same floats.
    assert scorer.score_all([n, n], [usage, usage], request_) == [scorer.score(n, usage, request_)] * 2
    assert scorer.name and scorer.weight > 0


@pytest.mark.parametrize(
    "count, least, expected",
    [(0, 0, 1.0), (1, 1, 1.0), (1, 0, 0.5), (3, 0, 0.25), (5, 2, 0.25)],
)
def test_topology_spread(count, least, expected):
    assert TopologySpread().score(count, least) == pytest.approx(expected)


@pytest.mark.parametrize(
    "scorer, request_, applies",
    [
        (LabelAffinity(), req(), False),
        (LabelAffinity(), req(affinity=[{"label": "disk", "value": "ssd"}]), True),
        (TopologySpread(), req(), False),
        (TopologySpread(), req(spread_by="zone"), True),
        (Spread(), req(), True),
        (MostAllocated(), req(), True),
    ],
)
def test_scorers_apply_only_with_something_to_say(scorer, request_, applies):
    assert scorer.applies(request_) is applies


def test_strategies_registry():
    assert {name: [s.name for s in strategy.scorers] for name, strategy in STRATEGIES.items()} == {
        "spread": ["spread", "least-allocated", "affinity"],
        "binpack": ["binpack", "anti-affinity", "affinity"],
    }
    with pytest.raises(ValueError, match="unknown placement strategy 'pack'"):
        Placer([], Usage(), "pack")


# ---- the Placer ---------------------------------------------------------------------------


def test_placer_spreads_replicas_over_nodes():
    placer = Placer([node("a"), node("b"), node("c")], Usage())
    chosen = [placer.place(req()).node_id for _ in range(6)]
    assert Counter(chosen) == {"a": 2, "b": 2, "c": 2}


def test_placer_prefers_emptier_node_for_a_new_deployment():
    usage = Usage()
    usage.add("a", req(cpu=1.5, deployment="default.other"))
    placer = Placer([node("a"), node("b")], usage)
    decision = placer.place(req())
    assert decision.node_id == "b"
    assert "best of 2 feasible nodes" in decision.reason and "spread 1.00" in decision.reason
    assert dict(decision.parts) == {"spread": 1.0, "least-allocated": pytest.approx(0.8125)}


def test_placer_records_what_it_placed_so_capacity_runs_out():
    placer = Placer([node("a", cpu=1.0)], Usage())
    assert [placer.place(req(cpu=0.5)).node_id for _ in range(3)] == ["a", "a", None]


def test_placer_explains_each_rejection_class():
    nodes = [node("a", cpu=0.1), node("b", memory=64 * MI), node("c", memory=64 * MI), node("d", status=NodeStatus.DOWN)]
    decision = Placer(nodes, Usage()).place(req())
    assert decision.node_id is None
    assert decision.reason == "no feasible node (2 nodes: insufficient memory; 1 node: insufficient cpu; 1 node: node not ready)"
    assert decision.rejections == (("insufficient memory", 2), ("insufficient cpu", 1), ("node not ready", 1))


def test_placer_explains_constraints_and_taints():
    nodes = [
        node("a1", labels={"zone": "a"}),
        node("a2", labels={"zone": "a"}),
        node("a3", labels={"zone": "a"}),
        node("b1", labels={"zone": "b"}, memory=64 * MI),
        node("b2", labels={"zone": "b"}, taints=[GPU]),
        node("c1", labels={"zone": "c"}),
    ]
    decision = Placer(nodes, Usage()).place(req(constraints=[{"label": "zone", "op": "!=", "value": "a"}, {"label": "zone", "value": "b"}]))
    assert decision.reason == (
        "no feasible node (3 nodes: constraint zone!=a; 1 node: constraint zone=b; "
        "1 node: insufficient memory; 1 node: untolerated taint dedicated=gpu:NoSchedule)"
    )


def test_placer_host_port_conflict_forces_another_node():
    placer = Placer([node("a"), node("b")], Usage())
    first = placer.place(req(ports=[(80, "tcp")]))
    second = placer.place(req(ports=[(80, "tcp")]))
    third = placer.place(req(ports=[(80, "tcp")]))
    assert {first.node_id, second.node_id} == {"a", "b"}
    assert third.node_id is None and "host port in use" in third.reason


def test_constraints_keep_replicas_to_matching_nodes():
    nodes = [node(f"{z}{i}", labels={"zone": z}) for z in "abc" for i in range(3)]
    placer = Placer(nodes, Usage())
    chosen = [placer.place(req(constraints=[{"label": "zone", "op": "in", "values": ["a", "c"]}])).node_id for _ in range(6)]
    assert sorted(chosen) == ["a0", "a1", "a2", "c0", "c1", "c2"]


def test_tainted_nodes_only_for_tolerating_deployments():
    nodes = [node("plain"), node("gpu", taints=[GPU], cpu=8.0)]
    placer = Placer(nodes, Usage())
    assert [placer.place(req(deployment="a")).node_id for _ in range(2)] == ["plain", "plain"]
    tolerant = req(deployment="b", tolerations=[{"key": "dedicated"}])
    assert placer.place(tolerant).node_id == "gpu"  # the emptier node, now allowed


def test_spread_by_zone_balances_zones_not_nodes():
    # Zone a has four nodes, zone b one: per-node spread alone would put 4 of 5 in a.
    nodes = [node(f"a{i}", labels={"zone": "a"}) for i in range(4)] + [node("b0", labels={"zone": "b"})]
    placer = Placer(nodes, Usage())
    chosen = [placer.place(req(spread_by="zone")).node_id for _ in range(4)]
    assert Counter(n[0] for n in chosen) == {"a": 2, "b": 2}


def test_spread_by_zone_counts_replicas_already_running():
    nodes = [node("a0", labels={"zone": "a"}), node("b0", labels={"zone": "b"}), node("b1", labels={"zone": "b"})]
    usage = Usage()
    usage.add("a0", req())
    usage.add("a0", req())
    placer = Placer(nodes, usage)
    assert [placer.place(req(spread_by="zone")).node_id for _ in range(2)] == ["b0", "b1"]


def test_nodes_without_the_spread_label_come_last():
    nodes = [node("bare"), node("a0", labels={"zone": "a"}, cpu=1.0)]
    placer = Placer(nodes, Usage())
    decision = placer.place(req(spread_by="zone"))
    assert decision.node_id == "a0" and ("topology-spread", 1.0) in decision.parts
    assert placer.place(req(spread_by="zone")).node_id == "a0"  # 2 replicas in one zone still beat no zone
    assert placer.place(req(spread_by="zone")).node_id == "bare"  # a0 is full


def test_binpack_fills_a_node_before_the_next():
    nodes = [node("a"), node("b"), node("c", cpu=1.0)]
    placer = Placer(nodes, Usage())
    chosen = [placer.place(req(deployment=f"d{i}", strategy="binpack")).node_id for i in range(4)]
    assert chosen == ["c", "c", "a", "a"]


def test_binpack_keeps_replicas_of_one_deployment_apart_while_it_can():
    placer = Placer([node("a"), node("b")], Usage())
    chosen = [placer.place(req(strategy="binpack")).node_id for _ in range(3)]
    assert sorted(chosen[:2]) == ["a", "b"]


def test_cluster_default_strategy_applies_when_the_deployment_names_none():
    nodes = [node("a"), node("b")]
    spread = Placer(nodes, Usage(), "spread")
    binpack = Placer(nodes, Usage(), "binpack")
    assert [spread.place(req(deployment=f"d{i}")).node_id for i in range(2)] == ["a", "b"]
    assert [binpack.place(req(deployment=f"d{i}")).node_id for i in range(2)] == ["a", "a"]
    # The deployment's own choice wins over the default.
    assert Placer(nodes, Usage(), "binpack").place(req(strategy="spread")).reason.count("least-allocated") == 1


def test_affinity_is_a_preference_not_a_rule():
    nodes = [node("hdd", labels={"disk": "hdd"}), node("ssd", labels={"disk": "ssd"}, cpu=1.0)]
    placer = Placer(nodes, Usage())
    prefer_ssd = req(affinity=[{"label": "disk", "value": "ssd", "weight": 5}], cpu=0.5)
    assert [placer.place(prefer_ssd).node_id for _ in range(3)] == ["ssd", "hdd", "ssd"]
    assert placer.place(prefer_ssd).node_id == "hdd"  # ssd is full: the preference yields


def test_max_per_node_is_a_rule():
    placer = Placer([node("a", cpu=8.0), node("b", cpu=8.0)], Usage())
    request = req(max_per_node=1)
    assert sorted(placer.place(request).node_id for _ in range(2)) == ["a", "b"]
    refused = placer.place(request)
    assert refused.node_id is None and refused.reason == "no feasible node (2 nodes: max_per_node 1 reached)"


def test_explain_with_no_nodes():
    assert explain_rejections(Counter(), 0) == "no nodes in the cluster"
    assert Placer([], Usage()).place(req()).reason == "no nodes in the cluster"


# ---- preemption ---------------------------------------------------------------------------


def resident(task_id, priority, cpu=0.5, memory=128 * MI, ports=(), deployment=None):
    return Resident(task_id, req(cpu=cpu, memory=memory, ports=ports, priority=priority, deployment=deployment or f"default.p{priority}"))


def loaded(n, *residents):
    usage = NodeUsage()
    for r in residents:
        usage.cpu += r.request.cpu
        usage.memory += r.request.memory
        usage.host_ports |= r.request.host_ports
        usage.per_deployment[r.request.deployment] += 1
    return usage


@pytest.mark.parametrize(
    "case, residents, request_, victims",
    [
        ("room already: nothing to stop", [resident("t1", 0)], req(cpu=1.0, priority=5), None),
        ("stop one low", [resident("t1", 0, cpu=1.0), resident("t2", 0, cpu=1.0)], req(cpu=1.0, priority=5), ["t1"]),
        (
            "lowest priority first",
            [resident("mid", 3, cpu=1.0), resident("low", 1, cpu=1.0)],
            req(cpu=1.0, priority=5),
            ["low"],
        ),
        (
            "one large before two small of a priority",
            [resident("s1", 0, cpu=0.5), resident("s2", 0, cpu=0.5), resident("big", 0, cpu=1.0)],
            req(cpu=1.0, priority=5),
            ["big"],
        ),
        (
            "a victim not needed after all is spared",
            # Lowest first takes tiny (0.25) then big (1.0); tiny alone is no use, so it is spared.
            [resident("tiny", 0, cpu=0.25), resident("big", 1, cpu=1.0), resident("rest", 9, cpu=0.75)],
            req(cpu=1.0, priority=5),
            ["big"],
        ),
        ("never equal priority", [resident("t1", 5, cpu=1.0), resident("t2", 5, cpu=1.0)], req(cpu=1.0, priority=5), None),
        ("never higher priority", [resident("t1", 9, cpu=2.0)], req(cpu=1.0, priority=5), None),
        (
            "not enough even with all lower stopped",
            [resident("low", 0, cpu=0.5), resident("high", 9, cpu=1.5)],
            req(cpu=1.0, priority=5),
            None,
        ),
        (
            "the holder of a wanted host port",
            [resident("port", 0, cpu=0.1, ports=[(80, "tcp")]), resident("big", 0, cpu=0.1)],
            req(cpu=0.1, ports=[(80, "tcp")], priority=5),
            ["port"],
        ),
        (
            "a higher-priority port holder cannot be moved",
            [resident("port", 9, cpu=0.1, ports=[(80, "tcp")]), resident("low", 0, cpu=1.9)],
            req(cpu=0.1, ports=[(80, "tcp")], priority=5),
            None,
        ),
        (
            "memory as well as cpu",
            [resident("m", 0, cpu=0.1, memory=900 * MI), resident("c", 0, cpu=1.0, memory=10 * MI)],
            req(cpu=0.1, memory=200 * MI, priority=5),
            ["m"],
        ),
    ],
)
def test_victims_needed(case, residents, request_, victims):
    n = node(cpu=2.0, memory=1024 * MI)
    found = victims_needed(n, loaded(n, *residents), request_, residents)
    assert (None if found is None else sorted(v.task_id for v in found)) == victims, case
    if found:
        assert all(v.request.priority < request_.priority for v in found)


def test_victims_needed_respects_max_per_node():
    n = node()
    residents = [resident("own", 5, cpu=1.0, deployment="default.web"), resident("low", 0, cpu=1.0)]
    assert victims_needed(n, loaded(n, *residents), req(cpu=1.0, priority=5, max_per_node=1), residents) is None


def _world_for_preemption():
    nodes = [node("a", cpu=2.0), node("b", cpu=2.0), node("c", cpu=2.0, labels={"zone": "x"})]
    usage = Usage()
    residents: dict[str, dict[str, Resident]] = {}
    for node_id, tasks in {
        "a": [resident("a-low", 0, cpu=1.0), resident("a-low2", 0, cpu=1.0)],  # two to stop
        "b": [resident("b-low", 0, cpu=0.5), resident("b-mid", 3, cpu=1.5)],  # one to stop, but priority 3
        "c": [resident("c-low", 1, cpu=2.0)],  # one to stop, priority 1
    }.items():
        for r in tasks:
            usage.add(node_id, r.request)
            residents.setdefault(node_id, {})[r.task_id] = r
    return nodes, usage, residents


def test_preemption_picks_the_node_with_the_fewest_and_lowest_victims():
    nodes, usage, residents = _world_for_preemption()
    session = Placer(nodes, usage).session(req(cpu=2.0, priority=5, deployment="default.vip"))
    assert session.place().node_id is None
    preemption = session.preempt(residents)
    assert preemption is not None
    assert preemption.decision.node_id == "c"  # one victim of priority 1 beats one of priority 3 (b) and two (a)
    assert [v.task_id for v in preemption.victims] == ["c-low"]
    assert preemption.decision.reason == "preempting 1 lower-priority task on c (priority 5 > 1)"
    assert usage.of("c").cpu == pytest.approx(2.0) and usage.of("c").per_deployment == {"default.vip": 1}


def test_preemption_honours_constraints():
    nodes, usage, residents = _world_for_preemption()
    # Without the constraint c would do with one victim; a is the best of the nodes allowed.
    session = Placer(nodes, usage).session(req(cpu=2.0, priority=5, constraints=[{"label": "zone", "op": "not_exists"}]))
    assert session.place().node_id is None
    preemption = session.preempt(residents)
    assert preemption is not None and preemption.decision.node_id == "a"
    assert sorted(v.task_id for v in preemption.victims) == ["a-low", "a-low2"]
    assert preemption.decision.reason == "preempting 2 lower-priority tasks on a (priority 5 > 0)"


def test_preemption_again_and_again_as_nodes_change():
    nodes, usage, residents = _world_for_preemption()
    session = Placer(nodes, usage).session(req(cpu=1.0, priority=5, deployment="default.vip"))
    steps = []
    for _ in range(7):
        decision = session.place()
        if decision.node_id is not None:
            steps.append((decision.node_id, "placed"))
            continue
        preemption = session.preempt(residents)
        if preemption is None:
            steps.append((None, decision.reason))
            break
        node_id = preemption.decision.node_id
        for victim in preemption.victims:
            del residents[node_id][victim.task_id]
        steps.append((node_id, [v.task_id for v in preemption.victims]))
        assert "best of -" not in preemption.decision.reason
    assert steps == [
        ("a", ["a-low"]),  # one victim of priority 0
        ("a", ["a-low2"]),
        ("c", ["c-low"]),  # one of priority 1, before b's one of priority 3
        ("c", "placed"),  # c-low freed two cores
        ("b", ["b-mid"]),  # b-low alone (0.5) would not do, and with b-mid it is not needed
        ("b", ["b-low"]),
        (None, "no feasible node (3 nodes: insufficient cpu)"),
    ]


# ---- the fast Placer agrees with the full scan ----------------------------------------------

label_st = st.fixed_dictionaries({"zone": st.sampled_from("abc")}, optional={"disk": st.sampled_from(["ssd", "hdd"])})
node_st = st.builds(
    lambda i, status, cpu, mem, labels, tainted: node(
        f"n{i:02d}", status, cpu, mem * 128 * MI, labels, [GPU] if tainted else []
    ),
    st.integers(0, 30),
    st.sampled_from([NodeStatus.READY] * 4 + [NodeStatus.DOWN, NodeStatus.UNKNOWN]),
    st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    st.integers(1, 16),
    label_st,
    st.booleans(),
)
constraint_st = st.sampled_from(
    [
        {"label": "zone", "value": "a"},
        {"label": "zone", "op": "!=", "value": "b"},
        {"label": "zone", "op": "in", "values": ["a", "c"]},
        {"label": "disk", "op": "exists"},
        {"label": "disk", "op": "not_in", "values": ["hdd"]},
    ]
)
request_st = st.builds(
    lambda d, cpu, mem, port, constraints, tolerate, spread_by, strategy, affinity, max_per_node: req(
        deployment=f"default.d{d}",
        cpu=cpu,
        memory=mem * 64 * MI,
        ports=[(8080, "tcp")] if port else [],
        constraints=constraints,
        tolerations=[{"key": "dedicated"}] if tolerate else [],
        spread_by=spread_by,
        strategy=strategy,
        affinity=[{"label": "disk", "value": "ssd", "weight": 3}] if affinity else [],
        max_per_node=max_per_node,
    ),
    st.integers(0, 3),
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    st.integers(1, 8),
    st.booleans(),
    st.lists(constraint_st, max_size=2),
    st.booleans(),
    st.sampled_from([None, "zone", "disk"]),
    st.sampled_from([None, "spread", "binpack"]),
    st.booleans(),
    st.sampled_from([None, 1, 2]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(node_st, max_size=14, unique_by=lambda n: n.node_id),
    st.lists(st.tuples(request_st, st.integers(1, 8)), max_size=5),
    st.sampled_from(["spread", "binpack"]),
)
def test_fast_placer_chooses_as_well_as_a_full_scan(nodes, work, default):
    """At every step the chosen node scores what the best node in a full scan scores, the
    feasible counts agree, and when nothing fits the explanations are the same."""
    usage = Usage()
    placer = Placer(nodes, usage, default)
    reference = FullScanPlacer(nodes, usage, default)  # reads the same ledger, never writes it
    for request, replicas in work:
        session = placer.session(request)
        for _ in range(replicas):
            expected = reference.evaluate(request)
            decision = session.place()
            if expected.node_id is None:
                assert decision.node_id is None
                assert (decision.reason, decision.rejections) == (expected.reason, expected.rejections)
                break
            assert decision.node_id is not None
            assert decision.score == pytest.approx(expected.score, abs=1e-9)
            assert decision.reason.split(" (")[0] == expected.reason.split(" (")[0]  # "best of N feasible nodes"
            # The chosen node really scores that: re-score it alone, on the ledger before it.
            usage.remove(decision.node_id, request)
            alone = FullScanPlacer([n for n in nodes if n.node_id == decision.node_id], usage, default).evaluate(request)
            usage.add(decision.node_id, request)
            if not request.placement.spread_by:  # topology needs every node's counts
                assert alone.score == pytest.approx(decision.score, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(node_st, max_size=14, unique_by=lambda n: n.node_id),
    st.lists(st.tuples(request_st, st.integers(1, 8)), max_size=4),
    st.sampled_from(["spread", "binpack"]),
)
def test_interleaved_sessions_choose_as_well_as_a_full_scan(nodes, work, default):
    """Sessions taking turns a placement at a time (as reconcile does across namespaces):
    each still sees what the others placed, so every choice matches a full scan."""
    usage = Usage()
    placer = Placer(nodes, usage, default)
    reference = FullScanPlacer(nodes, usage, default)
    # One session per deployment, as in reconcile.
    requests = [replace(request, deployment=f"default.i{i}") for i, (request, _) in enumerate(work)]
    sessions = [placer.session(request) for request in requests]
    left = [replicas for _, replicas in work]
    while any(left):
        for i, session in enumerate(sessions):
            if not left[i]:
                continue
            expected = reference.evaluate(requests[i])
            decision = session.place()
            if expected.node_id is None:
                assert decision.node_id is None
                assert (decision.reason, decision.rejections) == (expected.reason, expected.rejections)
                left[i] = 0
                continue
            assert decision.score == pytest.approx(expected.score, abs=1e-9)
            assert decision.reason.split(" (")[0] == expected.reason.split(" (")[0]
            left[i] -= 1


def test_place_at_and_feasible_nodes():
    usage = Usage()
    placer = Placer([node("a", cpu=1.0), node("b", cpu=1.0)], usage)
    session = placer.session(req(cpu=1.0))
    assert sorted(placer.nodes[i].node_id for _, i in session.feasible_nodes()) == ["a", "b"]
    assert session.place_at(placer.index_of["b"]).node_id == "b"
    assert [placer.nodes[i].node_id for _, i in session.feasible_nodes()] == ["a"]
    # Another session placing on a is seen by this one.
    placer.session(req(cpu=1.0, deployment="default.other")).place()
    assert session.feasible_nodes() == []
    assert session.place().node_id is None


def test_a_port_held_twice_is_freed_only_when_both_holders_go():
    # Two tasks on one host port (a world earlier rounds left behind): one going frees nothing.
    usage = Usage()
    low = req(ports=[(8080, "tcp")], deployment="default.low")
    mine = req(ports=[(8080, "tcp")], deployment="default.vip", priority=5)
    usage.add("a", low)
    usage.add("a", replace(mine, priority=0, deployment="default.other"))
    assert victims_needed(node("a", cpu=8.0), usage.of("a"), mine, [Resident("t-low", low)]) is None
    usage.remove("a", low)
    assert (8080, "tcp") in usage.of("a").host_ports
    usage.remove("a", replace(mine, priority=0, deployment="default.other"))
    assert usage.of("a").host_ports == set()
