"""`comp apply / get services / describe service / delete service` against the api served
by uvicorn over a real nats-server and redis-server; discovery's endpoints are written into their bucket by the test and two
hosts' lbs are played by subscriptions of the test's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import nats
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from comp_cli import main as cli_main
from comp_common import subjects
from comp_common.kv import put_model
from comp_common.messages import Endpoint, EndpointCounter, EndpointPort, ServiceEndpoints
from served_api import serve_api

MANIFEST = """
metadata: {name: web, namespace: shop, labels: {tier: front}}
spec: {image: nginx:1.27, replicas: 2, ports: [{container_port: 8080}, {container_port: 443}]}
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {labels: {tier: front}}
  ports:
    - {name: http, port: 80, target_port: 8080}
    - {name: https, port: 443, published: 8443}
---
kind: Service
metadata: {name: db, namespace: shop}
spec: {selector: {deployment: db}, ports: [{port: 5432}], mode: dnsrr}
"""


@pytest.fixture
def served_api(nats_url: str, redis_url: str) -> Iterator[str]:
    with serve_api(nats_url, redis_url) as url:
        yield url


async def comp(api: str, *args: str, stdin: str | None = None, code: int = 0) -> str:
    """Run `comp` in a thread, so that the test's fake lbs, on this loop, answer meanwhile."""
    result = await asyncio.to_thread(CliRunner().invoke, cli_main.cli, ["--api", api, *args], input=stdin)
    assert result.exit_code == code, result.output
    return result.output


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()]


async def fake_lb(nc: NatsClient, node_id: str, packets: int) -> None:
    """One host's lb: counted `packets` on each port and on the endpoint 172.17.0.5 behind it."""
    answer = [
        EndpointCounter(node_id=node_id, port=port, target=target, packets=packets, bytes=packets * 100).model_dump()
        for port, target in (("http", ""), ("https", ""), ("http", "172.17.0.5:8080"), ("https", "172.17.0.5:443"))
    ]

    async def reply(msg: Msg) -> None:
        await nc.publish(msg.reply, json.dumps(answer).encode())

    await nc.subscribe(subjects.lb_counters("shop", "web"), cb=reply)


async def test_services_through_the_cli(served_api: str, nats_url: str) -> None:
    applied = await comp(served_api, "apply", "-f", "-", stdin=MANIFEST)
    assert applied.splitlines()[:3] == ["deployment shop/web created", "service shop/web created", "service shop/db created"]

    listed = rows(await comp(served_api, "get", "services"))
    assert listed == [
        ["NAMESPACE", "NAME", "MODE", "VIP", "PORTS", "ENDPOINTS"],
        ["shop", "db", "dnsrr", "<none>", "5432/tcp", "0"],
        ["shop", "web", "vip", "<pending>", "80/tcp->8080,8443:443/tcp", "0"],
    ]
    before = await comp(served_api, "describe", "service", "web", "-n", "shop")
    assert "Endpoints:   none yet (discovery has not written this service's endpoints)" in before
    assert "Counters:    no lb answered" in before

    nc = await nats.connect(nats_url)
    try:
        discovered = ServiceEndpoints(
            namespace="shop", name="web", vip="10.96.0.9",
            ports=[EndpointPort(name="http", port=80, named=True), EndpointPort(name="https", port=443, published=8443, named=True)],
            endpoints=[Endpoint(task_id="shop.web-1", node_id="n1", address="172.17.0.5", ports={"http": 8080, "https": 443}),
                       Endpoint(task_id="shop.web-2", node_id="n2", address="172.17.0.6", ports={"http": 8080})],
            updated_at=1_700_000_000.0,
        )
        await put_model(await nc.jetstream().key_value(subjects.ENDPOINTS_BUCKET), "shop.web", discovered, None)
        await fake_lb(nc, "n1", packets=3)
        await fake_lb(nc, "n2", packets=4)
        await nc.flush()

        listed = rows(await comp(served_api, "get", "svc", "-n", "shop"))
        assert listed[2] == ["shop", "web", "vip", "10.96.0.9", "80/tcp->8080,8443:443/tcp", "2"]
        as_json = json.loads(await comp(served_api, "get", "services", "-o", "json"))
        assert [(s["name"], s["vip"]) for s in as_json] == [("db", None), ("web", "10.96.0.9")]

        described = await comp(served_api, "describe", "service", "web", "-n", "shop")
    finally:
        await nc.close()
    lines = described.splitlines()
    assert lines[:6] == [
        "Name:        shop/web",
        "Selector:    labels tier=front",
        "Mode:        vip",
        "VIP:         10.96.0.9",
        "Generation:  1 (revision 1)",
        "Counters:    summed over the lbs of 2 host(s) (nftables: one packet per connection)",
    ]
    # Each port and endpoint: what both hosts counted, added up (3 + 4 packets of 100 bytes).
    assert "  http: 80/tcp->8080  7 packets, 700 bytes" in lines
    assert "  https: 8443:443/tcp  7 packets, 700 bytes" in lines
    assert "Endpoints:   2 ready (as of " in described
    table = rows(described[described.index("  TASK"):])
    assert table == [
        ["TASK", "NODE", "PORT", "ADDRESS", "PACKETS", "BYTES"],
        ["shop.web-1", "n1", "http", "172.17.0.5:8080", "7", "700"],
        ["shop.web-1", "n1", "https", "172.17.0.5:443", "7", "700"],
        # Discovery gave web-2 no https port: no row for a port that sends it nothing.
        ["shop.web-2", "n2", "http", "172.17.0.6:8080", "0", "0"],
    ]

    assert (await comp(served_api, "delete", "service", "web", "-n", "shop")).startswith("service shop/web deleted\noperation ")
    missing = await comp(served_api, "describe", "service", "web", "-n", "shop", code=1)
    assert "HTTP 404: service 'web' not found in namespace 'shop'" in missing
    assert rows(await comp(served_api, "get", "services"))[1:] == [["shop", "db", "dnsrr", "<none>", "5432/tcp", "0"]]
