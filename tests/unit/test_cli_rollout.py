"""`comp rollout ...` and `comp get tasks` against a stand-in API (httpx's MockTransport): the
requests the commands send and how they render the answers.  tests/integration/test_api_rollout.py
drives the same commands against the real API."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner, Result

from comp_cli import main


class FakeApi:
    def __init__(self, answers: dict[tuple[str, str], tuple[int, object]]):
        self.answers = answers
        self.requests: list[tuple[str, str, object]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        status, answer = self.answers.get((request.method, request.url.path), (404, {"detail": "no such route"}))
        return httpx.Response(status, json=answer)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeApi]:
    def install(answers: dict[tuple[str, str], tuple[int, object]]) -> FakeApi:
        api = FakeApi(answers)
        client = httpx.Client(transport=httpx.MockTransport(api.handle))
        monkeypatch.setattr(main.httpx, "request", lambda method, url, timeout=None, **kw: client.request(method, url, **kw))
        return api

    return install


def comp(*args: str) -> Result:
    return CliRunner().invoke(main.cli, ["--api", "http://api", *args])


ROLLOUT = "/v1/deployments/shop/web/rollout"
ANSWER = {
    "operation_id": "4bf92f3577b34da6a3ce929d0e0e4736", "namespace": "shop", "name": "web", "generation": 4,
    "from_generation": 3, "to_revision": 2, "change_cause": "undo to revision 2", "promoted_generation": 0, "revision": 9,
}


@pytest.mark.parametrize(
    ("args", "body", "says"),
    [
        ((), None, "deployment shop/web rolled back to revision 2 (generation 4)"),
        (("--to-revision", "2"), {"to_revision": 2}, "deployment shop/web rolled back to revision 2 (generation 4)"),
    ],
)
def test_undo(fake, args: tuple[str, ...], body: object, says: str) -> None:
    api = fake({("POST", f"{ROLLOUT}/undo"): (200, {**ANSWER, "action": "undo"})})
    result = comp("rollout", "undo", "web", "-n", "shop", *args)
    assert result.exit_code == 0, result.output
    assert api.requests == [("POST", f"{ROLLOUT}/undo", body)]
    assert result.output.splitlines() == [says, "operation 4bf92f3577b34da6a3ce929d0e0e4736"]


def test_undo_refuses_a_bad_revision_before_asking() -> None:
    result = comp("rollout", "undo", "web", "--to-revision", "0")
    assert result.exit_code == 2 and "--to-revision" in result.output


def test_promote_and_abort(fake) -> None:
    api = fake({
        ("POST", f"{ROLLOUT}/promote"): (200, {**ANSWER, "action": "promote", "from_generation": 4, "to_revision": None}),
        ("POST", f"{ROLLOUT}/abort"): (200, {**ANSWER, "action": "abort", "change_cause": "rollout aborted"}),
    })
    promoted = comp("rollout", "promote", "web", "-n", "shop")
    assert promoted.exit_code == 0, promoted.output
    assert promoted.output.splitlines()[0] == "deployment shop/web: canary of generation 4 promoted"
    aborted = comp("rollout", "abort", "web", "-n", "shop")
    assert aborted.exit_code == 0, aborted.output
    assert aborted.output.splitlines()[0] == "deployment shop/web: rollout of generation 3 aborted, back to revision 2 (generation 4)"
    assert [r[:2] for r in api.requests] == [("POST", f"{ROLLOUT}/promote"), ("POST", f"{ROLLOUT}/abort")]


def test_a_refusal_is_the_apis_reason_and_exit_1(fake) -> None:
    fake({("POST", f"{ROLLOUT}/promote"): (409, {"detail": "generation 2 of deployment shop/web is already promoted"})})
    result = comp("rollout", "promote", "web", "-n", "shop")
    assert result.exit_code == 1
    assert "HTTP 409: generation 2 of deployment shop/web is already promoted" in result.output


def test_history(fake) -> None:
    fake({("GET", "/v1/deployments/default/web/revisions"): (200, {
        "namespace": "default", "name": "web", "generation": 3,
        "revisions": [
            {"generation": 1, "applied_at": 1.0e9, "change_cause": "applied", "healthy_at": 1.0e9 + 5, "image": "nginx:1.25", "current": False},
            {"generation": 3, "applied_at": 1.1e9, "change_cause": "undo to revision 1", "healthy_at": None, "image": "nginx:1.25", "current": True},
        ],
    })})
    result = comp("rollout", "history", "web")
    assert result.exit_code == 0, result.output
    header, first, current = result.output.splitlines()
    assert header.split() == ["REVISION", "APPLIED", "HEALTHY", "IMAGE", "CHANGE-CAUSE"]
    assert first.split()[0] == "1" and first.split()[-2:] == ["nginx:1.25", "applied"]
    assert current.split()[:2] == ["3", "*"] and current.split()[-6:] == ["-", "nginx:1.25", "undo", "to", "revision", "1"]


STATUS = {
    "namespace": "shop", "name": "web", "generation": 2, "change_cause": "applied", "replicas": 4, "canary": 1,
    "promoted_generation": 0,
    "last_event": {"deployment": "shop.web", "generation": 2, "from_generation": 1, "state": "paused", "message": "canary running",
                   "started": [], "stopped": [], "at": 1.0e9},
    "tasks": {"total": 5, "ready": 4, "crash_looping": 1, "by_state": {"failed": 1, "running": 4}},
}


def test_status(fake) -> None:
    fake({("GET", ROLLOUT): (200, STATUS)})
    result = comp("rollout", "status", "web", "-n", "shop")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:4] == [
        "Deployment:  shop/web", "Generation:  2 (applied)", "Replicas:    4", "Canary:      1 (waiting for `comp rollout promote`)",
    ]
    assert lines[4].startswith("Last event:  paused at ") and lines[4].endswith(": canary running")
    assert lines[5] == "Tasks:       5 total, 4 ready, 1 crash-looping (failed 1, running 4)"


def test_status_of_an_older_event_and_without_tasks(fake) -> None:
    older = {**STATUS, "generation": 3, "canary": 0, "last_event": {**STATUS["last_event"], "message": ""}, "tasks": None}
    fake({("GET", ROLLOUT): (200, older)})
    lines = comp("rollout", "status", "web", "-n", "shop").output.splitlines()
    assert not any(line.startswith("Canary:") for line in lines)
    assert any(line.startswith("Last event:  paused (of generation 2, not the current one) at ") for line in lines)
    assert "Tasks:       unknown (the API cannot read the observed state)" in lines


def test_status_json(fake) -> None:
    fake({("GET", ROLLOUT): (200, STATUS)})
    assert json.loads(comp("rollout", "status", "web", "-n", "shop", "-o", "json").output) == STATUS


# ---- get tasks ------------------------------------------------------------------------------


def task(task_id: str, **fields: object) -> dict:
    return {"task_id": task_id, "node_id": "n1", "deployment": "shop.web", "state": "running", "restarts": 0, "host_ports": {},
            "message": "", "liveness": "none", "readiness": "none", "crash_loop": False, "next_restart_at": None, **fields}


@pytest.mark.parametrize(
    ("fields", "state", "health", "restarts"),
    [
        ({}, "running", "-", "0"),
        ({"readiness": "healthy", "liveness": "healthy"}, "running", "healthy/healthy", "0"),
        ({"readiness": "starting"}, "running", "starting/-", "0"),
        ({"liveness": "unhealthy", "restarts": 2}, "running", "-/unhealthy", "2"),
        ({"state": "failed", "crash_loop": True, "next_restart_at": 1003.2, "restarts": 5}, "crash-loop (next in 4s)", "-", "5"),
        ({"state": "failed", "crash_loop": True, "next_restart_at": 990.0}, "crash-loop (next in 0s)", "-", "0"),
        ({"state": "failed", "crash_loop": True}, "crash-loop", "-", "0"),
        # as an older API answers: none of the new fields
        ({"liveness": None, "readiness": None, "crash_loop": None}, "running", "-", "0"),
    ],
)
def test_tasks_table_health_restarts_and_crash_loop(fields: dict, state: str, health: str, restarts: str) -> None:
    header, row = main.tasks_table([task("web-1", **fields)], now=1000.0).splitlines()
    columns = header.split()
    assert columns == ["TASK", "DEPLOYMENT", "NODE", "STATE", "HEALTH", "RESTARTS", "PORTS", "MESSAGE"]
    at = {name: header.index(name) for name in columns}
    cell = lambda name, after: row[at[name]:at[after]].strip()  # noqa: E731
    assert (cell("STATE", "HEALTH"), cell("HEALTH", "RESTARTS"), cell("RESTARTS", "PORTS")) == (state, health, restarts)


def test_get_tasks_renders_what_the_api_returns(fake) -> None:
    fake({("GET", "/v1/tasks"): (200, [task("web-1", readiness="healthy"), task("web-2", state="failed", crash_loop=True)])})
    result = comp("get", "tasks")
    assert result.exit_code == 0, result.output
    assert "healthy/-" in result.output and "crash-loop" in result.output
