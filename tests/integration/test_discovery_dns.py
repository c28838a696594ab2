"""Discovery's DNS server on real sockets (127.0.0.1, a free port), asked by dnspython's own
client: UDP and TCP on one port, truncation and the TCP retry, garbage, TCP framing with
several queries per connection, idle connections closed, the connection limit."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_discovery.dns import DnsServer

HOST = "127.0.0.1"
TIMEOUT = 5.0

WEB = ServiceEndpoints(
    namespace="default", name="web", vip="10.96.0.5", ports=[EndpointPort(name="http", port=80, named=True)],
)
DB = ServiceEndpoints(
    namespace="default", name="db", mode="dnsrr", ports=[EndpointPort(name="pg", port=5432, named=True)],
    endpoints=[
        Endpoint(task_id="db-a", node_id="n1", address="10.0.0.2", ports={"pg": 5432}),
        Endpoint(task_id="db-b", node_id="n2", address="10.0.0.3", ports={"pg": 6000}),
    ],
)
# 40 A records: 700-odd bytes, past a classic 512-byte UDP answer.
BIG = ServiceEndpoints(
    namespace="default", name="big", mode="dnsrr",
    endpoints=[Endpoint(task_id=f"big-{i}", node_id="n1", address=f"10.1.0.{i + 1}") for i in range(40)],
)


@pytest.fixture
def registry() -> dict[tuple[str, str], ServiceEndpoints]:
    return {(s.namespace, s.name): s for s in (WEB, DB, BIG)}


async def started(registry: dict[tuple[str, str], ServiceEndpoints], **options) -> DnsServer:
    server = DnsServer(lambda namespace, name: registry.get((namespace, name)), HOST, 0, **options)
    await server.start()
    return server


@pytest.fixture
async def server(registry) -> AsyncIterator[DnsServer]:
    server = await started(registry)
    yield server
    await server.stop()


def query(name: str, rdtype: str = "A", **kwargs) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kwargs)


def texts(section: list) -> list[str]:
    # Sorted within each record set: the server shuffles them on the wire (clients spread).
    return [line for rrset in section for line in sorted(rrset.to_text().splitlines())]


async def udp(server: DnsServer, message: dns.message.Message) -> dns.message.Message:
    return await dns.asyncquery.udp(message, HOST, port=server.port, timeout=TIMEOUT)


async def tcp(server: DnsServer, message: dns.message.Message) -> dns.message.Message:
    return await dns.asyncquery.tcp(message, HOST, port=server.port, timeout=TIMEOUT)


async def read_frame(reader: asyncio.StreamReader) -> dns.message.Message:
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), TIMEOUT))


async def test_a_and_srv_over_udp_and_tcp_on_one_port(server):
    assert server.port != 0
    for ask in (udp, tcp):
        vip = await ask(server, query("web.default.svc.comp.local."))
        assert (vip.rcode(), texts(vip.answer)) == (dns.rcode.NOERROR, ["web.default.svc.comp.local. 5 IN A 10.96.0.5"])
        assert vip.flags & dns.flags.AA
        srv = await ask(server, query("_pg._tcp.db.default.svc.comp.local.", "SRV"))
        assert texts(srv.answer) == [
            "_pg._tcp.db.default.svc.comp.local. 1 IN SRV 0 100 5432 db-a.db.default.svc.comp.local.",
            "_pg._tcp.db.default.svc.comp.local. 1 IN SRV 0 100 6000 db-b.db.default.svc.comp.local.",
        ]
        assert texts(srv.additional) == [
            "db-a.db.default.svc.comp.local. 1 IN A 10.0.0.2",
            "db-b.db.default.svc.comp.local. 1 IN A 10.0.0.3",
        ]
        target = await ask(server, query("db-b.db.default.svc.comp.local."))
        assert texts(target.answer) == ["db-b.db.default.svc.comp.local. 1 IN A 10.0.0.3"]


async def test_unknown_names_and_foreign_ones(server):
    missing = await udp(server, query("nope.default.svc.comp.local."))
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in missing.authority] == [dns.rdatatype.SOA]
    foreign = await udp(server, query("example.com."))
    assert (foreign.rcode(), foreign.answer) == (dns.rcode.REFUSED, [])


async def test_each_query_sees_the_registry_as_it_is_now(server, registry):
    registry["default", "db"] = DB.model_copy(
        update={"endpoints": [*DB.endpoints, Endpoint(task_id="db-c", node_id="n3", address="10.0.0.4")]}
    )
    grown = await udp(server, query("db.default.svc.comp.local."))
    assert sorted(rdata.address for rdata in grown.answer[0]) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    del registry["default", "web"]
    assert (await udp(server, query("web.default.svc.comp.local."))).rcode() == dns.rcode.NXDOMAIN


async def test_a_long_udp_answer_is_truncated_and_whole_over_tcp(server):
    over_udp = await udp(server, query("big.default.svc.comp.local."))
    assert over_udp.flags & dns.flags.TC
    assert over_udp.answer == []
    over_tcp = await tcp(server, query("big.default.svc.comp.local."))
    assert not over_tcp.flags & dns.flags.TC
    assert sorted(rdata.address for rdata in over_tcp.answer[0]) == sorted(e.address for e in BIG.endpoints)
    # What a stub resolver does with TC: dnspython's client retries over TCP by itself.
    fallback, used_tcp = await dns.asyncquery.udp_with_fallback(
        query("big.default.svc.comp.local."), HOST, port=server.port, timeout=TIMEOUT
    )
    assert used_tcp and texts(fallback.answer) == texts(over_tcp.answer)
    # A client announcing a larger EDNS buffer gets it whole over UDP.
    edns = await udp(server, query("big.default.svc.comp.local.", use_edns=0, payload=1232))
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 40


async def test_garbage_datagrams_do_not_stop_the_server(server):
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((HOST, server.port))
        await loop.sock_sendall(sock, b"\x01\x02\x03")  # not even a header: dropped
        # A readable header (id 0x4242, a query) before bytes that are no question: FORMERR.
        await loop.sock_sendall(sock, b"\x42\x42\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff")
        formerr = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 65535), TIMEOUT))
        assert (formerr.id, formerr.rcode()) == (0x4242, dns.rcode.FORMERR)
        valid = query("web.default.svc.comp.local.")
        await loop.sock_sendall(sock, valid.to_wire())
        reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 65535), TIMEOUT))
        assert valid.is_response(reply), "the dropped packet produced no reply that could be mistaken for this one"
        assert texts(reply.answer) == ["web.default.svc.comp.local. 5 IN A 10.96.0.5"]


async def test_several_queries_on_one_tcp_connection(server):
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        first, second = query("web.default.svc.comp.local."), query("db.default.svc.comp.local.")
        # Pipelined: both sent before either answer is read (RFC 7766 6.2.1.1).
        writer.write(first.to_wire(prepend_length=True) + second.to_wire(prepend_length=True))
        await writer.drain()
        replies = [await read_frame(reader), await read_frame(reader)]
        assert [reply.id for reply in replies] == [first.id, second.id]
        assert texts(replies[0].answer) == ["web.default.svc.comp.local. 5 IN A 10.96.0.5"]
        assert sorted(rdata.address for rdata in replies[1].answer[0]) == ["10.0.0.2", "10.0.0.3"]
        # And one more after a pause, on the same connection.
        third = query("nope.default.svc.comp.local.")
        writer.write(third.to_wire(prepend_length=True))
        await writer.drain()
        reply = await read_frame(reader)
        assert (reply.id, reply.rcode()) == (third.id, dns.rcode.NXDOMAIN)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_an_idle_tcp_connection_is_closed(registry):
    server = await started(registry, tcp_idle_timeout=0.3)
    try:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(query("web.default.svc.comp.local.").to_wire(prepend_length=True))
        await writer.drain()
        assert (await read_frame(reader)).rcode() == dns.rcode.NOERROR
        # Nothing more sent: the server hangs up (EOF) soon after the timeout.
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    finally:
        await server.stop()


async def test_tcp_connections_beyond_the_limit_are_closed_on_arrival(registry):
    server = await started(registry, max_tcp_connections=1)
    try:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(query("web.default.svc.comp.local.").to_wire(prepend_length=True))
        await writer.drain()
        await read_frame(reader)  # the first connection is being served
        extra_reader, extra_writer = await asyncio.open_connection(HOST, server.port)
        assert await asyncio.wait_for(extra_reader.read(), TIMEOUT) == b"", "the second is closed at once"
        extra_writer.close()
        writer.write(query("db.default.svc.comp.local.").to_wire(prepend_length=True))
        await writer.drain()
        assert (await read_frame(reader)).rcode() == dns.rcode.NOERROR, "the first still works"
        writer.close()
        await writer.wait_closed()
        # Its slot is free again once the server has seen it go.
        answered = None
        for _ in range(50):
            await asyncio.sleep(0.05)
            try:
                answered = await tcp(server, query("web.default.svc.comp.local."))
                break
            except (EOFError, ConnectionError):
                continue
        assert answered is not None and answered.rcode() == dns.rcode.NOERROR
    finally:
        await server.stop()


async def test_a_tcp_stream_that_is_not_dns_is_closed_and_others_are_served(server):
    reader, writer = await asyncio.open_connection(HOST, server.port)
    writer.write(b"\x00\x03abc")  # a frame too short for a DNS header
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    assert (await tcp(server, query("web.default.svc.comp.local."))).rcode() == dns.rcode.NOERROR


async def test_stop_closes_open_connections_and_frees_the_port(registry):
    server = await started(registry)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    await server.stop()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, server.port)
    # The same port can be bound again at once (a restart).
    again = DnsServer(lambda namespace, name: registry.get((namespace, name)), HOST, server.port)
    await again.start()
    try:
        assert (await udp(again, query("web.default.svc.comp.local."))).rcode() == dns.rcode.NOERROR
    finally:
        await again.stop()
