"""The discovery service on a real nats-server and redis-server: VIPs allocated once and
freed on delete, endpoints from task statuses and heartbeats, lookups over NATS and DNS,
and garbage on its inputs dropped while it keeps serving."""

from __future__ import annotations

import json
import time
from functools import partial

import dns.asyncquery
import dns.message
import dns.rcode
import nats
import pytest
from faststream import TestApp
from waiting import eventually

from comp_common import subjects
from comp_common.kv import list_models, open_bucket, put_model, read_model
from comp_common.manifest import parse_objects
from comp_common.messages import (
    Capacity,
    DeploymentRecord,
    Heartbeat,
    ServiceEndpoints,
    ServiceRecord,
    TaskState,
    TaskStatus,
    VipAllocation,
)
from comp_discovery.main import build_app
from comp_discovery.settings import DiscoverySettings

wait_for = partial(eventually, timeout=10.0)
MANIFEST = """
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec: {image: x, ports: [{container_port: 8080, name: http}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {deployment: web}, ports: [{name: http, port: 80, target_port: http}]}
---
kind: Service
metadata: {name: web-dns}
spec: {selector: {labels: {app: web}}, mode: dnsrr, ports: [{name: http, port: 80, target_port: http}]}
"""
OBJECTS = {obj.key + "/" + obj.kind: obj for _, obj in parse_objects(MANIFEST)}


def settings(nats_url, redis_url, cluster_name, cidr="10.123.0.0/29"):
    return DiscoverySettings(
        cluster=cluster_name,
        nats={"url": nats_url},
        redis={"url": redis_url},
        liveness={"heartbeat_seconds": 0.2, "grace_seconds": 1.0},
        discovery={"vip_cidr": cidr, "dns_port": 0, "batch_seconds": 0.01, "resync_seconds": 30},
        log={"json": False},
    )


class World:
    """What the API and the agents would write, written by the test."""

    def __init__(self, nc, discovery):
        self.nc, self.discovery = nc, discovery

    async def open(self):
        js = self.nc.jetstream()
        self.services = await js.create_key_value(bucket=subjects.SERVICES_BUCKET, history=10)
        self.deployments = await js.create_key_value(bucket=subjects.DEPLOYMENTS_BUCKET, history=10)
        self.endpoints = await js.create_key_value(bucket=subjects.ENDPOINTS_BUCKET, history=1)
        self.vips = await js.create_key_value(bucket=subjects.VIPS_BUCKET, history=1)
        return self

    async def apply(self):
        now = time.time()
        for obj in OBJECTS.values():
            if obj.kind == "Deployment":
                await self.deployments.put(obj.key, DeploymentRecord(deployment=obj, created_at=now, updated_at=now).model_dump_json().encode())
            else:
                await self.services.put(obj.key, ServiceRecord(service=obj, created_at=now, updated_at=now).model_dump_json().encode())

    async def status(self, task_id, *, ready=True, address="172.17.0.5", node="n1", state=TaskState.RUNNING):
        status = TaskStatus(
            task_id=task_id, node_id=node, deployment="default.web", state=state, ready=ready,
            address=address, updated_at=time.time(),
        )
        await self.nc.publish(subjects.task_event(node), status.model_dump_json().encode())
        return status

    async def endpoints_of(self, key):
        value, _ = await read_model(self.endpoints, key, ServiceEndpoints)
        return value

    async def addresses(self, key):
        value = await self.endpoints_of(key)
        return None if value is None else sorted(e.address for e in value.endpoints)

    def heartbeat(self, node, tasks, full=True):
        return Heartbeat(
            node_id=node, seq=1, sent_at=time.time(), started_at=0, driver="fake", full=full, tasks=tasks,
            capacity=Capacity(cpu=1, memory=1), allocated=Capacity(cpu=0, memory=0),
        )


@pytest.fixture
async def world(nats_url, redis_url, cluster_name):
    nc = await nats.connect(nats_url)
    app, discovery = build_app(settings(nats_url, redis_url, cluster_name))
    async with TestApp(app):
        yield await World(nc, discovery).open()
    await nc.close()


async def test_vips_endpoints_and_delete(world):
    await world.apply()
    vip = await wait_for(lambda: _vip(world, "default.web"), what="a VIP for default.web")
    assert vip.startswith("10.123.0.")
    dnsrr = await wait_for(lambda: world.endpoints_of("default.web-dns"), what="dnsrr service written")
    assert dnsrr.vip is None and dnsrr.endpoints == []
    allocations = await list_models(world.vips, VipAllocation)
    assert {k: v.service for k, (v, _) in allocations.items()} == {vip: "default.web"}, "dnsrr holds no VIP"

    await world.status("t1", address="172.17.0.5")
    await world.status("t2", address="172.17.0.6")
    await world.status("t3", ready=False, address="172.17.0.7")
    await wait_for(lambda: _equals(world.addresses("default.web"), ["172.17.0.5", "172.17.0.6"]), what="two ready endpoints")
    value = await world.endpoints_of("default.web")
    assert value.vip == vip and value.endpoints[0].ports == {"http": 8080}
    await wait_for(lambda: _equals(world.addresses("default.web-dns"), ["172.17.0.5", "172.17.0.6"]), what="dnsrr endpoints too")

    # Unready again: out at once.
    await world.status("t1", ready=False)
    await wait_for(lambda: _equals(world.addresses("default.web"), ["172.17.0.6"]), what="t1 removed")

    # Delete: the endpoints go and the VIP is free.
    await world.services.delete("default.web")
    await wait_for(lambda: _equals(world.endpoints_of("default.web"), None), what="endpoints deleted")
    assert await list_models(world.vips, VipAllocation) == {}


async def test_a_vip_outlives_a_restart_and_never_doubles(nats_url, redis_url, cluster_name):
    nc = await nats.connect(nats_url)
    try:
        app, discovery = build_app(settings(nats_url, redis_url, cluster_name))
        async with TestApp(app):
            world = await World(nc, discovery).open()
            await world.apply()
            first = await wait_for(lambda: _vip(world, "default.web"), what="a VIP")
        app, discovery = build_app(settings(nats_url, redis_url, cluster_name))
        async with TestApp(app):
            world = await World(nc, discovery).open()
            await discovery.resync()
            await discovery.flush()
            assert await _vip(world, "default.web") == first
            # Many services in a small range: all distinct, and the range's end is an error, not a reuse.
            now = time.time()
            base = OBJECTS["default.web/Service"]
            for i in range(8):
                svc = base.model_copy(update={"metadata": base.metadata.model_copy(update={"name": f"s{i}"})})
                await world.services.put(svc.key, ServiceRecord(service=svc, created_at=now, updated_at=now).model_dump_json().encode())
            await wait_for(lambda: _count(world.vips, 6), what="the /29's six addresses all held")
            held = await list_models(world.vips, VipAllocation)
            holders = [v.service for v, _ in held.values()]
            assert len(set(holders)) == 6 and "default.web" in holders
    finally:
        await nc.close()


async def test_heartbeats_make_endpoints_exact_and_a_silent_node_loses_them(world):
    await world.apply()
    await wait_for(lambda: _vip(world, "default.web"), what="a VIP")
    one = await world.status("t1", node="n1", address="172.17.0.5")
    await world.status("t2", node="n2", address="172.17.0.6")
    await wait_for(lambda: _equals(world.addresses("default.web"), ["172.17.0.5", "172.17.0.6"]), what="both")
    # n1's full heartbeat lists t1 only; n2 sends none: after the 1 s grace n2's task is out.
    for _ in range(15):
        await world.nc.publish(subjects.node_heartbeat("n1"), world.heartbeat("n1", [one]).model_dump_json().encode())
        if await world.addresses("default.web") == ["172.17.0.5"]:
            break
        await _sleep(0.2)
    assert await world.addresses("default.web") == ["172.17.0.5"]
    # A full heartbeat without t1: t1 is gone.
    await world.nc.publish(subjects.node_heartbeat("n1"), world.heartbeat("n1", []).model_dump_json().encode())
    await wait_for(lambda: _equals(world.addresses("default.web"), []), what="t1 gone with n1's full heartbeat")


async def test_lookup_over_nats_and_dns_and_garbage_is_dropped(world):
    await world.apply()
    vip = await wait_for(lambda: _vip(world, "default.web"), what="a VIP")
    # Garbage on every input first: none of it may stop the service.
    await world.nc.publish(subjects.task_event("n1"), b"\xff not json")
    await world.nc.publish(subjects.node_heartbeat("n1"), b'{"node_id": 3}')
    await world.nc.publish(subjects.DISCOVERY_LOOKUP, b"[]")
    await world.services.put("default.broken", b"{not a record")
    await world.status("t1", address="172.17.0.5")
    await wait_for(lambda: _equals(world.addresses("default.web"), ["172.17.0.5"]), what="still serving")

    reply = await world.nc.request(subjects.DISCOVERY_LOOKUP, json.dumps({"namespace": "default", "name": "web"}).encode(), timeout=2)
    found = ServiceEndpoints.model_validate_json(reply.data)
    assert found.vip == vip and [e.address for e in found.endpoints] == ["172.17.0.5"]
    reply = await world.nc.request(subjects.DISCOVERY_LOOKUP, json.dumps({"name": "nope"}).encode(), timeout=2)
    assert json.loads(reply.data) == {"error": "service default/nope not found"}

    server = world.discovery.dns
    query = dns.message.make_query("web.default.svc.comp.local", "A")
    answer = await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=2)
    assert [r.address for r in answer.answer[0]] == [vip]
    srv = await dns.asyncquery.udp(dns.message.make_query("_http._tcp.web.default.svc.comp.local", "SRV"), "127.0.0.1", port=server.port, timeout=2)
    assert [r.port for r in srv.answer[0]] == [80]
    rr = await dns.asyncquery.tcp(dns.message.make_query("web-dns.default.svc.comp.local", "A"), "127.0.0.1", port=server.port, timeout=2)
    assert [r.address for r in rr.answer[0]] == ["172.17.0.5"]
    missing = await dns.asyncquery.udp(dns.message.make_query("nope.default.svc.comp.local", "A"), "127.0.0.1", port=server.port, timeout=2)
    assert missing.rcode() == dns.rcode.NXDOMAIN


async def _vip(world, key):
    value = await world.endpoints_of(key)
    return value.vip if value is not None else None


async def _equals(awaitable, expected):
    return (await awaitable) == expected


async def _count(kv, n):
    return len(await list_models(kv, VipAllocation)) == n


async def _sleep(seconds):
    import asyncio

    await asyncio.sleep(seconds)
