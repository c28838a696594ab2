"""Start order (depends_on) as tables, and its properties under Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import Dependency, DeploymentSpec
from comp_scheduler.startorder import (
    WAITING_HEALTHY,
    DependencyStatus,
    blocked_by,
    start_blocked,
    unmet,
)


def healthy(name: str) -> Dependency:
    return Dependency(name=name, condition="healthy")


def started(name: str) -> Dependency:
    return Dependency(name=name, condition="started")


@pytest.mark.parametrize(
    "dependency, status, reason",
    [
        (healthy("db"), None, "waiting for db, which does not exist"),
        (started("db"), None, "waiting for db, which does not exist"),
        (healthy("db"), DependencyStatus(3, 3, 1), "waiting for db to be healthy: 1/3 ready"),
        (healthy("db"), DependencyStatus(3, 0, 0), "waiting for db to be healthy: 0/3 ready"),
        (healthy("db"), DependencyStatus(3, 3, 3), None),
        # Mid-rollout: old and new tasks together; ready ones of any generation count.
        (healthy("db"), DependencyStatus(3, 5, 4), None),
        (started("db"), DependencyStatus(3, 2, 0), "waiting for db to be started: 2/3 running"),
        (started("db"), DependencyStatus(3, 3, 0), None),
        (healthy("db"), DependencyStatus(0, 0, 0), "waiting for db, which is scaled to 0"),
        (started("db"), DependencyStatus(0, 2, 2), "waiting for db, which is scaled to 0"),
    ],
)
def test_unmet(dependency, status, reason):
    assert unmet(dependency, status) == reason


def test_blocked_by_names_every_unmet_dependency_in_declared_order():
    spec = DeploymentSpec(image="web:1", depends_on=["db", {"name": "cache", "condition": "started"}, "queue"])
    views = {"db": DependencyStatus(2, 2, 1), "cache": DependencyStatus(1, 0, 0)}
    assert blocked_by(spec.depends_on, views.get) == (
        "waiting for db to be healthy: 1/2 ready; waiting for cache to be started: 0/1 running; waiting for queue, which does not exist"
    )
    views = {"db": DependencyStatus(2, 2, 2), "cache": DependencyStatus(1, 1, 0), "queue": DependencyStatus(1, 1, 1)}
    assert blocked_by(spec.depends_on, views.get) is None


def test_no_dependencies_never_block():
    assert blocked_by([], {}.get) is None
    assert start_blocked([], {}.get, running=0) is None


def test_only_a_deployment_with_nothing_running_is_held():
    deps = [healthy("db")]
    views = {"db": DependencyStatus(3, 3, 1)}
    assert start_blocked(deps, views.get, running=0) == WAITING_HEALTHY.format(name="db", ready=1, replicas=3)
    # One replica runs: scale ups, replacements and rollouts go ahead whatever db's state.
    assert start_blocked(deps, views.get, running=1) is None
    assert start_blocked(deps, {}.get, running=4) is None


def test_status_of_is_asked_only_about_the_named_dependencies():
    asked = []

    def status_of(name: str) -> DependencyStatus | None:
        asked.append(name)
        return DependencyStatus(1, 1, 1)

    assert blocked_by([healthy("db"), started("cache")], status_of) is None
    assert asked == ["db", "cache"]
    asked.clear()
    assert start_blocked([healthy("db")], status_of, running=2) is None
    assert asked == []


# --- properties ---------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "f"])
STATUSES = st.one_of(
    st.none(),
    st.builds(
        lambda replicas, running, ready: DependencyStatus(replicas, running, min(ready, running)),
        st.integers(0, 5),
        st.integers(0, 7),
        st.integers(0, 7),
    ),
)


@given(
    st.lists(st.tuples(NAMES, st.sampled_from(["started", "healthy"])), unique_by=lambda d: d[0], max_size=5),
    st.dictionaries(NAMES, STATUSES),
    st.integers(0, 3),
)
@settings(max_examples=300, deadline=None)
def test_the_gate_holds_only_a_deployment_with_nothing_running_and_only_for_unmet_dependencies(deps, views, running):
    dependencies = [Dependency(name=name, condition=condition) for name, condition in deps]
    reason = blocked_by(dependencies, views.get)
    met = [unmet(d, views.get(d.name)) is None for d in dependencies]
    assert (reason is None) == all(met)
    if reason is not None:
        assert reason.count("waiting for") == met.count(False)
    assert start_blocked(dependencies, views.get, running) == (reason if running == 0 else None)
    for dep in dependencies:
        status = views.get(dep.name)
        if status is not None and unmet(dep, status) is None:
            # More running and ready never undoes a met dependency.
            more = DependencyStatus(status.replicas, status.running + 1, status.ready + 1)
            assert unmet(dep, more) is None
