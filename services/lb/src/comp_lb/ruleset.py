"""``build_ruleset``: services and their endpoints as one nftables table, in libnftables JSON.

Pure: the same services give the same document, byte for byte, so a sync can tell "nothing
changed" by comparing, and tests are tables.  Applying it is the dataplane's business
(``nft -j -f -``); the document replaces the whole table in one transaction (add the table
so that deleting it cannot fail, delete it, then add it again with everything in it), so
the kernel holds either the old rules or the new ones, never half of each.

The shape is kube-proxy's nftables mode, for IPv4:

* ``services`` (jumped to from the nat ``prerouting`` and ``output`` hooks): per service
  port, ``ip daddr VIP tcp dport PORT goto svc-...``, and for a published port
  ``fib daddr type local tcp dport PUBLISHED goto svc-...`` (the host's own addresses).
* ``svc-...``: counts, then picks an endpoint evenly, ``numgen random mod N`` into a
  verdict map of ``ep-...`` chains (one endpoint: straight there).
* ``ep-...``: counts, marks hairpin traffic (an endpoint reaching itself through the VIP
  must be masqueraded, or its reply would bypass the DNAT), then ``dnat to ADDR:PORT``.
  Other clients keep their source address: nothing else is masqueraded.
* ``no-endpoints`` (jumped to from filter ``input``, ``forward`` and ``output``): a
  service port with no ready endpoint rejects (a TCP reset, an ICMP port unreachable for
  UDP), so a client sees "connection refused" at once rather than a black hole.

Counters are named objects (``svc-...``, ``ep-...``) so that ``nft -j list counters``
reads them per service and per endpoint.  Replacing the table would zero them: the caller
passes the values it read before (``carry``) and they are written back into the new table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Literal

Protocol = Literal["tcp", "udp"]
TABLE = "comp_lb"  # not "comp": a keyword of nft's own syntax (IPComp), which operators type
FAMILY = "ip"
# Set on hairpin packets in their endpoint chain, masqueraded in postrouting (kube-proxy's bit).
MASQUERADE_MARK = 0x4000
# Chains and counters are named by a hash of what they stand for (names are limited in
# length and characters); the readable name goes in a rule comment.
_ID_LENGTH = 12
_COMMENT_LENGTH = 120  # nftables allows 128 bytes


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a service: clients use ``port`` on the VIP (and ``published`` on the
    host's addresses); ``target`` is the endpoint's port, a number or the name of one of
    its ports."""

    port: int
    target: int | str
    protocol: Protocol = "tcp"
    name: str = ""
    published: int | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A ready task of the service: its address and its named ports (name -> port)."""

    task_id: str
    address: str
    ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Service:
    key: str  # namespace.name
    vip: str | None  # None: no virtual IP (dnsrr), only published ports are programmed
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class Backend:
    task_id: str
    address: str
    port: int


def backends(port: ServicePort, endpoints: Iterable[Endpoint]) -> tuple[Backend, ...]:
    """The endpoints that serve ``port``, at their port for it; an endpoint without the
    named target port serves none of it (as Kubernetes does).  Sorted, so the spread does
    not depend on the order endpoints were reported in."""
    out = []
    for endpoint in endpoints:
        target = port.target if isinstance(port.target, int) else endpoint.ports.get(port.target)
        if target is not None:
            out.append(Backend(endpoint.task_id, endpoint.address, target))
    return tuple(sorted(out, key=lambda b: (IPv4Address(b.address), b.port, b.task_id)))


def service_port_id(key: str, port: ServicePort) -> str:
    """The name of a service port's chain and counter: ``svc-`` and a hash."""
    return "svc-" + _hash(f"{key}/{port.protocol}/{port.port}/{port.name}")


def endpoint_id(key: str, port: ServicePort, backend: Backend) -> str:
    """The name of an endpoint's chain and counter, for one service port: ``ep-`` and a hash."""
    return "ep-" + _hash(f"{key}/{port.protocol}/{port.port}/{backend.task_id}/{backend.address}:{backend.port}")


def build_ruleset(
    services: Iterable[Service],
    carry: Mapping[str, tuple[int, int]] | None = None,
    table: str = TABLE,
) -> dict[str, list[dict[str, Any]]]:
    """The whole table for ``services``, as one libnftables JSON document.

    ``carry``: counter name -> (packets, bytes) read from the table being replaced.
    Raises ValueError naming the service and port for an address, port or protocol the
    kernel would refuse, before anything is applied.
    """
    carry = carry or {}
    out = Document(table)
    out.base_chain("prerouting", "nat", "prerouting", -100, [[_jump("services")]])
    out.base_chain("output", "nat", "output", -100, [[_jump("services")]])
    out.base_chain("postrouting", "nat", "postrouting", 100, [[_marked(), {"masquerade": None}]])
    for hook in ("input", "forward", "output"):
        out.base_chain(f"filter-{hook}", "filter", hook, -10, [[_jump("no-endpoints")]])
    dispatch: list[list[dict[str, Any]]] = []
    rejects: list[list[dict[str, Any]]] = []
    # (address or "published", protocol, port) -> the service that has it: two services on
    # one of them would leave one unreachable, whichever rule came first.
    claimed: dict[tuple[str, str, int], str] = {}

    for service in sorted(services, key=lambda s: s.key):
        if service.vip is not None:
            _check(service.key, "vip", service.vip)
        for endpoint in service.endpoints:
            _check(service.key, f"endpoint {endpoint.task_id}", endpoint.address)
        for port in sorted(service.ports, key=lambda p: (p.protocol, p.port, p.name)):
            _check_port(service.key, port)
            if sum(p.protocol == port.protocol and p.port == port.port for p in service.ports) > 1:
                raise ValueError(f"service {service.key}: {port.protocol} port {port.port} is listed twice")
            for where, number in ((service.vip, port.port), ("published", port.published)):
                if where is None or number is None:
                    continue
                holder = claimed.setdefault((where, port.protocol, number), f"{service.key}:{port.port}")
                if holder != f"{service.key}:{port.port}":
                    raise ValueError(
                        f"service {service.key}: {where} {port.protocol} port {number} is also {holder.rsplit(':', 1)[0]}'s"
                    )
            label = _comment(f"{service.key}:{port.name or port.port}/{port.protocol}")
            matches = []
            if service.vip is not None:
                matches.append([_daddr(service.vip), _dport(port.protocol, port.port)])
            if port.published is not None:
                matches.append([_local(), _dport(port.protocol, port.published)])
            serving = backends(port, service.endpoints)
            if not serving:
                for match in matches:
                    rejects.append([*match, _reject(port.protocol)] + [{"comment": label}])
                continue
            chain = service_port_id(service.key, port)
            for match in matches:
                dispatch.append([*match, {"goto": {"target": chain}}] + [{"comment": label}])
            out.counter(chain, carry)
            targets = []
            for backend in serving:
                ep = endpoint_id(service.key, port, backend)
                out.counter(ep, carry)
                out.chain(ep, [
                    [{"counter": ep}],
                    [_saddr(backend.address), _set_mark()],
                    [_l4proto(port.protocol), {"dnat": {"addr": backend.address, "port": backend.port}},
                     {"comment": _comment(f"{label} -> {backend.task_id}")}],
                ])
                targets.append(ep)
            pick: dict[str, Any] = (
                {"goto": {"target": targets[0]}}
                if len(targets) == 1
                else {"vmap": {
                    "key": {"numgen": {"mode": "random", "mod": len(targets), "offset": 0}},
                    "data": {"set": [[i, {"goto": {"target": t}}] for i, t in enumerate(targets)]},
                }}
            )
            out.chain(chain, [[{"counter": chain}, pick]])
    out.chain("services", dispatch)
    out.chain("no-endpoints", rejects)
    return out.document()


class Document:
    """The commands of one transaction that replaces ``table`` whole."""

    def __init__(self, table: str):
        self.table = table
        self._objects: list[dict[str, Any]] = []
        self._rules: list[dict[str, Any]] = []

    def base_chain(self, name: str, kind: str, hook: str, priority: int, rules: list[list[dict[str, Any]]]) -> None:
        self._objects.append({"chain": {
            "family": FAMILY, "table": self.table, "name": name,
            "type": kind, "hook": hook, "prio": priority, "policy": "accept",
        }})
        self._add_rules(name, rules)

    def chain(self, name: str, rules: list[list[dict[str, Any]]]) -> None:
        self._objects.append({"chain": {"family": FAMILY, "table": self.table, "name": name}})
        self._add_rules(name, rules)

    def counter(self, name: str, carry: Mapping[str, tuple[int, int]]) -> None:
        packets, bytes_ = carry.get(name, (0, 0))
        self._objects.append({"counter": {
            "family": FAMILY, "table": self.table, "name": name, "packets": packets, "bytes": bytes_,
        }})

    def _add_rules(self, chain: str, rules: list[list[dict[str, Any]]]) -> None:
        for expr in rules:
            comment = [e["comment"] for e in expr if "comment" in e]
            rule: dict[str, Any] = {
                "family": FAMILY, "table": self.table, "chain": chain,
                "expr": [e for e in expr if "comment" not in e],
            }
            if comment:
                rule["comment"] = comment[0]
            self._rules.append({"rule": rule})

    def document(self) -> dict[str, list[dict[str, Any]]]:
        table = {"table": {"family": FAMILY, "name": self.table}}
        commands = [{"add": table}, {"delete": table}, {"add": table}]
        commands += [{"add": obj} for obj in self._objects]
        commands += [{"add": rule} for rule in self._rules]
        return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}


# ---- expressions --------------------------------------------------------------------------

def _match(left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _daddr(address: str) -> dict[str, Any]:
    return _match({"payload": {"protocol": "ip", "field": "daddr"}}, address)


def _saddr(address: str) -> dict[str, Any]:
    return _match({"payload": {"protocol": "ip", "field": "saddr"}}, address)


def _dport(protocol: Protocol, port: int) -> dict[str, Any]:
    return _match({"payload": {"protocol": protocol, "field": "dport"}}, port)


def _l4proto(protocol: Protocol) -> dict[str, Any]:
    return _match({"meta": {"key": "l4proto"}}, protocol)


def _local() -> dict[str, Any]:
    return _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")


def _marked() -> dict[str, Any]:
    return _match({"&": [{"meta": {"key": "mark"}}, MASQUERADE_MARK]}, MASQUERADE_MARK)


def _set_mark() -> dict[str, Any]:
    return {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, MASQUERADE_MARK]}}}


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def _reject(protocol: Protocol) -> dict[str, Any]:
    # TCP: a reset, which the client sees as "connection refused"; UDP: port unreachable.
    return {"reject": {"type": "tcp reset"}} if protocol == "tcp" else {"reject": None}


def _comment(text: str) -> str:
    return text.encode()[:_COMMENT_LENGTH].decode(errors="ignore")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_ID_LENGTH]


def _check(key: str, what: str, address: str) -> None:
    try:
        IPv4Address(address)
    except ValueError:
        raise ValueError(f"service {key}: {what} address {address!r} is not an IPv4 address") from None


def _check_port(key: str, port: ServicePort) -> None:
    if port.protocol not in ("tcp", "udp"):
        raise ValueError(f"service {key}: port {port.port}: protocol {port.protocol!r} is not tcp or udp")
    for what, number in (("port", port.port), ("published", port.published), ("target", port.target)):
        if isinstance(number, int) and not 1 <= number <= 65535:
            raise ValueError(f"service {key}: port {port.port}: {what} {number} is not in 1-65535")
