"""The scheduler service's rollout plumbing without NATS: which task statuses ask for a
round, and the shared revert helpers (revisions.returned_to, last_healthy)."""

from __future__ import annotations

import pytest

from comp_common.manifest import parse_deployments
from comp_common.messages import DeploymentRecord, NodeControl, RevisionRecord, TaskState, TaskStatus
from comp_common.revisions import last_healthy, returned_to, revision_of
from comp_scheduler.service import Scheduler
from comp_scheduler.settings import SchedulerSettings

WEB = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: web, labels: {tier: front}}
spec: {replicas: %d, image: "%s", resources: {cpu: 0.1, memory: 16Mi}}
"""


def record(image: str, replicas: int = 2, generation: int = 1) -> DeploymentRecord:
    return DeploymentRecord(deployment=parse_deployments(WEB % (replicas, image))[0], generation=generation, created_at=0, updated_at=0)


def status(state: TaskState, ready: bool = False, crash_loop: bool = False, deployment: str = "default.web") -> TaskStatus:
    return TaskStatus(task_id="t1", node_id="n1", deployment=deployment, state=state, ready=ready, crash_loop=crash_loop)


@pytest.fixture
def scheduler() -> Scheduler:
    s = Scheduler(SchedulerSettings(), broker=None, store=None)  # type: ignore[arg-type]
    s.state.desired["default.web"] = record("web:v1")
    return s


R, S, F, X = TaskState.RUNNING, TaskState.STARTING, TaskState.FAILED, TaskState.EXITED


@pytest.mark.parametrize(
    "before, after, rolling, expect",
    [
        (status(S), status(R), True, True),  # came up during a rollout
        (None, status(R), True, True),  # came up, first heard of in that state
        (status(R), status(R, ready=True), True, True),  # readiness flipped
        (status(R, ready=True), status(R), True, True),
        (status(R), status(R, crash_loop=True), True, True),
        (status(R), status(F), True, True),
        (status(R), status(X), True, True),
        (status(R), status(R), True, False),  # the same again (a message or restart count changed)
        (status(TaskState.PENDING), status(S), True, False),  # starting decides nothing
        (status(S), status(R), False, False),  # no rollout, move, drain or dependency: waits
    ],
)
def test_which_status_changes_ask_for_a_round(scheduler, before, after, rolling, expect):
    if rolling:
        scheduler._rolling = {"default.web"}
    assert scheduler._status_moves_rounds(before, after) is expect


def test_a_task_coming_up_asks_for_a_round_when_a_dependent_waits_or_a_node_drains(scheduler):
    came_up = (status(S), status(R))
    assert not scheduler._status_moves_rounds(*came_up)
    scheduler._awaited = {"default.web"}
    assert scheduler._status_moves_rounds(*came_up)
    scheduler._awaited = set()
    scheduler.state.node_controls = {"n9": NodeControl(node_id="n9", cordoned=True, draining=True, updated_at=0)}
    assert scheduler._status_moves_rounds(*came_up)


def test_the_deployments_a_pending_one_waits_for_are_watched(scheduler):
    waiting = parse_deployments(
        "apiVersion: comp/v1\nkind: Deployment\nmetadata: {name: app}\n"
        "spec: {image: app, resources: {cpu: 0.1, memory: 16Mi}, depends_on: [web]}"
    )[0]
    scheduler.state.desired["default.app"] = DeploymentRecord(deployment=waiting, created_at=0, updated_at=0)
    assert scheduler._awaited_by({"default.app": "waiting for web to be healthy: 0/2 ready"}) == {"default.web"}
    assert scheduler._awaited_by({"default.web": "no feasible node"}) == set()


def test_returned_to_takes_the_revision_spec_but_keeps_replicas_and_metadata():
    current = record("web:v2", replicas=5, generation=2).model_copy(update={"promoted_generation": 2})
    target = revision_of(record("web:v1", replicas=2, generation=1))
    new = returned_to(current, target, "auto-revert: t1 is crash-looping", now=9.0)
    assert (new.generation, new.change_cause, new.updated_at) == (3, "auto-revert: t1 is crash-looping", 9.0)
    assert (new.deployment.spec.image, new.deployment.spec.replicas) == ("web:v1", 5)
    assert new.deployment.metadata == current.deployment.metadata
    assert new.promoted_generation == 3, "a version returned to is not held by a canary"
    assert revision_of(new).generation == 3 and revision_of(new).change_cause == new.change_cause


def revision(generation: int, healthy: bool) -> RevisionRecord:
    return RevisionRecord(
        deployment=record(f"web:v{generation}").deployment, generation=generation, applied_at=0, healthy_at=1.0 if healthy else None
    )


@pytest.mark.parametrize(
    "healthy, before, expect",
    [
        ([True, True, False], 3, 2),  # the newest healthy one before the failed generation
        ([True, False, False], 3, 1),  # past one that never settled
        ([False, False, False], 3, None),  # nothing ran healthy: nothing to go back to
        ([True, True, True], 2, 1),  # never the failed generation itself, nor a later one
    ],
)
def test_last_healthy(healthy, before, expect):
    history = [revision(g, h) for g, h in enumerate(healthy, start=1)]
    found = last_healthy(history, before=before)
    assert (found.generation if found else None) == expect
