"""The api served by uvicorn on a free port, in a thread of its own, as `comp` reaches it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from opentelemetry.sdk.trace import TracerProvider

from comp_api.main import create_app
from comp_api.settings import ApiSettings
from comp_cli.local import free_port
from comp_common.broker import make_broker
from comp_common.observed import ObservedStore, connect
from comp_common.settings import NatsSettings, RedisSettings
from waiting import wait_until


@contextmanager
def serve_api(nats_url: str, redis_url: str, cluster: str | None = None) -> Iterator[str]:
    """The served api's URL, healthy, for as long as the block runs."""
    settings = ApiSettings(
        cluster=cluster or f"t{uuid.uuid4().hex[:8]}", nats=NatsSettings(url=nats_url, connect_timeout=1), redis=RedisSettings(url=redis_url)
    )
    provider = TracerProvider()
    app = create_app(settings, make_broker(settings.nats, "api", provider), ObservedStore(connect(redis_url), settings.cluster), provider)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), timeout=30, what="the served api to be healthy")
        yield url
    finally:
        server.should_exit = True
        thread.join()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
