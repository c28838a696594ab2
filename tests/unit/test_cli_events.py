"""`comp events` against a stand-in API (httpx's MockTransport): the query it sends, the line
it prints per event, and its errors.  tests/integration/test_event_history.py runs it against
the real API."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner, Result

from comp_cli import events_cmd, main

TASK = {
    "seq": 5, "time": "2026-12-01T10:00:01.234567Z", "subject": "comp.evt.task.n1", "kind": "task",
    "namespace": "shop", "name": "web", "raw": None, "trace_id": None,
    "data": {"task_id": "web-0a1b", "node_id": "n1", "deployment": "shop.web", "state": "running", "message": ""},
}


class FakeApi:
    def __init__(self, status: int, lines: list[str]):
        self.status = status
        self.lines = lines
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, content="".join(line + "\n" for line in self.lines).encode())


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeApi]:
    def install(status: int = 200, lines: list[str] | None = None) -> FakeApi:
        api = FakeApi(status, lines or [])
        client = httpx.Client(transport=httpx.MockTransport(api.handle))
        monkeypatch.setattr(events_cmd.httpx, "stream", lambda method, url, **kw: client.stream(method, url, **{k: v for k, v in kw.items() if k != "timeout"}))
        return api

    return install


def comp(*args: str) -> Result:
    return CliRunner().invoke(main.cli, ["--api", "http://api", *args])


@pytest.mark.parametrize(
    ("args", "params"),
    [
        ((), {"follow": "false"}),
        (("--follow",), {"follow": "true"}),
        (("--since", "10m", "--for", "deployment/web", "-n", "shop"),
         {"follow": "false", "since": "10m", "for": "deployment/web", "namespace": "shop"}),
        (("--after", "42", "--limit", "3"), {"follow": "false", "after": "42", "limit": "3"}),
    ],
)
def test_the_options_become_the_query(fake, args: tuple[str, ...], params: dict[str, str]) -> None:
    api = fake(lines=[])
    result = comp("events", *args)
    assert result.exit_code == 0, result.output
    (request,) = api.requests
    assert request.url.path == "/v1/events"
    assert dict(request.url.params) == params


def test_text_is_one_line_per_event(fake) -> None:
    placement = {**TASK, "seq": 6, "subject": "comp.evt.placement.shop.web", "kind": "placement",
                 "data": {"deployment": "shop.web", "placed": [{"task_id": "web-0a1b", "node_id": "n1", "reason": "most free memory"}]}}
    fake(lines=[json.dumps(TASK), json.dumps(placement)])
    result = comp("events")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "2026-12-01T10:00:01.234Z  task             shop/web                 web-0a1b running on n1",
        "2026-12-01T10:00:01.234Z  placement        shop/web                 placed web-0a1b on n1 (most free memory)",
    ]


def test_json_is_the_records_as_the_api_sent_them(fake) -> None:
    lines = [json.dumps(TASK), json.dumps({**TASK, "seq": 6})]
    fake(lines=lines)
    result = comp("events", "-o", "json")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == lines


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (422, {"detail": [{"loc": ["query", "since"], "msg": "'x' is neither an RFC 3339 time", "type": "value_error"}]},
         "HTTP 422: since: 'x' is neither an RFC 3339 time"),
        (503, {"detail": "NATS is unavailable: not connected"}, "HTTP 503: NATS is unavailable: not connected"),
    ],
)
def test_refusals_are_shown_as_the_api_gave_them(fake, status: int, body: dict, says: str) -> None:
    fake(status=status, lines=[json.dumps(body)])
    result = comp("events", "--since", "x")
    assert result.exit_code == 1
    assert says in result.output


def test_an_error_line_ends_the_listing_with_an_error(fake) -> None:
    fake(lines=[json.dumps(TASK), json.dumps({"error": "NATS is unavailable: nats: timeout", "after": 5})])
    result = comp("events")
    assert result.exit_code == 1
    assert "web-0a1b running on n1" in result.output
    assert "the listing stopped early: NATS is unavailable: nats: timeout" in result.output


def test_an_unreachable_api_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    monkeypatch.setattr(events_cmd.httpx, "stream", lambda method, url, **kw: client.stream(method, url))
    result = comp("events")
    assert result.exit_code == 1
    assert "cannot reach the COMP API at http://api" in result.output


def _record(kind: str, data, raw: str | None = None) -> dict:
    return {**TASK, "kind": kind, "data": data, "raw": raw}


@pytest.mark.parametrize(
    ("record", "summary"),
    [
        (_record("task", {"task_id": "web-1", "node_id": "n1", "state": "exited", "exit_code": 3, "message": "oom"}),
         "web-1 exited on n1 (exit 3): oom"),
        (_record("health", {"task_id": "web-1", "check": "readiness", "previous": "starting", "state": "unhealthy",
                            "detail": "GET / answered 500"}),
         "web-1 readiness starting -> unhealthy: GET / answered 500"),
        (_record("placement", {"placed": [], "stopped": [{"task_id": "web-2", "node_id": "n2", "reason": "scaled down"}],
                               "pending": 2, "pending_reason": "insufficient memory"}),
         "stopped web-2 on n2 (scaled down); 2 pending: insufficient memory"),
        (_record("placement", {"placed": [], "stopped": []}), "no change"),
        (_record("deployment", {"action": "applied", "generation": 2, "revision": 7}), "applied (generation 2, revision 7)"),
        (_record("service", {"action": "deleted", "revision": 3}), "deleted (revision 3)"),
        (_record("rollout", {"state": "complete", "generation": 3, "from_generation": 2, "message": "3/3 updated"}),
         "complete generation 3 from 2: 3/3 updated"),
        (_record("endpoints", {"vip": "10.96.0.5", "endpoints": [{}, {}]}), "2 endpoints, vip 10.96.0.5"),
        (_record("autoscale", {"changed": True, "current": 2, "replicas": 4, "reason": "cpu 0.9 > 0.5"}),
         "2 -> 4 replicas: cpu 0.9 > 0.5"),
        (_record("autoscale", {"changed": False, "current": 2, "replicas": 2, "reason": "in cooldown"}),
         "held at 2 replicas: in cooldown"),
        (_record("control", {"kind": "node", "name": "n1", "action": "drain"}), "drain"),
        (_record("capacity", {"fits": False, "pending": {"shop.web": {"count": 2, "reason": "insufficient cpu"}}}),
         "cannot place: shop.web 2 (insufficient cpu)"),
        (_record("capacity", {"fits": True}), "everything desired fits"),
        (_record("scheduler.leader", {"name": "scheduler-2", "state": "leading", "epoch": 9}), "scheduler-2 leading (epoch 9)"),
        (_record("task", None, raw="garbage\ufffd"), "(not JSON) garbage\ufffd"),
        (_record("task", {"unexpected": 1}), '{"unexpected":1}'),  # a body of another shape is shown as it is
        (_record("audit", {"a": 1}), '{"a":1}'),
        (_record("task", [1, 2]), "[1, 2]"),
        (_record("rollout", {"state": "progressing", "generation": 2, "message": "x" * 400}),
         "progressing generation 2: " + "x" * (events_cmd.SUMMARY_LIMIT - 3 - len("progressing generation 2: ")) + "..."),
    ],
)
def test_summaries(record: dict, summary: str) -> None:
    assert events_cmd.summarize(record) == summary


def test_a_listing_cut_off_by_the_api_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body", request=request)

    client = httpx.Client(transport=httpx.MockTransport(cut))
    monkeypatch.setattr(events_cmd.httpx, "stream", lambda method, url, **kw: client.stream(method, url))
    result = comp("events", "--follow")
    assert result.exit_code == 1
    assert "the COMP API at http://api ended the listing early" in result.output
