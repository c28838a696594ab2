"""Each service's own Prometheus families, apart from the wire: the autoscaler's decision
results as a table, the lb's sync gauges, tasks by state over a fleet of agents, the
scheduler's scrape-time gauges, a container start's outcome, and the api's requests by
route template (bad input included) through its real middleware on a small app."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Query

from comp_api import http_metrics
from comp_autoscaler import instruments as autoscaler_instruments
from comp_autoscaler.strategy import Bound, Decision
from comp_common.messages import Endpoint, ServiceEndpoints, TaskState, TaskStatus
from comp_common.metrics import REGISTRY
from comp_lb import instruments as lb_instruments
from comp_lb.dataplane import SyncReport
from comp_nodeagent import instruments as agent_instruments
from comp_scheduler import instruments as scheduler_instruments


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    "replicas, current, changed, bounds, result",
    [
        (4, 2, True, (), "up"),
        (1, 3, True, (), "down"),
        (3, 3, False, (Bound.DOWN_STABILIZATION,), "held"),
        (5, 5, False, (Bound.OUT_OF_RANGE,), "held"),
        (2, 2, False, (), "steady"),
    ],
)
def test_autoscaler_decision_results(replicas: int, current: int, changed: bool, bounds: tuple, result: str) -> None:
    decision = Decision(replicas=replicas, reason="r", observed=None, recommendation=None, changed=changed, bounds=bounds)
    assert autoscaler_instruments.decision_result(decision, current) == result
    before = sample("comp_autoscaler_decisions_total", result=result)
    autoscaler_instruments.decided(decision, current)
    assert sample("comp_autoscaler_decisions_total", result=result) == before + 1


def _service(name: str, endpoints: int) -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace="default", name=name,
        endpoints=[Endpoint(task_id=f"{name}-{i}", node_id="n1", address=f"10.0.0.{i + 1}") for i in range(endpoints)],
    )


def test_lb_sync_sets_what_is_held_and_counts_changes() -> None:
    changes = sample("comp_lb_sync_changes_total", mode="incremental")
    applied = sample("comp_lb_sync_seconds_count", outcome="applied")
    lb_instruments.synced([_service("a", 2), _service("b", 3)], SyncReport("incremental", 7, 2, 0.01), 0.02, refused=1)
    assert (sample("comp_lb_services"), sample("comp_lb_endpoints"), sample("comp_lb_refused_services")) == (2, 5, 1)
    assert sample("comp_lb_sync_changes_total", mode="incremental") == changes + 7
    assert sample("comp_lb_sync_seconds_count", outcome="applied") == applied + 1
    failed = sample("comp_lb_sync_seconds_count", outcome="failed")
    lb_instruments.not_synced("failed", 0.5)
    assert sample("comp_lb_sync_seconds_count", outcome="failed") == failed + 1
    assert sample("comp_lb_services") == 2, "a failed sync leaves what the kernel holds as it was"


@dataclass
class FakeAgent:
    statuses: dict[str, TaskStatus] = field(default_factory=dict)


def _status(task: str, state: TaskState) -> TaskStatus:
    return TaskStatus(task_id=task, node_id="n", deployment="default.web", state=state)


@pytest.fixture
def tracked_agents() -> Iterator[None]:
    yield
    agent_instruments.track(())


def test_tasks_by_state_sum_over_a_fleet(tracked_agents: None) -> None:
    fleet = [
        FakeAgent({"a": _status("a", TaskState.RUNNING), "b": _status("b", TaskState.FAILED)}),
        FakeAgent({"c": _status("c", TaskState.RUNNING)}),
        FakeAgent(),
    ]
    agent_instruments.track(fleet)  # type: ignore[arg-type]
    assert sample("comp_nodeagent_tasks", state="running") == 2
    assert sample("comp_nodeagent_tasks", state="failed") == 1
    assert sample("comp_nodeagent_tasks", state="starting") == 0, "every state has a series, zero included"
    assert sample("comp_nodeagent_agents") == 3
    fleet[1].statuses["c"] = _status("c", TaskState.EXITED)
    assert sample("comp_nodeagent_tasks", state="running") == 1, "read at scrape time"


async def test_a_container_start_is_timed_by_outcome() -> None:
    started = sample("comp_nodeagent_container_start_seconds_count", outcome="started")
    failed = sample("comp_nodeagent_container_start_seconds_count", outcome="failed")

    async def ok() -> str:
        return "container-1"

    async def refused() -> str:
        raise RuntimeError("image not found")

    assert await agent_instruments.start_container(ok()) == "container-1"
    with pytest.raises(RuntimeError, match="image not found"):
        await agent_instruments.start_container(refused())
    assert sample("comp_nodeagent_container_start_seconds_count", outcome="started") == started + 1
    assert sample("comp_nodeagent_container_start_seconds_count", outcome="failed") == failed + 1


@dataclass
class FakeSubscription:
    subject: str
    pending_msgs: int


@dataclass
class FakeScheduler:
    leading: bool
    _wanted: list
    _deployment_events_handling: int
    inputs: tuple


@pytest.fixture
def tracked_scheduler() -> Iterator[None]:
    yield
    scheduler_instruments.track(None)  # type: ignore[arg-type]


def test_scheduler_gauges_are_read_at_scrape_time(tracked_scheduler: None) -> None:
    scheduler = FakeScheduler(
        leading=False, _wanted=[("resync", None)] * 3, _deployment_events_handling=2,
        inputs=(FakeSubscription("comp.node.*.heartbeat", 40), FakeSubscription("comp.evt.task.*", 7)),
    )
    scheduler_instruments.track(scheduler)  # type: ignore[arg-type]
    assert sample("comp_scheduler_leader") == 0
    assert sample("comp_scheduler_round_requests_pending") == 3
    assert sample("comp_scheduler_deployment_events_in_progress") == 2
    assert sample("comp_scheduler_input_backlog_messages", subject="comp.node.*.heartbeat") == 40
    assert sample("comp_scheduler_input_backlog_messages", subject="comp.evt.task.*") == 7
    scheduler.leading = True
    assert sample("comp_scheduler_leader") == 1


def test_a_round_records_its_phases_and_what_it_could_not_place() -> None:
    reconcile = sample("comp_scheduler_round_seconds_count", phase="reconcile")
    placed = sample("comp_scheduler_placements_total")
    scheduler_instruments.planned(0.001, 0.02, places=3, stops=1, pending_replicas=4)
    assert sample("comp_scheduler_round_seconds_count", phase="reconcile") == reconcile + 1
    assert sample("comp_scheduler_placements_total") == placed + 3
    assert sample("comp_scheduler_pending_replicas") == 4


@pytest.fixture
def app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/things/{namespace}/{name}")
    async def thing(namespace: str, name: str, limit: int = Query(default=10, ge=1)) -> dict:
        if name == "missing":
            raise HTTPException(404, "no such thing")
        if name == "broken":
            raise RuntimeError("a bug")
        return {"name": name, "limit": limit}

    app.include_router(http_metrics.router)
    app.add_middleware(http_metrics.RequestMetricsMiddleware)
    return app


TEMPLATE = "/v1/things/{namespace}/{name}"


@pytest.mark.parametrize(
    "method, path, status, route, method_label",
    [
        ("GET", "/v1/things/default/a", 200, TEMPLATE, "GET"),
        ("GET", "/v1/things/team-b/missing", 404, TEMPLATE, "GET"),
        ("GET", "/v1/things/default/a?limit=zero", 422, TEMPLATE, "GET"),
        ("GET", "/v1/things/default/a?limit=-3", 422, TEMPLATE, "GET"),
        ("GET", "/v1/things/default/broken", 500, TEMPLATE, "GET"),
        ("POST", "/v1/things/default/a", 405, TEMPLATE, "POST"),
        ("GET", "/no/such/route", 404, http_metrics.UNMATCHED, "GET"),
        ("BREW", "/v1/things/default/a", 405, TEMPLATE, "other"),
    ],
)
async def test_api_requests_by_route_template_method_and_status(
    app: FastAPI, method: str, path: str, status: int, route: str, method_label: str
) -> None:
    labels = {"route": route, "method": method_label, "status": str(status)}
    before = sample("comp_api_requests_total", **labels)
    timed = sample("comp_api_request_seconds_count", route=route, method=method_label)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.request(method, path)
    assert response.status_code == status
    assert sample("comp_api_requests_total", **labels) == before + 1
    assert sample("comp_api_request_seconds_count", route=route, method=method_label) == timed + 1
    assert sample("comp_api_requests_in_progress") == 0
    assert not any(
        "default/a" in s.labels.get("route", "") for m in REGISTRY.collect() for s in m.samples
    ), "no concrete path is a label value"


async def test_api_serves_the_process_registry_at_metrics(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        await client.get("/v1/things/default/a")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert f'comp_api_requests_total{{method="GET",route="{TEMPLATE}",status="200"}}' in response.text


async def test_api_metrics_speak_openmetrics_when_asked(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
