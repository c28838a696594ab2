"""The api in-process (httpx over ASGI, lifespan run) against a real nats-server and redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from comp_api.main import create_app
from comp_api.settings import ApiGroup, ApiSettings
from comp_cli.local import _bin, free_port, wait_for_port
from comp_common import subjects
from comp_common.broker import make_broker, server_caught_up
from comp_common.kv import list_keys
from comp_common.messages import Capacity, DeploymentRecord, TaskState, TaskStatus
from comp_common.observed import DeploymentStatus, NodeRecord, ObservedStore, connect
from comp_common.settings import NatsSettings, RedisSettings

WEB = """
apiVersion: comp/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {tier: front}
spec:
  replicas: 2
  image: nginx:1.27
  env: {PORT: 8080}
  resources: {cpu: 250m, memory: 64Mi}
  ports: [{container_port: 8080}]
"""


@dataclass
class Api:
    http: httpx.AsyncClient
    settings: ApiSettings
    observed: ObservedStore
    spans: InMemorySpanExporter
    nc: NatsClient | None = None
    events: list[Msg] = field(default_factory=list)

    async def kv(self) -> KeyValue:
        assert self.nc is not None
        return await self.nc.jetstream().key_value(subjects.DEPLOYMENTS_BUCKET)

    async def stored_keys(self) -> list[str]:
        return await list_keys(await self.kv())

    async def apply(self, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/v1/apply", content=text, headers={"content-type": "application/yaml", **(headers or {})})

    async def wait_events(self, count: int, timeout: float = 5) -> list[Msg]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.events


@contextlib.asynccontextmanager
async def running_api(nats_url: str, redis_url: str, wait_ready: bool = True, **api: object) -> AsyncIterator[Api]:
    settings = ApiSettings(
        cluster=f"t{uuid.uuid4().hex[:8]}",
        nats=NatsSettings(url=nats_url, connect_timeout=1),
        redis=RedisSettings(url=redis_url),
        api=ApiGroup(**api),
    )
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    observed = ObservedStore(connect(settings.redis.url), settings.cluster)
    app = create_app(settings, make_broker(settings.nats, "api", provider), observed, provider)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            # The test's own view of Redis, beside the one the app owns and closes.
            harness = Api(http, settings, ObservedStore(connect(settings.redis.url), settings.cluster), spans)
            if wait_ready:
                await wait_healthy(http)
            yield harness
            await harness.observed.r.aclose()


async def wait_healthy(http: httpx.AsyncClient, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (await http.get("/healthz")).status_code != 200:
        assert time.monotonic() < deadline, "the api did not become healthy"
        await asyncio.sleep(0.05)


@pytest.fixture
async def api(nats_url: str, redis_url: str) -> AsyncIterator[Api]:
    async with running_api(nats_url, redis_url) as harness:
        harness.nc = await nats.connect(nats_url)

        async def collect(msg: Msg) -> None:
            harness.events.append(msg)

        await harness.nc.subscribe("comp.evt.deployment.>", cb=collect)
        await server_caught_up(harness.nc)
        yield harness
        await harness.nc.close()


def results_of(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


# ---- apply ----------------------------------------------------------------------------


async def test_apply_create_unchanged_configured(api: Api) -> None:
    [created] = results_of(await api.apply(WEB))
    assert created == {"namespace": "shop", "name": "web", "action": "created", "revision": created["revision"], "generation": 1}

    [same] = results_of(await api.apply(WEB))
    assert same == {**created, "action": "unchanged"}
    entry = await (await api.kv()).get("shop.web")
    assert entry.revision == created["revision"], "an unchanged apply must not write"

    [scaled] = results_of(await api.apply(WEB.replace("replicas: 2", "replicas: 5")))
    assert scaled["action"] == "configured"
    assert scaled["generation"] == 1, "scaling is not a new generation"
    assert scaled["revision"] > created["revision"]

    [relabelled] = results_of(await api.apply(WEB.replace("replicas: 2", "replicas: 5").replace("tier: front", "tier: edge")))
    assert (relabelled["action"], relabelled["generation"]) == ("configured", 1)

    [new_image] = results_of(await api.apply(WEB.replace("replicas: 2", "replicas: 5").replace("tier: front", "tier: edge").replace("1.27", "1.28")))
    assert (new_image["action"], new_image["generation"]) == ("configured", 2)

    entry = await (await api.kv()).get("shop.web")
    record = DeploymentRecord.model_validate_json(entry.value)
    assert entry.revision == new_image["revision"]
    assert record.generation == 2
    assert record.deployment.spec.image == "nginx:1.28" and record.deployment.spec.replicas == 5
    assert record.created_at <= record.updated_at


async def test_apply_json_with_any_content_type(api: Api) -> None:
    body = {"metadata": {"name": "api"}, "spec": {"image": "busybox", "replicas": 1}}
    response = await api.http.post("/v1/apply", json=body)
    assert results_of(response)[0]["action"] == "created"
    response = await api.http.post("/v1/apply", content=json.dumps(body, indent="\t"), headers={"content-type": "text/plain"})
    assert results_of(response)[0]["action"] == "unchanged"
    assert await api.stored_keys() == ["default.api"]


async def test_apply_several_documents(api: Api) -> None:
    text = WEB + "---\n" + WEB.replace("name: web", "name: worker") + "---\n"
    results = results_of(await api.apply(text))
    assert [(r["name"], r["action"]) for r in results] == [("web", "created"), ("worker", "created")]
    assert sorted(await api.stored_keys()) == ["shop.web", "shop.worker"]


async def test_concurrent_applies_of_one_deployment_all_land(api: Api) -> None:
    variants = [WEB.replace("tier: front", f"tier: t{i}") for i in range(5)]
    responses = await asyncio.gather(*(api.apply(text) for text in variants))
    results = [results_of(r)[0] for r in responses]
    assert sorted(r["action"] for r in results) == ["configured"] * 4 + ["created"]
    assert len({r["revision"] for r in results}) == 5
    entry = await (await api.kv()).get("shop.web")
    assert entry.revision == max(r["revision"] for r in results)


BAD_MANIFESTS = [
    pytest.param(WEB.replace("memory: 64Mi", "memory: 64Mb"), "spec.resources.memory", id="bad-memory-unit"),
    pytest.param(WEB.replace("replicas: 2", "replicass: 2"), "spec.replicass", id="unknown-field"),
    pytest.param(WEB.replace("replicas: 2", "replicas: -2"), "spec.replicas", id="negative-replicas"),
    pytest.param(WEB.replace("  image: nginx:1.27\n", ""), "spec.image", id="missing-image"),
    pytest.param(WEB.replace("name: web", "name: Web"), "metadata.name", id="bad-name"),
    pytest.param(WEB.replace("{container_port: 8080}", "{container_port: 8080, hostport: 80}"), "spec.ports[0].hostport", id="port-field"),
    pytest.param(WEB.replace("comp/v1", "comp/v9"), "apiVersion", id="api-version"),
    pytest.param("metadata: [", "", id="invalid-yaml"),
    pytest.param("", "", id="empty"),
    pytest.param(WEB + "---\n" + WEB, "", id="duplicate-deployment"),
]


@pytest.mark.parametrize(("text", "path"), BAD_MANIFESTS)
async def test_bad_manifest_is_422_and_stores_nothing(api: Api, text: str, path: str) -> None:
    response = await api.apply(text)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert path in [e["path"] for e in errors]
    assert all(e["message"] for e in errors)
    assert await api.stored_keys() == []
    assert api.events == []


async def test_one_bad_document_stores_none_of_them(api: Api) -> None:
    text = WEB + "---\n" + WEB.replace("name: web", "name: worker").replace("64Mi", "64Mb")
    response = await api.apply(text)
    assert response.status_code == 422
    assert response.json() == {
        "errors": [
            {
                "path": "document[1].spec.resources.memory",
                "message": "memory '64Mb' has unknown unit 'Mb'; use bytes or one of k, M, G, T, Ki, Mi, Gi, Ti",
            }
        ]
    }
    assert await api.stored_keys() == []


async def test_bad_manifest_does_not_disturb_what_is_stored(api: Api) -> None:
    [created] = results_of(await api.apply(WEB))
    assert (await api.apply(WEB.replace("replicas: 2", "replicas: -1"))).status_code == 422
    assert (await (await api.kv()).get("shop.web")).revision == created["revision"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_413(api: Api, chunked: bool) -> None:
    limit = api.settings.api.max_body_bytes
    body = (WEB + "#" * limit).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await api.http.post("/v1/apply", content=chunks() if chunked else body)
    assert response.status_code == 413
    assert response.json()["detail"] == f"request body is larger than {limit} bytes (the api's limit, COMP_API__MAX_BODY_BYTES)"
    assert await api.stored_keys() == []


# ---- events and tracing ---------------------------------------------------------------


def trace_id_of(msg: Msg) -> str:
    version, trace_id, span_id, flags = msg.headers["traceparent"].split("-")
    return trace_id


async def test_applied_event_carries_the_operation_trace(api: Api) -> None:
    response = await api.apply(WEB)
    [result] = results_of(response)
    operation_id = response.json()["operation_id"]
    assert len(operation_id) == 32 and response.headers["x-comp-operation-id"] == operation_id

    [msg] = await api.wait_events(1)
    assert msg.subject == subjects.deployment_event("shop", "web") == "comp.evt.deployment.shop.web"
    assert trace_id_of(msg) == operation_id
    assert json.loads(msg.data) == {
        "action": "applied", "namespace": "shop", "name": "web", "revision": result["revision"], "generation": 1,
    }

    # An unchanged apply announces nothing.
    await api.apply(WEB)
    await asyncio.sleep(0.2)
    assert len(api.events) == 1


async def test_client_traceparent_is_continued(api: Api) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await api.apply(WEB, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.json()["operation_id"] == trace_id == response.headers["x-comp-operation-id"]
    [msg] = await api.wait_events(1)
    assert trace_id_of(msg) == trace_id


async def test_one_server_span_per_request_with_the_publish_inside(api: Api) -> None:
    response = await api.apply(WEB)
    operation_id = response.json()["operation_id"]
    spans = [s for s in api.spans.get_finished_spans() if f"{s.context.trace_id:032x}" == operation_id]
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "POST /v1/apply"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/apply"
    producers = [s for s in spans if s.kind == SpanKind.PRODUCER]
    assert producers, "publishing the event must be part of the request's trace"

    await api.http.get("/v1/deployments/shop/web")
    names = [s.name for s in api.spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert "GET /v1/deployments/{namespace}/{name}" in names


async def test_errors_carry_an_operation_id_too(api: Api) -> None:
    response = await api.apply("metadata: [")
    assert response.status_code == 422
    assert len(response.headers["x-comp-operation-id"]) == 32


# ---- reading and deleting -------------------------------------------------------------


async def test_get_and_list_deployments_with_status(api: Api) -> None:
    [created] = results_of(await api.apply(WEB))
    results_of(await api.apply(WEB.replace("namespace: shop", "namespace: blog")))

    response = await api.http.get("/v1/deployments/shop/web")
    assert response.status_code == 200
    view = response.json()
    assert (view["namespace"], view["name"], view["generation"], view["revision"]) == ("shop", "web", 1, created["revision"])
    assert view["manifest"]["apiVersion"] == "comp/v1"
    assert view["manifest"]["spec"]["resources"] == {"cpu": 0.25, "memory": 64 * 1024**2}
    assert view["manifest"]["spec"]["env"] == {"PORT": "8080"}
    assert view["created_at"] == view["updated_at"] > 0
    nothing_yet = {"rollout_generation": 0, "rollout_state": "", "rollout_message": ""}
    assert view["status"] == {"desired": 0, "placed": 0, "running": 0, "pending_reason": "", **nothing_yet}

    await api.observed.put_deployment_statuses(
        [DeploymentStatus(deployment="shop.web", desired=2, placed=1, running=1, pending_reason="no node has 64Mi free",
                          generation=1, rollout_state="progressing", rollout_message="1/2 replicas healthy", updated_at=time.time())]
    )
    view = (await api.http.get("/v1/deployments/shop/web")).json()
    assert view["status"] == {
        "desired": 2, "placed": 1, "running": 1, "pending_reason": "no node has 64Mi free",
        "rollout_generation": 1, "rollout_state": "progressing", "rollout_message": "1/2 replicas healthy",
    }

    everything = (await api.http.get("/v1/deployments")).json()
    assert [(d["namespace"], d["name"]) for d in everything] == [("blog", "web"), ("shop", "web")]
    shop = (await api.http.get("/v1/deployments", params={"namespace": "shop"})).json()
    assert [d["status"]["running"] for d in shop] == [1]
    assert (await api.http.get("/v1/deployments", params={"namespace": "none"})).json() == []


async def test_missing_deployment_is_404(api: Api) -> None:
    response = await api.http.get("/v1/deployments/shop/nothing")
    assert response.status_code == 404
    assert response.json() == {"detail": "deployment 'nothing' not found in namespace 'shop'"}


async def test_invalid_names_in_the_path_are_refused(api: Api) -> None:
    assert (await api.http.get("/v1/deployments/shop/a.b")).status_code == 422
    assert (await api.http.delete("/v1/deployments/shop/*")).status_code == 422


async def test_delete_then_get_is_404(api: Api) -> None:
    [created] = results_of(await api.apply(WEB))
    response = await api.http.delete("/v1/deployments/shop/web")
    assert response.status_code == 200
    body = response.json()
    assert body == {"operation_id": response.headers["x-comp-operation-id"], "namespace": "shop", "name": "web", "action": "deleted"}

    assert (await api.http.get("/v1/deployments/shop/web")).status_code == 404
    assert (await api.http.delete("/v1/deployments/shop/web")).status_code == 404
    assert await api.stored_keys() == []
    assert (await api.http.get("/v1/deployments")).json() == []

    applied, deleted = await api.wait_events(2)
    assert json.loads(deleted.data) == {
        "action": "deleted", "namespace": "shop", "name": "web", "revision": created["revision"], "generation": 1,
    }
    assert trace_id_of(deleted) == body["operation_id"]

    # Applying again after a delete starts over.
    [again] = results_of(await api.apply(WEB))
    assert (again["action"], again["generation"]) == ("created", 1)


# ---- observed state -------------------------------------------------------------------


def node(node_id: str, last_heartbeat: float, tasks: int = 0) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        last_heartbeat=last_heartbeat,
        driver="hollow",
        address="10.0.0.1",
        capacity=Capacity(cpu=4, memory=8 * 1024**3),
        allocated=Capacity(cpu=0.5, memory=128 * 1024**2),
        labels={"zone": "a"},
        tasks=tasks,
    )


def task(task_id: str, node_id: str, deployment: str, state: TaskState = TaskState.RUNNING) -> TaskStatus:
    return TaskStatus(task_id=task_id, node_id=node_id, deployment=deployment, state=state, updated_at=time.time())


async def test_nodes_come_from_redis(api: Api) -> None:
    assert (await api.http.get("/v1/nodes")).json() == []
    now = time.time()
    grace = api.settings.liveness.grace_seconds
    await api.observed.put_nodes([node("n1", now, tasks=2), node("n2", now - grace - 5)])
    nodes = (await api.http.get("/v1/nodes")).json()
    assert [(n["node_id"], n["state"], n["tasks"]) for n in nodes] == [("n1", "ready", 2), ("n2", "down", 0)]
    assert nodes[0]["capacity"] == {"cpu": 4.0, "memory": 8 * 1024**3}
    assert nodes[0]["labels"] == {"zone": "a"} and nodes[0]["driver"] == "hollow"


async def test_tasks_come_from_redis_with_filters(api: Api) -> None:
    await api.observed.put_tasks(
        [task("t1", "n1", "shop.web"), task("t2", "n2", "shop.web", TaskState.STARTING), task("t3", "n1", "shop.worker")]
    )
    every = (await api.http.get("/v1/tasks")).json()
    assert [t["task_id"] for t in every] == ["t1", "t2", "t3"]
    assert every[1]["state"] == "starting"
    by_deployment = (await api.http.get("/v1/tasks", params={"deployment": "shop.web"})).json()
    assert [t["task_id"] for t in by_deployment] == ["t1", "t2"]
    by_node = (await api.http.get("/v1/tasks", params={"node": "n1"})).json()
    assert [t["task_id"] for t in by_node] == ["t1", "t3"]
    both = (await api.http.get("/v1/tasks", params={"deployment": "shop.web", "node": "n1"})).json()
    assert [t["task_id"] for t in both] == ["t1"]


async def test_redis_down_is_503_for_observed_state_only(api: Api, redis_url: str) -> None:
    results_of(await api.apply(WEB))
    killer = aioredis.from_url(redis_url)
    with contextlib.suppress(redis.exceptions.ConnectionError):
        await killer.shutdown(nosave=True)
    await killer.aclose()

    for path in ("/v1/nodes", "/v1/tasks"):
        response = await api.http.get(path)
        assert response.status_code == 503, response.text
        assert response.json()["detail"].startswith("Redis is unavailable")

    health = await api.http.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "nats": "connected"}

    # Desired state lives in NATS: it can still be changed and read, without status.
    [scaled] = results_of(await api.apply(WEB.replace("replicas: 2", "replicas: 3")))
    assert scaled["action"] == "configured"
    view = (await api.http.get("/v1/deployments/shop/web")).json()
    assert view["manifest"]["spec"]["replicas"] == 3 and view["status"] is None


# ---- NATS down ------------------------------------------------------------------------


@contextlib.contextmanager
def nats_server(port: int, data: Path) -> subprocess.Popen:
    data.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 15, "nats-server", proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_api_answers_without_nats_and_connects_when_it_comes(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    async with running_api(f"nats://127.0.0.1:{port}", redis_url, wait_ready=False, dependency_timeout_seconds=2) as api:
        health = await api.http.get("/healthz")
        assert health.status_code == 503 and health.json() == {"status": "unavailable", "nats": "disconnected"}

        response = await api.apply(WEB)
        assert response.status_code == 503
        assert response.json()["detail"] == f"NATS is unavailable: not connected to nats://127.0.0.1:{port}"
        assert (await api.http.get("/v1/deployments")).status_code == 503
        # Validation does not need NATS, and neither does observed state.
        assert (await api.apply("metadata: [")).status_code == 422
        assert (await api.http.get("/v1/nodes")).status_code == 200

        with nats_server(port, tmp_path / "nats"):
            await wait_healthy(api.http)
            [created] = results_of(await api.apply(WEB))
            assert created["action"] == "created"

        # NATS gone again: a clear 503, not a hang or a 500.
        response = await api.http.get("/v1/deployments/shop/web")
        assert response.status_code == 503 and response.json()["detail"].startswith("NATS is unavailable")


# ---- OpenAPI --------------------------------------------------------------------------


async def test_openapi_documents_the_manifest_body(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    body = spec["paths"]["/v1/apply"]["post"]["requestBody"]
    assert body["content"]["application/yaml"]["schema"] == {"$ref": "#/components/schemas/Deployment"}
    schemas = spec["components"]["schemas"]
    assert {"Deployment", "Metadata", "DeploymentSpec", "Resources", "Port"} <= set(schemas)
    assert "apiVersion" in schemas["Deployment"]["properties"]
    assert {"/healthz", "/v1/deployments", "/v1/deployments/{namespace}/{name}", "/v1/tasks", "/v1/nodes"} <= set(spec["paths"])


# ---- namespaces, quotas, node controls ---------------------------------------------------


async def test_apply_over_quota_is_403_and_stores_nothing(api) -> None:
    put = await api.http.put("/v1/namespaces/shop", json={"quota": {"cpu": "400m", "memory": "1Gi", "tasks": 10}})
    assert put.status_code == 200, put.text
    # WEB asks for 2 x 250m = 500m in namespace shop.
    response = await api.apply(WEB)
    assert response.status_code == 403
    assert response.json()["detail"] == "namespace shop quota exceeded: cpu 0.5 cores > quota 0.4; nothing was applied"
    assert await api.stored_keys() == []

    raised = await api.http.put("/v1/namespaces/shop", json={"quota": {"cpu": 1, "tasks": 2}})
    assert raised.status_code == 200
    assert (await api.apply(WEB)).status_code == 200
    scaled = WEB.replace("replicas: 2", "replicas: 3")
    over = await api.apply(scaled)
    assert over.status_code == 403 and "tasks 3 > quota 2" in over.json()["detail"]
    assert (await (await api.kv()).get("shop.web")).value.count(b'"replicas":2') == 1, "the stored spec is unchanged"


async def test_quota_below_current_usage_is_refused(api) -> None:
    assert (await api.apply(WEB)).status_code == 200
    response = await api.http.put("/v1/namespaces/shop", json={"quota": {"memory": "100Mi"}})
    assert response.status_code == 403
    assert "reserves more than this quota: memory 128Mi > quota 100Mi" in response.json()["detail"]
    listed = (await api.http.get("/v1/namespaces")).json()
    assert listed == []


async def test_namespace_validation_and_delete(api) -> None:
    bad = await api.http.put("/v1/namespaces/shop", json={"quota": {"memory": "12Mb"}, "extra": 1})
    assert bad.status_code == 422
    paths = {e["path"] for e in bad.json()["detail"]["errors"]}
    assert paths == {"quota.memory", "extra"}
    assert (await api.http.put("/v1/namespaces/shop", json={"quota": {"tasks": 5}})).status_code == 200
    assert (await api.apply(WEB)).status_code == 200
    [shop] = (await api.http.get("/v1/namespaces")).json()
    assert shop["usage"] == {"cpu": 0.5, "memory": 128 * 1024**2, "tasks": 2}
    assert (await api.http.delete("/v1/namespaces/shop")).status_code == 409
    assert (await api.http.delete("/v1/deployments/shop/web")).status_code == 200
    assert (await api.http.delete("/v1/namespaces/shop")).status_code == 200
    assert (await api.http.delete("/v1/namespaces/shop")).status_code == 404


async def test_node_cordon_drain_uncordon_are_stored(api) -> None:
    for action, cordoned, draining in (("cordon", True, False), ("drain", True, True), ("uncordon", False, False)):
        response = await api.http.post(f"/v1/nodes/n1/{action}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["cordoned"], body["draining"]) == (cordoned, draining)
    kv = await api.nc.jetstream().key_value(subjects.NODE_CONTROLS_BUCKET)
    assert await list_keys(kv) == ["n1"]
    assert (await api.http.post("/v1/nodes/n1/explode")).status_code == 422
