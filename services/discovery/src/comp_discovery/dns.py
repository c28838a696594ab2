"""The cluster's DNS: ``NAME.NAMESPACE.svc.<domain>`` for every service, over UDP and TCP.

Names (``<domain>`` is ``comp.local`` unless configured):

* ``NAME.NS.svc.<domain>``: ``A``/``AAAA``. A ``vip`` service answers its virtual IP; a
  ``dnsrr`` service answers the address of every ready endpoint (distinct, sorted).
* ``_PORT._PROTO.NAME.NS.svc.<domain>``: ``SRV`` for each port the user named (Kubernetes'
  form). ``vip``: one record, the service port on ``NAME.NS.svc.<domain>``. ``dnsrr``: one
  record per endpoint that has the port, that endpoint's own port number on
  ``<endpoint_label(task_id)>.NAME.NS.svc.<domain>``. Targets' addresses ride in the
  additional section.
* ``<endpoint_label(task_id)>.NAME.NS.svc.<domain>``: the endpoint's address (``dnsrr`` only,
  the SRV targets above).

Anything else under the domain is NXDOMAIN with the zone's SOA (whose minimum is the negative
caching TTL); a name that exists with no record of the asked type is NOERROR and empty (NODATA);
a name outside the domain is REFUSED, as this is no recursive resolver.

``answer`` is the whole resolving logic, a pure function of a parsed query and the lookup;
``respond`` adds the wire (parse errors, truncation); ``DnsServer`` only moves bytes.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import ipaddress
import logging
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from comp_common.aio import cancel_and_wait, within
from comp_common.manifest import DNS_LABEL
from comp_common.messages import Endpoint, ServiceEndpoints

log = logging.getLogger("discovery.dns")

# (namespace, name) -> the service with its ready endpoints, or None when there is no such service.
Lookup = Callable[[str, str], ServiceEndpoints | None]
Answerer = Callable[[dns.message.Message], dns.message.Message]

DEFAULT_DOMAIN = "comp.local"
DEFAULT_VIP_TTL = 5
# Endpoints come and go with every rollout and failed health check: a cached list would send
# clients to replicas that are gone.
DEFAULT_DNSRR_TTL = 1
DEFAULT_NEGATIVE_TTL = 5  # a service created a moment after a miss is found this soon
# The EDNS buffer size of DNS Flag Day 2020: larger UDP answers risk IP fragmentation, which
# is dropped on many paths; clients fall back to TCP instead.
DEFAULT_MAX_UDP_PAYLOAD = 1232
DEFAULT_TCP_IDLE_TIMEOUT = 10.0
DEFAULT_MAX_TCP_CONNECTIONS = 256

CLASSIC_UDP_SIZE = 512  # RFC 1035: what a client without EDNS can take
MAX_TCP_MESSAGE = 65535  # the 2-byte length prefix
_HEADER = struct.Struct("!HH")  # id, flags: the part of the header a reply needs
_HEADER_SIZE = 12
_OPCODE_MASK = 0x7800
_SERVICE_LABEL = re.compile(DNS_LABEL)
_PROTOCOLS = {b"_tcp": "tcp", b"_udp": "udp"}
_ZONE_TRANSFERS = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}
# Distinct ids are enough to tell the zone changed; nothing here transfers it to secondaries.
_SOA_SERIAL = 1
_SOA_TIMERS = "7200 1800 86400"  # refresh, retry, expire: unused without secondaries


def endpoint_label(task_id: str) -> str:
    """The DNS label naming an endpoint under its service (the target of its SRV records).

    Task ids are usually labels already (``web-0a1b2c3d4e``); one that is not (too long for a
    label, characters a label cannot hold) keeps a readable prefix and gets a hash of the whole
    id, so that two tasks never share a label.
    """
    lowered = task_id.lower()
    if len(lowered) <= 63 and _SERVICE_LABEL.match(lowered):
        return lowered
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:16]
    prefix = re.sub(r"[^a-z0-9-]+", "-", lowered)[:46].strip("-")
    return f"{prefix}-{digest}" if prefix else f"t-{digest}"


@dataclass(frozen=True)
class _Records:
    """What ``answer`` found for an existing name."""

    answer: tuple[dns.rrset.RRset, ...]
    additional: tuple[dns.rrset.RRset, ...] = ()


_EMPTY = _Records(())


def answer(
    query: dns.message.Message,
    lookup: Lookup,
    domain: str | dns.name.Name = DEFAULT_DOMAIN,
    *,
    vip_ttl: int = DEFAULT_VIP_TTL,
    dnsrr_ttl: int = DEFAULT_DNSRR_TTL,
    negative_ttl: int = DEFAULT_NEGATIVE_TTL,
) -> dns.message.Message:
    """The response to ``query``: see the module's docstring for the names and rcodes.

    An exception from ``lookup`` propagates (``respond`` turns it into SERVFAIL).
    """
    zone = _zone_name(domain)
    response = dns.message.make_response(query)
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    if query.edns > 0:
        response.set_rcode(dns.rcode.BADVERS)  # RFC 6891 6.1.3: we speak EDNS version 0 only
        return response
    question = query.question[0]
    qname, qtype = question.name, question.rdtype
    if (
        question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY)
        or not qname.is_subdomain(zone)
        or qtype in _ZONE_TRANSFERS
    ):
        response.set_rcode(dns.rcode.REFUSED)
        return response
    response.flags |= dns.flags.AA
    soa = _soa(zone, negative_ttl)
    labels = qname.canonicalize().relativize(zone).labels
    if labels == ():
        found: _Records | None = _Records((soa,))
    else:
        found = _resolve(labels, qname, zone, lookup, vip_ttl=vip_ttl, dnsrr_ttl=dnsrr_ttl)
    if found is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(soa)
        return response
    # The owner is the name as asked (case kept): a resolver using 0x20 randomisation
    # compares it with its question.
    matching = [_renamed(rrset, qname) for rrset in found.answer if qtype in (rrset.rdtype, dns.rdatatype.ANY)]
    if not matching:
        response.authority.append(soa)  # NODATA (RFC 2308): the SOA carries the negative TTL
        return response
    response.answer.extend(matching)
    response.additional.extend(found.additional)
    return response


def respond(
    wire: bytes,
    answerer: Answerer,
    *,
    over_tcp: bool,
    max_udp_payload: int = DEFAULT_MAX_UDP_PAYLOAD,
    peer: object = None,
) -> bytes | None:
    """The reply to one DNS message as received, or None when it deserves none.

    Never raises: a packet too short for a header, or one that is itself a response, is
    dropped; an unparsable one gets FORMERR (NOTIMP for an opcode other than QUERY); a failing
    ``answerer`` gets SERVFAIL. A reply larger than the transport allows loses its additional
    section first, then its records with TC set, so that the client asks again over TCP.
    """
    if len(wire) < _HEADER_SIZE:
        log.debug("dropped a %d-byte packet from %s: shorter than a DNS header", len(wire), peer)
        return None
    query_id, flags = _HEADER.unpack_from(wire)
    if flags & dns.flags.QR:
        # Replying to responses would let two servers bounce a spoofed packet forever.
        log.debug("dropped a response from %s", peer)
        return None
    try:
        query = dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        log.debug("NOTAUTH to %s: a TSIG-signed query, and we hold no keys", peer)
        return _header_only(query_id, flags, dns.rcode.NOTAUTH)
    except Exception as error:  # garbage raises anything from FormError to ValueError
        rcode = dns.rcode.FORMERR if (flags & _OPCODE_MASK) == 0 else dns.rcode.NOTIMP
        log.debug("%s to %s: unparsable query (%s)", dns.rcode.to_text(rcode), peer, error)
        return _header_only(query_id, flags, rcode)
    try:
        response = answerer(query)
    except Exception:
        log.exception("SERVFAIL to %s for %s", peer, query.question)
        return _header_only(query_id, flags, dns.rcode.SERVFAIL)
    if over_tcp:
        limit = MAX_TCP_MESSAGE
    elif query.edns >= 0:
        limit = max(CLASSIC_UDP_SIZE, min(query.payload, max_udp_payload))
    else:
        limit = CLASSIC_UDP_SIZE
    try:
        if response.edns >= 0:
            # Tell the client what we accept (make_response's default would claim 8192).
            response.use_edns(response.edns, response.ednsflags, max_udp_payload, options=response.options)
        return _render(response, limit)
    except Exception:
        log.exception("SERVFAIL to %s: could not render the response to %s", peer, query.question)
        return _header_only(query_id, flags, dns.rcode.SERVFAIL)


class DnsServer:
    """``respond`` on a UDP socket and a TCP listener sharing one address and port.

    TCP follows RFC 7766: 2-byte length framing, any number of queries per connection
    (answered in order), connections idle longer than ``tcp_idle_timeout`` closed, and at most
    ``max_tcp_connections`` at once (a connection beyond that is closed on arrival, rather than
    queued holding a socket).
    """

    def __init__(
        self,
        lookup: Lookup,
        host: str,
        port: int,
        domain: str = DEFAULT_DOMAIN,
        *,
        vip_ttl: int = DEFAULT_VIP_TTL,
        dnsrr_ttl: int = DEFAULT_DNSRR_TTL,
        negative_ttl: int = DEFAULT_NEGATIVE_TTL,
        max_udp_payload: int = DEFAULT_MAX_UDP_PAYLOAD,
        tcp_idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT,
        max_tcp_connections: int = DEFAULT_MAX_TCP_CONNECTIONS,
    ) -> None:
        self._answerer: Answerer = functools.partial(
            answer,
            lookup=lookup,
            domain=_zone_name(domain),  # a bad domain fails here, at startup, not per query
            vip_ttl=vip_ttl,
            dnsrr_ttl=dnsrr_ttl,
            negative_ttl=negative_ttl,
        )
        self._host = host
        self._requested_port = port
        self._port = port
        self._max_udp_payload = max_udp_payload
        self._tcp_idle_timeout = tcp_idle_timeout
        self._max_tcp_connections = max_tcp_connections
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (the one picked when asked for 0)."""
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # With port 0 the UDP socket picks a port that may be taken for TCP: try a few.
        attempts = 20 if self._requested_port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self._on_datagram), local_addr=(self._host, self._requested_port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp = await asyncio.start_server(self._serve_connection, self._host, port)
            except OSError as error:
                udp.close()
                if error.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            self._udp, self._tcp, self._port = udp, tcp, port
            log.info("DNS on %s port %d (udp and tcp)", self._host, port)
            return

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            # Python 3.11's Server.close leaves accepted connections open: end them here.
            await cancel_and_wait(self._connections)
            await self._tcp.wait_closed()
            self._tcp = None

    def _on_datagram(self, data: bytes, peer: object) -> bytes | None:
        return respond(data, self._answerer, over_tcp=False, max_udp_payload=self._max_udp_payload, peer=peer)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._connections) >= self._max_tcp_connections:
            log.debug("closed a TCP connection from %s: %d already open", peer, len(self._connections))
            writer.close()
            return
        connection = asyncio.current_task()
        assert connection is not None  # start_server runs this callback as a task
        self._connections.add(connection)
        try:
            await self._serve_queries(reader, writer, peer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as error:
            log.debug("TCP connection from %s ended: %r", peer, error)
        finally:
            self._connections.discard(connection)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass  # the peer reset it: nothing left to close

    async def _serve_queries(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object) -> None:
        while True:
            try:
                prefix = await within(reader.readexactly(2), self._tcp_idle_timeout)
            except asyncio.IncompleteReadError as error:
                if error.partial:
                    raise
                return  # the client closed between queries: the normal end
            (length,) = struct.unpack("!H", prefix)
            # A client that sends a length then stalls counts as idle too.
            wire = await within(reader.readexactly(length), self._tcp_idle_timeout)
            reply = respond(wire, self._answerer, over_tcp=True, max_udp_payload=self._max_udp_payload, peer=peer)
            if reply is None:
                return  # no header to answer: the stream is not DNS, or we lost its framing
            writer.write(struct.pack("!H", len(reply)) + reply)
            await within(writer.drain(), self._tcp_idle_timeout)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes, object], bytes | None]) -> None:
        self._handle = handle
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport, only acts as one.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self._handle(data, addr)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier sends (a client gone away): nothing to do but note it.
        log.debug("UDP error: %s", exc)


def _zone_name(domain: str | dns.name.Name) -> dns.name.Name:
    name = domain if isinstance(domain, dns.name.Name) else dns.name.from_text(domain)
    return name.canonicalize()


def _resolve(
    labels: tuple[bytes, ...],
    qname: dns.name.Name,
    zone: dns.name.Name,
    lookup: Lookup,
    *,
    vip_ttl: int,
    dnsrr_ttl: int,
) -> _Records | None:
    """The records of a name below the zone apex (``labels`` lowercase, relative to the
    zone), or None when the name does not exist."""
    *prefix, svc = labels
    if svc != b"svc":
        return None
    if len(prefix) == 0:
        return _EMPTY
    namespace = _label_text(prefix[-1])
    if namespace is None:
        return None
    if len(prefix) == 1:
        # ``NS.svc``: it may have services below it; NXDOMAIN would deny them all (RFC 8020).
        return _EMPTY
    name = _label_text(prefix[-2])
    if name is None or len(prefix) > 4:
        return None
    service = lookup(namespace, name)
    if service is None:
        return None
    service_name = dns.name.Name((name.encode(), namespace.encode(), b"svc", *zone.labels))
    ttl = vip_ttl if service.mode == "vip" else dnsrr_ttl
    below = prefix[:-2]
    if not below:
        if service.mode == "vip":
            addresses = [service.vip] if service.vip else []
        else:
            addresses = [endpoint.address for endpoint in service.endpoints]
        return _Records(_address_rrsets(qname, addresses, ttl))
    if len(below) == 1 and below[0].startswith(b"_"):
        # ``_tcp.NAME...`` exists (empty) when a named port of that protocol lives below it.
        protocol = _PROTOCOLS.get(below[0])
        if any(port.named and port.protocol == protocol for port in service.ports):
            return _EMPTY
        return None
    if len(below) == 1:
        if service.mode != "dnsrr":
            return None
        for endpoint in service.endpoints:
            if endpoint_label(endpoint.task_id) == below[0].decode("ascii", "replace"):
                return _Records(_address_rrsets(qname, [endpoint.address], ttl))
        return None
    if len(below) == 2:
        return _srv(below[0], below[1], service, service_name, ttl)
    return None


def _srv(
    port_label: bytes, protocol_label: bytes, service: ServiceEndpoints, service_name: dns.name.Name, ttl: int
) -> _Records | None:
    protocol = _PROTOCOLS.get(protocol_label)
    port = next(
        (
            port
            for port in service.ports
            if port.named and port.protocol == protocol and b"_" + port.name.lower().encode() == port_label
        ),
        None,
    )
    if port is None:
        return None
    if service.mode == "vip":
        if not service.vip:
            return _EMPTY  # the name exists; with no VIP yet there is nothing to point at
        srv = _rrset(service_name, ttl, dns.rdatatype.SRV, [f"0 100 {port.port} {service_name}"])
        return _Records((srv,), _address_rrsets(service_name, [service.vip], ttl))
    records: list[str] = []
    glue: list[dns.rrset.RRset] = []
    for endpoint in _endpoints_by_label(service.endpoints):
        number = endpoint.ports.get(port.name)
        target = dns.name.Name((endpoint_label(endpoint.task_id).encode(), *service_name.labels))
        addresses = _address_rrsets(target, [endpoint.address], ttl)
        if number is None or not addresses:
            continue
        records.append(f"0 100 {number} {target}")
        glue.extend(addresses)
    if not records:
        return _EMPTY
    return _Records((_rrset(service_name, ttl, dns.rdatatype.SRV, records),), tuple(glue))


def _endpoints_by_label(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    return sorted(endpoints, key=lambda endpoint: endpoint_label(endpoint.task_id))


def _address_rrsets(owner: dns.name.Name, addresses: Iterable[str], ttl: int) -> tuple[dns.rrset.RRset, ...]:
    """A and AAAA records for ``addresses``: distinct, sorted, unparsable ones left out."""
    parsed: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for address in addresses:
        try:
            parsed.add(ipaddress.ip_address(address))
        except ValueError:
            # Debug, not warning: it would repeat on every query until the registry changes.
            log.debug("%s: skipped the address %r, not an IP address", owner, address)
    rrsets = []
    for rdtype, version in ((dns.rdatatype.A, 4), (dns.rdatatype.AAAA, 6)):
        of_version = sorted(ip for ip in parsed if ip.version == version)
        if of_version:
            rrsets.append(_rrset(owner, ttl, rdtype, [str(ip) for ip in of_version]))
    return tuple(rrsets)


def _rrset(owner: dns.name.Name, ttl: int, rdtype: dns.rdatatype.RdataType, records: list[str]) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(owner, ttl, dns.rdataclass.IN, rdtype, records)


def _renamed(rrset: dns.rrset.RRset, owner: dns.name.Name) -> dns.rrset.RRset:
    renamed = dns.rrset.RRset(owner, rrset.rdclass, rrset.rdtype)
    renamed.update(rrset)
    return renamed


def _soa(zone: dns.name.Name, negative_ttl: int) -> dns.rrset.RRset:
    # The SOA's TTL and minimum both bound negative caching (RFC 2308 5): keep them equal.
    record = f"ns.dns.{zone} hostmaster.{zone} {_SOA_SERIAL} {_SOA_TIMERS} {negative_ttl}"
    return _rrset(zone, negative_ttl, dns.rdatatype.SOA, [record])


def _label_text(label: bytes) -> str | None:
    """The label as a service or namespace name, or None when no service could be named so."""
    try:
        text = label.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _SERVICE_LABEL.match(text) else None


def _header_only(query_id: int, flags: int, rcode: dns.rcode.Rcode) -> bytes:
    """A reply with no sections, for a query we could not (or would not) read further."""
    reply = dns.message.Message(id=query_id)
    reply.flags = dns.flags.QR | (flags & (_OPCODE_MASK | dns.flags.RD))
    reply.set_rcode(rcode)
    return reply.to_wire()


def _render(response: dns.message.Message, limit: int) -> bytes:
    # Records of a set go out in a new random order each time (dnspython's shuffle): most
    # clients take the first address of a dnsrr answer, so a fixed order would send them
    # all to one replica.  ``answer`` itself stays deterministic for its tests.
    try:
        return response.to_wire(max_size=limit, want_shuffle=True)
    except dns.exception.TooBig:
        pass
    # RFC 2181 9: additional data is optional; leaving it out is not a truncation.
    response.additional.clear()
    try:
        return response.to_wire(max_size=limit, want_shuffle=True)
    except dns.exception.TooBig:
        pass
    # A partial answer could be taken for the whole one by a client ignoring TC: send none.
    response.answer.clear()
    response.authority.clear()
    response.flags |= dns.flags.TC
    return response.to_wire(max_size=limit, want_shuffle=True)
