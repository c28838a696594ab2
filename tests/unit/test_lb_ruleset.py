"""The lb's ruleset: services and ready endpoints to the elements of one nftables table,
and the nft scripts that load it whole or change it.

Cases read the table back as elements in nft's own words (what ``nft list table`` prints),
so a case says what an operator would see."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comp_common.messages import Endpoint, EndpointPort, ServiceEndpoints
from comp_lb.ruleset import (
    COUNTED_SETS, FIXED_SETS, STAMP, Change, RulesetError, State, change_script, counter_elements, full_script, parse_listing,
)

NODE = "node-a"


def service(name="web", vip="10.96.0.10", ports=(), endpoints=(), mode="vip", namespace="d") -> ServiceEndpoints:
    return ServiceEndpoints(
        namespace=namespace, name=name, mode=mode, vip=vip if mode == "vip" else None,
        ports=list(ports), endpoints=list(endpoints),
    )


def port(name="http", number=80, protocol="tcp", published=None) -> EndpointPort:
    return EndpointPort(name=name, port=number, protocol=protocol, published=published)


def endpoint(task, address, node="node-b", **ports) -> Endpoint:
    return Endpoint(task_id=task, node_id=node, address=address, ports=ports)


def table(*services: ServiceEndpoints, node: str = NODE) -> dict[str, set[str]]:
    """The table's non-empty sets and maps with their elements; for the counted sets
    (``*_counted``, which traffic fills), the keys the services are counted under."""
    _change, state = State(node).update(services)
    both = {**state.elements(), **state.counted()}
    return {name: set(items) for name, items in both.items() if items}


A = endpoint("web-a", "10.0.0.2", http=8080)
B = endpoint("web-b", "10.0.0.3", http=8081)
NO_HTTP = endpoint("web-c", "10.0.0.4", metrics=9100)
VIP80 = "10.96.0.10 . tcp . 80"


@pytest.mark.parametrize(
    "services, expected",
    [
        pytest.param(
            [service(ports=[port()])],
            {"svc_ports": {VIP80}, "svc_counted": {VIP80}, "svc_no_endpoints": {VIP80}},
            id="zero endpoints: refused, and attempts still counted",
        ),
        pytest.param(
            [service(ports=[port("dns", 53, "udp")])],
            {"svc_ports": {"10.96.0.10 . udp . 53"}, "svc_counted": {"10.96.0.10 . udp . 53"}, "svc_no_endpoints": {"10.96.0.10 . udp . 53"}},
            id="zero endpoints, udp",
        ),
        pytest.param(
            [service(ports=[port()], endpoints=[A])],
            {
                "svc_ports": {VIP80}, "svc_counted": {VIP80}, "svc_group": {f"{VIP80} : goto svc_n1"},
                "svc_ep_n1": {f"{VIP80} . 0 : 10.0.0.2 . 8080"}, "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080"},
            },
            id="one endpoint",
        ),
        pytest.param(
            [service(ports=[port("dns", 53, "udp")], endpoints=[endpoint("a", "10.0.0.2", dns=5353), endpoint("b", "10.0.0.3", dns=5353)])],
            {
                "svc_ports": {"10.96.0.10 . udp . 53"}, "svc_counted": {"10.96.0.10 . udp . 53"}, "svc_group": {"10.96.0.10 . udp . 53 : goto svc_n2"},
                "svc_ep_n2": {"10.96.0.10 . udp . 53 . 0 : 10.0.0.2 . 5353", "10.96.0.10 . udp . 53 . 1 : 10.0.0.3 . 5353"},
                "svc_ep_counted": {"10.96.0.10 . udp . 53 . 10.0.0.2 . 5353", "10.96.0.10 . udp . 53 . 10.0.0.3 . 5353"},
            },
            id="udp, two endpoints",
        ),
        pytest.param(
            # a named target port: each endpoint's own number; one without the name serves none of it
            [service(ports=[port()], endpoints=[B, NO_HTTP, A])],
            {
                "svc_ports": {VIP80}, "svc_counted": {VIP80}, "svc_group": {f"{VIP80} : goto svc_n2"},
                "svc_ep_n2": {f"{VIP80} . 0 : 10.0.0.2 . 8080", f"{VIP80} . 1 : 10.0.0.3 . 8081"},
                "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080", f"{VIP80} . 10.0.0.3 . 8081"},
            },
            id="named target port",
        ),
        pytest.param(
            [service(ports=[port()], endpoints=[NO_HTTP])],
            {"svc_ports": {VIP80}, "svc_counted": {VIP80}, "svc_no_endpoints": {VIP80}},
            id="only endpoints without the port's name: as good as none",
        ),
        pytest.param(
            [service(ports=[port(published=30080)], endpoints=[A])],
            {
                "svc_ports": {VIP80}, "svc_counted": {VIP80}, "svc_group": {f"{VIP80} : goto svc_n1"},
                "svc_ep_n1": {f"{VIP80} . 0 : 10.0.0.2 . 8080"}, "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080"},
                "pub_ports": {"tcp . 30080"}, "pub_counted": {"tcp . 30080"}, "pub_group": {"tcp . 30080 : goto pub_n1"},
                "pub_ep_n1": {"tcp . 30080 . 0 : 10.0.0.2 . 8080"}, "pub_ep_counted": {"tcp . 30080 . 10.0.0.2 . 8080"},
            },
            id="published port: the host's addresses to the same endpoints",
        ),
        pytest.param(
            [service(ports=[port(published=30080)], mode="dnsrr")],
            {"pub_ports": {"tcp . 30080"}, "pub_counted": {"tcp . 30080"}, "pub_no_endpoints": {"tcp . 30080"}},
            id="dnsrr: no VIP rules; a published port with no endpoint is refused",
        ),
        pytest.param(
            [service(ports=[port()], endpoints=[endpoint("web-a", "10.0.0.2", node=NODE, http=8080), B])],
            {
                "svc_ports": {VIP80}, "svc_counted": {VIP80}, "svc_group": {f"{VIP80} : goto svc_n2"},
                "svc_ep_n2": {f"{VIP80} . 0 : 10.0.0.2 . 8080", f"{VIP80} . 1 : 10.0.0.3 . 8081"},
                "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080", f"{VIP80} . 10.0.0.3 . 8081"},
                "hairpin": {"10.0.0.2 . 10.0.0.2"},
            },
            id="hairpin: only the endpoint on this host",
        ),
        pytest.param(
            [
                service("web", ports=[port()], endpoints=[A]),
                service("api", "10.96.0.11", ports=[port()], endpoints=[A, B]),
            ],
            {
                "svc_ports": {VIP80, "10.96.0.11 . tcp . 80"}, "svc_counted": {VIP80, "10.96.0.11 . tcp . 80"},
                "svc_group": {f"{VIP80} : goto svc_n1", "10.96.0.11 . tcp . 80 : goto svc_n2"},
                "svc_ep_n1": {f"{VIP80} . 0 : 10.0.0.2 . 8080"},
                "svc_ep_n2": {"10.96.0.11 . tcp . 80 . 0 : 10.0.0.2 . 8080", "10.96.0.11 . tcp . 80 . 1 : 10.0.0.3 . 8081"},
                # one endpoint in two services counts separately for each
                "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080", "10.96.0.11 . tcp . 80 . 10.0.0.2 . 8080", "10.96.0.11 . tcp . 80 . 10.0.0.3 . 8081"},
            },
            id="services grouped by endpoint count",
        ),
    ],
)
def test_services_to_elements(services, expected):
    assert table(*services) == expected


def test_the_full_script_replaces_the_table_whole_and_hooks_the_chains():
    script = full_script(State(NODE).update([service(ports=[port(published=30080)], endpoints=[A, B])])[1].elements())
    lines = script.splitlines()
    assert lines[:3] == ["add table ip comp_lb", "delete table ip comp_lb", "table ip comp_lb {"], "add (so delete cannot fail), delete, define"
    hooks = re.findall(r"chain (\w+) \{\n\t\ttype (\w+) hook (\w+) priority (-?\d+)", script)
    assert sorted(hooks) == sorted([
        ("prerouting", "nat", "prerouting", "-100"), ("output", "nat", "output", "-100"),
        ("postrouting", "nat", "postrouting", "100"), ("filter_input", "filter", "input", "-10"),
        ("filter_forward", "filter", "forward", "-10"), ("filter_output", "filter", "output", "-10"),
    ])
    # one chain per distinct endpoint count, each counting the port, then one dnat through its map
    assert ("\tchain svc_n2 {\n\t\tadd @svc_counted { ip daddr . meta l4proto . th dport }\n"
            "\t\tdnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @svc_ep_n2\n") in script
    assert ("\tchain pub_n2 {\n\t\tadd @pub_counted { meta l4proto . th dport }\n"
            "\t\tdnat ip to meta l4proto . th dport . numgen random mod 2 map @pub_ep_n2\n") in script
    # counted sets are filled by traffic, not loaded: a full load has no counter to allocate
    assert "\t\tflags dynamic;\n\t\tcounter;\n\t}" in script and " counter packets" not in script
    assert script.count("\tchain ") == 11  # 9 fixed + 2 groups, whatever the number of services
    # the hairpin masquerade is the only masquerade, and only for DNATed traffic
    assert [line.strip() for line in lines if "masquerade" in line] == ["ct status dnat ip saddr . ip daddr @hairpin masquerade"]
    assert script.count(f'jump services comment "{STAMP}"') == 2
    assert "@svc_no_endpoints meta l4proto tcp reject with tcp reset" in script
    assert "@svc_no_endpoints reject with icmp type port-unreachable" in script


def test_counters_read_before_a_replacement_are_written_back_for_what_is_still_there():
    state = State(NODE).update([service(ports=[port()], endpoints=[A])])[1]
    carried = state.carry({
        "svc_counted": {VIP80: (7, 700), "10.96.9.9 . tcp . 80": (1, 1)},  # a service port gone
        "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080": (3, 300), f"{VIP80} . 10.0.0.9 . 8080": (2, 2)},
    })
    assert carried == {
        "svc_counted": {VIP80: (7, 700)}, "svc_ep_counted": {f"{VIP80} . 10.0.0.2 . 8080": (3, 300)},
        "pub_counted": {}, "pub_ep_counted": {},
    }
    script = full_script(state.element_lists(), "t1", carried)
    assert f"\t\t\t{VIP80} counter packets 7 bytes 700," in script
    assert f"\t\t\t{VIP80} . 10.0.0.2 . 8080 counter packets 3 bytes 300," in script
    assert "10.96.9.9" not in script and "10.0.0.9" not in script
    assert script.startswith("add table ip t1\ndelete table ip t1\n")


def test_a_new_endpoint_count_creates_its_group_first_and_an_emptied_one_goes_last():
    state = State(NODE).update([service(ports=[port()], endpoints=[A, B])])[1]
    change, after = state.update([service(ports=[port()], endpoints=[A])])
    assert change.new_groups == (("svc", 1),) and change.dead_groups == (("svc", 2),)
    assert change.deletes == {
        "svc_ep_n2": (f"{VIP80} . 0 : 10.0.0.2 . 8080", f"{VIP80} . 1 : 10.0.0.3 . 8081"),
        "svc_group": (f"{VIP80} : goto svc_n2",),
    }
    assert change.adds == {"svc_ep_n1": (f"{VIP80} . 0 : 10.0.0.2 . 8080",), "svc_group": (f"{VIP80} : goto svc_n1",)}
    assert change.forget == {"svc_ep_counted": (f"{VIP80} . 10.0.0.3 . 8081",)}, "the endpoint that went"
    lines = change_script(change, "t1").splitlines()
    assert lines[:4] == [
        "add map ip t1 svc_ep_n1 { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; }",
        "add chain ip t1 svc_n1",
        "add rule ip t1 svc_n1 add @svc_counted { ip daddr . meta l4proto . th dport }",
        "add rule ip t1 svc_n1 dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @svc_ep_n1",
    ]
    # forgetting a counted element that traffic may or may not have made: add, then delete
    forgotten = f"svc_ep_counted {{ {VIP80} . 10.0.0.3 . 8081 }}"
    assert lines.index(f"add element ip t1 {forgotten}") + 1 == lines.index(f"delete element ip t1 {forgotten}")
    assert f"delete element ip t1 svc_group {{ {VIP80} }}" in lines, "a map element is deleted by its key"
    assert lines.index(f"delete element ip t1 svc_group {{ {VIP80} }}") < lines.index(f"add element ip t1 svc_group {{ {VIP80} : goto svc_n1 }}")
    assert lines[-3:] == ["flush chain ip t1 svc_n2", "delete chain ip t1 svc_n2", "delete map ip t1 svc_ep_n2"]
    # the service port's counter is not touched: it survives the move between groups
    assert "svc_counted" not in change.deletes and "svc_counted" not in change.adds
    assert after.update([service(ports=[port()], endpoints=[A])])[0] == Change()


def test_an_unchanged_service_costs_nothing_and_a_shared_hairpin_address_stays_until_its_last_user_goes():
    local = endpoint("web-a", "10.0.0.2", node=NODE, http=8080)
    web, api = service("web", ports=[port()], endpoints=[local]), service("api", "10.96.0.11", ports=[port()], endpoints=[local])
    state = State(NODE).update([web, api])[1]
    assert state.update([web, api])[0] == Change()
    assert state.update([web.model_copy(deep=True), api])[0] == Change(), "an equal copy is no change"
    change, state = state.update([web])
    assert "hairpin" not in change.deletes, "api went, web still needs the hairpin address"
    change, state = state.update([])
    assert change.deletes["hairpin"] == ("10.0.0.2 . 10.0.0.2",)


@pytest.mark.parametrize(
    "bad, error",
    [
        (service(vip="10.96.0", ports=[port()]), "service d.web: vip address '10.96.0' is not an IPv4 address"),
        (service(vip="fd00::1", ports=[port()]), "service d.web: vip address 'fd00::1' is not an IPv4 address"),
        (service(ports=[port()], endpoints=[endpoint("t1", "fe80::1", http=80)]), "service d.web: endpoint t1 address 'fe80::1' is not an IPv4 address"),
        (service(ports=[port(number=0)]), "service d.web: port http 0 is not in 1-65535"),
        (service(ports=[port(number=70000)]), "service d.web: port http 70000 is not in 1-65535"),
        (service(ports=[port(published=65536)]), "service d.web: port http: published 65536 is not in 1-65535"),
        (service(ports=[port()], endpoints=[endpoint("t1", "10.0.0.2", http=0)]), "service d.web: endpoint t1 port http 0 is not in 1-65535"),
        (service(ports=[port("a"), port("b")]), "service d.web: 10.96.0.10 tcp port 80 is listed twice (ports a and b)"),
        (service(mode="dnsrr", ports=[port("a", 80, published=30080), port("b", 81, published=30080)]),
         "service d.web: published tcp port 30080 is listed twice (ports a and b)"),
    ],
)
def test_what_the_kernel_would_refuse_is_refused_first_naming_the_service(bad, error):
    with pytest.raises(RulesetError, match=re.escape(error)):
        State(NODE).update([bad])


def test_a_protocol_other_than_tcp_or_udp_is_refused():
    bad = service(ports=[EndpointPort.model_construct(name="x", port=80, protocol="sctp", published=None, named=False)])
    with pytest.raises(RulesetError, match=re.escape("service d.web: port x: protocol 'sctp' is not tcp or udp")):
        State(NODE).update([bad])


@pytest.mark.parametrize(
    "other, error",
    [
        (service("api", "10.96.0.10", ports=[port()]), "service d.web: 10.96.0.10 tcp port 80 is also d.api's"),
        (service("api", "10.96.0.11", ports=[port(number=81, published=30080)]), "service d.web: published tcp port 30080 is also d.api's"),
    ],
)
def test_two_services_on_one_address_or_published_port_are_refused_and_the_state_is_kept(other, error):
    web = service("web", ports=[port(published=30080)], endpoints=[A])
    with pytest.raises(RulesetError, match=re.escape(error)):
        State(NODE).update([web, other])
    with pytest.raises(RulesetError, match=re.escape(error)):
        State.build(NODE, [other, web])
    # refused as a change too: the state held before it is still whole
    before = State(NODE).update([other])[1]
    with pytest.raises(RulesetError, match="is also d.api's"):
        before.update([web, other])
    assert set(before.services) == {"d.api"}
    # the same port on another VIP, or another protocol, is no conflict
    State(NODE).update([web, service("api", "10.96.0.11", ports=[port(protocol="udp", published=30080)])])


def test_a_service_listed_twice_is_refused():
    with pytest.raises(RulesetError, match="service d.web: listed twice"):
        State(NODE).update([service(ports=[port()]), service(ports=[port()])])


def test_counter_elements_name_the_sets_a_service_is_counted_in():
    web = service(ports=[port(published=30080)], endpoints=[A, NO_HTTP])
    assert counter_elements(web) == [
        ("http", "", "svc_counted", VIP80),
        ("http", "10.0.0.2:8080", "svc_ep_counted", f"{VIP80} . 10.0.0.2 . 8080"),
        ("http", "", "pub_counted", "tcp . 30080"),
        ("http", "10.0.0.2:8080", "pub_ep_counted", "tcp . 30080 . 10.0.0.2 . 8080"),
    ]


def test_a_kernel_listing_reads_back_as_the_same_elements_with_counters():
    # The shapes nft -j list table prints (nftables 1.0.6): sets with counters, maps, verdict maps.
    listing = {"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "comp_lb", "handle": 1}},
        {"set": {"family": "ip", "name": "svc_counted", "table": "comp_lb", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                 "elem": [{"elem": {"val": {"concat": ["10.96.0.10", "tcp", 80]}, "counter": {"packets": 4, "bytes": 240}}}],
                 "stmt": [{"counter": None}]}},
        {"set": {"family": "ip", "name": "svc_ports", "table": "comp_lb", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                 "elem": [{"concat": ["10.96.0.10", "tcp", 80]}]}},
        {"set": {"family": "ip", "name": "hairpin", "table": "comp_lb", "type": ["ipv4_addr", "ipv4_addr"],
                 "elem": [{"concat": ["10.0.0.2", "10.0.0.2"]}]}},
        {"map": {"family": "ip", "name": "svc_group", "table": "comp_lb", "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict",
                 "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc_n1"}}]]}},
        {"map": {"family": "ip", "name": "svc_ep_n1", "table": "comp_lb", "map": "ipv4_addr . inet_service",
                 "elem": [[{"concat": ["10.96.0.10", "tcp", 80, 0]}, {"concat": ["10.0.0.2", 8080]}]]}},
        {"set": {"family": "ip", "name": "svc_no_endpoints", "table": "comp_lb"}},
        {"rule": {"family": "ip", "table": "comp_lb", "chain": "prerouting", "handle": 24, "comment": STAMP, "expr": [{"jump": {"target": "services"}}]}},
    ]}
    read = parse_listing(listing)
    assert read.stamp == STAMP
    assert read.elements == {
        "svc_counted": frozenset({VIP80}), "svc_ports": frozenset({VIP80}), "hairpin": frozenset({"10.0.0.2 . 10.0.0.2"}),
        "svc_group": frozenset({f"{VIP80} : goto svc_n1"}), "svc_ep_n1": frozenset({f"{VIP80} . 0 : 10.0.0.2 . 8080"}),
        "svc_no_endpoints": frozenset(),
    }
    assert read.counters == {"svc_counted": {VIP80: (4, 240)}}
    state = State(NODE).update([service(ports=[port()], endpoints=[endpoint("web-a", "10.0.0.2", node=NODE, http=8080)])])[1]
    programmed = {n: e for n, e in read.elements.items() if e and not n.endswith("_counted")}
    assert {n: e for n, e in state.elements().items() if e} == programmed


# ---- properties -----------------------------------------------------------------------------

octet = st.integers(2, 30)
endpoint_st = st.builds(
    Endpoint,
    task_id=st.text("abcdef0123456789", min_size=4, max_size=6),
    node_id=st.sampled_from([NODE, "node-b"]),
    address=octet.map(lambda n: f"10.0.0.{n}"),
    ports=st.fixed_dictionaries({}, optional={"http": st.integers(8080, 8082), "tcp-53": st.just(53)}),
)
port_st = st.one_of(
    st.builds(EndpointPort, name=st.just("http"), port=st.sampled_from([80, 8080]), protocol=st.just("tcp"),
              published=st.one_of(st.none(), st.integers(30000, 30003))),
    st.builds(EndpointPort, name=st.just("tcp-53"), port=st.just(53), protocol=st.sampled_from(["tcp", "udp"]),
              published=st.one_of(st.none(), st.integers(30000, 30003))),
)


@st.composite
def services_st(draw) -> list[ServiceEndpoints]:
    names = draw(st.lists(st.sampled_from("abcdef"), max_size=5, unique=True))
    out, published = [], set()
    for index, name in enumerate(names):
        ports = []
        for p in draw(st.lists(port_st, max_size=2, unique_by=lambda p: p.name)):
            if p.published is not None and (p.protocol, p.published) in published:
                p = p.model_copy(update={"published": None})  # a published port belongs to one service
            if p.published is not None:
                published.add((p.protocol, p.published))
            if all((q.protocol, q.port) != (p.protocol, p.port) for q in ports):
                ports.append(p)
        out.append(ServiceEndpoints(
            namespace="d", name=name, mode=draw(st.sampled_from(["vip", "vip", "dnsrr"])),
            vip=f"10.96.0.{index + 1}", ports=ports, endpoints=draw(st.lists(endpoint_st, max_size=5)),
        ))
    return out


def shuffled(services: list[ServiceEndpoints], rnd: random.Random) -> list[ServiceEndpoints]:
    out = [
        s.model_copy(update={"ports": rnd.sample(s.ports, len(s.ports)), "endpoints": rnd.sample(s.endpoints, len(s.endpoints))})
        for s in services
    ]
    rnd.shuffle(out)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services_st(), st.randoms(use_true_random=False))
def test_the_script_depends_on_the_services_not_on_their_order(services, rnd):
    first = full_script(State(NODE).update(services)[1].elements())
    assert full_script(State(NODE).update(shuffled(services, rnd))[1].elements()) == first


def apply(elements: dict[str, frozenset[str]], change: Change) -> dict[str, frozenset[str]]:
    assert not set(change.adds) & set(COUNTED_SETS) and not set(change.deletes) & set(COUNTED_SETS), "traffic fills those"
    """What the kernel does with a change script, strictly: a delete must find its element
    (by key, for a map), an add must not find its key, a new group's map is new and a dead
    one's is empty when it goes."""
    out = {name: set(items) for name, items in elements.items()}
    for kind, n in change.new_groups:
        assert f"{kind}_ep_n{n}" not in out
        out[f"{kind}_ep_n{n}"] = set()
    for name, items in change.deletes.items():
        for item in items:
            key = item.split(" : ")[0]
            found = [e for e in out[name] if e.split(" : ")[0] == key]
            assert found == [item], f"delete {name} {item}: the kernel holds {found}"
            out[name].discard(item)
    for name, items in change.adds.items():
        for item in items:
            key = item.split(" : ")[0]
            assert not [e for e in out.setdefault(name, set()) if e.split(" : ")[0] == key], f"add {name} {item}: already there"
            out[name].add(item)
    for kind, n in change.dead_groups:
        assert out.pop(f"{kind}_ep_n{n}") == set()
    return {name: frozenset(items) for name, items in out.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(services_st(), services_st(), st.randoms(use_true_random=False))
def test_a_change_turns_state_a_into_exactly_state_b(a, b, rnd):
    _change, state_a = State(NODE).update(a)
    change, state_b = state_a.update(shuffled(b, rnd))
    from_scratch = State(NODE).update(b)[1].elements()
    assert apply(state_a.elements(), change) == from_scratch
    assert state_b.elements() == from_scratch
    # counters go with the service ports and endpoints that went, and only with them
    counted_a, counted_b = state_a.counted(), State(NODE).update(b)[1].counted()
    assert {n: set(change.forget.get(n, ())) for n in COUNTED_SETS} == {n: counted_a[n] - counted_b[n] for n in COUNTED_SETS}
    # and the state after it diffs further as if built from scratch
    assert state_b.update([])[0] == State(NODE).update(b)[1].update([])[0]
    built = State.build(NODE, b)  # the full load's way, without a change
    assert (built.elements(), built.claims, built.hairpin, built.sizes) == (from_scratch, state_b.claims, state_b.hairpin, state_b.sizes)
    assert {n: sorted(e) for n, e in built.element_lists().items()} == {n: sorted(e) for n, e in from_scratch.items()}, "no repeats"
    assert set(from_scratch) >= set(FIXED_SETS) - set(COUNTED_SETS)
