"""Placement: feasibility filters, then scorers, over an immutable node snapshot.

Each filter and scorer is a small named unit with a constant reason, in the manner of
the Kubernetes scheduler framework; what a round has already placed is tracked in a
:class:`Usage` ledger beside the snapshot, never by changing the snapshot.

Two placers choose by the same filters and scorers:

- :class:`Placer`, the one reconcile uses.  Nodes with the same status, labels and taints
  form a *class* (as Nomad's computed node classes), so the static filters (readiness,
  constraints, taints) and the label-only scorers run once per class and deployment.
  The feasible nodes then go into a heap per topology domain keyed by score; a placement
  pops the best, commits it, re-checks the dynamic filters on that one node and pushes it
  back with its new score.  Only the chosen node's usage changes while one deployment is
  being placed, so every other key stays exact: O(log n) a placement, same choice as a
  full scan.  Sessions may be interleaved (reconcile alternates namespaces by dominant
  resource fairness): every commit is logged on the placer, and a session resuming after
  others committed re-scores just the nodes they changed, dropping the stale heap entries
  lazily, so it still chooses as a full scan would.
- :class:`FullScanPlacer`, the original: every filter and scorer on every node for every
  placement.  Kept as the reference the fast one is tested against, and as the baseline
  in ``bench/placement.py``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from comp_common.manifest import Constraint, Placement

from .model import Desired, Node, NodeStatus, Taint

NO_PLACEMENT = Placement()
DEFAULT_STRATEGY = "spread"


@dataclass(frozen=True, slots=True)
class Request:
    """What one new task needs, and where its deployment may and would rather run."""

    deployment: str
    cpu: float
    memory: int
    host_ports: frozenset[tuple[int, str]] = frozenset()
    placement: Placement = NO_PLACEMENT
    priority: int = 0

    @classmethod
    def of(cls, desired: Desired) -> "Request":
        spec = desired.spec
        return cls(desired.key, spec.resources.cpu, spec.resources.memory, desired.host_ports, spec.placement, spec.priority)


@dataclass(slots=True)
class NodeUsage:
    cpu: float = 0.0
    memory: int = 0
    host_ports: set[tuple[int, str]] = field(default_factory=set)
    # How many tasks hold each port: an inconsistent world (two tasks on one port, left by
    # earlier rounds) must not have the port freed when just one of them goes.
    port_holders: Counter[tuple[int, str]] = field(default_factory=Counter)
    per_deployment: Counter[str] = field(default_factory=Counter)


_NO_USAGE = NodeUsage()


class Usage:
    """What is allocated on each node: existing tasks plus this round's placements."""

    def __init__(self) -> None:
        self._by_node: dict[str, NodeUsage] = {}
        # deployment -> node -> replicas: topology spread counts a deployment's replicas per
        # domain without visiting every node.
        self._replicas: dict[str, Counter[str]] = {}

    def of(self, node_id: str) -> NodeUsage:
        usage = self._by_node.get(node_id)
        if usage is None:
            usage = self._by_node[node_id] = NodeUsage()
        return usage

    def peek(self, node_id: str) -> NodeUsage:
        """Read-only: what ``node_id`` has, without making an entry for a node with nothing."""
        return self._by_node.get(node_id, _NO_USAGE)

    def peek_all(self, nodes: Sequence[Node]) -> list[NodeUsage]:
        get = self._by_node.get
        return [get(node.node_id, _NO_USAGE) for node in nodes]

    def add(self, node_id: str, request: Request) -> None:
        usage = self.of(node_id)
        usage.cpu += request.cpu
        usage.memory += request.memory
        if request.host_ports:
            usage.host_ports |= request.host_ports
            usage.port_holders.update(request.host_ports)
        usage.per_deployment[request.deployment] += 1
        replicas = self._replicas.get(request.deployment)
        if replicas is None:
            replicas = self._replicas[request.deployment] = Counter()
        replicas[node_id] += 1

    def remove(self, node_id: str, request: Request) -> None:
        usage = self.of(node_id)
        usage.cpu -= request.cpu
        usage.memory -= request.memory
        for port in request.host_ports:
            usage.port_holders[port] -= 1
            if usage.port_holders[port] <= 0:
                del usage.port_holders[port]
                usage.host_ports.discard(port)
        usage.per_deployment[request.deployment] -= 1
        if usage.per_deployment[request.deployment] <= 0:
            del usage.per_deployment[request.deployment]
        replicas = self._replicas[request.deployment]
        replicas[node_id] -= 1
        if replicas[node_id] <= 0:
            del replicas[node_id]

    def replicas(self, deployment: str) -> Mapping[str, int]:
        """Node -> how many replicas of ``deployment`` it has, for nodes with at least one."""
        return self._replicas.get(deployment, {})


# Below this many cores a fit is treated as exact, so float sums do not reject a node that
# is full to the last task; scores closer than this are a tie.
_EPSILON = 1e-9


# ---- filters ---------------------------------------------------------------------------------


class Filter(Protocol):
    name: str
    reason: str  # constant per instance: the explanation counts nodes per reason
    # True when the answer depends only on the node's status, labels and taints (never on
    # usage): then it is decided once per node class, not once per node.
    static: bool

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool: ...

    def feasible_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[bool]:
        """``feasible`` of each node, in order: the same answers, one call for many nodes."""
        ...


class FilterBase:
    """Gives a filter ``feasible_all`` by way of ``feasible``; the filters that run on every
    node override it with one comprehension, which is several times faster in CPython."""

    static = False

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        raise NotImplementedError

    def feasible_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[bool]:
        feasible = self.feasible
        return [feasible(node, usage, request) for node, usage in zip(nodes, usages)]


class NodeReady(FilterBase):
    name = "node-ready"
    reason = "node not ready"
    static = True

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return node.status is NodeStatus.READY


class NodeSchedulable(FilterBase):
    name = "node-schedulable"
    reason = "node cordoned"
    static = True

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return not node.cordoned


class LabelConstraint(FilterBase):
    """One of the deployment's ``placement.constraints``; the reason names it."""

    name = "constraint"
    static = True

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.reason = f"constraint {constraint}"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return self.constraint.matches(node.labels)


class TaintToleration(FilterBase):
    """One taint present in the cluster: a node carrying it needs the deployment to tolerate it."""

    name = "taint-toleration"
    static = True

    def __init__(self, taint: Taint):
        self.taint = taint
        self.reason = f"untolerated taint {taint}"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        if self.taint not in node.taints:
            return True
        taint = self.taint
        return any(t.tolerates(taint.key, taint.value, taint.effect) for t in request.placement.tolerations)


class FitsCpu(FilterBase):
    name = "fits-cpu"
    reason = "insufficient cpu"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return usage.cpu + request.cpu <= node.cpu + _EPSILON

    def feasible_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[bool]:
        cpu = request.cpu
        return [usage.cpu + cpu <= node.cpu + _EPSILON for node, usage in zip(nodes, usages)]


class FitsMemory(FilterBase):
    name = "fits-memory"
    reason = "insufficient memory"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return usage.memory + request.memory <= node.memory

    def feasible_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[bool]:
        memory = request.memory
        return [usage.memory + memory <= node.memory for node, usage in zip(nodes, usages)]


class HostPortsFree(FilterBase):
    name = "host-ports-free"
    reason = "host port in use"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return not (request.host_ports and request.host_ports & usage.host_ports)

    def feasible_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[bool]:
        ports = request.host_ports
        return [not (ports and ports & usage.host_ports) for usage in usages]


class MaxPerNode(FilterBase):
    """Hard anti-affinity: ``placement.max_per_node`` replicas of one deployment on a node at most."""

    name = "max-per-node"

    def __init__(self, limit: int):
        self.limit = limit
        self.reason = f"max_per_node {limit} reached"

    def feasible(self, node: Node, usage: NodeUsage, request: Request) -> bool:
        return usage.per_deployment.get(request.deployment, 0) < self.limit

    def feasible_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[bool]:
        deployment, limit = request.deployment, self.limit
        return [usage.per_deployment.get(deployment, 0) < limit for usage in usages]


NODE_READY, NODE_SCHEDULABLE = NodeReady(), NodeSchedulable()
FITS_CPU, FITS_MEMORY, HOST_PORTS_FREE = FitsCpu(), FitsMemory(), HostPortsFree()


def filters_for(request: Request, taints: Iterable[Taint] = ()) -> tuple[Filter, ...]:
    """The filters one request passes through, in order: static ones first (readiness,
    constraints, each of the cluster's ``taints``), then the ones that depend on usage.

    A node is counted under the first filter that rejects it.
    """
    placement = request.placement
    filters: list[Filter] = [NODE_READY, NODE_SCHEDULABLE]
    filters += [LabelConstraint(c) for c in placement.constraints]
    filters += [TaintToleration(t) for t in sorted(taints)]
    filters += [FITS_CPU, FITS_MEMORY]
    if request.host_ports:  # else it never rejects: leave it out of every node's path
        filters.append(HOST_PORTS_FREE)
    if placement.max_per_node is not None:
        filters.append(MaxPerNode(placement.max_per_node))
    return tuple(filters)


# ---- scorers ---------------------------------------------------------------------------------


class Scorer(Protocol):
    name: str
    weight: float
    # True when the score depends only on the node's labels: computed once per node class.
    static: bool

    def applies(self, request: Request) -> bool:
        """False when the scorer has nothing to say for this request (it is then left out)."""
        ...

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        """0 (worst) to 1 (best), for placing ``request`` on ``node`` given its ``usage``."""
        ...

    def score_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[float]:
        """``score`` of each node, in order: the same values, one call for many nodes."""
        ...


class ScorerBase:
    """A weighted scorer that applies to every request; ``score_all`` by way of ``score``
    unless overridden with one comprehension (see :class:`FilterBase`)."""

    static = False

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def applies(self, request: Request) -> bool:
        return True

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        raise NotImplementedError

    def score_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[float]:
        score = self.score
        return [score(node, usage, request) for node, usage in zip(nodes, usages)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


class Spread(ScorerBase):
    """Spread by node: fewer replicas of the same deployment on a node is better."""

    name = "spread"

    def __init__(self, weight: float = 2.0):
        super().__init__(weight)

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        return 1.0 / (1 + usage.per_deployment.get(request.deployment, 0))

    def score_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[float]:
        deployment = request.deployment
        return [1.0 / (1 + usage.per_deployment.get(deployment, 0)) for usage in usages]


class ReplicaAntiAffinity(ScorerBase):
    """Soft anti-affinity of replicas: a node without a replica of this deployment is better.

    Unlike :class:`Spread` it does not grade how many: it keeps binpacking from stacking one
    deployment's replicas while other nodes would do, and is indifferent after that.
    """

    name = "anti-affinity"

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        return 0.0 if usage.per_deployment.get(request.deployment) else 1.0

    def score_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[float]:
        deployment = request.deployment
        return [0.0 if usage.per_deployment.get(deployment) else 1.0 for usage in usages]


class LeastAllocated(ScorerBase):
    """The node with the most room left after placing is better (Kubernetes' default)."""

    name = "least-allocated"

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        cpu_free = 1 - (usage.cpu + request.cpu) / node.cpu if node.cpu > 0 else 0.0
        mem_free = 1 - (usage.memory + request.memory) / node.memory if node.memory > 0 else 0.0
        return max(0.0, (cpu_free + mem_free) / 2)

    def score_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[float]:
        cpu, memory = request.cpu, request.memory
        return [
            max(
                0.0,
                (
                    (1 - (usage.cpu + cpu) / node.cpu if node.cpu > 0 else 0.0)
                    + (1 - (usage.memory + memory) / node.memory if node.memory > 0 else 0.0)
                )
                / 2,
            )
            for node, usage in zip(nodes, usages)
        ]


class MostAllocated(ScorerBase):
    """Binpack: the node with the least room left after placing is better, so that whole
    nodes stay free for large tasks (Kubernetes' MostAllocated, Nomad's binpack)."""

    name = "binpack"

    def __init__(self, weight: float = 2.0):
        super().__init__(weight)

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        cpu_used = (usage.cpu + request.cpu) / node.cpu if node.cpu > 0 else 1.0
        mem_used = (usage.memory + request.memory) / node.memory if node.memory > 0 else 1.0
        return min(1.0, max(0.0, (cpu_used + mem_used) / 2))

    def score_all(self, nodes: Sequence[Node], usages: Sequence[NodeUsage], request: Request) -> list[float]:
        cpu, memory = request.cpu, request.memory
        return [
            min(
                1.0,
                max(
                    0.0,
                    (
                        ((usage.cpu + cpu) / node.cpu if node.cpu > 0 else 1.0)
                        + ((usage.memory + memory) / node.memory if node.memory > 0 else 1.0)
                    )
                    / 2,
                ),
            )
            for node, usage in zip(nodes, usages)
        ]


class LabelAffinity(ScorerBase):
    """Soft affinity: the share of ``placement.affinity`` weight whose labels the node matches."""

    name = "affinity"
    static = True

    def applies(self, request: Request) -> bool:
        return bool(request.placement.affinity)

    def score(self, node: Node, usage: NodeUsage, request: Request) -> float:
        preferences = request.placement.affinity
        total = sum(p.weight for p in preferences)
        matched = sum(p.weight for p in preferences if p.matches(node.labels))
        return matched / total if total else 0.0


class TopologySpread:
    """Spread over a topology label (``placement.spread_by``, e.g. zone): a domain with fewer
    of the deployment's replicas than the others is better.

    Scored per domain, not per node: ``count`` is the deployment's replicas in the node's
    domain, ``least`` the fewest in any domain that can still take one.  A node without the
    label is in no domain and scores 0, as in Kubernetes' topology spread.
    """

    name = "topology-spread"

    def __init__(self, weight: float = 5.0):
        self.weight = weight

    def applies(self, request: Request) -> bool:
        return request.placement.spread_by is not None

    def score(self, count: int, least: int) -> float:
        return 1.0 / (1 + count - least)

    def __repr__(self) -> str:
        return f"TopologySpread(weight={self.weight})"


@dataclass(frozen=True)
class Strategy:
    """A named set of weighted scorers; a deployment picks one, or takes the cluster default."""

    name: str
    scorers: tuple[Scorer, ...]
    topology: TopologySpread


# A deployment that asks for spread_by wants its domains even before anything else: one
# replica of skew (topology 1 -> 0.5) weighs 2.5, more than stacking a second replica on a
# node costs plus a typical resource difference (spread 2 x (1 -> 0.5) + least-allocated).
_TOPOLOGY_WEIGHT = 5.0
STRATEGIES: dict[str, Strategy] = {
    "spread": Strategy("spread", (Spread(2.0), LeastAllocated(1.0), LabelAffinity(1.0)), TopologySpread(_TOPOLOGY_WEIGHT)),
    "binpack": Strategy(
        "binpack", (MostAllocated(2.0), ReplicaAntiAffinity(1.0), LabelAffinity(1.0)), TopologySpread(_TOPOLOGY_WEIGHT)
    ),
}


def strategy_for(request: Request, default: str) -> Strategy:
    return STRATEGIES[request.placement.strategy or default]


# ---- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    node_id: str | None
    reason: str  # why this node, or why none
    score: float = 0.0  # the chosen node's weighted total
    parts: tuple[tuple[str, float], ...] = ()  # each scorer's score of the chosen node
    rejections: tuple[tuple[str, int], ...] = ()  # when none: filter reason -> nodes, most first


def explain_rejections(rejected: Mapping[str, int], total_nodes: int) -> str:
    if total_nodes == 0:
        return "no nodes in the cluster"
    parts = [f"{count} node{'s' if count != 1 else ''}: {reason}" for reason, count in _most_first(rejected)]
    return "no feasible node (" + "; ".join(parts) + ")"


def _most_first(rejected: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))


def _chosen(node_id: str, feasible: int, total: float, parts: list[tuple[str, float]]) -> Decision:
    detail = ", ".join(f"{name} {score:.2f}" for name, score in parts)
    return Decision(node_id, f"best of {feasible} feasible node{'s' if feasible != 1 else ''} ({detail})", total, tuple(parts))


def _none_fits(rejected: Counter[str], total_nodes: int) -> Decision:
    return Decision(None, explain_rejections(rejected, total_nodes), rejections=_most_first(rejected))


@dataclass(frozen=True, slots=True)
class Resident:
    """A task already on a node, as preemption sees it."""

    task_id: str
    request: Request


@dataclass(frozen=True, slots=True)
class Preemption:
    decision: Decision
    victims: tuple[Resident, ...]


# ---- the fast placer -------------------------------------------------------------------------


@dataclass(slots=True)
class _NodeClass:
    sample: Node  # any member: they share status, labels and taints
    members: list[int]  # indexes into Placer.nodes, ascending
    nodes: list[Node]  # the members themselves


class Placer:
    """Places requests one deployment at a time; see the module docstring for how."""

    def __init__(self, nodes: Sequence[Node], usage: Usage, default_strategy: str = DEFAULT_STRATEGY):
        if default_strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {default_strategy!r}; known: {', '.join(STRATEGIES)}")
        # Sorted so that ties go the same way every time: deterministic placement.
        self.nodes = sorted(nodes, key=lambda n: n.node_id)
        self.index_of = {node.node_id: index for index, node in enumerate(self.nodes)}
        self.usage = usage
        self.default_strategy = default_strategy
        self.classes: list[_NodeClass] = []
        self.class_of: list[int] = []  # node index -> its class's position in self.classes
        positions: dict[tuple, int] = {}
        for index, node in enumerate(self.nodes):
            key = (node.status, node.cordoned, frozenset(node.labels.items()), node.taints)
            position = positions.get(key)
            if position is None:
                position = positions[key] = len(self.classes)
                self.classes.append(_NodeClass(node, [], []))
            self.classes[position].members.append(index)
            self.classes[position].nodes.append(node)
            self.class_of.append(position)
        self.taints = sorted({t for node in self.nodes for t in node.taints})
        self._session: PlacementSession | None = None
        # Index of every node whose usage a session changed, in order: how an interleaved
        # session learns what the others did since it last ran.
        self.changes: list[int] = []

    def session(self, request: Request) -> "PlacementSession":
        """Start placing replicas of ``request``; valid while usage changes only through this
        placer's sessions (any number of them, interleaved)."""
        self._session = PlacementSession(self, request)
        return self._session

    def place(self, request: Request) -> Decision:
        """Choose a node for ``request`` and record it in the ledger, or say why none fits.

        Consecutive calls with an equal request continue one session, so the ledger must
        change only through this placer in between.
        """
        session = self._session
        if session is None or session.request != request:
            session = self.session(request)
        return session.place()


class PlacementSession:
    """One deployment's placements in one round: the static work done once, then a heap."""

    def __init__(self, placer: Placer, request: Request):
        self.placer = placer
        self.request = request
        strategy = strategy_for(request, placer.default_strategy)
        filters = filters_for(request, placer.taints)
        self.static_filters = [f for f in filters if f.static]
        self.dynamic_filters = [f for f in filters if not f.static]
        self.scorers = [s for s in strategy.scorers if s.applies(request)]
        self.topology = strategy.topology if strategy.topology.applies(request) else None
        self._checks = tuple(f.feasible for f in self.dynamic_filters)
        dynamic_scorers = [s for s in self.scorers if not s.static]
        self._dynamic_scorers = tuple((s.weight, s.score) for s in dynamic_scorers)
        static_scorers = [s for s in self.scorers if s.static]
        spread_by = request.placement.spread_by
        nodes, usage = placer.nodes, placer.usage

        # Per class (by position): the label-only part of its nodes' scores, their domain.
        self._bonus: list[float] = [0.0] * len(placer.classes)
        self._domain: list[str | None] = [None] * len(placer.classes)
        self._feasible_classes: list[_NodeClass] = []
        self._class_ok: list[bool] = [False] * len(placer.classes)
        self._heaps: dict[str | None, list[tuple[float, int]]] = {}
        # Node index -> its one valid heap key (None: not in a heap).  Built only once another
        # session's commit made entries stale; until then every entry is valid.
        self._keys: list[float | None] | None = None
        self._seen = len(placer.changes)
        feasible = 0
        for position, node_class in enumerate(placer.classes):
            sample = node_class.sample
            if not all(f.feasible(sample, _NO_USAGE, request) for f in self.static_filters):
                continue
            self._feasible_classes.append(node_class)
            self._class_ok[position] = True
            bonus = self._bonus[position] = sum(s.weight * s.score(sample, _NO_USAGE, request) for s in static_scorers)
            domain = self._domain[position] = sample.labels.get(spread_by) if spread_by else None
            heap = self._heaps.setdefault(domain, [])
            members, class_nodes = node_class.members, node_class.nodes
            usages = usage.peek_all(class_nodes)
            for f in self.dynamic_filters:
                ok = f.feasible_all(class_nodes, usages, request)
                if not all(ok):
                    members = [m for m, fine in zip(members, ok) if fine]
                    class_nodes = [n for n, fine in zip(class_nodes, ok) if fine]
                    usages = [u for u, fine in zip(usages, ok) if fine]
            # Summed in the same order as _score(), so a node's key is the same float
            # whichever way it was computed.
            totals = [0.0] * len(members)
            for scorer in dynamic_scorers:
                weight = scorer.weight
                totals = [t + weight * part for t, part in zip(totals, scorer.score_all(class_nodes, usages, request))]
            heap.extend(zip([-(bonus + t) for t in totals], members))
            feasible += len(members)
        for heap in self._heaps.values():
            heapq.heapify(heap)
        self._feasible = feasible
        # The deployment's replicas per domain, wherever they are (feasible nodes or not).
        self._counts: Counter[str | None] = Counter()
        if spread_by:
            for node_id, count in usage.replicas(request.deployment).items():
                index = placer.index_of.get(node_id)
                if index is not None:
                    self._counts[nodes[index].labels.get(spread_by)] += count
        # Preemption candidates, worked out on the first call to preempt().
        self._preempt_heap: list[tuple[tuple[int, int, int, int], int]] | None = None
        self._preempt_victims: dict[int, tuple[tuple[int, int, int, int], tuple[Resident, ...]]] = {}
        self._dirty: set[int] = set()

    # ---- placing -------------------------------------------------------------------------
    # The two below re-check and re-score the one node a placement changed: plain loops, as
    # they are measurably faster than all()/sum() over generators here.
    def _fits(self, node: Node, usage: NodeUsage) -> bool:
        request = self.request
        for check in self._checks:
            if not check(node, usage, request):
                return False
        return True

    def _score(self, node: Node, usage: NodeUsage) -> float:
        request = self.request
        total = 0.0
        for weight, score in self._dynamic_scorers:
            total += weight * score(node, usage, request)
        return total

    # ---- interleaving ---------------------------------------------------------------------
    def _sync(self) -> None:
        """Catch up with what other sessions committed since this one last ran."""
        changes = self.placer.changes
        if self._seen == len(changes):
            return
        keys = self._keys if self._keys is not None else self._build_keys()
        nodes, usage, class_of = self.placer.nodes, self.placer.usage, self.placer.class_of
        for index in dict.fromkeys(changes[self._seen :]):
            position = class_of[index]
            if not self._class_ok[position]:
                continue
            if self._preempt_heap is not None:
                self._dirty.add(index)  # its usage or residents changed, so may its victims
            node = nodes[index]
            node_usage = usage.peek(node.node_id)
            key = -(self._bonus[position] + self._score(node, node_usage)) if self._fits(node, node_usage) else None
            old = keys[index]
            if key == old:
                continue
            if old is None:
                self._feasible += 1
            elif key is None:
                self._feasible -= 1
            keys[index] = key
            if key is not None:
                heapq.heappush(self._heaps[self._domain[position]], (key, index))
        self._seen = len(changes)

    def _build_keys(self) -> list[float | None]:
        keys: list[float | None] = [None] * len(self.placer.nodes)
        for heap in self._heaps.values():
            for key, index in heap:
                keys[index] = key
        self._keys = keys
        return keys

    def _drop_stale_tops(self) -> None:
        keys = self._keys
        assert keys is not None
        for heap in self._heaps.values():
            while heap and keys[heap[0][1]] != heap[0][0]:
                heapq.heappop(heap)

    def feasible_nodes(self) -> list[tuple[float, int]]:
        """(-score, node index) of every node the request fits now, best first."""
        self._sync()
        keys = self._keys
        entries = [e for heap in self._heaps.values() for e in heap if keys is None or keys[e[1]] == e[0]]
        entries.sort()
        return entries

    def place_at(self, index: int) -> Decision:
        """Place on node ``index``, which must be among :meth:`feasible_nodes`: a choice made
        by the caller (rebalancing), scored and recorded as :meth:`place` would."""
        self._sync()
        if self._keys is not None:
            self._drop_stale_tops()
        node = self.placer.nodes[index]
        position = self.placer.class_of[index]
        heap = self._heaps[self._domain[position]]
        keys = self._keys
        entry = next(e for e in heap if e[1] == index and (keys is None or keys[index] == e[0]))
        node_usage = self.placer.usage.peek(node.node_id)
        request = self.request
        parts = [(s.name, s.score(node, node_usage, request)) for s in self.scorers]
        total = -entry[0]
        if self.topology is not None:
            domain = self._domain[position]
            live = [d for d, h in self._heaps.items() if h and d is not None]
            least = min(self._counts[d] for d in live) if live else 0
            part = self.topology.score(self._counts[domain], least) if domain is not None else 0.0
            parts.append((self.topology.name, part))
            total += self.topology.weight * part
        heap.remove(entry)
        heapq.heapify(heap)
        if keys is not None:
            keys[index] = None
        decision = _chosen(node.node_id, self._feasible, total, parts)
        self._commit(index)
        return decision

    def _best_heap(self) -> tuple[list[tuple[float, int]] | None, float]:
        """The heap whose top is the best node, and that node's topology score (unweighted)."""
        if self._keys is not None:
            self._drop_stale_tops()
        topology = self.topology
        if topology is None:
            for heap in self._heaps.values():  # one domain: None
                return (heap, 0.0) if heap else (None, 0.0)
            return None, 0.0
        counts, weight = self._counts, topology.weight
        live = [d for d, heap in self._heaps.items() if heap and d is not None]
        least = min(counts[d] for d in live) if live else 0
        best: list[tuple[float, int]] | None = None
        best_key = (0.0, 0)
        best_part = 0.0
        for domain, heap in self._heaps.items():
            if not heap:
                continue
            part = topology.score(counts[domain], least) if domain is not None else 0.0
            neg_score, index = heap[0]
            # Higher total first, then the lower node index, as a full scan in node order would.
            key = (weight * part - neg_score, -index)
            if best is None or key > best_key:
                best, best_key, best_part = heap, key, part
        return best, best_part

    def place(self) -> Decision:
        self._sync()
        heap, domain_part = self._best_heap()
        if heap is None:
            return _none_fits(self.explain(), len(self.placer.nodes))
        neg_score, index = heapq.heappop(heap)
        node = self.placer.nodes[index]
        node_usage = self.placer.usage.of(node.node_id)
        request = self.request
        parts = [(s.name, s.score(node, node_usage, request)) for s in self.scorers]
        total = -neg_score
        if self.topology is not None:
            parts.append((self.topology.name, domain_part))
            total += self.topology.weight * domain_part
        decision = _chosen(node.node_id, self._feasible, total, parts)
        self._commit(index)
        return decision

    def _commit(self, index: int) -> None:
        """Record the request on node ``index`` and put the node back in its heap if another fits."""
        node = self.placer.nodes[index]
        node_usage = self.placer.usage.of(node.node_id)
        request = self.request
        self.placer.usage.add(node.node_id, request)
        changes = self.placer.changes
        changes.append(index)
        self._seen = len(changes)  # _sync ran just before: nothing else is new
        position = self.placer.class_of[index]
        self._counts[self._domain[position]] += 1
        if self._fits(node, node_usage):
            key = -(self._bonus[position] + self._score(node, node_usage))
            heapq.heappush(self._heaps[self._domain[position]], (key, index))
            if self._keys is not None:
                self._keys[index] = key
        else:
            self._feasible -= 1
            if self._keys is not None:
                self._keys[index] = None
        if self._preempt_heap is not None:
            self._dirty.add(index)  # its usage changed: work out its victims again

    def explain(self) -> Counter[str]:
        """Per filter reason, how many nodes it rejects for the request now (a full pass)."""
        rejected: Counter[str] = Counter()
        nodes, usage, request = self.placer.nodes, self.placer.usage, self.request
        for node_class in self.placer.classes:
            failed = next((f for f in self.static_filters if not f.feasible(node_class.sample, _NO_USAGE, request)), None)
            if failed is not None:
                rejected[failed.reason] += len(node_class.members)
                continue
            for index in node_class.members:
                node = nodes[index]
                node_usage = usage.peek(node.node_id)
                failed = next((f for f in self.dynamic_filters if not f.feasible(node, node_usage, request)), None)
                if failed is not None:
                    rejected[failed.reason] += 1
        return rejected

    # ---- preemption ----------------------------------------------------------------------
    def preempt(self, residents: Mapping[str, Mapping[str, Resident]]) -> Preemption | None:
        """Make room by stopping the fewest tasks of lower priority, and place there.

        Only nodes that pass the static filters are candidates, and only tasks of strictly
        lower priority are ever stopped (see :func:`victims_needed` for which, on one node).
        Among nodes the fewest victims win, then the lowest highest-victim priority, then the
        lowest priority sum, then node order.  Candidates are worked out once per session;
        a placement changes one node, so only that node is worked out again.

        ``residents`` is node id -> task id -> :class:`Resident`, the tasks that may be
        stopped (their usage is in the ledger); the caller removes the victims from it.
        """
        self._sync()
        if self._preempt_heap is None:
            self._preempt_heap = []
            for node_class in self._feasible_classes:
                for index in node_class.members:
                    self._reckon_victims(index, residents)
        for index in sorted(self._dirty):
            self._reckon_victims(index, residents)
        self._dirty.clear()
        heap, victims_of = self._preempt_heap, self._preempt_victims
        while heap:
            key, index = heapq.heappop(heap)
            found = victims_of.get(index)
            if found is not None and found[0] == key:  # else stale: the node changed since
                break
        else:
            return None
        victims = victims_of.pop(index)[1]
        node = self.placer.nodes[index]
        for victim in victims:
            self.placer.usage.remove(node.node_id, victim.request)
        lowest = min(v.request.priority for v in victims)
        count = len(victims)
        decision = Decision(
            node.node_id,
            f"preempting {count} lower-priority task{'s' if count != 1 else ''} on {node.node_id} "
            f"(priority {self.request.priority} > {lowest})",
        )
        self._feasible += 1  # it fits now; _commit takes it off again if it is full after
        self._commit(index)
        return Preemption(decision, victims)

    def _reckon_victims(self, index: int, residents: Mapping[str, Mapping[str, Resident]]) -> None:
        """Work out node ``index``'s victims and make it a candidate if stopping some would do."""
        node = self.placer.nodes[index]
        found = victims_needed(node, self.placer.usage.peek(node.node_id), self.request, residents.get(node.node_id, {}).values())
        if found is None:
            self._preempt_victims.pop(index, None)
            return
        priorities = [v.request.priority for v in found]
        key = (len(found), max(priorities), sum(priorities), index)
        self._preempt_victims[index] = (key, found)
        assert self._preempt_heap is not None
        heapq.heappush(self._preempt_heap, (key, index))


def victims_needed(node: Node, usage: NodeUsage, request: Request, residents: Iterable[Resident]) -> tuple[Resident, ...] | None:
    """The fewest tasks of priority below ``request.priority`` whose stopping makes ``request``
    fit on ``node``, lowest priority first; None when stopping them all would not do (or
    nothing needs stopping, which is not preemption)."""
    if request.placement.max_per_node is not None and usage.per_deployment[request.deployment] >= request.placement.max_per_node:
        return None  # replicas of the same deployment share its priority: nothing to stop
    lower = [r for r in residents if r.request.priority < request.priority]
    if not lower:
        return None

    def fits(freed: Sequence[Resident]) -> bool:
        cpu = usage.cpu - sum(r.request.cpu for r in freed)
        memory = usage.memory - sum(r.request.memory for r in freed)
        ports_taken = False
        if request.host_ports:
            freed_ports = Counter(p for r in freed for p in r.request.host_ports)
            ports_taken = any(
                (usage.port_holders.get(p) or (1 if p in usage.host_ports else 0)) > freed_ports[p] for p in request.host_ports
            )
        return (
            cpu + request.cpu <= node.cpu + _EPSILON
            and memory + request.memory <= node.memory
            and not ports_taken
        )

    if fits(()) or not fits(lower):
        return None

    def size(r: Resident) -> float:
        return (r.request.cpu / node.cpu if node.cpu > 0 else 0.0) + (r.request.memory / node.memory if node.memory > 0 else 0.0)

    lower.sort(key=lambda r: (r.request.priority, -size(r), r.task_id))
    victims: list[Resident] = []
    for resident in lower:
        victims.append(resident)
        if fits(victims):
            break
    # Spare, highest priority first, each victim the request fits without.
    for resident in list(reversed(victims)):
        spared = [v for v in victims if v is not resident]
        if fits(spared):
            victims = spared
    return tuple(victims)


# ---- the reference placer --------------------------------------------------------------------


class FullScanPlacer:
    """Every filter and every scorer on every node, for every placement: O(nodes) each.

    The reference :class:`Placer` must agree with (equally good choices, the same
    explanations), and the baseline ``bench/placement.py`` measures it against.
    """

    def __init__(self, nodes: Sequence[Node], usage: Usage, default_strategy: str = DEFAULT_STRATEGY):
        self.nodes = sorted(nodes, key=lambda n: n.node_id)
        self.usage = usage
        self.default_strategy = default_strategy
        self.taints = sorted({t for node in self.nodes for t in node.taints})

    def evaluate(self, request: Request) -> Decision:
        """The decision :meth:`place` would make, without recording it."""
        strategy = strategy_for(request, self.default_strategy)
        filters = filters_for(request, self.taints)
        scorers = [s for s in strategy.scorers if s.applies(request)]
        topology = strategy.topology if strategy.topology.applies(request) else None
        spread_by = request.placement.spread_by
        rejected: Counter[str] = Counter()
        feasible: list[Node] = []
        for node in self.nodes:
            usage = self.usage.peek(node.node_id)
            failed = next((f for f in filters if not f.feasible(node, usage, request)), None)
            if failed is not None:
                rejected[failed.reason] += 1
            else:
                feasible.append(node)
        if not feasible:
            return _none_fits(rejected, len(self.nodes))
        counts: Counter[str | None] = Counter()
        least = 0
        if topology is not None:
            for node in self.nodes:
                counts[node.labels.get(spread_by)] += self.usage.peek(node.node_id).per_deployment[request.deployment]  # type: ignore[arg-type]
            domains = {node.labels.get(spread_by) for node in feasible} - {None}  # type: ignore[arg-type]
            least = min((counts[d] for d in domains), default=0)
        best: tuple[float, Node, list[tuple[str, float]]] | None = None
        for node in feasible:
            usage = self.usage.peek(node.node_id)
            parts = [(s.name, s.score(node, usage, request)) for s in scorers]
            total = sum(s.weight * score for s, (_, score) in zip(scorers, parts))
            if topology is not None:
                domain = node.labels.get(spread_by)  # type: ignore[arg-type]
                part = topology.score(counts[domain], least) if domain is not None else 0.0
                parts.append((topology.name, part))
                total += topology.weight * part
            if best is None or total > best[0] + _EPSILON:
                best = (total, node, parts)
        assert best is not None
        total, node, parts = best
        return _chosen(node.node_id, len(feasible), total, parts)

    def place(self, request: Request) -> Decision:
        decision = self.evaluate(request)
        if decision.node_id is not None:
            self.usage.add(decision.node_id, request)
        return decision
