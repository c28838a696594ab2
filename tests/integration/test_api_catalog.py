"""GET /v1/catalog and /v1/catalog/models/{name}: the event catalog as the api serves it,
over real HTTP with real NATS and Redis behind it, and while NATS is unreachable."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import httpx
import nats
from nats.js.errors import NotFoundError

from comp_cli.local import _bin, free_port
from comp_common import catalog, subjects
from served_api import serve_api
from waiting import wait_until


def test_catalog_is_the_generated_asyncapi_document_and_each_model_its_schema(nats_url, redis_url):
    with serve_api(nats_url, redis_url) as url:
        response = httpx.get(f"{url}/v1/catalog", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
        document = response.json()
        # What the generator writes (tests/unit/test_catalog.py holds docs/asyncapi.json to it).
        assert document == json.loads(catalog.render_json(catalog.asyncapi_document()))
        assert document["channels"]["task"]["address"] == "comp.evt.task.{node_id}"

        model = httpx.get(f"{url}/v1/catalog/models/TaskStatus", timeout=10)
        assert model.status_code == 200
        schema = model.json()
        assert schema["title"] == "TaskStatus" and "HealthState" in schema["$defs"]
        # Every model the document's channels refer to is served on its own.
        for name in document["components"]["messages"]:
            ref = document["components"]["messages"][name]["payload"].get("$ref", "")
            if ref:
                assert httpx.get(f"{url}/v1/catalog/models/{ref.rsplit('/', 1)[1]}", timeout=10).status_code == 200


def test_an_unknown_model_is_a_404_naming_the_known_ones(nats_url, redis_url):
    with serve_api(nats_url, redis_url) as url:
        for name in ("NoSuchModel", "taskstatus", "TaskStatus.json", "Task%20Status", "x" * 300):
            response = httpx.get(f"{url}/v1/catalog/models/{name}", timeout=10)
            assert response.status_code == 404, name
            detail = response.json()["detail"]
            assert "no model" in detail["error"] and "TaskStatus" in detail["known"] and "Heartbeat" in detail["known"]
        # The api goes on serving after them.
        assert httpx.get(f"{url}/v1/catalog/models/Heartbeat", timeout=10).status_code == 200


def test_catalog_answers_while_nats_is_unreachable(redis_url, tmp_path):
    """The comp-api process with nothing at its NATS URL: the catalog needs no NATS."""
    port = free_port()
    env = {
        **os.environ, "COMP_CLUSTER": "catalog", "COMP_NATS__URL": f"nats://127.0.0.1:{free_port()}",
        "COMP_NATS__CONNECT_TIMEOUT": "1", "COMP_REDIS__URL": redis_url, "COMP_API__PORT": str(port),
    }
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([_bin("comp-api")], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        response = wait_until(lambda: _answer(f"{url}/v1/catalog") or proc.poll() is not None, timeout=30, what="the catalog")
        assert proc.poll() is None, f"comp-api exited: {log.read_text()}"
        assert response.status_code == 200 and response.json()["info"]["version"] == catalog.CATALOG_VERSION
        assert httpx.get(f"{url}/v1/deployments", timeout=10).status_code == 503, "NATS is really out of reach"
        assert httpx.get(f"{url}/v1/catalog/models/Nudge", timeout=10).status_code == 200
    finally:
        proc.kill()
        proc.wait()


def _answer(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def _last_request_record(nats_url: str) -> dict:
    async def read() -> dict:
        nc = await nats.connect(nats_url)
        try:
            msg = await nc.jetstream().get_last_msg(subjects.API_REQUESTS_STREAM, subjects.API_REQUEST_SUBJECT)
        except NotFoundError:
            return {}  # not published yet
        else:
            return json.loads(msg.data)
        finally:
            await nc.close()

    return asyncio.run(read())


def test_the_api_request_record_is_the_catalogs(nats_url, redis_url):
    """The catalog describes the api's request records by hand (they are no model): held to
    what the api really publishes."""
    with serve_api(nats_url, redis_url) as url:
        assert httpx.get(f"{url}/v1/catalog/models/NoSuchModel", timeout=10).status_code == 404
        def recorded() -> dict | None:
            record = _last_request_record(nats_url)
            return record if record.get("path") == "/v1/catalog/models/NoSuchModel" else None

        record = wait_until(recorded, timeout=30, what="the request's audit record")
    schema = catalog.entry("api-request").payload.schema
    assert set(schema["required"]) <= set(record) <= set(schema["properties"]), sorted(record)
    assert record["status"] == 404 and record["verb"] == "GET"
