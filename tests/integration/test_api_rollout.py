"""Revisions and rollouts through the api in-process (httpx over ASGI, lifespan run), against a
real nats-server and redis-server: the history an apply records, undo, promote, abort, the
rollout status, and depends_on cycles refused at apply time."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import nats
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from opentelemetry.sdk.trace import TracerProvider

from comp_api.main import create_app
from comp_api.settings import ApiSettings
from comp_cli import main as cli_main
from comp_common import subjects
from comp_common.broker import make_broker, server_caught_up
from comp_common.kv import list_keys
from comp_common.messages import DeploymentRecord, HealthState, RevisionRecord, RolloutEvent, TaskState, TaskStatus
from comp_common.observed import ObservedStore, connect
from comp_common.revisions import Revisions
from comp_common.settings import NatsSettings, RedisSettings
from served_api import serve_api
from waiting import eventually


def web(image: str = "nginx:1.27", replicas: int = 2, extra: str = "", name: str = "web") -> str:
    return f"""
apiVersion: comp/v1
kind: Deployment
metadata: {{name: {name}, namespace: shop, labels: {{tier: front}}}}
spec:
  replicas: {replicas}
  image: {image}
  resources: {{cpu: 100m, memory: 64Mi}}
{extra}"""


def needs(name: str, *deps: str, namespace: str = "shop") -> str:
    return f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {{image: x, depends_on: [{', '.join(deps)}]}}\n"


@dataclass
class Api:
    http: httpx.AsyncClient
    observed: ObservedStore
    nc: NatsClient
    events: list[Msg] = field(default_factory=list)

    async def apply(self, text: str) -> list[dict]:
        response = await self.http.post("/v1/apply", content=text, headers={"content-type": "application/yaml"})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    async def kv(self, bucket: str) -> KeyValue:
        return await self.nc.jetstream().key_value(bucket)

    async def stored(self, key: str = "shop.web") -> DeploymentRecord:
        return DeploymentRecord.model_validate_json((await (await self.kv(subjects.DEPLOYMENTS_BUCKET)).get(key)).value)

    async def revisions(self) -> Revisions:
        return Revisions(await self.kv(subjects.REVISIONS_BUCKET))

    async def history(self, name: str = "web") -> dict:
        response = await self.http.get(f"/v1/deployments/shop/{name}/revisions")
        assert response.status_code == 200, response.text
        return response.json()

    async def rollout(self, action: str, **body: object) -> httpx.Response:
        return await self.http.post(f"/v1/deployments/shop/web/rollout/{action}", json=body or None)

    def events_on(self, prefix: str) -> list[Msg]:
        return [m for m in self.events if m.subject.startswith(prefix)]


@pytest.fixture
async def api(nats_url: str, redis_url: str) -> AsyncIterator[Api]:
    settings = ApiSettings(
        cluster=f"t{uuid.uuid4().hex[:8]}", nats=NatsSettings(url=nats_url, connect_timeout=1), redis=RedisSettings(url=redis_url)
    )
    # A real tracer provider: operation ids are trace ids, all zero without one.
    provider = TracerProvider()
    app = create_app(settings, make_broker(settings.nats, "api", provider), ObservedStore(connect(redis_url), settings.cluster), provider)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            await eventually_healthy(http)
            nc = await nats.connect(nats_url)
            harness = Api(http, ObservedStore(connect(redis_url), settings.cluster), nc)

            async def collect(msg: Msg) -> None:
                harness.events.append(msg)

            await nc.subscribe("comp.evt.>", cb=collect)
            await server_caught_up(nc)
            yield harness
            await nc.close()
            await harness.observed.r.aclose()


async def eventually_healthy(http: httpx.AsyncClient) -> None:
    for _ in range(300):
        if (await http.get("/healthz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the api did not become healthy")


async def three_generations(api: Api) -> None:
    """shop/web at generations 1 (nginx:1.25), 2 (1.26) and 3 (1.27), scaled to 4 after 3."""
    for image in ("nginx:1.25", "nginx:1.26", "nginx:1.27"):
        await api.apply(web(image))
    [scaled] = await api.apply(web("nginx:1.27", replicas=4))
    assert scaled["generation"] == 3


# ---- revisions ------------------------------------------------------------------------------


async def test_each_new_generation_is_recorded_and_nothing_else(api: Api) -> None:
    await api.apply(web("nginx:1.25"))
    await api.apply(web("nginx:1.25", replicas=5))  # scale: same generation, no revision
    await api.apply(web("nginx:1.25", replicas=5).replace("tier: front", "tier: edge"))  # labels: likewise
    await api.apply(web("nginx:1.26", replicas=5))
    await api.apply(web("nginx:1.26", replicas=5, extra="  update: {max_surge: 1}\n"))  # rollout policy: likewise

    revisions_kv = await api.kv(subjects.REVISIONS_BUCKET)
    assert sorted(await list_keys(revisions_kv)) == ["shop.web.r00000001", "shop.web.r00000002"]
    records = await (await api.revisions()).list("shop.web")
    assert [(r.generation, r.deployment.spec.image, r.change_cause, r.healthy_at) for r in records] == [
        (1, "nginx:1.25", "applied", None),
        (2, "nginx:1.26", "applied", None),
    ]
    assert records[1].deployment.spec.replicas == 5, "a revision holds the deployment as applied"

    history = await api.history()
    assert history["generation"] == 2
    assert [(r["generation"], r["image"], r["current"], r["change_cause"], r["healthy_at"]) for r in history["revisions"]] == [
        (1, "nginx:1.25", False, "applied", None),
        (2, "nginx:1.26", True, "applied", None),
    ]
    assert history["revisions"][0]["applied_at"] <= history["revisions"][1]["applied_at"]


async def test_history_of_a_missing_deployment_is_404(api: Api) -> None:
    response = await api.http.get("/v1/deployments/shop/nothing/revisions")
    assert response.status_code == 404
    assert response.json() == {"detail": "deployment 'nothing' not found in namespace 'shop'"}


async def test_delete_removes_the_revisions_and_a_new_deployment_starts_over(api: Api) -> None:
    await api.apply(web("nginx:1.25"))
    await api.apply(web("nginx:1.26"))
    await api.apply(web("nginx:1.25", name="other"))
    assert (await api.http.delete("/v1/deployments/shop/web")).status_code == 200
    assert sorted(await list_keys(await api.kv(subjects.REVISIONS_BUCKET))) == ["shop.other.r00000001"]

    await api.apply(web("nginx:1.30"))
    history = await api.history()
    assert [(r["generation"], r["image"]) for r in history["revisions"]] == [(1, "nginx:1.30")]


async def test_an_orphan_past_the_current_generation_is_not_shown_and_is_overwritten(api: Api) -> None:
    # What an apply that wrote its revision and then lost its compare-and-set leaves behind.
    await api.apply(web("nginx:1.25"))
    revisions = await api.revisions()
    stray = RevisionRecord(deployment=(await api.stored()).deployment, generation=2, applied_at=1.0, change_cause="lost")
    await revisions.put("shop.web", stray)
    assert [r["generation"] for r in (await api.history())["revisions"]] == [1]

    await api.apply(web("nginx:1.26"))
    second = await revisions.get("shop.web", 2)
    assert second is not None and (second.deployment.spec.image, second.change_cause) == ("nginx:1.26", "applied")


async def test_concurrent_applies_leave_each_generation_with_its_own_spec(api: Api) -> None:
    await api.apply(web("nginx:1.0"))
    images = [f"nginx:2.{i}" for i in range(4)]
    responses = await asyncio.gather(
        *(api.http.post("/v1/apply", content=web(image), headers={"content-type": "application/yaml"}) for image in images)
    )
    landed = [r for r in responses if r.status_code == 200]
    assert landed, [r.text for r in responses]
    assert all(r.status_code in (200, 409) for r in responses)
    # Which spec each generation had, from the deployment key's own history.
    kv = await api.kv(subjects.DEPLOYMENTS_BUCKET)
    applied = {}
    for entry in await kv.history("shop.web"):
        record = DeploymentRecord.model_validate_json(entry.value)
        applied.setdefault(record.generation, record.deployment.spec.image)
    recorded = {r.generation: r.deployment.spec.image for r in await (await api.revisions()).list("shop.web", up_to=max(applied))}
    assert recorded == applied


async def test_mark_healthy_keeps_the_first_time(api: Api) -> None:
    await api.apply(web())
    revisions = await api.revisions()
    assert (await revisions.mark_healthy("shop.web", 1, at=100.0)).healthy_at == 100.0
    assert (await revisions.mark_healthy("shop.web", 1, at=200.0)).healthy_at == 100.0
    assert await revisions.mark_healthy("shop.web", 9, at=1.0) is None
    [first] = (await api.history())["revisions"]
    assert first["healthy_at"] == 100.0


# ---- undo -----------------------------------------------------------------------------------


async def test_undo_returns_to_the_previous_revision_keeping_the_replica_count(api: Api) -> None:
    await three_generations(api)
    response = await api.rollout("undo")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["operation_id"] == response.headers["x-comp-operation-id"] and len(body["operation_id"]) == 32
    assert {k: body[k] for k in ("action", "generation", "from_generation", "to_revision", "change_cause")} == {
        "action": "undo", "generation": 4, "from_generation": 3, "to_revision": 2, "change_cause": "undo to revision 2",
    }
    record = await api.stored()
    assert (record.generation, record.deployment.spec.image, record.deployment.spec.replicas) == (4, "nginx:1.26", 4)
    assert record.change_cause == "undo to revision 2"
    assert record.deployment.metadata.labels == {"tier": "front"}
    view = (await api.http.get("/v1/deployments/shop/web")).json()
    # Promoted at once: a version returned to has run before, and no canary holds the way back.
    assert (view["generation"], view["change_cause"], view["promoted_generation"]) == (4, "undo to revision 2", 4)

    history = await api.history()
    assert [(r["generation"], r["image"], r["change_cause"], r["current"]) for r in history["revisions"]][-1] == (
        4, "nginx:1.26", "undo to revision 2", True,
    )

    # The scheduler hears of it as of any apply, and the rollout log says what happened.
    deployment_event = await eventually(lambda: [m for m in api.events_on("comp.evt.deployment.") if json.loads(m.data)["generation"] == 4], "the deployment event")
    assert json.loads(deployment_event[0].data) == {
        "action": "applied", "namespace": "shop", "name": "web", "revision": body["revision"], "generation": 4,
    }
    [rollout] = await eventually(lambda: api.events_on("comp.evt.rollout."), "the rollout event")
    assert rollout.subject == subjects.rollout_event("shop", "web")
    event = RolloutEvent.model_validate_json(rollout.data)
    assert (event.deployment, event.generation, event.from_generation, event.state, event.message) == (
        "shop.web", 4, 3, "progressing", "undo to revision 2",
    )

    # Undo again: back to what was current before the first undo, as kubectl does.
    again = (await api.rollout("undo")).json()
    assert (again["to_revision"], again["generation"]) == (3, 5)
    assert (await api.stored()).deployment.spec.image == "nginx:1.27"


async def test_undo_to_a_given_revision(api: Api) -> None:
    await three_generations(api)
    response = await api.rollout("undo", to_revision=1)
    assert response.status_code == 200, response.text
    assert (response.json()["to_revision"], response.json()["change_cause"]) == (1, "undo to revision 1")
    record = await api.stored()
    assert (record.generation, record.deployment.spec.image, record.deployment.spec.replicas) == (4, "nginx:1.25", 4)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"to_revision": 3}, 409, "revision 3 is the current one of deployment shop/web; nothing to undo"),
        ({"to_revision": 7}, 404, "deployment shop/web has no revision 7 (recorded: 1, 2, 3)"),
    ],
)
async def test_undo_refusals(api: Api, body: dict, status: int, detail: str) -> None:
    await three_generations(api)
    response = await api.rollout("undo", **body)
    assert response.status_code == status, response.text
    assert response.json() == {"detail": detail}
    assert len(response.headers["x-comp-operation-id"]) == 32
    assert (await api.stored()).generation == 3, "nothing changed"


@pytest.mark.parametrize(
    ("body", "path"),
    [("{\"to_revision\": 0}", "to_revision"), ("{\"to_revision\": \"two\"}", "to_revision"), ("{\"revision\": 1}", "revision"), ("[", "")],
)
async def test_undo_with_a_bad_body_is_422(api: Api, body: str, path: str) -> None:
    await three_generations(api)
    response = await api.http.post("/v1/deployments/shop/web/rollout/undo", content=body)
    assert response.status_code == 422, response.text
    assert path in [e["path"] for e in response.json()["errors"]]
    assert (await api.stored()).generation == 3


async def test_undo_with_nothing_before_is_409_and_of_nothing_is_404(api: Api) -> None:
    await api.apply(web())
    response = await api.rollout("undo")
    assert (response.status_code, response.json()) == (
        409, {"detail": "deployment shop/web has no revision before the current one (1) to undo to"},
    )
    missing = await api.http.post("/v1/deployments/shop/nothing/rollout/undo")
    assert (missing.status_code, missing.json()) == (404, {"detail": "deployment 'nothing' not found in namespace 'shop'"})
    assert api.events_on("comp.evt.rollout.") == []


async def test_undo_to_a_revision_that_runs_the_same_is_409(api: Api) -> None:
    await api.apply(web("nginx:1.25"))
    await api.apply(web("nginx:1.26"))
    await api.apply(web("nginx:1.25"))  # generation 3 runs what 1 ran
    response = await api.rollout("undo", to_revision=1)
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "revision 1 of deployment shop/web runs what generation 3 runs already; there is nothing to go back to"
    )


async def test_undo_that_would_close_a_dependency_cycle_is_409(api: Api) -> None:
    await api.apply(needs("web", "db"))
    await api.apply(needs("web").replace("image: x", "image: y"))  # generation 2 no longer needs db...
    await api.apply(needs("db", "web"))  # ...so db may need web
    response = await api.rollout("undo")
    assert response.status_code == 409
    assert response.json()["detail"] == "revision 1 of deployment shop/web cannot be restored: depends_on cycle: web -> db -> web"


async def test_undo_over_quota_is_403(api: Api) -> None:
    await api.apply(web(replicas=2).replace("cpu: 100m", "cpu: 1"))
    await api.apply(web(replicas=2).replace("cpu: 100m", "cpu: 200m"))
    assert (await api.http.put("/v1/namespaces/shop", json={"quota": {"cpu": 1}})).status_code == 200
    response = await api.rollout("undo")
    assert response.status_code == 403
    assert response.json()["detail"] == "namespace shop quota exceeded: cpu 2 cores > quota 1; nothing was applied"
    assert (await api.stored()).generation == 2


# ---- promote --------------------------------------------------------------------------------


async def test_promote_a_canary_once(api: Api) -> None:
    await api.apply(web("nginx:1.25", extra="  update: {canary: 1}\n"))
    await api.apply(web("nginx:1.26", extra="  update: {canary: 1}\n"))
    response = await api.rollout("promote")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["action"], body["generation"], body["from_generation"], body["promoted_generation"]) == ("promote", 2, 2, 2)
    assert body["operation_id"] == response.headers["x-comp-operation-id"]
    record = await api.stored()
    assert (record.generation, record.promoted_generation) == (2, 2)
    assert sorted(await list_keys(await api.kv(subjects.REVISIONS_BUCKET))) == ["shop.web.r00000001", "shop.web.r00000002"]

    [rollout] = await eventually(lambda: api.events_on("comp.evt.rollout."), "the rollout event")
    assert RolloutEvent.model_validate_json(rollout.data).state == "promoted"
    await eventually(lambda: [m for m in api.events_on("comp.evt.deployment.") if json.loads(m.data)["revision"] == body["revision"]], "the deployment event")

    again = await api.rollout("promote")
    assert (again.status_code, again.json()) == (409, {"detail": "generation 2 of deployment shop/web is already promoted"})


async def test_promote_without_a_canary_is_409(api: Api) -> None:
    await api.apply(web())
    response = await api.rollout("promote")
    assert (response.status_code, response.json()) == (
        409, {"detail": "deployment shop/web has no canary (spec.update.canary is 0); there is nothing to promote"},
    )
    assert (await api.stored()).promoted_generation == 0
    assert (await api.http.post("/v1/deployments/shop/nothing/rollout/promote")).status_code == 404


# ---- abort ----------------------------------------------------------------------------------


async def test_abort_returns_to_the_last_healthy_revision(api: Api) -> None:
    await three_generations(api)
    await (await api.revisions()).mark_healthy("shop.web", 1, at=50.0)
    response = await api.rollout("abort")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["action"], body["generation"], body["from_generation"], body["to_revision"], body["change_cause"]) == (
        "abort", 4, 3, 1, "rollout aborted",
    )
    record = await api.stored()
    assert (record.deployment.spec.image, record.deployment.spec.replicas, record.change_cause) == ("nginx:1.25", 4, "rollout aborted")
    [rollout] = await eventually(lambda: api.events_on("comp.evt.rollout."), "the rollout event")
    event = RolloutEvent.model_validate_json(rollout.data)
    assert (event.state, event.generation, event.from_generation) == ("aborted", 4, 3)
    assert event.message == "rollout of generation 3 aborted; back to revision 1"


async def test_abort_without_a_healthy_revision_returns_to_the_previous(api: Api) -> None:
    await three_generations(api)
    body = (await api.rollout("abort")).json()
    assert (body["to_revision"], body["generation"]) == (2, 4)
    assert (await api.stored()).deployment.spec.image == "nginx:1.26"


async def test_abort_refusals(api: Api) -> None:
    await api.apply(web("nginx:1.25"))
    response = await api.rollout("abort")
    assert (response.status_code, response.json()) == (
        409, {"detail": "deployment shop/web has no revision before the current one (1) to go back to"},
    )
    await api.apply(web("nginx:1.26"))
    await (await api.revisions()).mark_healthy("shop.web", 2, at=10.0)
    response = await api.rollout("abort")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "the rollout of generation 2 of deployment shop/web completed healthy; nothing to abort "
        "(`comp rollout undo` returns to an earlier revision)"
    )
    assert (await api.stored()).generation == 2
    assert (await api.http.post("/v1/deployments/shop/nothing/rollout/abort")).status_code == 404


# ---- status ---------------------------------------------------------------------------------


async def test_rollout_status_with_the_last_event_and_the_tasks(api: Api) -> None:
    await api.apply(web("nginx:1.25", extra="  update: {canary: 2}\n"))
    status = (await api.http.get("/v1/deployments/shop/web/rollout")).json()
    assert status == {
        "namespace": "shop", "name": "web", "generation": 1, "change_cause": "applied", "replicas": 2, "canary": 2,
        "promoted_generation": 0, "last_event": None, "tasks": {"total": 0, "ready": 0, "crash_looping": 0, "by_state": {}},
    }
    await api.observed.put_tasks([
        TaskStatus(task_id="web-1", node_id="n1", deployment="shop.web", state=TaskState.RUNNING, ready=True,
                   readiness=HealthState.HEALTHY),
        TaskStatus(task_id="web-2", node_id="n1", deployment="shop.web", state=TaskState.FAILED, crash_loop=True),
        TaskStatus(task_id="other-1", node_id="n1", deployment="shop.other", state=TaskState.RUNNING, ready=True),
    ])
    # As the scheduler would report a step.
    step = RolloutEvent(deployment="shop.web", generation=1, state="paused", message="canary running", at=5.0)
    await api.nc.jetstream().publish(subjects.rollout_event("shop", "web"), step.model_dump_json().encode())

    status = (await api.http.get("/v1/deployments/shop/web/rollout")).json()
    assert status["tasks"] == {"total": 2, "ready": 1, "crash_looping": 1, "by_state": {"failed": 1, "running": 1}}
    assert RolloutEvent.model_validate(status["last_event"]) == step
    assert (await api.http.get("/v1/deployments/shop/nothing/rollout")).status_code == 404


# ---- depends_on cycles ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        pytest.param(needs("a", "a"), [{"path": "spec.depends_on", "message": "depends_on cycle: a -> a"}], id="self"),
        pytest.param(
            needs("a", "b") + "---\n" + needs("b", "c") + "---\n" + needs("c", "a"),
            [{"path": "document[0].spec.depends_on", "message": "depends_on cycle: a -> b -> c -> a"}],
            id="batch",
        ),
        pytest.param(
            needs("ok", "a") + "---\n" + needs("a", "b") + "---\n" + needs("b", "a") + "---\n" + needs("z", "z"),
            [
                {"path": "document[1].spec.depends_on", "message": "depends_on cycle: a -> b -> a"},
                {"path": "document[3].spec.depends_on", "message": "depends_on cycle: z -> z"},
            ],
            id="two-cycles",
        ),
    ],
)
async def test_depends_on_cycle_in_the_batch_is_422_and_stores_nothing(api: Api, text: str, errors: list) -> None:
    response = await api.http.post("/v1/apply", content=text)
    assert response.status_code == 422, response.text
    assert response.json() == {"errors": errors}
    assert await list_keys(await api.kv(subjects.DEPLOYMENTS_BUCKET)) == []
    assert await list_keys(await api.kv(subjects.REVISIONS_BUCKET)) == []


async def test_depends_on_cycle_with_what_is_stored_is_422(api: Api) -> None:
    await api.apply(needs("a", "b"))
    await api.apply(needs("b", "c"))
    await api.apply(needs("a", "b", namespace="other"))  # another namespace is another graph
    response = await api.http.post("/v1/apply", content=needs("x") + "---\n" + needs("c", "a"))
    assert response.status_code == 422
    assert response.json() == {"errors": [{"path": "document[1].spec.depends_on", "message": "depends_on cycle: c -> a -> b -> c"}]}
    keys = sorted(await list_keys(await api.kv(subjects.DEPLOYMENTS_BUCKET)))
    assert keys == ["other.a", "shop.a", "shop.b"]

    # c depending on other.a's namesake elsewhere is fine; so is dropping the edge that closed it.
    assert [r["action"] for r in await api.apply(needs("c", "a", namespace="other"))] == ["created"]
    # Re-applying b without its dependency opens the loop, and then c may depend on a.
    results = await api.apply(needs("b") + "---\n" + needs("c", "a"))
    assert [(r["name"], r["action"]) for r in results] == [("b", "configured"), ("c", "created")]


async def test_a_dependency_on_a_deployment_not_applied_yet_is_accepted(api: Api) -> None:
    [result] = await api.apply(needs("web", "db", "cache"))
    assert result["action"] == "created"
    assert [d.name for d in (await api.stored("shop.web")).deployment.spec.depends_on] == ["db", "cache"]


# ---- the CLI against the api ----------------------------------------------------------------


@pytest.fixture
def served_api(nats_url: str, redis_url: str) -> Iterator[str]:
    with serve_api(nats_url, redis_url) as url:
        yield url


def test_cli_rollout_commands_against_the_api(served_api: str) -> None:
    def comp(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli_main.cli, ["--api", served_api, *args])
        assert result.exit_code == code, result.output
        return result.output

    for image in ("nginx:1.25", "nginx:1.26"):
        response = httpx.post(f"{served_api}/v1/apply", content=web(image, extra="  update: {canary: 1}\n"), timeout=30)
        assert response.status_code == 200, response.text

    history = comp("rollout", "history", "web", "-n", "shop").splitlines()
    assert [line.split()[0] for line in history[1:]] == ["1", "2"]
    assert history[2].split()[1] == "*" and "nginx:1.26" in history[2]

    status = comp("rollout", "status", "web", "-n", "shop")
    assert "Generation:  2 (applied)" in status and "Canary:      1 (waiting for `comp rollout promote`)" in status
    assert "Tasks:       0 total, 0 ready" in status

    assert comp("rollout", "promote", "web", "-n", "shop").startswith("deployment shop/web: canary of generation 2 promoted\noperation ")
    again = comp("rollout", "promote", "web", "-n", "shop", code=1)
    assert "HTTP 409: generation 2 of deployment shop/web is already promoted" in again

    out = comp("rollout", "undo", "web", "-n", "shop", "--to-revision", "1")
    assert out.startswith("deployment shop/web rolled back to revision 1 (generation 3)\noperation ")
    status = comp("rollout", "status", "web", "-n", "shop")
    assert "Generation:  3 (undo to revision 1)" in status
    assert "Last event:  progressing at " in status and status.splitlines()[4].endswith(": undo to revision 1")

    out = comp("rollout", "abort", "web", "-n", "shop")
    assert out.startswith("deployment shop/web: rollout of generation 3 aborted, back to revision 2 (generation 4)")
    history = comp("rollout", "history", "web", "-n", "shop", "-o", "json")
    assert [(r["generation"], r["image"], r["change_cause"]) for r in json.loads(history)["revisions"]] == [
        (1, "nginx:1.25", "applied"), (2, "nginx:1.26", "applied"), (3, "nginx:1.25", "undo to revision 1"),
        (4, "nginx:1.26", "rollout aborted"),
    ]
    missing = comp("rollout", "undo", "nothing", "-n", "shop", code=1)
    assert "HTTP 404: deployment 'nothing' not found in namespace 'shop'" in missing
