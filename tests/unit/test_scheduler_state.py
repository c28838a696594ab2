"""ClusterState: snapshots carry what placement needs; liveness deadlines; incremental summaries."""

from __future__ import annotations

import random

import pytest

from comp_common.manifest import parse_deployments
from comp_common.messages import (
    Capacity, DeploymentRecord, Heartbeat, NodeAssignments, NodeControl, Taint, TaskSpec, TaskState, TaskStatus,
)
from comp_common.observed import NodeRecord
from comp_scheduler.model import NodeStatus
from comp_scheduler.model import Taint as NodeTaint
from comp_scheduler.settings import SchedulerSettings
from comp_scheduler.state import ClusterState, DisruptionPolicy, HeartbeatParser


def heartbeat(**extra) -> Heartbeat:
    return Heartbeat(
        node_id="n1", seq=1, sent_at=0.0, started_at=0.0, driver="hollow",
        capacity=Capacity(cpu=4, memory=8 * 1024**3), allocated=Capacity(cpu=0, memory=0), **extra,
    )


def test_snapshot_carries_labels_and_taints():
    state = ClusterState(grace_seconds=3)
    state.record_heartbeat(
        heartbeat(labels={"zone": "a"}, taints=[Taint(key="dedicated", value="gpu"), Taint(key="spot")]), now=1.0
    )
    node = state.snapshot().nodes["n1"]
    assert node.status is NodeStatus.READY and dict(node.labels) == {"zone": "a"}
    assert node.taints == frozenset({NodeTaint("dedicated", "gpu", "NoSchedule"), NodeTaint("spot", "", "NoSchedule")})
    assert sorted(str(t) for t in node.taints) == ["dedicated=gpu:NoSchedule", "spot:NoSchedule"]


def test_a_node_known_only_from_assignments_has_no_taints():
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n2", NodeAssignments(node_id="n2"), None, now=0.0)
    assert state.snapshot().nodes["n2"].taints == frozenset()


def test_heartbeat_without_taints_from_an_older_agent_is_valid():
    hb = Heartbeat.model_validate_json(heartbeat().model_dump_json(exclude={"taints"}))
    assert hb.taints == []
    assert NodeRecord.from_heartbeat(hb, 1.0).taints == []


def test_an_unknown_taint_effect_does_not_invalidate_a_heartbeat():
    # A newer agent may send an effect this scheduler does not act on; the heartbeat must pass.
    hb = Heartbeat.model_validate({**heartbeat().model_dump(), "taints": [{"key": "k", "effect": "NoExecute"}]})
    assert str(hb.taints[0]) == "k:NoExecute"


@pytest.mark.parametrize("value", ["spread", "binpack"])
def test_default_strategy_setting(monkeypatch, value):
    monkeypatch.setenv("COMP_SCHEDULER__DEFAULT_STRATEGY", value)
    assert SchedulerSettings().scheduler.default_strategy == value


def test_default_strategy_setting_refuses_unknown(monkeypatch):
    monkeypatch.setenv("COMP_SCHEDULER__DEFAULT_STRATEGY", "pack")
    with pytest.raises(ValueError, match="spread"):
        SchedulerSettings()


@pytest.mark.parametrize(
    "variable, value",
    [
        ("COMP_LIVENESS__PING_AFTER_SECONDS", "-1"),
        ("COMP_LIVENESS__PING_TIMEOUT_SECONDS", "0"),
        ("COMP_LIVENESS__DISRUPTION_FRACTION", "1.5"),
        ("COMP_LIVENESS__DISRUPTION_MIN_NODES", "0"),
    ],
)
def test_liveness_settings_out_of_range_are_refused_with_their_name(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    field = variable.removeprefix("COMP_LIVENESS__").lower()
    with pytest.raises(ValueError, match=field):
        SchedulerSettings()


# ---- liveness: one deadline per node, checked only when due ---------------------------------------


@pytest.mark.parametrize(
    "change, same_record",
    [
        ({}, True),  # only the time moved
        ({"seq": 9, "sent_at": 5.0, "full": False}, True),
        ({"allocated": Capacity(cpu=1, memory=1024)}, False),
        ({"capacity": Capacity(cpu=8, memory=8 * 1024**3)}, False),
        ({"labels": {"zone": "b"}}, False),
        ({"taints": [Taint(key="spot")]}, False),
        ({"address": "10.0.0.2"}, False),
        ({"task_count": 3}, False),
    ],
)
def test_a_heartbeat_that_repeats_the_last_keeps_its_record_and_snapshot_node(change, same_record):
    state = ClusterState(grace_seconds=3)
    state.record_heartbeat(heartbeat(), now=1.0)
    record, node = state.nodes["n1"].record, state.snapshot().nodes["n1"]
    state.record_heartbeat(heartbeat().model_copy(update=change), now=2.0)
    assert state.nodes["n1"].record.last_heartbeat == 2.0
    assert (state.nodes["n1"].record is record) is same_record
    assert (state.snapshot().nodes["n1"] is node) is same_record


def test_the_snapshot_node_follows_status_and_control_changes():
    state = ClusterState(grace_seconds=3)
    state.record_heartbeat(heartbeat(), now=1.0)
    node = state.snapshot().nodes["n1"]
    state.node_controls["n1"] = NodeControl(node_id="n1", cordoned=True, updated_at=1.0)
    cordoned = state.snapshot().nodes["n1"]
    assert cordoned is not node and cordoned.cordoned and not node.cordoned
    state.refresh_liveness(10.0)
    down = state.snapshot().nodes["n1"]
    assert down.status is NodeStatus.DOWN and down.cordoned


def beat(node_id: str, tasks=()) -> Heartbeat:
    return heartbeat().model_copy(update={"node_id": node_id, "tasks": list(tasks)})


@pytest.mark.parametrize(
    "beats, check_at, down",
    [
        # (node, heartbeat times), when the check runs, who goes down (grace 3: down strictly after last + 3)
        ({"a": [0.0]}, 2.9, []),
        ({"a": [0.0]}, 3.0, []),
        ({"a": [0.0]}, 3.01, ["a"]),
        ({"a": [0.0, 1.0, 2.0]}, 4.5, []),
        ({"a": [0.0, 1.0, 2.0]}, 5.5, ["a"]),
        ({"a": [0.0, 2.0], "b": [0.0]}, 4.0, ["b"]),
        ({"a": [0.0, 2.0], "b": [0.0]}, 9.0, ["a", "b"]),
    ],
)
def test_a_node_goes_down_when_its_grace_after_the_last_heartbeat_has_passed(beats, check_at, down):
    state = ClusterState(grace_seconds=3)
    for at, node_id in sorted((t, n) for n, times in beats.items() for t in times):
        state.record_heartbeat(beat(node_id), now=at)
    assert sorted(state.refresh_liveness(check_at)[0]) == down
    assert {n for n, e in state.nodes.items() if e.status is NodeStatus.DOWN} == set(down)


def test_next_deadline_is_the_earliest_last_heartbeat_plus_grace():
    state = ClusterState(grace_seconds=3)
    assert state.next_deadline() is None, "no node, nothing to wait for"
    state.record_heartbeat(beat("a"), now=0.0)
    state.record_heartbeat(beat("b"), now=1.0)
    assert state.next_deadline() == 3.0
    state.record_heartbeat(beat("a"), now=2.0)
    # a's queued deadline is stale: due but not overdue; it is queued again at its real one.
    assert state.overdue(3.5) == [] and state.next_deadline() == 4.0
    assert state.overdue(4.5) == ["b"]
    assert state.refresh_liveness(4.5) == (["b"], [])
    assert state.next_deadline() == 5.0, "a down node has no deadline"
    state.record_heartbeat(beat("b"), now=4.6)  # back
    assert state.nodes["b"].status is NodeStatus.READY and state.next_deadline() == 5.0
    assert state.refresh_liveness(7.7) == (["a", "b"], [])
    assert state.next_deadline() is None


def test_a_node_known_only_from_assignments_goes_down_a_grace_after_it_was_learnt_of():
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n2", NodeAssignments(node_id="n2"), None, now=10.0)
    assert state.next_deadline() == 13.0
    assert state.refresh_liveness(12.0) == ([], []) and state.nodes["n2"].status is NodeStatus.UNKNOWN
    assert state.refresh_liveness(13.5) == (["n2"], [])


# ---- statuses: updated_at alone is no change -------------------------------------------------------


def pinged(node_id: str) -> Heartbeat:
    return beat(node_id).model_copy(update={"answers_pings": True})


@pytest.mark.parametrize(
    "beats, check_at, due",
    [
        # (node, heartbeat times), when due_for_ping runs, who is due (ping after 1.5)
        ({"a": [0.0]}, 1.4, []),
        ({"a": [0.0]}, 1.6, ["a"]),
        ({"a": [0.0, 1.0]}, 1.6, []),
        ({"a": [0.0, 1.0]}, 2.6, ["a"]),
        ({"a": [0.0], "b": [1.0]}, 2.0, ["a"]),
        ({"a": [0.0], "b": [1.0]}, 2.6, ["a", "b"]),
    ],
)
def test_a_node_that_answers_pings_is_due_for_one_when_a_heartbeat_is_late(beats, check_at, due):
    state = ClusterState(grace_seconds=3, ping_after_seconds=1.5)
    for at, node_id in sorted((t, n) for n, times in beats.items() for t in times):
        state.record_heartbeat(pinged(node_id), now=at)
    assert sorted(state.due_for_ping(check_at)) == due
    assert not set(state.due_for_ping(check_at + 5)) & set(due), "one ping per silence"


def test_pings_follow_heartbeats_and_only_nodes_that_answer_them_are_pinged():
    state = ClusterState(grace_seconds=3, ping_after_seconds=1.5)
    state.record_heartbeat(beat("quiet"), now=0.0)
    state.record_heartbeat(pinged("a"), now=0.0)
    assert state.next_ping() == 1.5
    assert state.due_for_ping(1.6) == ["a"] and state.next_ping() is None
    state.record_heartbeat(pinged("a"), now=2.0)  # it was alive after all
    assert state.next_ping() == 3.5 and state.due_for_ping(3.6) == ["a"], "a new silence, a new ping"
    off = ClusterState(grace_seconds=3, ping_after_seconds=0)
    off.record_heartbeat(pinged("a"), now=0.0)
    assert off.next_ping() is None and off.due_for_ping(10.0) == []


def test_an_unreachable_node_goes_down_at_once_unless_it_was_heard_from_since_the_ping():
    state = ClusterState(grace_seconds=3, ping_after_seconds=1.5)
    state.record_heartbeat(pinged("a"), now=0.0)
    state.record_heartbeat(pinged("b"), now=0.0)
    state.stopping["old"] = "a"
    assert sorted(state.due_for_ping(1.6)) == ["a", "b"]
    state.record_heartbeat(pinged("b"), now=1.7)  # b's agent reconnected before the answer
    assert state.still_silent(["a", "b"]) == ["a"]
    assert state.mark_unreachable(["a"], asked_at=1.8, now=1.9) == ["a"]
    assert state.mark_unreachable(["b"], asked_at=1.65, now=1.9) == []
    assert state.nodes["a"].status is NodeStatus.DOWN and state.nodes["b"].status is NodeStatus.READY
    assert "old" not in state.stopping, "what it was stopping is gone with it"
    assert state.overdue(3.5) == [] and state.next_deadline() == 4.7, "only b can still go down"
    assert state.mark_unreachable(["a"], asked_at=2.0, now=2.0) == [], "already down"
    state.record_heartbeat(pinged("a"), now=5.0)
    assert state.nodes["a"].status is NodeStatus.READY


POLICY = DisruptionPolicy(fraction=0.5, min_nodes=4, hold_seconds=10)


def fleet(n: int, policy: DisruptionPolicy = POLICY) -> ClusterState:
    state = ClusterState(grace_seconds=3, disruption=policy)
    for i in range(n):
        state.record_heartbeat(beat(f"n{i}"), now=0.0)
    return state


@pytest.mark.parametrize(
    "nodes, silent, held",
    [
        (10, 4, False),  # 40% of the ready nodes: they go down
        (10, 5, True),  # half at once: held
        (10, 10, True),  # all of them: held
        (3, 3, False),  # fewer ready nodes than min_nodes: no policy
        (4, 2, True),
    ],
)
def test_most_nodes_going_down_at_once_are_held(nodes, silent, held):
    state = fleet(nodes)
    for i in range(silent, nodes):
        state.record_heartbeat(beat(f"n{i}"), now=2.0)
    down, _ = state.refresh_liveness(4.0)
    assert (down == []) is held and (held or len(down) == silent)
    assert (state.holding_since is not None) is held
    assert sum(e.status is NodeStatus.DOWN for e in state.nodes.values()) == (0 if held else silent)


def test_a_hold_ends_when_they_are_heard_from_or_after_hold_seconds():
    state = fleet(10)
    assert state.refresh_liveness(4.0)[0] == [] and state.holding_since == 4.0
    for i in range(10):
        state.record_heartbeat(beat(f"n{i}"), now=5.0)  # the network came back
    assert state.refresh_liveness(6.0) == ([], []) and state.holding_since is None
    # A new silence: held again from when it began, then let go once the hold is over.
    assert state.refresh_liveness(8.5)[0] == [] and state.holding_since == 8.5
    assert state.refresh_liveness(18.0)[0] == []
    assert sorted(state.refresh_liveness(18.6)[0]) == sorted(f"n{i}" for i in range(10))


def test_a_wave_spread_over_many_checks_is_held_once_it_reaches_the_fraction():
    # Heartbeat slots are staggered: a stall makes nodes late one after another.
    state = ClusterState(grace_seconds=3, disruption=POLICY)
    for i in range(10):
        state.record_heartbeat(beat(f"n{i}"), now=i * 0.1)
    went = [state.refresh_liveness(3.01 + i * 0.1)[0] for i in range(10)]
    assert went[:4] == [["n0"], ["n1"], ["n2"], ["n3"]], "alone, each is a node down"
    assert went[4:] == [[]] * 6, "the fifth of ten within a grace is half the nodes: the rest are held"
    # Nodes going down more than a grace apart are no wave: each goes down.
    spaced = ClusterState(grace_seconds=3, disruption=POLICY)
    downs = []
    for step in range(8):  # node k falls silent at 4k s; the rest keep beating
        now = 4.0 * step
        for i in range(step, 10):
            spaced.record_heartbeat(beat(f"n{i}"), now=now)
        downs += spaced.refresh_liveness(now + 2.0)[0]
    assert downs == [f"n{i}" for i in range(7)] and spaced.holding_since is None


def test_the_policy_holds_nodes_whose_pings_found_no_one_too():
    state = fleet(10)
    assert state.mark_unreachable([f"n{i}" for i in range(6)], asked_at=1.6, now=1.7) == []
    assert state.mark_unreachable(["n0"], asked_at=1.6, now=1.7) == ["n0"], "one alone is no disruption"


def test_a_status_repeated_with_another_timestamp_is_not_a_change():
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec("t1", "default.web")]), 1, now=0.0)
    running = TaskStatus(task_id="t1", node_id="n1", deployment="default.web", state=TaskState.RUNNING, updated_at=1.0)
    assert state.record_status(running) == "changed"
    assert state.record_status(running.model_copy(update={"updated_at": 2.0})) == "ignored"
    assert state.record_status(running.model_copy(update={"restarts": 1})) == "changed"
    _, changed, _ = state.record_heartbeat(beat("n1", [running.model_copy(update={"restarts": 1, "updated_at": 9.0})]), now=3.0)
    assert changed == []


# ---- summaries: only touched deployments are recounted, and always equal a full count ---------------


def spec(task_id: str, deployment: str) -> TaskSpec:
    namespace, name = deployment.split(".")
    return TaskSpec(task_id=task_id, deployment=deployment, namespace=namespace, name=name, spec_hash="h", image="i", cpu=0.1, memory=1)


def record(name: str, replicas: int) -> DeploymentRecord:
    deployment = parse_deployments(
        f"apiVersion: comp/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec: {{replicas: {replicas}, image: i}}\n"
    )[0]
    return DeploymentRecord(deployment=deployment, created_at=0.0, updated_at=0.0)


def full_count(state: ClusterState) -> dict[str, tuple[int, int]]:
    """What a summary must say, counted the slow way over every assignment."""
    out = {key: (0, 0) for key in state.desired}
    for value, _ in state.assignments.values():
        for t in value.tasks:
            if t.deployment in out:
                placed, running = out[t.deployment]
                status = state.statuses.get(t.task_id)
                out[t.deployment] = (placed + 1, running + (status is not None and status.state is TaskState.RUNNING))
    return out


def test_summaries_of_touched_deployments_keep_the_shown_picture_equal_to_a_full_count():
    rng = random.Random(3)
    state = ClusterState(grace_seconds=3)
    state.desired = {f"default.d{i}": record(f"d{i}", 3) for i in range(4)}
    state.touched.update(state.desired)  # as the service does for a changed desired state
    shown: dict[str, tuple[int, int]] = {}
    ids = iter(range(10**6))

    def take() -> set[str]:
        touched = state.take_touched()
        for s in state.deployment_statuses(0.0, touched):
            shown[s.deployment] = (s.placed, s.running)
        return touched

    take()
    for step in range(400):
        node = f"n{rng.randrange(5)}"
        value = state.assignments.get(node, (NodeAssignments(node_id=node), None))[0]
        op = rng.randrange(6)
        if op == 0:  # a round adds tasks
            tasks = value.tasks + [spec(f"t{next(ids)}", rng.choice(sorted(state.desired))) for _ in range(rng.randrange(1, 4))]
            state.set_assignments(node, value.model_copy(update={"tasks": tasks}), step)
        elif op == 1 and value.tasks:  # a round stops some
            keep = [t for t in value.tasks if rng.random() < 0.6]
            state.set_assignments(node, value.model_copy(update={"tasks": keep}), step)
        elif op == 2 and value.tasks:  # a status event
            t = rng.choice(value.tasks)
            state.record_status(
                TaskStatus(task_id=t.task_id, node_id=node, deployment=t.deployment, state=rng.choice(list(TaskState)))
            )
        elif op == 3:  # a heartbeat with some of the node's tasks running
            states = [
                TaskStatus(task_id=t.task_id, node_id=node, deployment=t.deployment, state=TaskState.RUNNING)
                for t in value.tasks if rng.random() < 0.7
            ]
            state.record_heartbeat(beat(node, states), now=float(step))
        elif op == 4:  # another scheduler's picture taken over
            state.replace_assignments({n: (v, r or 0) for n, (v, r) in state.assignments.items() if rng.random() < 0.8}, now=float(step))
        else:
            state.refresh_liveness(float(step))
        touched = take()
        assert shown == full_count(state), f"step {step}, op {op}"
        assert touched <= set(state.desired) | {t.deployment for v, _ in state.assignments.values() for t in v.tasks} | {
            s.deployment for s in state.statuses.values()
        } | set(shown)
    assert any(running for _, running in shown.values()), "the walk reached running tasks"


@pytest.mark.parametrize(
    "change, touched",
    [
        ("nothing", set()),
        ("status of a", {"default.a"}),
        ("same status again", set()),
        ("task added to b", {"default.b"}),
        ("task of a moved away", {"default.a"}),
    ],
)
def test_only_the_deployments_a_change_is_about_are_touched(change, touched):
    state = ClusterState(grace_seconds=3)
    state.desired = {"default.a": record("a", 1), "default.b": record("b", 1)}
    state.load_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec("a1", "default.a")]), 1, now=0.0)
    running = TaskStatus(task_id="a1", node_id="n1", deployment="default.a", state=TaskState.RUNNING)
    state.record_status(running)
    state.take_touched()
    value = state.assignments["n1"][0]
    if change == "status of a":
        state.record_status(running.model_copy(update={"state": TaskState.EXITED}))
    elif change == "same status again":
        state.record_status(running)
    elif change == "task added to b":
        state.set_assignments("n1", value.model_copy(update={"tasks": value.tasks + [spec("b1", "default.b")]}), 2)
    elif change == "task of a moved away":
        state.set_assignments("n1", value.model_copy(update={"tasks": []}), 2)
    assert state.take_touched() == touched


def test_snapshot_reuses_the_tasks_of_unchanged_assignments_and_follows_their_state():
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec("a1", "default.a"), spec("a2", "default.a")]), 1, now=0.0)
    first = state.snapshot().tasks
    state.record_status(TaskStatus(task_id="a1", node_id="n1", deployment="default.a", state=TaskState.RUNNING))
    second = state.snapshot().tasks
    assert second["a2"] is first["a2"], "unchanged task reused"
    assert first["a1"].state is TaskState.PENDING and second["a1"].state is TaskState.RUNNING, "earlier snapshot untouched"
    state.set_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec("a2", "default.a")]), 2)
    assert set(state.snapshot().tasks) == {"a2"}


# ---- heartbeats: a node's unchanged task list is validated once ----------------------------------


def running(task_id: str, **extra) -> TaskStatus:
    return TaskStatus(task_id=task_id, node_id="n1", deployment="default.web", state=TaskState.RUNNING, **extra)


def test_the_parser_reuses_a_nodes_task_list_while_its_bytes_are_unchanged():
    parser = HeartbeatParser()
    hb = heartbeat(labels={"zone": "a"}, tasks=[running("t1"), running("t2")])
    first = parser.parse(hb.model_dump_json().encode())
    again = parser.parse(hb.model_copy(update={"seq": 2}).model_dump_json().encode())
    assert first == hb and again == hb.model_copy(update={"seq": 2})
    assert again.tasks is first.tasks, "not validated again"
    changed = hb.model_copy(update={"seq": 3, "tasks": [running("t1"), running("t2", restarts=1)]})
    third = parser.parse(changed.model_dump_json().encode())
    assert third == changed and third.tasks is not first.tasks


def test_a_partial_heartbeat_neither_replaces_the_cached_full_list_nor_is_cached():
    parser = HeartbeatParser()
    full = heartbeat(tasks=[running("t1"), running("t2")])
    first = parser.parse(full.model_dump_json().encode())
    change = full.model_copy(update={"seq": 2, "full": False, "tasks": [running("t2", restarts=1)]})
    assert parser.parse(change.model_dump_json().encode()) == change
    quiet = full.model_copy(update={"seq": 3, "full": False, "tasks": []})
    assert parser.parse(quiet.model_dump_json().encode()).tasks == []
    again = parser.parse(full.model_copy(update={"seq": 4}).model_dump_json().encode())
    assert again.tasks is first.tasks


def test_only_a_full_heartbeat_says_which_stopping_tasks_are_gone():
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec("t1", "default.web")]), 1, now=0.0)
    state.record_heartbeat(beat("n1", [running("t1"), running("old")]), now=0.0)
    state.stopping["old"] = "n1"
    assert state.nodes["n1"].record.tasks == 2, "an older agent's full list is its count"
    partial = beat("n1", [running("t1", restarts=1)]).model_copy(update={"full": False, "task_count": 2})
    _, changed, gone = state.record_heartbeat(partial, now=1.0)
    assert [s.task_id for s in changed] == ["t1"] and gone == [] and "old" in state.stopping
    assert state.nodes["n1"].record.tasks == 2, "the count the heartbeat states, not its list's length"
    _, _, gone = state.record_heartbeat(beat("n1", [running("t1", restarts=1)]).model_copy(update={"task_count": 1}), now=2.0)
    assert gone == ["old"] and state.nodes["n1"].record.tasks == 1


@pytest.mark.parametrize(
    "body",
    [
        # tasks not last: the tail is no list, so the full validation reads every field
        b'{"node_id":"n1","seq":1,"sent_at":0,"started_at":0,"driver":"d","capacity":{"cpu":1,"memory":1},'
        b'"allocated":{"cpu":0,"memory":0},"tasks":[],"labels":{"zone":"b"}}',
        b'{"node_id":"n1","seq":1,"sent_at":0,"started_at":0,"driver":"d","capacity":{"cpu":1,"memory":1},'
        b'"allocated":{"cpu":0,"memory":0}}',  # no tasks at all
    ],
)
def test_the_parser_reads_other_shapes_as_a_full_validation_does(body):
    parser = HeartbeatParser()
    for _ in range(2):  # also once a list is cached for the node
        assert parser.parse(body) == Heartbeat.model_validate_json(body)


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe", b"{}", b'{"node_id": 5}', b'{"node_id":"n1","tasks":[1]}', b'{"node_id":"n1","seq":1,"tasks":[]}'],
)
def test_the_parser_refuses_what_a_full_validation_refuses(garbage):
    with pytest.raises(ValueError):
        HeartbeatParser().parse(garbage)


# ---- health, restart and rollout fields: snapshot, change detection, desired_view -------------

_PROBED = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  image: comp/busybox:test
  resources: {cpu: 0.1, memory: 16Mi}
  restart: {condition: on-failure}
  health:
    readiness: {http: {path: /, port: 80}}
  ports: [{container_port: 80}]
"""


def probed_spec(task_id: str = "t1", generation: int = 3) -> TaskSpec:
    from comp_scheduler.applier import task_spec
    from comp_scheduler.model import Place

    deployment = parse_deployments(_PROBED)[0]
    record = DeploymentRecord(deployment=deployment, generation=generation, created_at=0, updated_at=0)
    return task_spec(Place(task_id, "default.web", "n1", "test"), record, now=5.0)


def test_the_task_spec_carries_health_restart_stop_and_generation_from_the_deployment():
    spec = probed_spec()
    assert spec.health.readiness is not None and spec.health.readiness.http.path == "/"
    assert spec.restart.condition == "on-failure"
    assert (spec.stop_signal, spec.stop_grace_seconds, spec.generation) == ("SIGTERM", 10.0, 3)


def state_with(spec: TaskSpec) -> ClusterState:
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec]), 1, now=0.0)
    return state


def status(**fields) -> TaskStatus:
    return TaskStatus(task_id="t1", node_id="n1", deployment="default.web", **{"state": TaskState.RUNNING, **fields})


def test_snapshot_takes_readiness_and_restart_from_the_spec_and_health_from_the_status():
    state = state_with(probed_spec())
    task = state.snapshot().tasks["t1"]
    assert (task.readiness_check, task.restart, task.generation) == (True, "on-failure", 3)
    assert (task.state, task.ready, task.ready_since, task.crash_loop, task.exit_code) == (TaskState.PENDING, False, None, False, None)

    state.record_status(status(ready=True, ready_since=7.0))
    task = state.snapshot().tasks["t1"]
    assert (task.state, task.ready, task.ready_since) == (TaskState.RUNNING, True, 7.0) and task.serving


@pytest.mark.parametrize(
    "change, field, value",
    [
        ({"ready": True, "ready_since": 9.0}, "ready", True),
        ({"ready": True, "ready_since": 9.0}, "ready_since", 9.0),
        ({"crash_loop": True}, "crash_loop", True),
        ({"state": TaskState.EXITED, "exit_code": 0}, "exit_code", 0),
        ({"state": TaskState.EXITED, "exit_code": 0}, "state", TaskState.EXITED),
    ],
)
def test_a_cached_snapshot_task_follows_every_health_field(change, field, value):
    state = state_with(probed_spec())
    state.record_status(status())
    before = state.snapshot().tasks["t1"]  # cached from here on: the assignments value is unchanged
    assert state.record_status(status(**change)) == "changed"
    after = state.snapshot().tasks["t1"]
    assert getattr(after, field) == value and after is not before
    assert state.snapshot().tasks["t1"] is after, "unchanged again: reused"


@pytest.mark.parametrize(
    "change",
    [
        {"ready": True},
        {"ready_since": 3.0},
        {"readiness": "healthy"},
        {"liveness": "unhealthy"},
        {"crash_loop": True},
    ],
)
def test_a_health_change_alone_is_a_status_change(change):
    state = state_with(probed_spec())
    state.record_status(status())
    state.take_touched()
    assert state.record_status(status(**change)) == "changed"
    assert state.take_touched() == {"default.web"}, "its summary is recounted and the flush writes it"
    assert state.record_status(status(**change, updated_at=99.0)) == "ignored", "a newer time alone is no change"


def test_a_heartbeat_reports_what_each_changed_status_replaced():
    state = state_with(probed_spec())
    state.record_heartbeat(beat("n1", [status()]), now=1.0)
    before: dict = {}
    _, changed, _ = state.record_heartbeat(beat("n1", [status(ready=True)]), now=2.0, before=before)
    assert [s.ready for s in changed] == [True]
    assert before["t1"].ready is False


def web_record(generation: int = 2, promoted: int = 0) -> DeploymentRecord:
    return DeploymentRecord(
        deployment=parse_deployments(_PROBED)[0], generation=generation, promoted_generation=promoted, created_at=0, updated_at=0
    )


@pytest.mark.parametrize(
    "promoted_generation, settled, seen, expect",
    [
        # (record.promoted_generation, state.settled, state.seen_healthy) -> (promoted, settled, seen_healthy)
        (0, None, None, (False, True, frozenset())),  # nothing known: no rollout planned on a guess
        (2, None, None, (True, True, frozenset())),
        (1, (2, False), (2, frozenset({"a"})), (False, False, frozenset({"a"}))),
        (0, (2, True), None, (False, True, frozenset())),
        (0, (1, False), (1, frozenset({"a"})), (False, True, frozenset())),  # another generation's: not this one's
    ],
)
def test_desired_view_flags(promoted_generation, settled, seen, expect):
    state = ClusterState(grace_seconds=3)
    state.desired["default.web"] = web_record(2, promoted_generation)
    if settled is not None:
        state.settled["default.web"] = settled
    if seen is not None:
        state.seen_healthy["default.web"] = seen
    want = state.desired_view()["default.web"]
    assert (want.promoted, want.settled, want.seen_healthy) == expect


def test_seen_healthy_grows_within_a_generation_and_restarts_with_the_next():
    state = ClusterState(grace_seconds=3)
    state.remember_healthy("default.web", 2, ["a"])
    state.remember_healthy("default.web", 2, ["b"])
    assert state.seen_healthy["default.web"] == (2, frozenset({"a", "b"}))
    state.remember_healthy("default.web", 3, [])
    assert state.seen_healthy["default.web"] == (3, frozenset())


def test_the_summary_shows_the_rollout_of_the_current_generation_only():
    state = ClusterState(grace_seconds=3)
    state.desired["default.web"] = web_record(2)
    assert state.set_rollout_status("default.web", 2, "progressing", "generation 2: 0/1 new healthy")
    assert not state.set_rollout_status("default.web", 2, "progressing", "generation 2: 0/1 new healthy")
    [summary] = state.deployment_statuses(1.0)
    assert (summary.generation, summary.rollout_state, summary.rollout_message) == (2, "progressing", "generation 2: 0/1 new healthy")
    state.desired["default.web"] = web_record(3)
    [summary] = state.deployment_statuses(1.0)
    assert (summary.generation, summary.rollout_state) == (3, "")


def test_rebalance_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("COMP_SCHEDULER__REBALANCE__MAX_MOVES", "9")
    monkeypatch.setenv("COMP_SCHEDULER__REBALANCE__ENABLED", "false")
    policy = SchedulerSettings().scheduler.rebalance.policy()
    assert (policy.max_moves, policy.enabled, policy.margin) == (9, False, 2)
    monkeypatch.setenv("COMP_SCHEDULER__REBALANCE__MARGIN", "1")
    with pytest.raises(ValueError, match="margin"):
        SchedulerSettings()
