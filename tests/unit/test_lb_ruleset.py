"""The lb's ruleset builder: services and endpoints to one nftables table (libnftables JSON).

Tables of cases read the rules back as (chain, rule) pairs in nft's own words, so a case
says what an operator would see in ``nft list table``."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from comp_lb.ruleset import (
    Endpoint, Service, ServicePort, build_ruleset, endpoint_id, service_port_id,
)


def rules(document: dict) -> dict[str, list[list[dict]]]:
    """chain name -> the expressions of each of its rules, in order."""
    out: dict[str, list[list[dict]]] = {}
    for command in document["nftables"]:
        rule = command.get("add", {}).get("rule")
        if rule is not None:
            out.setdefault(rule["chain"], []).append(rule["expr"])
    return out


def objects(document: dict, kind: str) -> dict[str, dict]:
    return {c["add"][kind]["name"]: c["add"][kind] for c in document["nftables"] if kind in c.get("add", {})}


def verdict(expr: list[dict]) -> dict:
    return expr[-1]


WEB = ServicePort(80, "http", name="web")
A = Endpoint("web-a", "10.0.0.2", {"http": 8080})
B = Endpoint("web-b", "10.0.0.3", {"http": 8081})
NO_NAME = Endpoint("web-c", "10.0.0.4", {"metrics": 9100})


def test_the_table_is_replaced_whole_in_one_document():
    commands = build_ruleset([])["nftables"]
    table = {"table": {"family": "ip", "name": "comp_lb"}}
    assert commands[1:4] == [{"add": table}, {"delete": table}, {"add": table}], "add (so delete cannot fail), delete, add"
    chains = objects(build_ruleset([]), "chain")
    assert {n: (c.get("type"), c.get("hook"), c.get("prio")) for n, c in chains.items()} == {
        "prerouting": ("nat", "prerouting", -100), "output": ("nat", "output", -100),
        "postrouting": ("nat", "postrouting", 100), "filter-input": ("filter", "input", -10),
        "filter-forward": ("filter", "forward", -10), "filter-output": ("filter", "output", -10),
        "services": (None, None, None), "no-endpoints": (None, None, None),
    }


@pytest.mark.parametrize(
    "service, dispatched, rejected, dnats",
    [
        # zero endpoints: refused at once (a TCP reset), not a black hole
        (Service("d.web", "10.96.0.10", (ServicePort(80, 8080),)), 0, [{"reject": {"type": "tcp reset"}}], []),
        # UDP with no endpoint: ICMP port unreachable
        (Service("d.dns", "10.96.0.11", (ServicePort(53, 53, "udp"),)), 0, [{"reject": None}], []),
        # one endpoint: straight to it, no random pick
        (Service("d.web", "10.96.0.10", (ServicePort(80, 8080),), (A,)), 1, [], [("10.0.0.2", 8080, "tcp")]),
        # UDP
        (Service("d.dns", "10.96.0.11", (ServicePort(53, 5353, "udp"),), (A, B)), 1, [],
         [("10.0.0.2", 5353, "udp"), ("10.0.0.3", 5353, "udp")]),
        # a named target port: each endpoint's own number; one without the name serves none of it
        (Service("d.web", "10.96.0.10", (WEB,), (B, NO_NAME, A)), 1, [], [("10.0.0.2", 8080, "tcp"), ("10.0.0.3", 8081, "tcp")]),
        # only endpoints without the named port: as good as none
        (Service("d.web", "10.96.0.10", (WEB,), (NO_NAME,)), 0, [{"reject": {"type": "tcp reset"}}], []),
    ],
)
def test_endpoints_to_rules(service, dispatched, rejected, dnats):
    document = build_ruleset([service])
    chains = rules(document)
    assert len(chains.get("services", [])) == dispatched
    assert [verdict(r) for r in chains.get("no-endpoints", [])] == rejected
    found = []
    for name, chain in chains.items():
        if name.startswith("ep-"):
            counter, hairpin, dnat = chain
            assert counter == [{"counter": name}]
            assert hairpin[-1]["mangle"]["value"] == {"|": [{"meta": {"key": "mark"}}, 0x4000]}
            protocol = dnat[0]["match"]["right"]
            found.append((dnat[1]["dnat"]["addr"], dnat[1]["dnat"]["port"], protocol))
    assert sorted(found) == dnats


def test_traffic_is_spread_evenly_over_every_endpoint():
    service = Service("d.web", "10.96.0.10", (ServicePort(80, "http"),), (A, B, Endpoint("web-d", "10.0.0.5", {"http": 80})))
    document = build_ruleset([service])
    chain = service_port_id("d.web", service.ports[0])
    (pick,) = rules(document)[chain]
    vmap = pick[1]["vmap"]
    assert pick[0] == {"counter": chain}
    assert vmap["key"] == {"numgen": {"mode": "random", "mod": 3, "offset": 0}}
    targets = [entry[1]["goto"]["target"] for entry in vmap["data"]["set"]]
    assert [entry[0] for entry in vmap["data"]["set"]] == [0, 1, 2] and len(set(targets)) == 3
    assert set(targets) <= set(rules(document))
    (dispatch,) = rules(document)["services"]
    assert dispatch[0]["match"]["right"] == "10.96.0.10" and dispatch[1]["match"]["right"] == 80
    assert dispatch[2] == {"goto": {"target": chain}}


def test_a_published_port_is_reached_on_the_hosts_own_addresses_and_dnsrr_has_no_vip_rule():
    port = ServicePort(80, 8080, published=30080)
    for vip, expected in (("10.96.0.10", 2), (None, 1)):
        chains = rules(build_ruleset([Service("d.web", vip, (port,), (A,))]))
        assert len(chains["services"]) == expected
        published = chains["services"][-1]
        assert published[0]["match"] == {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}
        assert published[1]["match"]["right"] == 30080


def test_counters_are_named_per_service_port_and_endpoint_and_carried_over():
    service = Service("d.web", "10.96.0.10", (ServicePort(80, 8080),), (A, B))
    port = service.ports[0]
    svc, ep = service_port_id("d.web", port), endpoint_id("d.web", port, _backend(service, "web-a"))
    counters = objects(build_ruleset([service], carry={svc: (7, 700), ep: (3, 300), "svc-gone": (1, 1)}), "counter")
    assert len(counters) == 3 and "svc-gone" not in counters
    assert (counters[svc]["packets"], counters[svc]["bytes"]) == (7, 700)
    assert (counters[ep]["packets"], counters[ep]["bytes"]) == (3, 300)


def _backend(service, task_id):
    from comp_lb.ruleset import backends

    return next(b for b in backends(service.ports[0], service.endpoints) if b.task_id == task_id)


@pytest.mark.parametrize(
    "service, error",
    [
        (Service("d.web", "10.96.0", (ServicePort(80, 80),)), "service d.web: vip address '10.96.0' is not an IPv4 address"),
        (Service("d.web", "10.96.0.1", (ServicePort(80, 80),), (Endpoint("t1", "fe80::1"),)), "service d.web: endpoint t1 address 'fe80::1'"),
        (Service("d.web", "10.96.0.1", (ServicePort(0, 80),)), "service d.web: port 0: port 0 is not in 1-65535"),
        (Service("d.web", "10.96.0.1", (ServicePort(80, 70000),)), "service d.web: port 80: target 70000 is not in 1-65535"),
        (Service("d.web", "10.96.0.1", (ServicePort(80, 80, published=65536),)), "published 65536"),
        (Service("d.web", "10.96.0.1", (ServicePort(80, 80, "sctp"),)), "protocol 'sctp' is not tcp or udp"),  # type: ignore[arg-type]
        (Service("d.web", "10.96.0.1", (ServicePort(80, 80), ServicePort(80, 81, name="b"))), "service d.web: tcp port 80 is listed twice"),
        (Service("d.web", None, (ServicePort(80, 80, published=30080), ServicePort(81, 81, published=30080))), "service d.web: published tcp port 30080 is also d.web's"),
    ],
)
def test_what_the_kernel_would_refuse_is_refused_first_naming_the_service(service, error):
    with pytest.raises(ValueError, match=_escaped(error)):
        build_ruleset([service])


@pytest.mark.parametrize(
    "other, error",
    [
        (Service("d.api", "10.96.0.1", (ServicePort(80, 80),)), "service d.web: 10.96.0.1 tcp port 80 is also d.api's"),
        (Service("d.api", "10.96.0.2", (ServicePort(81, 80, published=30080),)), "service d.web: published tcp port 30080 is also d.api's"),
    ],
)
def test_two_services_on_one_address_and_port_are_refused(other, error):
    web = Service("d.web", "10.96.0.1", (ServicePort(80, 80, published=30080),))
    with pytest.raises(ValueError, match=_escaped(error)):
        build_ruleset([web, other])
    # the same port on another VIP, or another protocol, is no conflict
    build_ruleset([web, Service("d.api", "10.96.0.2", (ServicePort(80, 80, "udp", published=30080),))])


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


endpoint_st = st.builds(
    Endpoint,
    task_id=st.text("abcdef0123456789", min_size=4, max_size=8),
    address=st.integers(0x0A000001, 0x0A0000FE).map(lambda n: f"10.0.0.{n & 0xFF}"),
    ports=st.fixed_dictionaries({}, optional={"http": st.integers(1, 65535)}),
)
port_st = st.builds(
    ServicePort, port=st.integers(1, 65535), target=st.one_of(st.integers(1, 65535), st.just("http")),
    protocol=st.sampled_from(["tcp", "udp"]), name=st.sampled_from(["", "a", "b"]),
    published=st.one_of(st.none(), st.integers(30000, 32767)),
)
service_st = st.builds(
    Service, key=st.text("abcxyz", min_size=1, max_size=5).map(lambda n: f"default.{n}"),
    vip=st.integers(1, 254).map(lambda n: f"10.96.0.{n}"),
    ports=st.lists(port_st, max_size=3, unique_by=lambda p: (p.protocol, p.port)).map(tuple),
    endpoints=st.lists(endpoint_st, max_size=4).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(service_st, max_size=4, unique_by=(lambda s: s.key, lambda s: s.vip)), st.randoms(use_true_random=False))
def test_the_document_depends_on_the_services_not_on_their_order(services, rnd: random.Random):
    published = [(p.protocol, p.published) for s in services for p in s.ports if p.published]
    assume(len(published) == len(set(published)))  # a published port belongs to one service
    shuffled = [Service(s.key, s.vip, tuple(rnd.sample(s.ports, len(s.ports))), tuple(rnd.sample(s.endpoints, len(s.endpoints)))) for s in services]
    rnd.shuffle(shuffled)
    assert build_ruleset(services) == build_ruleset(shuffled)
    chains = rules(build_ruleset(services))
    # every jump and goto lands on a chain the document defines
    defined = set(objects(build_ruleset(services), "chain"))
    for rule_list in chains.values():
        for expr in rule_list:
            for e in expr:
                for key in ("jump", "goto"):
                    if key in e:
                        assert e[key]["target"] in defined
