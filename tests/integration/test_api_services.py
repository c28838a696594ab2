"""Services through the api in-process (httpx over ASGI, lifespan run) against a real
nats-server and redis-server: applied beside deployments, read back joined with what
discovery wrote, deleted, refused when invalid, and their counters gathered from every lb."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider

from comp_api.main import create_app
from comp_api.settings import ApiGroup, ApiSettings
from comp_common import subjects
from comp_common.broker import make_broker, server_caught_up
from comp_common.kv import list_keys, put_model
from comp_common.messages import Endpoint, EndpointCounter, EndpointPort, ServiceEndpoints, ServiceRecord
from comp_common.observed import ObservedStore, connect
from comp_common.settings import NatsSettings, RedisSettings
from waiting import eventually

WEB = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: web, namespace: shop, labels: {tier: front}}
spec:
  replicas: 2
  image: nginx:1.27
  ports: [{container_port: 8080, name: http}]
"""


def service(name: str = "web", namespace: str = "shop", ports: str = "[{name: http, port: 80, target_port: http}]",
            selector: str = "{deployment: web}", extra: str = "") -> str:
    return f"""
apiVersion: comp/v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {selector}
  ports: {ports}
{extra}"""


SVC = service()
# The api's window for lb replies: wide enough that an answer within it cannot be luck.
COUNTERS_WINDOW = 1.0


@dataclass
class Api:
    http: httpx.AsyncClient
    nc: NatsClient
    events: list[Msg] = field(default_factory=list)

    async def apply(self, text: str) -> httpx.Response:
        return await self.http.post("/v1/apply", content=text, headers={"content-type": "application/yaml"})

    async def applied(self, text: str) -> dict:
        response = await self.apply(text)
        assert response.status_code == 200, response.text
        return response.json()

    async def kv(self, bucket: str) -> KeyValue:
        return await self.nc.jetstream().key_value(bucket)

    async def record(self, key: str = "shop.web") -> tuple[ServiceRecord, int]:
        entry = await (await self.kv(subjects.SERVICES_BUCKET)).get(key)
        return ServiceRecord.model_validate_json(entry.value), entry.revision

    async def stored(self, bucket: str) -> list[str]:
        return sorted(await list_keys(await self.kv(bucket)))

    def service_events(self) -> list[dict]:
        return [json.loads(m.data) for m in self.events if m.subject.startswith("comp.evt.service.")]


@pytest.fixture
async def api(nats_url: str, redis_url: str) -> AsyncIterator[Api]:
    settings = ApiSettings(
        cluster=f"t{uuid.uuid4().hex[:8]}", nats=NatsSettings(url=nats_url, connect_timeout=1), redis=RedisSettings(url=redis_url),
        api=ApiGroup(counters_window_seconds=COUNTERS_WINDOW),
    )
    provider = TracerProvider()
    app = create_app(settings, make_broker(settings.nats, "api", provider), ObservedStore(connect(redis_url), settings.cluster), provider)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            await eventually(lambda: _healthy(http), "the api to be healthy", timeout=15)
            nc = await nats.connect(nats_url)
            harness = Api(http, nc)

            async def collect(msg: Msg) -> None:
                harness.events.append(msg)

            await nc.subscribe("comp.evt.>", cb=collect)
            await server_caught_up(nc)
            yield harness
            await nc.close()


async def _healthy(http: httpx.AsyncClient) -> bool:
    return (await http.get("/healthz")).status_code == 200


async def settle() -> None:
    """Long enough for an event published by the api to have reached the test's subscription."""
    await asyncio.sleep(0.2)


# ---- apply --------------------------------------------------------------------------------


async def test_apply_a_service_with_its_deployment(api: Api) -> None:
    body = await api.applied(WEB + "---\n" + SVC)
    [deployment] = body["results"]
    assert (deployment["name"], deployment["action"]) == ("web", "created")
    [svc] = body["services"]
    assert svc == {"namespace": "shop", "name": "web", "action": "created", "revision": svc["revision"], "generation": 1}

    record, revision = await api.record()
    assert revision == svc["revision"] and record.generation == 1
    assert record.service.spec.selector.deployment == "web"
    assert record.created_at == record.updated_at > 0

    await eventually(lambda: api.service_events(), "the service event")
    assert api.service_events() == [{"action": "applied", "namespace": "shop", "name": "web", "revision": svc["revision"]}]
    [msg] = [m for m in api.events if m.subject.startswith("comp.evt.service.")]
    assert msg.subject == subjects.service_event("shop", "web")
    assert msg.headers["traceparent"].split("-")[1] == body["operation_id"], "the event is part of the apply's trace"

    view = (await api.http.get("/v1/namespaces/shop/services/web")).json()
    assert (view["namespace"], view["name"], view["generation"], view["revision"], view["mode"]) == ("shop", "web", 1, svc["revision"], "vip")
    assert view["manifest"]["kind"] == "Service" and view["manifest"]["spec"]["selector"] == {"deployment": "web", "labels": {}}
    assert view["ports"] == [{"name": "http", "port": 80, "target_port": "http", "protocol": "tcp", "published": None}]
    # Discovery has written nothing yet.
    assert (view["vip"], view["endpoints"], view["endpoints_updated_at"]) == (None, [], None)


async def test_a_service_alone_leaves_the_deployment_results_empty(api: Api) -> None:
    body = await api.applied(SVC)
    assert body["results"] == [] and [s["action"] for s in body["services"]] == ["created"]
    assert await api.stored(subjects.DEPLOYMENTS_BUCKET) == []
    assert await api.stored(subjects.SERVICES_BUCKET) == ["shop.web"]


async def test_unchanged_reapply_writes_and_announces_nothing(api: Api) -> None:
    [created] = (await api.applied(SVC))["services"]
    await eventually(lambda: api.service_events(), "the first event")
    [same] = (await api.applied(SVC))["services"]
    assert same == {**created, "action": "unchanged"}
    assert (await api.record())[1] == created["revision"]
    await settle()
    assert len(api.service_events()) == 1


async def test_a_changed_spec_bumps_the_generation_and_labels_do_not(api: Api) -> None:
    [created] = (await api.applied(SVC))["services"]
    labelled = SVC.replace("namespace: shop}", "namespace: shop, labels: {team: a}}")
    [relabelled] = (await api.applied(labelled))["services"]
    assert (relabelled["action"], relabelled["generation"]) == ("configured", 1)
    assert relabelled["revision"] > created["revision"]

    [changed] = (await api.applied(service(ports="[{name: http, port: 80, target_port: 8081}]")))["services"]
    assert (changed["action"], changed["generation"]) == ("configured", 2)
    record, revision = await api.record()
    assert revision == changed["revision"] and record.generation == 2
    assert record.service.spec.ports[0].target_port == 8081
    assert record.service.metadata.labels == {}, "the stored service is the one applied last"
    await eventually(lambda: len(api.service_events()) == 3, "an event per write")
    assert [e["revision"] for e in api.service_events()] == [created["revision"], relabelled["revision"], changed["revision"]]


# ---- refused ------------------------------------------------------------------------------

BAD_SERVICES = [
    pytest.param(service(extra="  sessionAffinity: ClientIP\n"), "document[1].spec.sessionAffinity", "unknown field", id="unknown-field"),
    pytest.param(service(selector="{deployment: web, labels: {tier: front}}"), "document[1].spec.selector",
                 "give either 'deployment' or 'labels', not both and not neither", id="selector-both"),
    pytest.param(service(selector="{}"), "document[1].spec.selector",
                 "give either 'deployment' or 'labels', not both and not neither", id="selector-neither"),
    pytest.param(service(ports="[{name: a, port: 80}, {name: b, port: 80}]"), "document[1].spec",
                 "ports[1]: 80/tcp is already ports[0]", id="duplicate-port"),
    pytest.param(service(ports="[{port: 80}]", extra="  mode: round-robin\n"), "document[1].spec.mode", None, id="bad-mode"),
]


@pytest.mark.parametrize(("text", "path", "message"), BAD_SERVICES)
async def test_a_bad_service_is_refused_with_its_path_and_nothing_is_stored(api: Api, text: str, path: str, message: str | None) -> None:
    response = await api.apply(WEB + "---\n" + text)
    assert response.status_code == 422, response.text
    errors = {e["path"]: e["message"] for e in response.json()["errors"]}
    assert path in errors, errors
    if message is not None:
        assert errors[path] == message
    assert await api.stored(subjects.SERVICES_BUCKET) == []
    assert await api.stored(subjects.DEPLOYMENTS_BUCKET) == [], "the deployment beside it is not stored either"
    await settle()
    assert api.events == []


async def test_a_published_port_of_a_stored_service_is_refused_naming_it(api: Api) -> None:
    [owner] = (await api.applied(service(name="front", ports="[{port: 80, published: 8080}]")))["services"]
    await eventually(lambda: api.service_events(), "the owner's event")

    # In another namespace too: a published port opens on every host.
    clash = WEB + "---\n" + service(name="other", namespace="blog", ports="[{port: 80, published: 8080}]")
    response = await api.apply(clash)
    assert response.status_code == 422
    assert response.json() == {"errors": [{
        "path": "document[1].spec.ports[0].published",
        "message": "published port 8080/tcp is already used by service shop/front",
    }]}
    assert await api.stored(subjects.SERVICES_BUCKET) == ["shop.front"]
    assert await api.stored(subjects.DEPLOYMENTS_BUCKET) == []
    assert (await api.record("shop.front"))[1] == owner["revision"]

    # The same number over udp is another port; re-applying the owner is no clash with itself.
    udp = (await api.applied(service(name="dns", namespace="blog", ports="[{port: 53, published: 8080, protocol: udp}]")))
    assert udp["services"][0]["action"] == "created"
    again = await api.applied(service(name="front", ports="[{port: 80, published: 8080}]"))
    assert again["services"][0]["action"] == "unchanged"
    await settle()
    assert len(api.service_events()) == 2


async def test_published_ports_clash_within_one_apply_and_move_between_services(api: Api) -> None:
    first, second = (service(name=n, ports="[{port: 80, published: 9000}]") for n in ("first", "second"))
    response = await api.apply(first + "---\n" + second)
    assert response.status_code == 422
    assert response.json()["errors"] == [{
        "path": "document[1].spec.ports[0].published",
        "message": "published port 9000/tcp is already used by service shop/first",
    }]
    assert await api.stored(subjects.SERVICES_BUCKET) == []

    await api.applied(first)
    # One apply takes the port from first and gives it to second.
    moved = await api.applied(service(name="first", ports="[{port: 80}]") + "---\n" + second)
    assert [(s["name"], s["action"]) for s in moved["services"]] == [("first", "configured"), ("second", "created")]
    record, _ = await api.record("shop.second")
    assert record.service.spec.ports[0].published == 9000


async def test_a_namespace_with_services_is_not_deleted(api: Api) -> None:
    assert (await api.http.put("/v1/namespaces/shop", json={})).status_code == 200
    await api.applied(SVC)
    response = await api.http.delete("/v1/namespaces/shop")
    assert response.status_code == 409
    assert response.json() == {"detail": "namespace shop still has services; delete them first"}
    assert (await api.http.delete("/v1/namespaces/shop/services/web")).status_code == 200
    assert (await api.http.delete("/v1/namespaces/shop")).status_code == 200


# ---- reading ------------------------------------------------------------------------------


async def test_the_view_joins_what_discovery_wrote(api: Api) -> None:
    await api.applied(WEB + "---\n" + SVC + "---\n" + service(name="db", ports="[{port: 5432}]", extra="  mode: dnsrr\n"))
    await api.applied(service(namespace="blog"))
    discovered = ServiceEndpoints(
        namespace="shop", name="web", vip="10.96.0.7",
        ports=[EndpointPort(name="http", port=80, named=True)],
        endpoints=[Endpoint(task_id="shop.web-1", node_id="n1", address="172.17.0.5", ports={"http": 8080}),
                   Endpoint(task_id="shop.web-2", node_id="n2", address="172.17.0.6", ports={"http": 8080})],
        updated_at=1234.5,
    )
    await put_model(await api.kv(subjects.ENDPOINTS_BUCKET), "shop.web", discovered, None)

    view = (await api.http.get("/v1/namespaces/shop/services/web")).json()
    assert view["vip"] == "10.96.0.7" and view["endpoints_updated_at"] == 1234.5
    assert view["endpoints"] == [
        {"task_id": "shop.web-1", "node_id": "n1", "address": "172.17.0.5", "ports": {"http": 8080}},
        {"task_id": "shop.web-2", "node_id": "n2", "address": "172.17.0.6", "ports": {"http": 8080}},
    ]

    listed = (await api.http.get("/v1/services")).json()
    assert [(s["namespace"], s["name"], s["vip"], len(s["endpoints"])) for s in listed] == [
        ("blog", "web", None, 0), ("shop", "db", None, 0), ("shop", "web", "10.96.0.7", 2),
    ]
    assert [s["mode"] for s in listed] == ["vip", "dnsrr", "vip"]
    shop = (await api.http.get("/v1/services", params={"namespace": "shop"})).json()
    assert [s["name"] for s in shop] == ["db", "web"]
    assert (await api.http.get("/v1/services", params={"namespace": "none"})).json() == []


async def test_delete_then_404(api: Api) -> None:
    [created] = (await api.applied(SVC))["services"]
    response = await api.http.delete("/v1/namespaces/shop/services/web")
    assert response.status_code == 200
    assert response.json() == {
        "operation_id": response.headers["x-comp-operation-id"], "namespace": "shop", "name": "web", "action": "deleted",
    }
    assert await api.stored(subjects.SERVICES_BUCKET) == []
    await eventually(lambda: len(api.service_events()) == 2, "the deleted event")
    assert api.service_events()[1] == {"action": "deleted", "namespace": "shop", "name": "web", "revision": created["revision"]}

    missing = {"detail": "service 'web' not found in namespace 'shop'"}
    for method, path in (("GET", "/v1/namespaces/shop/services/web"), ("DELETE", "/v1/namespaces/shop/services/web"),
                         ("GET", "/v1/namespaces/shop/services/web/counters")):
        response = await api.http.request(method, path)
        assert (response.status_code, response.json()) == (404, missing), (method, path)
    assert (await api.http.get("/v1/services")).json() == []
    assert (await api.http.get("/v1/namespaces/shop/services/a.b")).status_code == 422

    # Applying again after a delete starts over.
    [again] = (await api.applied(SVC))["services"]
    assert (again["action"], again["generation"]) == ("created", 1)


# ---- counters -----------------------------------------------------------------------------


def counters(node_id: str, packets: int) -> list[EndpointCounter]:
    return [
        EndpointCounter(node_id=node_id, port="http", target="", packets=packets, bytes=packets * 60),
        EndpointCounter(node_id=node_id, port="http", target="172.17.0.5:8080", packets=packets, bytes=packets * 60),
    ]


async def test_counters_are_gathered_from_every_lb(api: Api) -> None:
    await api.applied(SVC)
    requests: list[Msg] = []

    def lb(answer: bytes):
        async def reply(msg: Msg) -> None:
            requests.append(msg)
            await api.nc.publish(msg.reply, answer)

        return reply

    for node_id, packets in (("n1", 3), ("n2", 5)):
        answer = json.dumps([c.model_dump() for c in counters(node_id, packets)]).encode()
        await api.nc.subscribe(subjects.lb_counters("shop", "web"), cb=lb(answer))
    # A broken lb's answer is left out rather than failing the others'.
    await api.nc.subscribe(subjects.lb_counters("shop", "web"), cb=lb(b'{"not": "a list"}'))
    await server_caught_up(api.nc)

    response = await api.http.get("/v1/namespaces/shop/services/web/counters")
    assert response.status_code == 200, response.text
    got = sorted((c["node_id"], c["target"], c["packets"], c["bytes"]) for c in response.json())
    assert got == [("n1", "", 3, 180), ("n1", "172.17.0.5:8080", 3, 180), ("n2", "", 5, 300), ("n2", "172.17.0.5:8080", 5, 300)]
    assert len(requests) == 3
    assert json.loads(requests[0].data) == {"namespace": "shop", "name": "web"}
    assert "traceparent" in requests[0].headers


async def test_counters_without_any_lb_are_an_empty_list_at_once(api: Api) -> None:
    await api.applied(SVC)
    started = time.monotonic()
    response = await api.http.get("/v1/namespaces/shop/services/web/counters")
    assert (response.status_code, response.json()) == (200, [])
    # The server says at once that nobody listens; the api need not wait out its window.
    assert time.monotonic() - started < COUNTERS_WINDOW / 2


# ---- OpenAPI ------------------------------------------------------------------------------


async def test_openapi_documents_services(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    assert {"/v1/services", "/v1/namespaces/{namespace}/services/{name}", "/v1/namespaces/{namespace}/services/{name}/counters"} <= set(spec["paths"])
    assert {"delete", "get"} <= set(spec["paths"]["/v1/namespaces/{namespace}/services/{name}"])
    schemas = spec["components"]["schemas"]
    assert {"Service", "ServiceSpec", "ServicePort", "Selector", "Deployment", "ServiceView"} <= set(schemas)
    assert schemas["Service"]["properties"]["kind"]["const"] == "Service"
