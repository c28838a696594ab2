"""Scaling through the api (`comp scale`'s path, which the autoscaler shares through
comp_common.scaling), on a real nats-server: the count changes, the generation stays,
an event goes out; autoscale bounds, quotas and unknown deployments are refused."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import nats
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NatsClient

from comp_cli import main as cli_main
from comp_common.broker import server_caught_up
from comp_common import subjects
from comp_common.messages import AutoscaleDecision, DeploymentEvent, DeploymentRecord
from comp_common.observed import ObservedStore, connect
from served_api import serve_api


@dataclass
class Api:
    http: httpx.AsyncClient
    nc: NatsClient
    events: list = field(default_factory=list)

    async def kv(self):
        return await self.nc.jetstream().key_value(subjects.DEPLOYMENTS_BUCKET)

    async def apply(self, text: str) -> httpx.Response:
        return await self.http.post("/v1/apply", content=text, headers={"content-type": "application/yaml"})

    async def wait_events(self, count: int) -> list:
        for _ in range(250):
            if len(self.events) >= count:
                break
            await asyncio.sleep(0.02)
        return self.events


@pytest.fixture
async def api(nats_url, redis_url):
    with serve_api(nats_url, redis_url) as url:
        nc = await nats.connect(nats_url)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            harness = Api(http, nc)

            async def collect(msg) -> None:
                harness.events.append(msg)

            await nc.subscribe("comp.evt.deployment.>", cb=collect)
            await server_caught_up(nc)
            yield harness
        await nc.close()


def results_of(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]

WEB = """
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 2, image: nginx:1.27, resources: {cpu: 250m, memory: 64Mi}}
"""
SCALED_WEB = WEB.replace("replicas: 2, image", "replicas: 2, autoscale: {min: 2, max: 6, target: 0.5}, image")


async def stored(api) -> DeploymentRecord:
    entry = await (await api.kv()).get("shop.web")
    return DeploymentRecord.model_validate_json(entry.value)


async def test_scale_keeps_the_generation_and_announces(api):
    results_of(await api.apply(WEB))
    before = await stored(api)
    answer = await api.http.post("/v1/deployments/shop/web/scale", json={"replicas": 5})
    assert answer.status_code == 200, answer.text
    assert answer.json() | {"revision": 0} == {"namespace": "shop", "name": "web", "replicas": 5, "previous": 2, "revision": 0, "changed": True}
    after = await stored(api)
    assert after.deployment.spec.replicas == 5 and after.generation == before.generation == 1
    events = [DeploymentEvent.model_validate_json(m.data) for m in await api.wait_events(2)]
    assert [(e.action, e.name, e.generation) for e in events][-1] == ("applied", "web", 1)
    again = await api.http.post("/v1/deployments/shop/web/scale", json={"replicas": 5})
    assert again.json()["changed"] is False


@pytest.mark.parametrize(
    ("manifest", "replicas", "status", "message"),
    [
        (SCALED_WEB, 9, 409, "autoscales between 2 and 6 replicas; 9 is outside"),
        (SCALED_WEB, 1, 409, "autoscales between 2 and 6 replicas; 1 is outside"),
        (WEB, -1, 422, ""),
    ],
)
async def test_refusals(api, manifest, replicas, status, message):
    results_of(await api.apply(manifest))
    answer = await api.http.post("/v1/deployments/shop/web/scale", json={"replicas": replicas})
    assert answer.status_code == status, answer.text
    assert message in answer.text
    assert (await stored(api)).deployment.spec.replicas == 2, "nothing written"


async def test_unknown_and_quota(api):
    answer = await api.http.post("/v1/deployments/shop/nope/scale", json={"replicas": 1})
    assert answer.status_code == 404 and "shop/nope not found" in answer.text
    results_of(await api.apply(WEB))
    quota = await api.http.put("/v1/namespaces/shop", json={"quota": {"cpu": 1}})
    assert quota.status_code < 300, quota.text
    answer = await api.http.post("/v1/deployments/shop/web/scale", json={"replicas": 5})
    assert answer.status_code == 403 and "quota exceeded" in answer.text
    assert (await stored(api)).deployment.spec.replicas == 2


async def test_an_apply_keeps_the_autoscaled_count(api):
    results_of(await api.apply(SCALED_WEB))
    assert (await api.http.post("/v1/deployments/shop/web/scale", json={"replicas": 5})).status_code == 200
    [result] = results_of(await api.apply(SCALED_WEB))
    assert result["action"] == "unchanged"
    assert (await stored(api)).deployment.spec.replicas == 5
    # Bounds that no longer hold the count bring it within them.
    results_of(await api.apply(SCALED_WEB.replace("max: 6", "max: 3")))
    assert (await stored(api)).deployment.spec.replicas == 3


def test_comp_scale(nats_url, redis_url):
    with serve_api(nats_url, redis_url) as url:
        runner = CliRunner()
        apply = runner.invoke(cli_main.cli, ["--api", url, "apply", "-f", "-"], input=SCALED_WEB)
        assert apply.exit_code == 0, apply.output
        done = runner.invoke(cli_main.cli, ["--api", url, "scale", "web", "4", "-n", "shop"])
        assert done.exit_code == 0 and "scaled from 2 to 4" in done.output, done.output
        refused = runner.invoke(cli_main.cli, ["--api", url, "scale", "web", "8", "-n", "shop"])
        assert refused.exit_code != 0 and "autoscales between 2 and 6" in refused.output
        shown = runner.invoke(cli_main.cli, ["--api", url, "get", "deployments", "-o", "json"])
        assert [d["manifest"]["spec"]["replicas"] for d in json.loads(shown.output)] == [4]


async def test_describe_shows_the_last_decisions(nats_url, redis_url, cluster_name):
    store = ObservedStore(connect(redis_url), cluster_name)
    for at, current, replicas, reason in [(1.0, 2, 4, "cpu 0.90 of target 0.50 (ratio 1.80): 2 -> 4"),
                                          (2.0, 4, 4, "scale-down held by the 300 s stabilization window (highest recommendation 4): holding at 4")]:
        await store.put_autoscale_decision(AutoscaleDecision(
            deployment="shop.web", at=at, metric="cpu", target=0.5, observed=0.9, samples=2,
            current=current, replicas=replicas, reason=reason, changed=current != replicas,
        ))
    with serve_api(nats_url, redis_url, cluster=cluster_name) as url:
        runner = CliRunner()
        assert runner.invoke(cli_main.cli, ["--api", url, "apply", "-f", "-"], input=SCALED_WEB).exit_code == 0
        listed = httpx.get(f"{url}/v1/deployments/shop/web/autoscale").json()
        assert [d["reason"][:10] for d in listed] == ["scale-down", "cpu 0.90 o"], "newest first"
        shown = runner.invoke(cli_main.cli, ["--api", url, "describe", "deployment", "web", "-n", "shop"])
        assert shown.exit_code == 0, shown.output
        assert "Autoscale:   2..6 replicas on cpu, target 0.5" in shown.output
        assert "2 -> 4: cpu 0.90 of target 0.50 (ratio 1.80): 2 -> 4" in shown.output
        assert "4 -> 4: scale-down held by the 300 s stabilization window" in shown.output
    await store.r.aclose()
