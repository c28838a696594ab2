"""End to end: the failed-task webhook extension (examples/extensions/failed_task_webhook) as its
own process against a private local cluster (real nats-server, redis-server, Docker, every
COMP service), a deployment whose task really fails, and an HTTP server here receiving
the webhook.  Then every event that cluster's stream kept is held to the catalog.  Last,
without a cluster: the extension started before its NATS server exists."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.errors import NotFoundError
from waiting import wait_until

from comp_cli.local import ClusterConfig, LocalCluster, _bin, free_port, wait_for_port
from comp_common import catalog, subjects
from comp_common.catalog import subject_covers, wildcard
from comp_common.messages import TaskState, TaskStatus

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
DURABLE = "failed-task-webhook-test"
# A registry nothing listens on: the pull fails at once, without the internet.
MISSING_IMAGE = "127.0.0.1:9/comp-missing/nope:1"


def manifest(name: str, image: str, command: str) -> str:
    return f"""
metadata: {{name: {name}}}
spec:
  replicas: 1
  image: {image}
  command: {command}
  resources: {{cpu: 0.05, memory: 16Mi}}
"""


class Hook:
    """An HTTP server recording each POST's JSON body; answers 503 to the first one, so the
    extension has to retry."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.answers: list[int] = []
        self.traceparents: list[str | None] = []
        lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with lock:
                    code = 503 if not hook.answers else 200
                    hook.answers.append(code)
                    hook.posts.append(json.loads(body))
                    hook.traceparents.append(self.headers.get("traceparent"))
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/failed"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, docker_client, busybox_image) -> Iterator[LocalCluster]:
    local = LocalCluster(ClusterConfig.private(tmp_path_factory.mktemp("cluster"), "t", nodes=1))
    local.start()
    yield local
    local.stop(purge_workloads=True)


def _consumer_exists(nats_url: str, durable: str = DURABLE) -> bool:
    async def ask() -> bool:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().consumer_info(subjects.EVENTS_STREAM, durable)
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(ask())


def _consumer_caught_up(nats_url: str) -> bool:
    async def ask() -> bool:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(subjects.EVENTS_STREAM, DURABLE)
            return info.num_pending == 0 and info.num_ack_pending == 0
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.fixture
def extension(cluster: LocalCluster, tmp_path: Path) -> Iterator[tuple[Hook, Path]]:
    hook = Hook()
    log = tmp_path / "extension.log"
    env = cluster.env(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT / "examples" / "extensions"), os.environ.get("PYTHONPATH", "")]),
            "COMP_WEBHOOK__URL": hook.url,
            "COMP_WEBHOOK__DURABLE": DURABLE,
            "COMP_WEBHOOK__BACKOFF_SECONDS": "0.2",
        }
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "failed_task_webhook"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        # The consumer starts at new events: wait for it before anything fails.
        wait_until(
            lambda: proc.poll() is None and _consumer_exists(cluster.config.nats_url) or proc.poll() is not None,
            timeout=60, what="the extension's durable consumer",
        )
        assert proc.poll() is None, f"the extension exited: {log.read_text()}"
        yield hook, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        hook.close()


def apply(cluster: LocalCluster, text: str) -> dict:
    response = httpx.post(f"{cluster.config.api_url}/v1/apply", content=text, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def tasks(cluster: LocalCluster, deployment: str) -> list[dict]:
    return [t for t in httpx.get(f"{cluster.config.api_url}/v1/tasks", timeout=10).json() if t["deployment"] == deployment]


def test_a_failed_task_is_posted_to_the_webhook_and_a_running_one_is_not(cluster, extension, busybox_image):
    hook, log = extension
    # Alone, so that the scheduler's round that places it is in this apply's trace.
    operation_id = apply(cluster, manifest("ghost", MISSING_IMAGE, "[sleep, '3600']"))["operation_id"]
    failed = wait_until(
        lambda: [t for t in tasks(cluster, "default.ghost") if t["state"] == "failed"], timeout=90, what="the ghost task failed"
    )[0]
    apply(cluster, manifest("fine", busybox_image, "[sleep, '3600']"))
    wait_until(lambda: [t for t in tasks(cluster, "default.fine") if t["state"] == "running"], timeout=60, what="fine running")

    def delivered() -> list[dict]:
        return [p for p, answer in zip(hook.posts, hook.answers) if answer == 200]

    try:
        wait_until(delivered, timeout=60, what="a webhook POST answered 200")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nextension log:\n{log.read_text()[-3000:]}") from None

    first, *_ = hook.posts
    assert hook.answers[0] == 503 and len(hook.posts) >= 2, "the 503 was retried"
    assert all(p == first for p in hook.posts[:2]), "the retry carried the same summary"
    assert first["event"] == "task.failed"
    assert (first["deployment"], first["namespace"], first["name"]) == ("default.ghost", "default", "ghost")
    assert first["task_id"] == failed["task_id"] and first["node"] == cluster.config.node_ids()[0]
    assert MISSING_IMAGE in first["message"]
    assert first["time"].endswith("+00:00")
    # The failure happened in the start the apply caused: its trace is the apply's.
    assert first["trace_id"] == operation_id
    assert operation_id in (hook.traceparents[0] or ""), "the POST continues that trace"
    assert not [p for p in hook.posts if p["deployment"] != "default.ghost"], "nothing posted for the running deployment"
    # The agent retries the start and fails again; once the extension has taken every one
    # of those events, there is still one notification for the task.
    def failures_kept() -> int:
        return sum(
            1 for subject, data in _kept_events(cluster.config.nats_url)
            if subject.startswith("comp.evt.task.") and json.loads(data)["task_id"] == failed["task_id"]
            and json.loads(data)["state"] == "failed"
        )

    wait_until(lambda: failures_kept() >= 2, timeout=60, what="a second failure of the ghost task in the stream")
    wait_until(lambda: _consumer_caught_up(cluster.config.nats_url), timeout=30, what="the extension to take every event")
    assert len({p["task_id"] for p in hook.posts}) == 1 and hook.answers.count(200) == 1

    for name in ("fine", "ghost"):
        assert httpx.delete(f"{cluster.config.api_url}/v1/deployments/default/{name}", timeout=30).status_code == 200


def _kept_events(nats_url: str) -> list[tuple[str, bytes]]:
    async def read() -> list[tuple[str, bytes]]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            state = (await js.stream_info(subjects.EVENTS_STREAM)).state
            found = []
            for seq in range(state.first_seq, state.last_seq + 1):
                try:
                    msg = await js.get_msg(subjects.EVENTS_STREAM, seq)
                except NotFoundError:
                    continue
                found.append((msg.subject, msg.data))
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def test_every_event_the_cluster_kept_is_its_catalog_entrys_model(cluster, busybox_image):
    """What the running services really published, read back from the stream: each subject
    has a catalog entry, and each body is that entry's model, field for field."""
    apply(cluster, manifest("wire", busybox_image, "[sleep, '3600']"))
    wait_until(lambda: [t for t in tasks(cluster, "default.wire") if t["state"] == "running"], timeout=60, what="wire running")
    assert httpx.delete(f"{cluster.config.api_url}/v1/deployments/default/wire", timeout=30).status_code == 200
    wait_until(lambda: not tasks(cluster, "default.wire"), timeout=60, what="wire gone")

    events = _kept_events(cluster.config.nats_url)
    seen: set[str] = set()
    problems = []
    for subject, data in events:
        entry = next((e for e in catalog.ENTRIES if subject_covers(wildcard(e.pattern), subject)), None)
        if entry is None:
            problems.append(f"{subject}: no catalog entry")
            continue
        model = entry.payload.model
        assert model is not None, entry.id
        body = json.loads(data)
        model.model_validate(body)
        if set(body) != set(model.model_fields):
            problems.append(f"{subject}: fields {sorted(body)} are not {model.__name__}'s {sorted(model.model_fields)}")
        seen.add(entry.id)
    assert not problems, "\n".join(problems)
    assert {"deployment", "task", "placement"} <= seen, f"the stream kept only {sorted(seen)}"


def test_started_before_nats_it_says_so_then_serves_once_nats_is_up(tmp_path):
    """No cluster here: a nats-server that is not there yet, then is; and a garbage event
    before the real one."""
    hook = Hook()
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    log = tmp_path / "extension.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "examples" / "extensions"), os.environ.get("PYTHONPATH", "")]),
        "COMP_NATS__URL": url, "COMP_WEBHOOK__URL": hook.url, "COMP_WEBHOOK__BACKOFF_SECONDS": "0.2",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "failed_task_webhook"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = None
    try:
        wait_until(lambda: "does not answer; still trying" in log.read_text(), timeout=30, what="the extension saying NATS is unreachable")
        assert proc.poll() is None
        data = tmp_path / "nats"
        data.mkdir()
        server = subprocess.Popen(
            [_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, 15, "nats-server", server)
        wait_until(lambda: _consumer_exists(url, "failed-task-webhook"), timeout=60, what="the extension's consumer")

        async def publish() -> None:
            nc = await nats.connect(url)
            js = nc.jetstream()
            await js.publish(subjects.task_event("n1"), b"\xff not json")
            failed = TaskStatus(task_id="late-1", node_id="n1", deployment="default.late", state=TaskState.FAILED, message="no image")
            await js.publish(subjects.task_event("n1"), failed.model_dump_json().encode())
            await nc.close()

        asyncio.run(publish())
        wait_until(lambda: 200 in hook.answers, timeout=30, what="the webhook POST")
        assert {(p["deployment"], p["task_id"], p["message"]) for p in hook.posts} == {("default.late", "late-1", "no image")}
        assert "dropped a message that is not a TaskStatus" in log.read_text()
        assert proc.poll() is None, "garbage did not stop it"
    finally:
        proc.terminate()
        proc.wait(10)
        if server is not None:
            server.terminate()
            server.wait(10)
        hook.close()
