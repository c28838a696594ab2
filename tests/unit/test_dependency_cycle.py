"""``dependency_cycle``: finding a depends_on cycle, by table and by property; and the api's
``cycle_errors`` over a batch and what is stored."""

from __future__ import annotations

import graphlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manifests import only
from comp_api.ordering import cycle_errors
from comp_common.manifest import dependency_cycle

TABLE = [
    ({}, None, None),
    ({"a": []}, None, None),
    ({"a": ["a"]}, None, ["a", "a"]),
    ({"a": ["b"], "b": ["a"]}, None, ["a", "b", "a"]),
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, None, ["a", "b", "c", "a"]),
    ({"a": ["b"], "b": ["c"], "c": []}, None, None),
    # a name that is not a key (not applied yet) depends on nothing
    ({"a": ["ghost"], "b": ["a", "ghost"]}, None, None),
    # a diamond is no cycle
    ({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}, None, None),
    # without start: the cycle through the first name (in sorted order) that is on one
    ({"z": ["y"], "y": ["z"], "m": ["n"], "n": ["m"]}, None, ["m", "n", "m"]),
    ({"a": ["x"], "x": ["y"], "y": ["x"]}, None, ["x", "y", "x"]),
    # with start: only a cycle through start, beginning there
    ({"a": ["b"], "b": ["c"], "c": ["a"]}, "b", ["b", "c", "a", "b"]),
    ({"x": ["a"], "a": ["b"], "b": ["a"]}, "x", None),
    ({"a": ["b"]}, "nowhere", None),
    # the shortest way back is the one named
    ({"a": ["b", "c"], "b": ["c"], "c": ["a"]}, "a", ["a", "c", "a"]),
    ({"a": ["b", "c"], "b": ["d"], "c": ["a"], "d": ["a"]}, "a", ["a", "c", "a"]),
    # of two equally short, the one through the earlier-listed dependency
    ({"a": ["b", "c"], "b": ["a"], "c": ["a"]}, "a", ["a", "b", "a"]),
]


@pytest.mark.parametrize(("graph", "start", "cycle"), TABLE)
def test_table(graph: dict[str, list[str]], start: str | None, cycle: list[str] | None) -> None:
    assert dependency_cycle(graph, start) == cycle


NAMES = st.sampled_from("abcdefg")
GRAPHS = st.dictionaries(NAMES, st.lists(NAMES, max_size=4, unique=True), max_size=7)


def is_acyclic(graph: dict[str, list[str]]) -> bool:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError:
        return False
    return True


def assert_is_a_cycle(graph: dict[str, list[str]], cycle: list[str]) -> None:
    assert len(cycle) >= 2 and cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "no name twice on the way round"
    for here, there in zip(cycle, cycle[1:]):
        assert there in graph.get(here, []), f"{here} does not depend on {there}"


@given(GRAPHS)
def test_a_cycle_is_found_exactly_when_there_is_one(graph: dict[str, list[str]]) -> None:
    cycle = dependency_cycle(graph)
    if cycle is None:
        assert is_acyclic(graph)
    else:
        assert_is_a_cycle(graph, cycle)


@given(GRAPHS, NAMES)
def test_a_cycle_through_start_is_found_exactly_when_start_reaches_itself(graph: dict[str, list[str]], start: str) -> None:
    cycle = dependency_cycle(graph, start)
    reachable, frontier = set(), list(graph.get(start, []))
    while frontier:
        node = frontier.pop()
        if node not in reachable:
            reachable.add(node)
            frontier.extend(graph.get(node, []))
    if cycle is None:
        assert start not in reachable
    else:
        assert cycle[0] == start
        assert_is_a_cycle(graph, cycle)


@given(GRAPHS, NAMES)
def test_the_cycle_through_start_is_a_shortest_one(graph: dict[str, list[str]], start: str) -> None:
    cycle = dependency_cycle(graph, start)
    if cycle is None:
        return
    # Breadth-first distances from start's dependencies back to start.
    distance, frontier = {start: 0}, [start]
    shortest = None
    while frontier and shortest is None:
        following = []
        for node in frontier:
            for dep in graph.get(node, []):
                if dep == start:
                    shortest = distance[node] + 1
                elif dep not in distance:
                    distance[dep] = distance[node] + 1
                    following.append(dep)
        frontier = following
    assert len(cycle) - 1 == shortest


# ---- cycle_errors: a batch over what is stored ----------------------------------------------


def deployment(name: str, *deps: str, namespace: str = "shop"):
    return only(f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {{image: x, depends_on: [{', '.join(deps)}]}}")


def test_batch_replaces_the_stored_version() -> None:
    stored = [deployment("a", "b"), deployment("b", "a")]  # as if stored with a cycle already
    # b re-applied without its dependency: no cycle through what is applied.
    assert cycle_errors([("", deployment("b"))], stored) == []
    assert cycle_errors([("", deployment("b", "a"))], stored) == [
        {"path": "spec.depends_on", "message": "depends_on cycle: b -> a -> b"}
    ]


def test_one_error_per_cycle_at_its_first_document() -> None:
    batch = [("document[0]", deployment("a", "b")), ("document[2]", deployment("b", "a")), ("document[3]", deployment("c", "c"))]
    assert cycle_errors(batch, []) == [
        {"path": "document[0].spec.depends_on", "message": "depends_on cycle: a -> b -> a"},
        {"path": "document[3].spec.depends_on", "message": "depends_on cycle: c -> c"},
    ]


def test_namespaces_are_separate_graphs() -> None:
    stored = [deployment("b", "a", namespace="other")]
    assert cycle_errors([("", deployment("a", "b"))], stored) == []
    assert cycle_errors([("", deployment("a", "b", namespace="other"))], stored) == [
        {"path": "spec.depends_on", "message": "depends_on cycle: a -> b -> a"}
    ]


def test_a_long_chain_is_walked_without_recursion() -> None:
    n = 50_000
    chain = {f"d{i}": [f"d{i + 1}"] for i in range(n)}
    assert dependency_cycle(chain) is None
    assert dependency_cycle(chain, start="d0") is None
    chain[f"d{n}"] = ["d0"]
    cycle = dependency_cycle(chain)
    assert cycle is not None and len(cycle) == n + 2 and cycle[0] == cycle[-1]
    assert dependency_cycle(chain, start="d0") == [f"d{i}" for i in range(n + 1)] + ["d0"]
