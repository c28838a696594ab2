"""Discovery's DNS without sockets: ``answer`` (names to records) and ``respond`` (the wire).

The table reads answers back as zone-file lines, so a case says what ``dig`` would print."""

from __future__ import annotations

import re

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_discovery.dns import (
    CLASSIC_UDP_SIZE,
    DEFAULT_MAX_UDP_PAYLOAD,
    DnsServer,
    answer,
    endpoint_label,
    respond,
)

HTTP = EndpointPort(name="http", port=80, named=True)
DNS_PORT = EndpointPort(name="dns", port=53, protocol="udp", named=True)
UNNAMED = EndpointPort(name="tcp-9000", port=9000, named=False)
PG = EndpointPort(name="pg", port=5432, named=True)
LONG_TASK = "a-deployment-name-that-is-as-long-as-a-label-may-be-at-sixty-three-0123456789"

SERVICES = {
    ("default", "web"): ServiceEndpoints(
        namespace="default", name="web", vip="10.96.0.5", ports=[HTTP, DNS_PORT, UNNAMED],
        endpoints=[Endpoint(task_id="web-1", node_id="n1", address="10.0.1.2", ports={"http": 8080})],
    ),
    ("prod", "web"): ServiceEndpoints(namespace="prod", name="web", vip="10.96.0.9", ports=[HTTP]),
    ("default", "pending"): ServiceEndpoints(namespace="default", name="pending", vip=None, ports=[HTTP]),
    ("default", "db"): ServiceEndpoints(
        namespace="default", name="db", mode="dnsrr", ports=[PG],
        endpoints=[
            Endpoint(task_id="db-b", node_id="n1", address="10.0.0.3", ports={"pg": 6000}),
            Endpoint(task_id="db-a", node_id="n2", address="10.0.0.2", ports={"pg": 5432}),
            # Same host as db-a (host networking): one A record for both; no pg port, no SRV.
            Endpoint(task_id="db-c", node_id="n2", address="10.0.0.2", ports={}),
        ],
    ),
    ("default", "empty"): ServiceEndpoints(namespace="default", name="empty", mode="dnsrr", ports=[PG]),
    ("default", "dual"): ServiceEndpoints(
        namespace="default", name="dual", mode="dnsrr", ports=[PG],
        endpoints=[
            Endpoint(task_id="dual-1", node_id="n1", address="fd00::2", ports={"pg": 5432}),
            Endpoint(task_id="dual-2", node_id="n1", address="10.0.0.7", ports={"pg": 5432}),
        ],
    ),
    ("default", "long"): ServiceEndpoints(
        namespace="default", name="long", mode="dnsrr", ports=[PG],
        endpoints=[Endpoint(task_id=LONG_TASK, node_id="n1", address="10.0.0.8", ports={"pg": 5432})],
    ),
}


def lookup(namespace: str, name: str) -> ServiceEndpoints | None:
    return SERVICES.get((namespace, name))


def lines(section: list) -> list[str]:
    return [line for rrset in section for line in rrset.to_text().splitlines()]


def ask(qname: str, qtype: str = "A", **kwargs) -> dns.message.Message:
    return answer(dns.message.make_query(qname, qtype), lookup, **kwargs)


SOA = "comp.local. 5 IN SOA ns.dns.comp.local. hostmaster.comp.local. 1 7200 1800 86400 5"
LONG_LABEL = endpoint_label(LONG_TASK)

NOERROR, NXDOMAIN, REFUSED = dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.REFUSED


@pytest.mark.parametrize(
    "qname, qtype, rcode, expected",
    [
        # vip: the one virtual IP, whatever the endpoints
        ("web.default.svc.comp.local.", "A", NOERROR, ["web.default.svc.comp.local. 5 IN A 10.96.0.5"]),
        ("web.prod.svc.comp.local.", "A", NOERROR, ["web.prod.svc.comp.local. 5 IN A 10.96.0.9"]),
        # names are case-insensitive; the owner keeps the asker's case (0x20 randomisation)
        ("WEB.Default.SVC.Comp.Local.", "A", NOERROR, ["WEB.Default.SVC.Comp.Local. 5 IN A 10.96.0.5"]),
        ("web.default.svc.comp.local.", "ANY", NOERROR, ["web.default.svc.comp.local. 5 IN A 10.96.0.5"]),
        # dnsrr: every ready endpoint's address, distinct and sorted, short TTL
        ("db.default.svc.comp.local.", "A", NOERROR,
         ["db.default.svc.comp.local. 1 IN A 10.0.0.2", "db.default.svc.comp.local. 1 IN A 10.0.0.3"]),
        ("dual.default.svc.comp.local.", "A", NOERROR, ["dual.default.svc.comp.local. 1 IN A 10.0.0.7"]),
        ("dual.default.svc.comp.local.", "AAAA", NOERROR, ["dual.default.svc.comp.local. 1 IN AAAA fd00::2"]),
        # the name exists with nothing (yet) to answer: NODATA
        ("empty.default.svc.comp.local.", "A", NOERROR, []),
        ("pending.default.svc.comp.local.", "A", NOERROR, []),
        ("web.default.svc.comp.local.", "AAAA", NOERROR, []),
        ("web.default.svc.comp.local.", "TXT", NOERROR, []),
        ("web.default.svc.comp.local.", "MX", NOERROR, []),
        ("web.default.svc.comp.local.", "SRV", NOERROR, []),
        ("db.default.svc.comp.local.", "AAAA", NOERROR, []),
        # SRV, vip: the service port on the service's name
        ("_http._tcp.web.default.svc.comp.local.", "SRV", NOERROR,
         ["_http._tcp.web.default.svc.comp.local. 5 IN SRV 0 100 80 web.default.svc.comp.local."]),
        ("_dns._udp.web.default.svc.comp.local.", "SRV", NOERROR,
         ["_dns._udp.web.default.svc.comp.local. 5 IN SRV 0 100 53 web.default.svc.comp.local."]),
        ("_HTTP._TCP.web.default.svc.comp.local.", "SRV", NOERROR,
         ["_HTTP._TCP.web.default.svc.comp.local. 5 IN SRV 0 100 80 web.default.svc.comp.local."]),
        ("_http._tcp.web.default.svc.comp.local.", "A", NOERROR, []),
        ("_http._tcp.pending.default.svc.comp.local.", "SRV", NOERROR, []),
        # SRV, dnsrr: each endpoint's own port on its own name; db-c lacks the port
        ("_pg._tcp.db.default.svc.comp.local.", "SRV", NOERROR,
         ["_pg._tcp.db.default.svc.comp.local. 1 IN SRV 0 100 5432 db-a.db.default.svc.comp.local.",
          "_pg._tcp.db.default.svc.comp.local. 1 IN SRV 0 100 6000 db-b.db.default.svc.comp.local."]),
        ("_pg._tcp.empty.default.svc.comp.local.", "SRV", NOERROR, []),
        ("_pg._tcp.long.default.svc.comp.local.", "SRV", NOERROR,
         [f"_pg._tcp.long.default.svc.comp.local. 1 IN SRV 0 100 5432 {LONG_LABEL}.long.default.svc.comp.local."]),
        # SRV targets of a dnsrr service resolve
        ("db-b.db.default.svc.comp.local.", "A", NOERROR, ["db-b.db.default.svc.comp.local. 1 IN A 10.0.0.3"]),
        ("DB-A.db.default.svc.comp.local.", "A", NOERROR, ["DB-A.db.default.svc.comp.local. 1 IN A 10.0.0.2"]),
        (f"{LONG_LABEL}.long.default.svc.comp.local.", "A", NOERROR,
         [f"{LONG_LABEL}.long.default.svc.comp.local. 1 IN A 10.0.0.8"]),
        ("db-b.db.default.svc.comp.local.", "AAAA", NOERROR, []),
        # empty non-terminals exist: NXDOMAIN would deny every name below them (RFC 8020)
        ("comp.local.", "A", NOERROR, []),
        ("svc.comp.local.", "A", NOERROR, []),
        ("default.svc.comp.local.", "A", NOERROR, []),
        ("nowhere.svc.comp.local.", "A", NOERROR, []),
        ("_tcp.web.default.svc.comp.local.", "SRV", NOERROR, []),
        ("comp.local.", "SOA", NOERROR, [SOA]),
        # no such service, port or endpoint
        ("nope.default.svc.comp.local.", "A", NXDOMAIN, []),
        ("web.staging.svc.comp.local.", "A", NXDOMAIN, []),
        ("nope.default.svc.comp.local.", "AAAA", NXDOMAIN, []),
        ("_smtp._tcp.web.default.svc.comp.local.", "SRV", NXDOMAIN, []),
        ("_http._udp.web.default.svc.comp.local.", "SRV", NXDOMAIN, []),  # http is tcp
        ("_tcp-9000._tcp.web.default.svc.comp.local.", "SRV", NXDOMAIN, []),  # unnamed: no SRV
        ("_udp.db.default.svc.comp.local.", "SRV", NXDOMAIN, []),
        ("_sctp.web.default.svc.comp.local.", "SRV", NXDOMAIN, []),
        ("db-z.db.default.svc.comp.local.", "A", NXDOMAIN, []),
        ("web-1.web.default.svc.comp.local.", "A", NXDOMAIN, []),  # a vip service names no endpoints
        # malformed under the domain
        ("we_b.default.svc.comp.local.", "A", NXDOMAIN, []),
        ("web.Def@ult.svc.comp.local.", "A", NXDOMAIN, []),
        ("web.default.comp.local.", "A", NXDOMAIN, []),
        ("x._pg._tcp.db.default.svc.comp.local.", "A", NXDOMAIN, []),
        ("a.b.c.d.web.default.svc.comp.local.", "A", NXDOMAIN, []),
        # not ours: we do not recurse
        ("example.com.", "A", REFUSED, []),
        ("comp.localhost.", "A", REFUSED, []),
        ("web.default.svc.cluster.local.", "A", REFUSED, []),
        (".", "NS", REFUSED, []),
        # nor transfer the zone
        ("comp.local.", "AXFR", REFUSED, []),
    ],
)
def test_answers(qname, qtype, rcode, expected):
    response = ask(qname, qtype)
    assert (dns.rcode.to_text(response.rcode()), lines(response.answer)) == (dns.rcode.to_text(rcode), expected)
    assert response.question == dns.message.make_query(qname, qtype).question
    assert not response.flags & dns.flags.RA, "not a recursive resolver"
    # Authoritative for its zone (and only there); negative answers carry the SOA (RFC 2308).
    assert bool(response.flags & dns.flags.AA) == (rcode != REFUSED)
    if rcode == NXDOMAIN or (rcode == NOERROR and not expected):
        assert lines(response.authority) == [SOA]
    else:
        assert response.authority == []


@pytest.mark.parametrize(
    "qname, additional",
    [
        ("_http._tcp.web.default.svc.comp.local.", ["web.default.svc.comp.local. 5 IN A 10.96.0.5"]),
        ("_pg._tcp.db.default.svc.comp.local.",
         ["db-a.db.default.svc.comp.local. 1 IN A 10.0.0.2", "db-b.db.default.svc.comp.local. 1 IN A 10.0.0.3"]),
        ("_pg._tcp.dual.default.svc.comp.local.",
         ["dual-1.dual.default.svc.comp.local. 1 IN AAAA fd00::2", "dual-2.dual.default.svc.comp.local. 1 IN A 10.0.0.7"]),
    ],
)
def test_srv_targets_addresses_ride_in_the_additional_section(qname, additional):
    assert lines(ask(qname, "SRV").additional) == additional


def test_domain_and_ttls_are_configurable():
    def answered(qname: str, qtype: str) -> dns.message.Message:
        query = dns.message.make_query(qname, qtype)
        return answer(query, lookup, "Cluster.Example", vip_ttl=30, dnsrr_ttl=0, negative_ttl=2)

    assert lines(answered("web.default.svc.cluster.example.", "A").answer) == ["web.default.svc.cluster.example. 30 IN A 10.96.0.5"]
    assert [rrset.ttl for rrset in answered("db.default.svc.cluster.example.", "A").answer] == [0]
    missing = answered("nope.default.svc.cluster.example.", "A")
    assert missing.rcode() == NXDOMAIN
    assert lines(missing.authority) == [
        "cluster.example. 2 IN SOA ns.dns.cluster.example. hostmaster.cluster.example. 1 7200 1800 86400 2"
    ]
    assert answered("web.default.svc.comp.local.", "A").rcode() == REFUSED, "the default domain is not served any more"


def test_the_lookup_is_asked_with_lowercase_namespace_and_name():
    asked = []

    def recording(namespace: str, name: str) -> ServiceEndpoints | None:
        asked.append((namespace, name))
        return lookup(namespace, name)

    answer(dns.message.make_query("_Http._Tcp.WEB.DEFAULT.svc.comp.local.", "SRV"), recording)
    answer(dns.message.make_query("we_b.default.svc.comp.local.", "A"), recording)  # malformed: not asked
    answer(dns.message.make_query("web.default.svc.other.", "A"), recording)  # not ours: not asked
    assert asked == [("default", "web")]


def test_an_opcode_other_than_query_is_not_implemented():
    query = dns.message.make_query("web.default.svc.comp.local.", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    response = answer(query, lookup)
    assert (response.rcode(), response.opcode(), response.answer) == (dns.rcode.NOTIMP, dns.opcode.NOTIFY, [])


def test_a_question_count_other_than_one_is_a_format_error():
    query = dns.message.make_query("web.default.svc.comp.local.", "A")
    query.question.append(dns.message.make_query("db.default.svc.comp.local.", "A").question[0])
    assert answer(query, lookup).rcode() == dns.rcode.FORMERR
    query.question.clear()
    assert answer(query, lookup).rcode() == dns.rcode.FORMERR


def test_an_edns_version_we_do_not_speak_is_badvers():
    query = dns.message.make_query("web.default.svc.comp.local.", "A", use_edns=1)
    response = answer(query, lookup)
    assert (response.rcode(), response.edns, response.answer) == (dns.rcode.BADVERS, 0, [])


def test_a_class_other_than_in_is_refused():
    query = dns.message.make_query("web.default.svc.comp.local.", "A", rdclass=dns.rdataclass.CH)
    assert answer(query, lookup).rcode() == REFUSED


def test_endpoint_labels_are_labels_and_distinct():
    assert endpoint_label("web-0a1b2c3d4e") == "web-0a1b2c3d4e"
    assert endpoint_label("Web-0A1B") == "web-0a1b"
    label_re = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    odd = [LONG_TASK, LONG_TASK + "x", "web_1", "web.1", "__", "-web-", "ÿ"]
    labels = [endpoint_label(task_id) for task_id in odd]
    assert all(label_re.match(label) for label in labels), labels
    assert len(set(labels)) == len(odd), "two tasks never share a name"


# -- respond: the wire ------------------------------------------------------------------------

def answerer(query: dns.message.Message) -> dns.message.Message:
    return answer(query, lookup)


def parsed(reply: bytes | None) -> dns.message.Message:
    assert reply is not None
    return dns.message.from_wire(reply)


def many_endpoints(count: int) -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace="default", name="big", mode="dnsrr", ports=[PG],
        endpoints=[
            Endpoint(task_id=f"big-{i:03d}", node_id="n", address=f"10.1.{i // 250}.{i % 250 + 1}", ports={"pg": 5432})
            for i in range(count)
        ],
    )


def test_records_are_shuffled_on_the_wire_so_clients_spread():
    query = dns.message.make_query("_pg._tcp.db.default.svc.comp.local.", "SRV")
    orders = set()
    for _ in range(40):
        reply = parsed(respond(query.to_wire(), answerer, over_tcp=False))
        ports = tuple(rdata.port for rdata in reply.answer[0])
        assert sorted(ports) == [5432, 6000]
        orders.add(ports)
    # Two records, 40 renderings: both orders, unless the shuffle is off (chance 2 ** -39).
    assert orders == {(5432, 6000), (6000, 5432)}


def test_a_packet_shorter_than_a_header_is_dropped():
    assert respond(b"", answerer, over_tcp=False) is None
    assert respond(b"\x12\x34\x01\x00\x00", answerer, over_tcp=False) is None


def test_a_response_is_never_answered():
    query = dns.message.make_query("web.default.svc.comp.local.", "A")
    response_wire = dns.message.make_response(query).to_wire()
    assert respond(response_wire, answerer, over_tcp=False) is None


def test_an_unparsable_query_with_a_readable_header_gets_formerr():
    wire = dns.message.make_query("web.default.svc.comp.local.", "A").to_wire()
    broken = wire[:12] + b"\x3f" + wire[13:]  # the first label now claims 63 bytes
    reply = parsed(respond(broken, answerer, over_tcp=False))
    assert (reply.id, reply.rcode(), reply.flags & dns.flags.QR, reply.question) == (
        int.from_bytes(wire[:2], "big"), dns.rcode.FORMERR, dns.flags.QR, [],
    )
    assert parsed(respond(wire + b"junk", answerer, over_tcp=True)).rcode() == dns.rcode.FORMERR


def test_an_unparsable_query_with_an_unknown_opcode_gets_notimp():
    header = (0xBEEF).to_bytes(2, "big") + (15 << 11).to_bytes(2, "big") + b"\x00\x05" + b"\x00" * 6
    reply = parsed(respond(header, answerer, over_tcp=False))
    assert (reply.id, reply.rcode(), reply.opcode()) == (0xBEEF, dns.rcode.NOTIMP, 15)


def test_a_signed_query_gets_notauth():
    query = dns.message.make_query("web.default.svc.comp.local.", "A")
    query.use_tsig(dns.tsigkeyring.from_text({"key.": "aGVsbG8gd29ybGQ="}), "key.")
    reply = parsed(respond(query.to_wire(), answerer, over_tcp=False))
    assert (reply.id, reply.rcode()) == (query.id, dns.rcode.NOTAUTH)


def test_a_failing_lookup_gets_servfail():
    def failing(namespace: str, name: str) -> ServiceEndpoints | None:
        raise RuntimeError("the registry is not loaded")

    query = dns.message.make_query("web.default.svc.comp.local.", "A")
    reply = parsed(respond(query.to_wire(), lambda q: answer(q, failing), over_tcp=False))
    assert (reply.id, reply.rcode()) == (query.id, dns.rcode.SERVFAIL)


def test_an_answer_too_long_for_udp_is_truncated_and_whole_over_tcp():
    big = many_endpoints(40)  # 40 A records of 16 bytes: over 512

    def big_answerer(query: dns.message.Message) -> dns.message.Message:
        return answer(query, lambda ns, name: big if (ns, name) == ("default", "big") else None)

    query = dns.message.make_query("big.default.svc.comp.local.", "A")
    udp = respond(query.to_wire(), big_answerer, over_tcp=False)
    assert udp is not None and len(udp) <= CLASSIC_UDP_SIZE
    truncated = parsed(udp)
    assert (truncated.flags & dns.flags.TC, truncated.rcode(), truncated.answer) == (dns.flags.TC, NOERROR, [])
    whole = parsed(respond(query.to_wire(), big_answerer, over_tcp=True))
    assert not whole.flags & dns.flags.TC
    assert len(whole.answer[0]) == 40

    # The client's EDNS buffer size raises the limit, up to our own.
    edns_query = dns.message.make_query("big.default.svc.comp.local.", "A", use_edns=0, payload=4096)
    fits = parsed(respond(edns_query.to_wire(), big_answerer, over_tcp=False))
    assert not fits.flags & dns.flags.TC and len(fits.answer[0]) == 40
    assert fits.payload == DEFAULT_MAX_UDP_PAYLOAD, "we advertise our own buffer size"
    larger = many_endpoints(100)  # 1,600+ bytes: over our 1232
    over = respond(edns_query.to_wire(), lambda q: answer(q, lambda ns, name: larger), over_tcp=False)
    assert over is not None and len(over) <= DEFAULT_MAX_UDP_PAYLOAD and parsed(over).flags & dns.flags.TC


def test_additional_records_that_do_not_fit_are_left_out_without_tc():
    # 8 SRV records fit in 512 bytes (485: RFC 2782 forbids compressing their targets), not
    # with their 8 A records (677).
    big = many_endpoints(8)

    query = dns.message.make_query("_pg._tcp.big.default.svc.comp.local.", "SRV")
    reply = parsed(respond(query.to_wire(), lambda q: answer(q, lambda ns, name: big), over_tcp=False))
    assert not reply.flags & dns.flags.TC
    assert (len(reply.answer[0]), reply.additional) == (8, [])
    whole = parsed(respond(query.to_wire(), lambda q: answer(q, lambda ns, name: big), over_tcp=True))
    assert len(whole.additional) == 8


def test_the_server_reports_its_configuration_before_it_starts():
    server = DnsServer(lookup, "127.0.0.1", 5353, "Cluster.Example")
    assert (server.host, server.port) == ("127.0.0.1", 5353)
    with pytest.raises(dns.name.EmptyLabel):
        DnsServer(lookup, "127.0.0.1", 0, "bad..domain")


# -- properties -------------------------------------------------------------------------------

def query_header(flags: int) -> bytes:
    return b"\xab\xcd" + flags.to_bytes(2, "big") + b"\x00\x01\x00\x00\x00\x00\x00\x00"


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        # A plausible header (a query with one question) before random bytes: gets past the
        # first checks into the parser.
        st.builds(lambda flags, body: query_header(flags & ~0x8000) + body, st.integers(0, 0xFFFF), st.binary(max_size=300)),
    ),
    st.booleans(),
)
def test_no_packet_raises_and_every_reply_is_a_response_to_it(wire, over_tcp):
    reply = respond(wire, answerer, over_tcp=over_tcp)
    if reply is None:
        assert len(wire) < 12 or wire[2] & 0x80, "only headerless packets and responses go unanswered"
        return
    assert len(reply) <= (65535 if over_tcp else CLASSIC_UDP_SIZE)
    response = dns.message.from_wire(reply)
    assert response.id == int.from_bytes(wire[:2], "big")
    assert response.flags & dns.flags.QR
    assert response.rcode() != dns.rcode.SERVFAIL, "every parsable query is answered, not failed"


LABELS = [b"svc", b"default", b"prod", b"web", b"db", b"long", b"comp", b"local", b"_tcp", b"_udp", b"_http", b"_pg", b"db-a", b"WEB"]
label_st = st.one_of(st.sampled_from(LABELS), st.binary(min_size=1, max_size=20))
qtype_st = st.sampled_from(["A", "AAAA", "SRV", "TXT", "ANY", "SOA", "NS", "CNAME", "PTR"])


@settings(max_examples=300, deadline=None)
@given(st.lists(label_st, max_size=6), st.sampled_from([(), (b"comp", b"local"), (b"comp", b"localhost"), (b"COMP", b"Local")]), qtype_st)
def test_any_name_answers_with_a_valid_rcode(prefix, suffix, qtype):
    qname = dns.name.Name((*prefix, *suffix, b""))
    response = answer(dns.message.make_query(qname, qtype), lookup)
    inside = qname.is_subdomain(dns.name.from_text("comp.local."))
    assert response.rcode() in ((NOERROR, NXDOMAIN) if inside else (REFUSED,))
    assert all(rrset.name == qname for rrset in response.answer), "answers are for the name asked"
    if response.rcode() == NXDOMAIN or (inside and not response.answer):
        assert lines(response.authority) == [SOA]
    wire = respond(dns.message.make_query(qname, qtype).to_wire(), answerer, over_tcp=False)
    assert wire is not None and len(wire) <= CLASSIC_UDP_SIZE
