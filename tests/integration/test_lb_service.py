"""The lb process on a real nats-server with a recording dataplane: bursts are batched,
deletions and garbage are handled, a refused service does not hold the others back,
counters are answered over NATS, and an unusable dataplane is refused at start."""

from __future__ import annotations

import json
import threading
import time
from functools import partial

import nats
import nats.errors
import pytest
from faststream import TestApp
from waiting import eventually

from comp_common import subjects
from comp_common.messages import Endpoint, EndpointCounter, EndpointPort, ServiceEndpoints
from comp_lb import dataplane as dataplanes
from comp_lb.dataplane import SyncReport
from comp_lb.main import DataplaneUnavailable, build_app
from comp_lb.ruleset import RulesetError
from comp_lb.settings import LbSettings

wait_for = partial(eventually, timeout=10.0)


class RecordingDataplane:
    """Takes as long as a real nft transaction, refuses VIP 'bad', remembers every sync."""

    name = "recording"

    def __init__(self, node_id: str, table: str, why_not: str | None = None):
        self.node_id, self.table, self.why_not = node_id, table, why_not
        self.syncs: list[list[ServiceEndpoints]] = []
        self.lock = threading.Lock()

    def unavailable(self) -> str | None:
        return self.why_not

    def sync(self, services):
        time.sleep(0.05)
        for service in services:
            if service.vip == "bad":
                raise RulesetError(f"service {service.key}: vip 'bad' is not an IPv4 address", service=service.key)
        with self.lock:
            self.syncs.append(list(services))
        return SyncReport("incremental", len(services), len(services), 0.05)

    def counters(self, namespace, name):
        return [EndpointCounter(node_id=self.node_id, port="http", target="", packets=7, bytes=420)]

    def cleanup(self) -> None:
        pass

    def last(self) -> dict[str, ServiceEndpoints]:
        with self.lock:
            return {s.key: s for s in self.syncs[-1]} if self.syncs else {}


def endpoints(name: str, vip: str = "10.96.0.1", addresses: tuple[str, ...] = ("172.17.0.2",)) -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace="default", name=name, vip=vip, ports=[EndpointPort(name="http", port=80)],
        endpoints=[Endpoint(task_id=f"t{i}", node_id="n1", address=a, ports={"http": 8080}) for i, a in enumerate(addresses)],
    )


@pytest.fixture
def recording(monkeypatch):
    made: list[RecordingDataplane] = []

    def make(**kwargs):
        made.append(RecordingDataplane(**kwargs))
        return made[-1]

    monkeypatch.setitem(dataplanes.DATAPLANES, "recording", make)
    return made


def settings(nats_url: str, dataplane: str = "recording") -> LbSettings:
    return LbSettings(nats={"url": nats_url}, lb={"node_id": "n1", "dataplane": dataplane, "table": "t"}, log={"json": False})


@pytest.fixture
async def lb(nats_url, recording):
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().create_key_value(bucket=subjects.ENDPOINTS_BUCKET, history=1)
    await kv.put("default.before", endpoints("before").model_dump_json().encode())
    app, service = build_app(settings(nats_url))
    async with TestApp(app):
        yield service, recording[0], kv, nc
    await nc.close()


async def test_the_first_sync_has_what_was_there_and_a_burst_is_a_few_syncs(lb):
    service, dataplane, kv, _ = lb
    await wait_for(lambda: "default.before" in dataplane.last(), what="the first sync")
    first = len(dataplane.syncs)
    for i in range(30):
        await kv.put(f"default.s{i}", endpoints(f"s{i}", vip=f"10.96.1.{i + 1}").model_dump_json().encode())
    await wait_for(lambda: len(dataplane.last()) == 31, what="all 31 services synced")
    # 30 updates while each sync takes 50 ms: they pile up and go together.
    assert len(dataplane.syncs) - first <= 5, f"{len(dataplane.syncs) - first} syncs for a burst of 30 updates"


async def test_deletes_and_garbage(lb):
    service, dataplane, kv, _ = lb
    await wait_for(lambda: "default.before" in dataplane.last(), what="the first sync")
    await kv.put("default.garbage", b"{not json")
    await kv.put("default.after", endpoints("after", vip="10.96.0.2").model_dump_json().encode())
    await wait_for(lambda: set(dataplane.last()) == {"default.before", "default.after"}, what="garbage dropped, after applied")
    await kv.delete("default.before")
    await wait_for(lambda: set(dataplane.last()) == {"default.after"}, what="before removed")


async def test_a_refused_service_does_not_hold_the_others_back(lb):
    service, dataplane, kv, _ = lb
    await wait_for(lambda: "default.before" in dataplane.last(), what="the first sync")
    await kv.put("default.broken", endpoints("broken", vip="bad").model_dump_json().encode())
    await kv.put("default.fine", endpoints("fine", vip="10.96.0.3").model_dump_json().encode())
    await wait_for(lambda: set(dataplane.last()) == {"default.before", "default.fine"}, what="the others applied")
    assert "default.broken" in service.refused
    await kv.put("default.broken", endpoints("broken", vip="10.96.0.4").model_dump_json().encode())
    await wait_for(lambda: "default.broken" in dataplane.last(), what="the mended service applied")
    assert service.refused == {}


async def test_counters_are_answered_over_nats(lb):
    _, dataplane, _, nc = lb
    await wait_for(lambda: "default.before" in dataplane.last(), what="the first sync")

    async def answered():
        # FastStream subscribes once the app has started: until then the server has no responder.
        try:
            return await nc.request(subjects.lb_counters("default", "before"), b"", timeout=5)
        except nats.errors.NoRespondersError:
            return None

    reply = await wait_for(answered, what="the lb answering counters")
    assert [EndpointCounter.model_validate(c) for c in json.loads(reply.data)] == [
        EndpointCounter(node_id="n1", port="http", target="", packets=7, bytes=420)
    ]


def test_an_unusable_dataplane_is_refused_with_its_reason(nats_url, monkeypatch):
    monkeypatch.setitem(dataplanes.DATAPLANES, "unusable", lambda **kw: RecordingDataplane(**kw, why_not="the kernel has no ip_vs module"))
    with pytest.raises(DataplaneUnavailable, match="the unusable dataplane cannot run here: the kernel has no ip_vs module"):
        build_app(settings(nats_url, "unusable"))
    with pytest.raises(DataplaneUnavailable, match="no dataplane named 'nope'; there are .*nftables"):
        build_app(settings(nats_url, "nope"))


async def test_rates_from_the_counters(lb):
    service, dataplane, _, nc = lb
    await wait_for(lambda: "default.before" in dataplane.last(), what="the first sync")
    counts = iter([100, 160, 160, 160])
    dataplane.counters = lambda namespace, name: [
        EndpointCounter(node_id="n1", port="http", target="", packets=next(counts), bytes=0),
        EndpointCounter(node_id="n1", port="http", target="172.17.0.2:8080", packets=999, bytes=0),
    ]
    assert await service.rates(10.0) == [], "a first reading has nothing to compare with"
    [rate] = await service.rates(12.0)
    assert (rate.name, rate.connections_per_second, rate.period_seconds) == ("before", 30.0, 2.0)
    [stopped] = await service.rates(14.0)
    assert stopped.connections_per_second == 0.0, "the fall to zero is reported once"
    assert await service.rates(16.0) == [], "then a quiet service costs nothing"
