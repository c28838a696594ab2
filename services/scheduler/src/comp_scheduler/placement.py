"""Placement: feasibility filters, then scorers, over an immutable node snapshot.

Each filter and scorer is a small named unit with a constant reason, in the manner of
the Kubernetes scheduler framework; what a round has already placed is tracked in a
:class:`Usage` ledger beside the snapshot, never by changing the snapshot.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from .model import Node, NodeStatus


@dataclass(frozen=True, slots=True)
class Request:
    """What one new task needs."""

    deployment: str
    cpu: float
    memory: int
    host_ports: frozenset[tuple[int, str]] = frozenset()


@dataclass(slots=True)
class NodeUsage:
    cpu: float = 0.0
    memory: int = 0
    host_ports: set[tuple[int, str]] = field(default_factory=set)
    per_deployment: Counter[str] = field(default_factory=Counter)


class Usage:
    """What is allocated on each node: existing tasks plus this round's placements."""

    def __init__(self) -> None:
        self._by_node: dict[str, NodeUsage] = {}

    def of(self, node_id: str) -> NodeUsage:
        usage = self._by_node.get(node_id)
        if usage is None:
            usage = self._by_node[node_id] = NodeUsage()
        return usage

    def add(self, node_id: str, request: Request) -> None:
        usage = self.of(node_id)
        usage.cpu += request.cpu
        usage.memory += request.memory
        usage.host_ports |= request.host_ports
        usage.per_deployment[request.deployment] += 1


# Below this many cores or bytes a fit is treated as exact, so float sums do not reject
# a node that is full to the last task.
_EPSILON = 1e-9


class Filter(Protocol):
    name: str
    reason: str

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool: ...


class Scorer(Protocol):
    name: str
    weight: float

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        """0 (worst) to 1 (best)."""
        ...


class NodeReady:
    name = "node-ready"
    reason = "node not ready"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return node.status is NodeStatus.READY


class FitsCpu:
    name = "fits-cpu"
    reason = "insufficient cpu"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return usage.cpu + request.cpu <= node.cpu + _EPSILON


class FitsMemory:
    name = "fits-memory"
    reason = "insufficient memory"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return usage.memory + request.memory <= node.memory


class HostPortsFree:
    name = "host-ports-free"
    reason = "host port in use"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return not (request.host_ports & usage.host_ports)


class Spread:
    """Fewer replicas of the same deployment on a node is better."""

    name = "spread"
    weight = 2.0

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        return 1.0 / (1 + usage.per_deployment[request.deployment])


class LeastAllocated:
    """The node with the most room left after placing is better (Kubernetes' default)."""

    name = "least-allocated"
    weight = 1.0

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        cpu_free = 1 - (usage.cpu + request.cpu) / node.cpu if node.cpu > 0 else 0.0
        mem_free = 1 - (usage.memory + request.memory) / node.memory if node.memory > 0 else 0.0
        return max(0.0, (cpu_free + mem_free) / 2)


DEFAULT_FILTERS: tuple[Filter, ...] = (NodeReady(), FitsCpu(), FitsMemory(), HostPortsFree())
DEFAULT_SCORERS: tuple[Scorer, ...] = (Spread(), LeastAllocated())


@dataclass(frozen=True, slots=True)
class Decision:
    node_id: str | None
    reason: str  # why this node, or why none


class Placer:
    def __init__(
        self,
        nodes: Sequence[Node],
        usage: Usage,
        filters: Sequence[Filter] = DEFAULT_FILTERS,
        scorers: Sequence[Scorer] = DEFAULT_SCORERS,
    ):
        # Sorted so that ties go the same way every time: deterministic placement.
        self.nodes = sorted(nodes, key=lambda n: n.node_id)
        self.usage = usage
        self.filters = tuple(filters)
        self.scorers = tuple(scorers)

    def place(self, request: Request) -> Decision:
        """Choose a node for ``request`` and record it in the ledger, or say why none fits."""
        rejected: Counter[str] = Counter()
        best: tuple[float, Node, list[tuple[str, float]]] | None = None
        feasible = 0
        for node in self.nodes:
            usage = self.usage.of(node.node_id)
            failed = next((f for f in self.filters if not f.feasible(node, usage, request)), None)
            if failed is not None:
                rejected[failed.reason] += 1
                continue
            feasible += 1
            parts = [(s.name, s.score(node, usage, request)) for s in self.scorers]
            total = sum(score * s.weight for s, (_, score) in zip(self.scorers, parts))
            if best is None or total > best[0] + _EPSILON:
                best = (total, node, parts)
        if best is None:
            return Decision(None, explain_rejections(rejected, len(self.nodes)))
        _, node, parts = best
        self.usage.add(node.node_id, request)
        detail = ", ".join(f"{name} {score:.2f}" for name, score in parts)
        return Decision(node.node_id, f"best of {feasible} feasible node{'s' if feasible != 1 else ''} ({detail})")


def explain_rejections(rejected: Counter[str], total_nodes: int) -> str:
    if total_nodes == 0:
        return "no nodes in the cluster"
    parts = [f"{count} node{'s' if count != 1 else ''}: {reason}" for reason, count in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "no feasible node (" + "; ".join(parts) + ")"
