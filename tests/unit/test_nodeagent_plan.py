"""plan_actions: desired tasks and observed containers in, actions out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.manifest import RestartPolicy
from comp_common.messages import TaskSpec
from comp_nodeagent.agent import NEW_TASK_REASON, Action, ActionKind, backoff_delay, plan_actions, plan_new_starts
from comp_nodeagent.driver import RuntimeTask

START, RESTART, STOP, ADOPT = ActionKind.START, ActionKind.RESTART, ActionKind.STOP, ActionKind.ADOPT
FINISH = ActionKind.FINISH


def spec(task_id: str, spec_hash: str = "h1", restart: str = "always") -> TaskSpec:
    return TaskSpec(
        restart=RestartPolicy(condition=restart),
        task_id=task_id,
        deployment="default.web",
        namespace="default",
        name="web",
        spec_hash=spec_hash,
        image="comp/busybox:test",
        cpu=0.1,
        memory=64 * 1024**2,
    )


def container(task_id: str, state: str = "running", spec_hash: str = "h1", exit_code: int | None = None, cid: str | None = None) -> RuntimeTask:
    return RuntimeTask(
        task_id=task_id,
        container_id=cid or f"c-{task_id}",
        state=state,
        exit_code=exit_code,
        spec_hash=spec_hash,
        deployment="default.web",
    )


def kinds(actions: list[Action]) -> list[tuple[str, ActionKind]]:
    return [(a.task_id, a.kind) for a in actions]


CASES = [
    pytest.param(dict(desired=[spec("a")], actual=[]), [("a", START)], id="start-missing"),
    pytest.param(dict(desired=[spec("a")], actual=[container("a")]), [("a", ADOPT)], id="adopt-unknown-running"),
    pytest.param(
        dict(desired=[spec("a")], actual=[container("a")], tracked={"a": "c-a"}), [], id="known-running-left-alone"
    ),
    pytest.param(
        dict(desired=[spec("a")], actual=[container("a", cid="c-new")], tracked={"a": "c-old"}),
        [("a", ADOPT)],
        id="adopt-replaced-container",
    ),
    pytest.param(
        dict(desired=[spec("a")], actual=[container("a", "exited", exit_code=137)], tracked={"a": "c-a"}),
        [("a", RESTART)],
        id="restart-exited",
    ),
    pytest.param(dict(desired=[spec("a")], actual=[container("a", "created")]), [("a", RESTART)], id="restart-never-started"),
    pytest.param(
        dict(desired=[spec("a", "h2")], actual=[container("a", spec_hash="h1")], tracked={"a": "c-a"}),
        [("a", RESTART)],
        id="restart-spec-changed",
    ),
    pytest.param(
        dict(desired=[spec("a")], actual=[container("a", cid="c1"), container("a", cid="c2")]),
        [("a", RESTART)],
        id="restart-duplicates",
    ),
    pytest.param(dict(desired=[], actual=[container("a")]), [("a", STOP)], id="stop-unassigned-running"),
    pytest.param(dict(desired=[], actual=[container("a", "exited", exit_code=0)]), [("a", STOP)], id="stop-unassigned-exited"),
    pytest.param(dict(desired=[], actual=[], tracked={"a": None}), [("a", STOP)], id="stop-forgets-failed-unassigned"),
    pytest.param(dict(desired=[], actual=[]), [], id="nothing"),
    pytest.param(
        dict(desired=[spec("a"), spec("b")], actual=[container("c")], busy={"a", "c"}), [("b", START)], id="busy-skipped"
    ),
    pytest.param(
        dict(desired=[spec("a")], actual=[], tracked={"a": None}, not_before={"a": 105.0}, now=100.0),
        [],
        id="failed-waits-for-backoff",
    ),
    pytest.param(
        dict(desired=[spec("a")], actual=[], tracked={"a": None}, not_before={"a": 99.0}, now=100.0),
        [("a", START)],
        id="failed-retried-after-backoff",
    ),
    pytest.param(
        dict(
            desired=[spec("a"), spec("b"), spec("c"), spec("d"), spec("e")],
            actual=[
                container("b"),
                container("c", "exited", exit_code=1),
                container("d"),
                container("x"),
                container("e", "exited", exit_code=2),
            ],
            tracked={"d": "c-d", "x": "c-x", "y": None},
            busy={"e"},
        ),
        [("a", START), ("b", ADOPT), ("c", RESTART), ("x", STOP), ("y", STOP)],
        id="mixed",
    ),
]


@pytest.mark.parametrize(("state", "expected"), CASES)
def test_plan_actions(state: dict, expected: list) -> None:
    assert kinds(plan_actions(**state)) == expected


# The restart policy: which ended containers are started again, and which are left ended.
POLICY_CASES = [
    pytest.param(dict(desired=[spec("a", restart="on-failure")], actual=[container("a", "exited", exit_code=1)]),
                 [("a", RESTART)], id="on-failure-restarts-a-failure"),
    pytest.param(dict(desired=[spec("a", restart="on-failure")], actual=[container("a", "exited", exit_code=0)]),
                 [("a", FINISH)], id="on-failure-leaves-a-success"),
    pytest.param(dict(desired=[spec("a", restart="never")], actual=[container("a", "exited", exit_code=1)]),
                 [("a", FINISH)], id="never-leaves-a-failure"),
    pytest.param(dict(desired=[spec("a", restart="never")], actual=[container("a", "exited", exit_code=1)],
                      finished=["c-a"], tracked={"a": "c-a"}),
                 [], id="finished-is-reported-once"),
    pytest.param(dict(desired=[spec("a", restart="never")], actual=[container("a", "created")]),
                 [("a", RESTART)], id="never-started-is-no-exit"),
    pytest.param(dict(desired=[spec("a", "h2", restart="never")], actual=[container("a", "exited", exit_code=0)],
                      finished=["c-a"]),
                 [("a", RESTART)], id="finished-is-replaced-by-a-new-spec"),
    pytest.param(dict(desired=[spec("a", restart="on-failure")], actual=[container("a", "exited", exit_code=0)],
                      terminated={"c-a": "liveness check failed: x"}),
                 [("a", RESTART)], id="on-failure-restarts-what-liveness-stopped"),
    pytest.param(dict(desired=[spec("a", restart="never")], actual=[container("a", "exited", exit_code=143)],
                      terminated={"c-a": "liveness check failed: x"}),
                 [("a", FINISH)], id="never-leaves-what-liveness-stopped"),
    pytest.param(dict(desired=[], actual=[container("a", "exited", exit_code=0)], finished=["c-a"]),
                 [("a", STOP)], id="finished-unassigned-is-removed"),
]


@pytest.mark.parametrize(("state", "expected"), POLICY_CASES)
def test_plan_follows_the_restart_policy(state: dict, expected: list) -> None:
    assert kinds(plan_actions(**state)) == expected


def test_the_reason_of_a_liveness_stop_is_kept() -> None:
    [restart] = plan_actions([spec("a")], [container("a", "exited", exit_code=143)], terminated={"c-a": "liveness check failed: GET / on :80 answered 404"})
    assert restart.reason == "liveness check failed: GET / on :80 answered 404"
    [finish] = plan_actions([spec("a", restart="never")], [container("a", "exited", exit_code=3)])
    assert finish.reason == "container exited with code 3; not restarted (restart policy never)"


def test_actions_carry_what_they_act_on() -> None:
    exited = container("a", "exited", exit_code=137)
    [restart] = plan_actions([spec("a")], [exited])
    assert restart.spec == spec("a")
    assert restart.containers == (exited,)
    assert "137" in restart.reason

    [stop] = plan_actions([], [container("b")])
    assert stop.spec is None
    assert stop.reason


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0)]
)
def test_backoff_delay(failures: int, delay: float) -> None:
    assert backoff_delay(failures, cap=30.0) == delay


# ---- property: applying the plan converges the runtime on the assignments ------------

TASK_IDS = [f"t{i}" for i in range(6)]
ids = st.sets(st.sampled_from(TASK_IDS))
runtime_containers = st.lists(
    st.builds(
        container,
        task_id=st.sampled_from(TASK_IDS),
        state=st.sampled_from(["running", "exited", "created", "dead"]),
        spec_hash=st.sampled_from(["h1", "h2"]),
        exit_code=st.none() | st.integers(0, 255),
    ),
    max_size=8,
)
_container_ids = itertools.count()


def apply(actions: list[Action], runtime: list[RuntimeTask], tracked: dict[str, str | None]) -> list[RuntimeTask]:
    """A simulated engine: what the agent's executors do to the runtime and its own records."""
    by_task = {a.task_id: a for a in actions}
    out = [c for c in runtime if c.task_id not in by_task or by_task[c.task_id].kind is ADOPT]
    for action in actions:
        if action.kind in (START, RESTART):
            assert action.spec is not None
            new = RuntimeTask(action.task_id, f"n{next(_container_ids)}", "running", spec_hash=action.spec.spec_hash)
            out.append(new)
            tracked[action.task_id] = new.container_id
        elif action.kind is ADOPT:
            tracked[action.task_id] = action.containers[0].container_id
        elif action.kind is STOP:
            tracked.pop(action.task_id, None)
    return out


@settings(max_examples=300, deadline=None)
@given(
    wanted=ids,
    hashes=st.dictionaries(st.sampled_from(TASK_IDS), st.sampled_from(["h1", "h2"])),
    runtime=runtime_containers,
    tracked_ids=ids,
)
def test_plan_converges_on_desired(wanted: set[str], hashes: dict[str, str], runtime: list[RuntimeTask], tracked_ids: set[str]) -> None:
    desired = [spec(t, hashes.get(t, "h1")) for t in sorted(wanted)]
    tracked: dict[str, str | None] = {t: None for t in tracked_ids}

    actions = plan_actions(desired, runtime, tracked=tracked)
    assert len({a.task_id for a in actions}) == len(actions), "at most one action per task"
    runtime = apply(actions, runtime, tracked)

    # Exactly the desired tasks run, one container each, with the desired spec.
    assert sorted(c.task_id for c in runtime) == sorted(wanted)
    assert all(c.alive for c in runtime)
    assert {c.task_id: c.spec_hash for c in runtime} == {t.task_id: t.spec_hash for t in desired}
    # The agent knows exactly what runs, and a second pass has nothing left to do.
    assert tracked == {c.task_id: c.container_id for c in runtime}
    assert plan_actions(desired, runtime, tracked=tracked) == []


@given(wanted=ids, runtime=runtime_containers, busy=ids)
def test_busy_tasks_are_never_touched(wanted: set[str], runtime: list[RuntimeTask], busy: set[str]) -> None:
    actions = plan_actions([spec(t) for t in wanted], runtime, busy=busy)
    assert not {a.task_id for a in actions} & busy


@pytest.mark.parametrize(
    ("desired", "known", "not_before", "starts"),
    [
        pytest.param(["a"], set(), {}, ["a"], id="new task"),
        pytest.param(["b", "a"], set(), {}, ["a", "b"], id="several, in task id order"),
        pytest.param(["a", "b"], {"a"}, {}, ["b"], id="a tracked task is left to the listing"),
        pytest.param(["a"], {"a"}, {}, [], id="in flight or reported"),
        pytest.param(["a"], set(), {"a": 11.0}, [], id="backing off"),
        pytest.param(["a"], set(), {"a": 9.0}, ["a"], id="backoff over"),
        pytest.param([], {"gone"}, {}, [], id="unassigned is no start: stops need the listing"),
    ],
)
def test_plan_new_starts(desired: list[str], known: set[str], not_before: dict[str, float], starts: list[str]) -> None:
    actions = plan_new_starts([spec(t) for t in desired], known=known, not_before=not_before, now=10.0)
    assert [a.task_id for a in actions] == starts
    assert all(a.kind is START and a.reason == NEW_TASK_REASON and a.spec is not None for a in actions)


@settings(max_examples=100, deadline=None)
@given(
    desired=st.sets(st.sampled_from("abcdef")),
    known=st.sets(st.sampled_from("abcdef")),
)
def test_new_starts_are_starts_plan_actions_would_make_on_an_empty_host(desired: set[str], known: set[str]) -> None:
    """The shortcut never starts what the full plan would not: a task unknown to the agent and
    without a container is a START there too."""
    specs = [spec(t) for t in desired]
    quick = {a.task_id for a in plan_new_starts(specs, known=known)}
    full = {a.task_id for a in plan_actions(specs, [], busy=known) if a.kind is START}
    assert quick == full
