"""The lb's metrics on a real nats-server, with a dataplane that records instead of
programming the kernel: what the last applied sync holds (services, endpoints), syncs timed
by outcome, and a refused service counted while it is held out."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from functools import partial

import nats
import pytest
from faststream import TestApp
from waiting import eventually

from comp_common import subjects
from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_common.metrics import REGISTRY
from comp_lb import dataplane as dataplanes
from comp_lb.dataplane import SyncReport
from comp_lb.main import build_app
from comp_lb.ruleset import RulesetError
from comp_lb.settings import LbSettings

wait_for = partial(eventually, timeout=10.0)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class RecordingDataplane:
    """Refuses VIP 'bad' as the nftables ruleset would, remembers every applied sync."""

    name = "recording"

    def __init__(self, node_id: str, table: str):
        self.syncs: list[set[str]] = []
        self.lock = threading.Lock()

    def unavailable(self) -> str | None:
        return None

    def sync(self, services):
        for service in services:
            if service.vip == "bad":
                raise RulesetError(f"service {service.key}: vip 'bad' is not an IPv4 address", service=service.key)
        with self.lock:
            self.syncs.append({s.key for s in services})
        return SyncReport("incremental", 2 * len(services), 1, 0.0)

    def counters(self, namespace, name):
        return []

    def cleanup(self) -> None:
        pass

    def last(self) -> set[str]:
        with self.lock:
            return self.syncs[-1] if self.syncs else set()


def endpoints(name: str, vip: str, replicas: int) -> bytes:
    value = ServiceEndpoints(
        namespace="default", name=name, vip=vip, ports=[EndpointPort(name="http", port=80)],
        endpoints=[Endpoint(task_id=f"{name}-{i}", node_id="n1", address=f"172.17.0.{i + 2}", ports={"http": 8080})
                   for i in range(replicas)],
    )
    return value.model_dump_json().encode()


@pytest.fixture
async def lb(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[RecordingDataplane, object]]:
    made: list[RecordingDataplane] = []
    monkeypatch.setitem(dataplanes.DATAPLANES, "recording", lambda **kw: made.append(RecordingDataplane(**kw)) or made[-1])
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().create_key_value(bucket=subjects.ENDPOINTS_BUCKET, history=1)
    settings = LbSettings(nats={"url": nats_url}, lb={"node_id": "n1", "dataplane": "recording", "table": "t"}, log={"json": False})
    app, _ = build_app(settings)
    async with TestApp(app):
        yield made[0], kv
    await nc.close()


async def test_sync_gauges_follow_what_is_programmed_and_refusals(lb) -> None:
    dataplane, kv = lb
    await wait_for(lambda: dataplane.syncs, what="the first sync")
    applied = sample("comp_lb_sync_seconds_count", outcome="applied")
    refused = sample("comp_lb_sync_seconds_count", outcome="refused")

    await kv.put("default.web", endpoints("web", "10.96.0.1", 3))
    await kv.put("default.db", endpoints("db", "10.96.0.2", 1))
    await wait_for(lambda: dataplane.last() == {"default.web", "default.db"}, what="both services applied")
    await wait_for(lambda: sample("comp_lb_endpoints") == 4, what="the gauges of the last applied sync")
    assert sample("comp_lb_services") == 2
    assert sample("comp_lb_sync_seconds_count", outcome="applied") > applied

    await kv.put("default.broken", endpoints("broken", "bad", 2))
    await wait_for(lambda: sample("comp_lb_refused_services") == 1, what="the refused service counted")
    assert sample("comp_lb_sync_seconds_count", outcome="refused") == refused + 1
    assert dataplane.last() == {"default.web", "default.db"}, "the others stay programmed"
    assert (sample("comp_lb_services"), sample("comp_lb_endpoints")) == (2, 4)

    await kv.put("default.broken", endpoints("broken", "10.96.0.3", 2))
    await wait_for(lambda: sample("comp_lb_refused_services") == 0 and sample("comp_lb_services") == 3,
                   what="the mended service programmed")
    assert sample("comp_lb_endpoints") == 6
