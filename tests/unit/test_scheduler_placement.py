"""Table tests for every placement filter and scorer, and for the Placer."""

from __future__ import annotations

from collections import Counter

import pytest

from comp_scheduler.model import Node, NodeStatus
from comp_scheduler.placement import (
    FitsCpu,
    FitsMemory,
    HostPortsFree,
    LeastAllocated,
    NodeReady,
    NodeUsage,
    Placer,
    Request,
    Spread,
    Usage,
    explain_rejections,
)

MI = 1024**2


def node(node_id="n1", status=NodeStatus.READY, cpu=2.0, memory=1024 * MI):
    return Node(node_id=node_id, status=status, cpu=cpu, memory=memory)


def req(cpu=0.5, memory=128 * MI, ports=(), deployment="default.web"):
    return Request(deployment, cpu, memory, frozenset(ports))


@pytest.mark.parametrize(
    "filt, n, usage, request_, feasible",
    [
        (NodeReady(), node(status=NodeStatus.READY), NodeUsage(), req(), True),
        (NodeReady(), node(status=NodeStatus.DOWN), NodeUsage(), req(), False),
        (NodeReady(), node(status=NodeStatus.UNKNOWN), NodeUsage(), req(), False),
        (FitsCpu(), node(cpu=2.0), NodeUsage(cpu=1.5), req(cpu=0.5), True),  # exactly full
        (FitsCpu(), node(cpu=2.0), NodeUsage(cpu=1.6), req(cpu=0.5), False),
        (FitsCpu(), node(cpu=1.0), NodeUsage(cpu=0.1 * 9), req(cpu=0.1), True),  # float sums
        (FitsMemory(), node(memory=256 * MI), NodeUsage(memory=128 * MI), req(memory=128 * MI), True),
        (FitsMemory(), node(memory=256 * MI), NodeUsage(memory=129 * MI), req(memory=128 * MI), False),
        (HostPortsFree(), node(), NodeUsage(host_ports={(8080, "tcp")}), req(ports=[(8080, "tcp")]), False),
        (HostPortsFree(), node(), NodeUsage(host_ports={(8080, "udp")}), req(ports=[(8080, "tcp")]), True),
        (HostPortsFree(), node(), NodeUsage(host_ports={(8080, "tcp")}), req(), True),
    ],
)
def test_filters(filt, n, usage, request_, feasible):
    assert filt.feasible(n, usage, request_) is feasible
    assert filt.name and filt.reason


@pytest.mark.parametrize(
    "scorer, usage, request_, expected",
    [
        (Spread(), NodeUsage(), req(), 1.0),
        (Spread(), NodeUsage(per_deployment=Counter({"default.web": 1})), req(), 0.5),
        (Spread(), NodeUsage(per_deployment=Counter({"default.other": 3})), req(), 1.0),
        (LeastAllocated(), NodeUsage(), req(cpu=1.0, memory=512 * MI), 0.5),
        (LeastAllocated(), NodeUsage(cpu=1.0, memory=512 * MI), req(cpu=1.0, memory=512 * MI), 0.0),
        (LeastAllocated(), NodeUsage(), req(cpu=0.0, memory=0), 1.0),
    ],
)
def test_scorers(scorer, usage, request_, expected):
    assert scorer.score(node(cpu=2.0, memory=1024 * MI), usage, request_) == pytest.approx(expected)


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


def test_placer_records_what_it_placed_so_capacity_runs_out():
    placer = Placer([node("a", cpu=1.0)], Usage())
    assert [placer.place(req(cpu=0.5)).node_id for _ in range(3)] == ["a", "a", None]


def test_placer_explains_each_rejection_class():
    nodes = [node("a", cpu=0.1), node("b", memory=64 * MI), node("c", memory=64 * MI), node("d", status=NodeStatus.DOWN)]
    decision = Placer(nodes, Usage()).place(req())
    assert decision.node_id is None
    assert decision.reason == "no feasible node (2 nodes: insufficient memory; 1 node: insufficient cpu; 1 node: node not ready)"


def test_placer_host_port_conflict_forces_another_node():
    placer = Placer([node("a"), node("b")], Usage())
    first = placer.place(req(ports=[(80, "tcp")]))
    second = placer.place(req(ports=[(80, "tcp")]))
    third = placer.place(req(ports=[(80, "tcp")]))
    assert {first.node_id, second.node_id} == {"a", "b"}
    assert third.node_id is None and "host port in use" in third.reason


def test_explain_with_no_nodes():
    assert explain_rejections(Counter(), 0) == "no nodes in the cluster"
