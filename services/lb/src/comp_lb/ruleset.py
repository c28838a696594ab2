"""Services and their ready endpoints as one nftables table: what the table holds, and the
nft scripts that put it there, whole or as a change.  Pure: nothing here runs ``nft``
(that is ``comp_lb.nftables``), so the shape is tested as tables of cases.

Why this shape: a chain and a named counter per endpoint (kube-proxy's nftables shape)
took 9 minutes to load 10,000 services x 10 endpoints on a 2-core VM; the kernel's cost
grows with the number of chains and rules, and with counters (each is a per-CPU
allocation).  Here the number of chains and rules is fixed (plus one chain per distinct
endpoint count), every service and endpoint is a set or map element, and a counter
exists only for a service port or endpoint that has had a connection (dynamic sets the
packet path adds to), so a full load is one `nft -f` of plain elements and a change is a
few element deletes and adds.

The table (``ip``, IPv4 only)::

    services        (from nat prerouting and output: a connection's first packet)
        ip daddr . meta l4proto . th dport vmap @svc_group           -> goto svc_nN
        ... @svc_no_endpoints add @svc_counted {...}                 count the attempt
        fib daddr type local meta l4proto . th dport vmap @pub_group -> goto pub_nN
        ... @pub_no_endpoints add @pub_counted {...}
    svc_nN          add @svc_counted { ip daddr . meta l4proto . th dport }
                    dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map @svc_ep_nN
    pub_nN          the same for published ports, keyed by meta l4proto . th dport
    postrouting     ct status dnat: count the endpoint (svc_ep_counted, pub_ep_counted), then
                    masquerade only hairpin traffic (saddr . daddr in @hairpin)
    refuse          (from filter input, forward, output) a port in @svc_no_endpoints or
                    @pub_no_endpoints: TCP reset, or ICMP port unreachable

Services are grouped by their endpoint count N because ``numgen random mod N`` needs a
constant N; a service whose count changes moves between groups, so its counters live in
sets keyed by what they count (service port; service port and endpoint), not in the
group maps, and survive the move.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from comp_common.messages import EndpointPort, ServiceEndpoints

TABLE = "comp_lb"  # not "comp": a keyword of nft's own syntax (IPComp), which operators type

# Sets and maps that always exist: name -> (kind, declaration).
FIXED_SETS: dict[str, tuple[str, str]] = {
    # Counted sets: filled by the packet path (the nat hooks, so one per connection), each
    # element with its counter.  The control plane only removes elements (of service ports
    # and endpoints that went) and writes counters back after a full replacement.
    "svc_counted": ("set", "typeof ip daddr . meta l4proto . th dport; size 1048576; flags dynamic; counter;"),
    "pub_counted": ("set", "typeof meta l4proto . th dport; size 1048576; flags dynamic; counter;"),
    # Keyed by the service port as the client addressed it and the endpoint it went to, so
    # an endpoint shared by two services (or two ports) counts separately for each.
    # ("type", not "typeof": nft 1.0.6 cannot name ct original proto-dst's type.)
    "svc_ep_counted": ("set", "type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service; "
                              "size 1048576; flags dynamic; counter;"),
    "pub_ep_counted": ("set", "type inet_proto . inet_service . ipv4_addr . inet_service; size 1048576; flags dynamic; counter;"),
    # Every service port, to tell this table's DNATs from others' when counting endpoints
    # (a lookup in a counted set would count again).
    "svc_ports": ("set", "typeof ip daddr . meta l4proto . th dport;"),
    "pub_ports": ("set", "typeof meta l4proto . th dport;"),
    "svc_group": ("map", "typeof ip daddr . meta l4proto . th dport : verdict;"),
    "pub_group": ("map", "typeof meta l4proto . th dport : verdict;"),
    "svc_no_endpoints": ("set", "typeof ip daddr . meta l4proto . th dport;"),
    "pub_no_endpoints": ("set", "typeof meta l4proto . th dport;"),
    "hairpin": ("set", "typeof ip saddr . ip daddr;"),
}
COUNTED_SETS = ("svc_counted", "pub_counted", "svc_ep_counted", "pub_ep_counted")
_GROUP_MAP = re.compile(r"^(svc|pub)_ep_n([1-9][0-9]*)$")


def group_map(kind: str, n: int) -> str:
    """The dnat map of the services (``svc``) or published ports (``pub``) with n endpoints."""
    return f"{kind}_ep_n{n}"


def group_chain(kind: str, n: int) -> str:
    return f"{kind}_n{n}"


def group_declaration(kind: str, n: int) -> str:
    key = "ip daddr . meta l4proto . th dport" if kind == "svc" else "meta l4proto . th dport"
    return f"typeof {key} . numgen random mod {n} : ip daddr . th dport;"


def group_rules(kind: str, n: int) -> tuple[str, str]:
    key = "ip daddr . meta l4proto . th dport" if kind == "svc" else "meta l4proto . th dport"
    return f"add @{kind}_counted {{ {key} }}", f"dnat ip to {key} . numgen random mod {n} map @{group_map(kind, n)}"


def parse_group(name: str) -> tuple[str, int] | None:
    match = _GROUP_MAP.match(name)
    return (match.group(1), int(match.group(2))) if match else None


# ---- one service --------------------------------------------------------------------------

def backends(port: EndpointPort, service: ServiceEndpoints) -> tuple[tuple[str, int], ...]:
    """The endpoints that serve ``port`` as (address, their own number for it); an endpoint
    without the port's name serves none of it.  Sorted and without repeats, so the spread
    (slot i of ``numgen mod N``) does not depend on the order endpoints were reported in."""
    name = port.name
    found = {(endpoint.address, endpoint.ports[name]) for endpoint in service.endpoints if name in endpoint.ports}
    return tuple(sorted(found, key=_backend_order))


def _backend_order(backend: tuple[str, int]) -> tuple[bytes, int]:
    return _packed(backend[0]), backend[1]


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """One service's share of the table: elements per set or map (in nft's syntax, as
    ``nft list`` prints them), the addresses and ports it claims (two services on one
    would leave one unreachable), and its local endpoints' addresses (hairpin)."""

    key: str
    elements: Mapping[str, tuple[str, ...]]
    claims: tuple[tuple[str, str, int], ...]  # (VIP or "published", protocol, port)
    local_addresses: frozenset[str] = frozenset()


class RulesetError(ValueError):
    """A service the kernel would refuse or could not serve; nothing was applied.
    ``service`` is its key, so that a caller can set it aside and apply the others."""

    def __init__(self, message: str, service: str | None = None):
        super().__init__(message)
        self.service = service


def compile_service(service: ServiceEndpoints, node_id: str) -> ServiceRules:
    """``service``'s elements.  Raises RulesetError naming the service for an address,
    port or protocol the kernel would refuse, before anything is applied."""
    key = service.key
    vip = service.vip if service.mode == "vip" else None  # dnsrr: clients resolve endpoints
    if vip is not None:
        _check_address(key, "vip", vip)
    for endpoint in service.endpoints:
        _check_address(key, f"endpoint {endpoint.task_id}", endpoint.address)
        for name, number in endpoint.ports.items():
            _check_number(key, f"endpoint {endpoint.task_id} port {name}", number)
    elements: dict[str, list[str]] = {}
    claims: list[tuple[str, str, int]] = []
    seen: dict[tuple[str, str, int], str] = {}
    for port in service.ports:
        proto = port.protocol
        if proto not in ("tcp", "udp"):
            raise RulesetError(f"service {key}: port {port.name}: protocol {proto!r} is not tcp or udp", service=key)
        _check_number(key, f"port {port.name}", port.port)
        if port.published is not None:
            _check_number(key, f"port {port.name}: published", port.published)
        for where, number in ((vip, port.port), ("published", port.published)):
            if where is None or number is None:
                continue
            claim = (where, proto, number)
            if claim in seen:
                raise RulesetError(f"service {key}: {_describe(claim)} is listed twice (ports {seen[claim]} and {port.name})", service=key)
            seen[claim] = port.name
            claims.append(claim)
        targets = [f"{address} . {number}" for address, number in backends(port, service)]
        # The VIP's port ("svc" sets, keyed by VIP . protocol . port) and the published
        # port ("pub" sets, keyed by protocol . port, on any of the host's addresses).
        entries = []
        if vip is not None:
            entries.append(("svc", f"{vip} . {proto} . {port.port}"))
        if port.published is not None:
            entries.append(("pub", f"{proto} . {port.published}"))
        for where, prefix in entries:
            elements.setdefault(f"{where}_ports", []).append(prefix)
            elements.setdefault(f"{where}_counted", []).append(prefix)
            if not targets:
                elements.setdefault(f"{where}_no_endpoints", []).append(prefix)
                continue
            n = len(targets)
            elements.setdefault(f"{where}_group", []).append(f"{prefix} : goto {group_chain(where, n)}")
            elements.setdefault(group_map(where, n), []).extend(
                [f"{prefix} . {slot} : {target}" for slot, target in enumerate(targets)]
            )
            elements.setdefault(f"{where}_ep_counted", []).extend(
                [f"{prefix} . {target}" for target in targets]
            )
    local = frozenset(e.address for e in service.endpoints if e.node_id == node_id)
    return ServiceRules(key, {name: tuple(items) for name, items in elements.items()}, tuple(claims), local)


def _describe(claim: tuple[str, str, int]) -> str:
    where, protocol, number = claim
    return f"{where} {protocol} port {number}"


def _packed(address: str) -> bytes:
    # inet_pton rather than ipaddress: the same strictness (four decimal octets), and
    # 20 times faster, which matters at 100,000 endpoints.
    return socket.inet_pton(socket.AF_INET, address)


def _check_address(key: str, what: str, address: str) -> None:
    try:
        _packed(address)
    except (OSError, TypeError):
        raise RulesetError(f"service {key}: {what} address {address!r} is not an IPv4 address", service=key) from None


def _check_number(key: str, what: str, number: int) -> None:
    if not isinstance(number, int) or not 1 <= number <= 65535:
        raise RulesetError(f"service {key}: {what} {number} is not in 1-65535", service=key)


# ---- the whole table, and changes to it ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Change:
    """Element deletes and adds (set or map name -> elements), in one transaction: new
    groups are created before their elements are added, emptied groups removed after
    their elements are deleted.  ``forget``: counted-set keys of service ports and
    endpoints that went, whose elements (and counters) go if traffic made them."""

    deletes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    adds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    new_groups: tuple[tuple[str, int], ...] = ()
    dead_groups: tuple[tuple[str, int], ...] = ()
    forget: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def elements(self) -> int:
        return sum(len(items) for part in (self.deletes, self.adds, self.forget) for items in part.values())

    def __bool__(self) -> bool:
        return bool(self.deletes or self.adds or self.new_groups or self.dead_groups or self.forget)


@dataclass(frozen=True)
class State:
    """What the table holds for a set of services, kept per service so that a change of
    one service costs that service's elements, not the whole table's."""

    node_id: str
    services: Mapping[str, tuple[ServiceEndpoints, ServiceRules]] = field(default_factory=dict)
    claims: Mapping[tuple[str, str, int], str] = field(default_factory=dict)
    hairpin: Mapping[str, int] = field(default_factory=dict)  # local address -> services using it
    sizes: Mapping[str, int] = field(default_factory=dict)  # group map -> its element count

    @classmethod
    def build(cls, node_id: str, services: Iterable[ServiceEndpoints]) -> State:
        """The state for ``services`` from nothing: ``update`` from an empty state without
        the change (a full load needs none; at 100,000 endpoints it costs a second)."""
        wanted = _by_key(services)
        compiled = {key: (wanted[key], compile_service(wanted[key], node_id)) for key in sorted(wanted)}
        claims: dict[tuple[str, str, int], str] = {}
        hairpin: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for key, (_service, rules) in compiled.items():
            for claim in rules.claims:
                holder = claims.setdefault(claim, key)
                if holder != key:
                    raise RulesetError(f"service {key}: {_describe(claim)} is also {holder}'s", service=key)
            hairpin.update(rules.local_addresses)
            for name, items in rules.elements.items():
                if parse_group(name):
                    sizes[name] += len(items)
        return cls(node_id, compiled, claims, dict(hairpin), dict(sizes))

    def update(self, services: Iterable[ServiceEndpoints]) -> tuple[Change, State]:
        """The change from this state to ``services``, and the state after it.  Raises
        RulesetError, naming the service, for any service it cannot program (and then this
        state is still the one to keep)."""
        wanted = _by_key(services)
        gone = [key for key in self.services if key not in wanted]
        changed: list[tuple[str, ServiceRules | None, ServiceRules]] = []
        for key in sorted(wanted):
            service = wanted[key]
            held = self.services.get(key)
            if held is not None and (held[0] is service or held[0] == service):
                continue
            changed.append((key, held[1] if held else None, compile_service(service, self.node_id)))

        claims = dict(self.claims)
        for key in gone:
            for claim in self.services[key][1].claims:
                claims.pop(claim, None)
        for _key, old, _new in changed:
            for claim in old.claims if old else ():
                claims.pop(claim, None)
        for key, _old, new in changed:
            for claim in new.claims:
                holder = claims.setdefault(claim, key)
                if holder != key:
                    raise RulesetError(f"service {key}: {_describe(claim)} is also {holder}'s", service=key)

        deletes: dict[str, set[str]] = {}
        adds: dict[str, set[str]] = {}
        hairpin = Counter(self.hairpin)
        pairs = [(self.services[key][1], None) for key in gone] + [(old, new) for _k, old, new in changed]
        for old, new in pairs:
            if old is None or new is None:  # added or removed: no need to compare
                into = adds if old is None else deletes
                for name, items in (new or old).elements.items():  # type: ignore[union-attr]
                    into.setdefault(name, set()).update(items)
            else:
                for name in old.elements.keys() | new.elements.keys():
                    was, now = set(old.elements.get(name, ())), set(new.elements.get(name, ()))
                    if was - now:
                        deletes.setdefault(name, set()).update(was - now)
                    if now - was:
                        adds.setdefault(name, set()).update(now - was)
            for address in (old.local_addresses if old else ()):
                hairpin[address] -= 1
                if hairpin[address] == 0:
                    deletes.setdefault("hairpin", set()).add(f"{address} . {address}")
            for address in (new.local_addresses if new else ()):
                hairpin[address] += 1
                if hairpin[address] == 1:
                    adds.setdefault("hairpin", set()).add(f"{address} . {address}")
        # An element one service drops and another takes in the same change (a hairpin
        # address, a VIP port handed over) stays put, with its counter.
        for name in list(deletes):
            both = deletes[name] & adds.get(name, set())
            if both:
                deletes[name] -= both
                adds[name] -= both

        sizes = Counter(self.sizes)
        for name, items in deletes.items():
            if parse_group(name):
                sizes[name] -= len(items)
        for name, items in adds.items():
            if parse_group(name):
                sizes[name] += len(items)
        new_groups = tuple(sorted(
            parse_group(name) for name, size in sizes.items() if size > 0 and not self.sizes.get(name)  # type: ignore[misc]
        ))
        dead_groups = tuple(sorted(
            parse_group(name) for name, size in sizes.items() if size <= 0 and self.sizes.get(name)  # type: ignore[misc]
        ))

        kept = {key: value for key, value in self.services.items() if key in wanted}
        for key, _old, new in changed:
            kept[key] = (wanted[key], new)
        state = State(
            self.node_id, kept, claims,
            {a: c for a, c in hairpin.items() if c > 0},
            {name: c for name, c in sizes.items() if c > 0},
        )
        # The packet path adds counted elements; the control plane only forgets them.
        forget = {name: deletes.pop(name) for name in COUNTED_SETS if name in deletes}
        for name in COUNTED_SETS:
            adds.pop(name, None)
        change = Change(
            {name: tuple(sorted(items)) for name, items in sorted(deletes.items()) if items},
            {name: tuple(sorted(items)) for name, items in sorted(adds.items()) if items},
            new_groups, dead_groups,
            {name: tuple(sorted(items)) for name, items in sorted(forget.items()) if items},
        )
        return change, state

    def elements(self) -> dict[str, frozenset[str]]:
        """Every set and map the control plane fills, with its elements (the fixed ones
        even when empty): all but the counted sets."""
        return {name: frozenset(items) for name, items in self.element_lists().items()}

    def element_lists(self) -> dict[str, list[str]]:
        """``elements`` as lists, cheaper: no two services share an element (their keys
        hold a VIP port or published port, which the claims keep to one service) but for
        hairpin addresses, which come from their own count."""
        out: dict[str, list[str]] = {name: [] for name in FIXED_SETS if name not in COUNTED_SETS}
        for _service, rules in self.services.values():
            for name, items in rules.elements.items():
                if name not in COUNTED_SETS:
                    out.setdefault(name, []).extend(items)
        out["hairpin"] = [f"{a} . {a}" for a in self.hairpin]
        return out

    def counted(self) -> dict[str, frozenset[str]]:
        """The keys each counted set may hold for these services (it holds those that
        have had traffic)."""
        out: dict[str, set[str]] = {name: set() for name in COUNTED_SETS}
        for _service, rules in self.services.values():
            for name in COUNTED_SETS:
                out[name].update(rules.elements.get(name, ()))
        return {name: frozenset(items) for name, items in out.items()}

    def carry(self, counters: Mapping[str, Mapping[str, tuple[int, int]]]) -> dict[str, dict[str, tuple[int, int]]]:
        """Of the counters read from a table about to be replaced, those of service ports
        and endpoints these services still have."""
        keep = self.counted()
        return {name: {k: v for k, v in counters.get(name, {}).items() if k in keep[name]} for name in COUNTED_SETS}

    def owner(self, element: str) -> str | None:
        """The service an element (as nft prints it; a map element by its key alone, as
        a delete names it) belongs to, for error messages."""
        wanted = element.split(" : ")[0]
        for key, (_service, rules) in self.services.items():
            for items in rules.elements.values():
                if any(item.split(" : ")[0] == wanted for item in items):
                    return key
        return None


def _by_key(services: Iterable[ServiceEndpoints]) -> dict[str, ServiceEndpoints]:
    out: dict[str, ServiceEndpoints] = {}
    for service in services:
        if service.key in out:
            raise RulesetError(f"service {service.key}: listed twice", service=service.key)
        out[service.key] = service
    return out


# ---- scripts ------------------------------------------------------------------------------

def _fixed_chains(mark: str) -> list[str]:
    """The chains that do not depend on the services (tab-indented, inside the table)."""
    lines = [
        "\tchain services {",
        "\t\tip daddr . meta l4proto . th dport vmap @svc_group",
        "\t\tip daddr . meta l4proto . th dport @svc_no_endpoints add @svc_counted { ip daddr . meta l4proto . th dport }",
        "\t\tfib daddr type local meta l4proto . th dport vmap @pub_group",
        "\t\tfib daddr type local meta l4proto . th dport @pub_no_endpoints add @pub_counted { meta l4proto . th dport }",
        "\t}",
        # Only connections to this table's service ports: not those other tables DNATed
        # (Docker's published ports).  One counted as a VIP's returns, so that it is not
        # counted again as a published port's.  (nft 1.0.6 needs the protocol spelled out
        # to use ct original proto-dst in a concatenation.)
        "\tchain count_endpoints {",
        *(f"\t\tmeta l4proto {p} ct original ip daddr . meta l4proto . ct original proto-dst @svc_ports"
          " add @svc_ep_counted { ct original ip daddr . meta l4proto . ct original proto-dst . ip daddr . th dport } return"
          for p in ("tcp", "udp")),
        *(f"\t\tmeta l4proto {p} meta l4proto . ct original proto-dst @pub_ports"
          " add @pub_ep_counted { meta l4proto . ct original proto-dst . ip daddr . th dport }"
          for p in ("tcp", "udp")),
        "\t}",
        "\tchain refuse {",
        "\t\tip daddr . meta l4proto . th dport @svc_no_endpoints meta l4proto tcp reject with tcp reset",
        "\t\tip daddr . meta l4proto . th dport @svc_no_endpoints reject with icmp type port-unreachable",
        "\t\tfib daddr type local meta l4proto . th dport @pub_no_endpoints meta l4proto tcp reject with tcp reset",
        "\t\tfib daddr type local meta l4proto . th dport @pub_no_endpoints reject with icmp type port-unreachable",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority -100; policy accept;",
        f'\t\tjump services comment "{mark}"',
        "\t}",
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        f'\t\tjump services comment "{mark}"',
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority 100; policy accept;",
        "\t\tct status dnat jump count_endpoints",
        # An endpoint reaching itself through its VIP: without a new source its reply
        # would go straight back, bypassing the DNAT.  Every other client keeps its address.
        "\t\tct status dnat ip saddr . ip daddr @hairpin masquerade",
        "\t}",
    ]
    # Before Docker's filter chains (priority 0), so a refused port is refused, not dropped.
    # Only a connection's first packet can be refused: every later packet of a forwarded
    # connection passes with one conntrack test instead of four lookups (two of them fib).
    for hook in ("input", "forward", "output"):
        lines += [
            f"\tchain filter_{hook} {{",
            f"\t\ttype filter hook {hook} priority -10; policy accept;",
            "\t\tct state new jump refuse",
            "\t}",
        ]
    return lines


def _stamp() -> str:
    """A mark of the table's skeleton (every declaration and rule that is not an element),
    kept as the comment of the hook rules: a restart that finds the same stamp and the
    same elements has nothing to do; a newer lb with another skeleton replaces the table."""
    skeleton = repr(FIXED_SETS) + "\n".join(_fixed_chains("")) + group_declaration("x", 0) + "".join(group_rules("x", 0))
    return "comp-lb " + hashlib.sha256(skeleton.encode()).hexdigest()[:16]


STAMP = _stamp()


def full_script(
    elements: Mapping[str, Iterable[str]],
    table: str = TABLE,
    counters: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
) -> str:
    """One transaction that replaces ``table`` whole: add it (so that deleting it cannot
    fail), delete it, define it with every element.  The kernel holds the old table or
    the new one, never part of each; a script it refuses changes nothing.

    ``elements``: set or map name -> elements (``State.element_lists``).  ``counters``:
    counted set -> element -> (packets, bytes) to write back (``State.carry`` of what
    was read from the table being replaced), so that a restart does not zero them."""
    counters = counters or {}
    lines = [f"add table ip {table}", f"delete table ip {table}", f"table ip {table} {{"]
    groups = sorted(group for name, items in elements.items() if items for group in [parse_group(name)] if group)
    declared = [(name, *FIXED_SETS[name]) for name in FIXED_SETS]
    declared += [(group_map(*group), "map", group_declaration(*group)) for group in groups]
    for name, kind, declaration in declared:
        lines.append(f"\t{kind} {name} {{")
        lines.extend(f"\t\t{part.strip()};" for part in declaration.rstrip(";").split(";"))
        if name in COUNTED_SETS:
            items = [f"{key} counter packets {p} bytes {b}" for key, (p, b) in sorted(counters.get(name, {}).items())]
        else:
            items = sorted(elements.get(name, ()))
        if items:
            lines.append("\t\telements = {")
            lines.extend(f"\t\t\t{item}," for item in items)
            lines.append("\t\t}")
        lines.append("\t}")
    for group in groups:
        lines += [f"\tchain {group_chain(*group)} {{", *(f"\t\t{rule}" for rule in group_rules(*group)), "\t}"]
    lines += _fixed_chains(STAMP)
    lines.append("}")
    return "\n".join(lines) + "\n"


def change_script(change: Change, table: str = TABLE) -> str:
    """One transaction with ``change``'s element deletes and adds, one command a line (so
    that nft's error, which names a line, names the element)."""
    lines: list[str] = []
    for kind, n in change.new_groups:
        lines.append(f"add map ip {table} {group_map(kind, n)} {{ {group_declaration(kind, n)} }}")
        lines.append(f"add chain ip {table} {group_chain(kind, n)}")
        lines.extend(f"add rule ip {table} {group_chain(kind, n)} {rule}" for rule in group_rules(kind, n))
    for name, items in change.deletes.items():
        # A map element is deleted by its key.
        lines.extend(f"delete element ip {table} {name} {{ {item.split(' : ')[0]} }}" for item in items)
    for name, items in change.forget.items():
        # Whether traffic made the element is unknown, and deleting a missing one fails
        # the transaction (nft 1.0.6 has no "destroy"): adding first makes it exist (a
        # no-op if it did), so the delete always finds it.
        for item in items:
            lines += [f"add element ip {table} {name} {{ {item} }}", f"delete element ip {table} {name} {{ {item} }}"]
    for name, items in change.adds.items():
        lines.extend(f"add element ip {table} {name} {{ {item} }}" for item in items)
    for kind, n in change.dead_groups:
        lines.append(f"flush chain ip {table} {group_chain(kind, n)}")
        lines.append(f"delete chain ip {table} {group_chain(kind, n)}")
        lines.append(f"delete map ip {table} {group_map(kind, n)}")
    return "\n".join(lines) + "\n" if lines else ""


# ---- reading the kernel's table back ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Listing:
    """A table as ``nft -j list table`` gives it: elements per set and map (as nft prints
    them), the hook rules' stamp, and the counted sets' counters."""

    elements: dict[str, frozenset[str]]
    stamp: str | None
    counters: dict[str, dict[str, tuple[int, int]]]


def parse_listing(document: Mapping) -> Listing:
    elements: dict[str, set[str]] = {}
    counters: dict[str, dict[str, tuple[int, int]]] = {}
    found_stamp = None
    for item in document.get("nftables", []):
        body = item.get("set") or item.get("map")
        if body is not None:
            name = body["name"]
            out = elements.setdefault(name, set())
            for element in body.get("elem", []):
                text, counter = _element_text(element)
                out.add(text)
                if counter is not None:
                    counters.setdefault(name, {})[text] = counter
        rule = item.get("rule")
        if rule is not None and rule.get("chain") == "prerouting" and rule.get("comment"):
            found_stamp = rule["comment"]
    return Listing({n: frozenset(e) for n, e in elements.items()}, found_stamp, counters)


def _element_text(element) -> tuple[str, tuple[int, int] | None]:
    counter = None
    if isinstance(element, dict) and "elem" in element:  # an element with a counter
        counter = (element["elem"]["counter"]["packets"], element["elem"]["counter"]["bytes"])
        element = element["elem"]["val"]
    if isinstance(element, list):  # a map element: [key, value]
        return f"{_value_text(element[0])} : {_value_text(element[1])}", counter
    return _value_text(element), counter


def _value_text(value) -> str:
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_value_text(v) for v in value["concat"])
        if "goto" in value:
            return f"goto {value['goto']['target']}"
        if "jump" in value:
            return f"jump {value['jump']['target']}"
    return str(value)


def counter_elements(service: ServiceEndpoints) -> list[tuple[str, str, str, str]]:
    """Where ``service``'s counters are: (port name, target, set, element), target ""
    for the service port itself, else the endpoint's "address:port"."""
    vip = service.vip if service.mode == "vip" else None
    out = []
    for port in service.ports:
        where: list[tuple[str, str, str]] = []  # (counted set for the port, its endpoints', key)
        if vip is not None:
            where.append(("svc_counted", "svc_ep_counted", f"{vip} . {port.protocol} . {port.port}"))
        if port.published is not None:
            where.append(("pub_counted", "pub_ep_counted", f"{port.protocol} . {port.published}"))
        for port_set, endpoint_set, key in where:
            out.append((port.name, "", port_set, key))
            out.extend(
                (port.name, f"{address}:{number}", endpoint_set, f"{key} . {address} . {number}")
                for address, number in backends(port, service)
            )
    return out

