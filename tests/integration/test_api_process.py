"""The api as users run it: the ``comp-api`` entry point, configured by environment, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from comp_cli.local import _bin, free_port

MANIFEST = """
metadata: {name: web, namespace: shop}
spec: {image: nginx:1.27, replicas: 2}
"""


@dataclass
class ApiProcess:
    url: str
    proc: subprocess.Popen
    log: Path
    span_file: Path


@pytest.fixture
def api_process(tmp_path: Path, nats_url: str, redis_url: str) -> Iterator[ApiProcess]:
    port = free_port()
    span_file = tmp_path / "spans.jsonl"
    env = {
        **os.environ,
        "COMP_CLUSTER": "proc",
        "COMP_NATS__URL": nats_url,
        "COMP_REDIS__URL": redis_url,
        "COMP_API__PORT": str(port),
        "COMP_API__MAX_BODY_BYTES": "4096",
        "COMP_TELEMETRY__SPAN_FILE": str(span_file),
    }
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([_bin("comp-api")], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    api = ApiProcess(f"http://127.0.0.1:{port}", proc, log, span_file)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"comp-api exited: {log.read_text()}"
            try:
                if httpx.get(f"{api.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"comp-api not healthy: {log.read_text()}"
            time.sleep(0.1)
        yield api
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entry_point_serves_traces_and_stops_cleanly(api_process: ApiProcess) -> None:
    response = httpx.post(f"{api_process.url}/v1/apply", content=MANIFEST, headers={"content-type": "application/yaml"})
    assert response.status_code == 200, response.text
    operation_id = response.json()["operation_id"]
    assert response.json()["results"][0]["action"] == "created"

    deployments = httpx.get(f"{api_process.url}/v1/deployments").json()
    assert [(d["namespace"], d["name"], d["manifest"]["spec"]["replicas"]) for d in deployments] == [("shop", "web", 2)]

    # COMP_API__MAX_BODY_BYTES is honoured.
    too_big = httpx.post(f"{api_process.url}/v1/apply", content=MANIFEST + "#" * 5000)
    assert too_big.status_code == 413 and "4096" in too_big.json()["detail"]

    spans = [json.loads(line) for line in api_process.span_file.read_text().splitlines()]
    server = [s for s in spans if s["kind"] == "SERVER" and s["trace_id"] == operation_id]
    assert [(s["name"], s["service"]) for s in server] == [("POST /v1/apply", "api")]
    assert any(s["kind"] == "PRODUCER" and s["trace_id"] == operation_id for s in spans)

    api_process.proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert api_process.proc.wait(10) in (0, -signal.SIGTERM)
    records = [json.loads(line) for line in api_process.log.read_text().splitlines()]
    assert all(r["service"] == "api" for r in records)
    assert "Application shutdown complete." in [r["msg"] for r in records]
    # Request logs carry the operation's trace id.
    assert any(r.get("trace_id") == operation_id and "/v1/apply" in r["msg"] for r in records)
