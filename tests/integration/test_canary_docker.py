"""Canary, promote, abort and undo on real containers (api, scheduler, one docker agent,
busybox httpd with a readiness check).  Which version a replica runs is read from its
container's VERSION environment variable, as the engine reports it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from httpd_web import httpd_web
from waiting import wait_until

from comp_cli.local import LocalCluster
from comp_common import labels

pytestmark = pytest.mark.docker

REPLICAS = 3


def manifest(image: str, version: int, canary: int = 0) -> str:
    return httpd_web(image, replicas=REPLICAS, env=f'{{VERSION: "{version}"}}',
                     update=f"{{max_surge: 1, max_unavailable: 0, canary: {canary}}}")


async def test_canary_promote_abort_and_undo(one_node_cluster: LocalCluster, docker_client, busybox_image: str) -> None:
    cluster = one_node_cluster
    api = cluster.config.api_url

    def versions() -> list[str]:
        """VERSION of every running container of the deployment, sorted."""
        found = docker_client.api.containers(
            filters={"label": [f"{labels.CLUSTER}={cluster.config.cluster}", f"{labels.DEPLOYMENT}=default.web"]}
        )
        env = [docker_client.api.inspect_container(c["Id"])["Config"]["Env"] for c in found]
        return sorted(v.split("=", 1)[1] for e in env for v in e if v.startswith("VERSION="))

    def event() -> dict:
        return httpx.get(f"{api}/v1/deployments/default/web/rollout", timeout=5).json().get("last_event") or {}

    def at(state: str, generation: int):
        return lambda: (e := event()).get("state") == state and e.get("generation") == generation and e

    def post(action: str, **body) -> dict:
        response = httpx.post(f"{api}/v1/deployments/default/web/rollout/{action}", json=body or None, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def apply(text: str) -> None:
        response = httpx.post(f"{api}/v1/apply", content=text, timeout=30)
        assert response.status_code == 200, response.text

    def wait(check, what: str, seconds: float = 60):
        return asyncio.to_thread(wait_until, check, seconds, what)

    apply(manifest(busybox_image, 1))
    await wait(at("complete", 1), "version 1 complete")
    await wait(lambda: versions() == ["1"] * REPLICAS, "3 replicas of version 1")

    # A canary runs beside every old replica and the rollout waits.
    apply(manifest(busybox_image, 2, canary=1))
    await wait(at("paused", 2), "the canary paused the rollout")
    assert versions() == ["1"] * REPLICAS + ["2"], "one canary beside all the old replicas"
    post("promote")
    await wait(at("complete", 2), "version 2 complete after promotion")
    await wait(lambda: versions() == ["2"] * REPLICAS, "3 replicas of version 2")

    # Abort a canary: back to the last healthy revision (2), the canary gone.
    apply(manifest(busybox_image, 3, canary=1))
    await wait(at("paused", 3), "the second canary paused")
    post("abort")
    await wait(at("complete", 4), "generation 4 (version 2 again) complete")
    await wait(lambda: versions() == ["2"] * REPLICAS, "the canary of version 3 removed")

    # Undo to a given revision: revision 1's spec as a new generation.
    body = post("undo", to_revision=1)
    assert body["to_revision"] == 1 and body["generation"] == 5
    await wait(at("complete", 5), "generation 5 (version 1 again) complete")
    await wait(lambda: versions() == ["1"] * REPLICAS, "3 replicas of version 1 again")
    history = httpx.get(f"{api}/v1/deployments/default/web/revisions", timeout=5).json()["revisions"]
    assert [r["change_cause"] for r in history][-2:] == ["rollout aborted", "undo to revision 1"]
