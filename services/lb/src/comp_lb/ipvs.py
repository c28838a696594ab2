"""The IPVS dataplane (pyroute2), for kernels with ip_vs: one virtual service per VIP,
protocol and port, its ready endpoints as real servers (masquerading, scheduler "rr").

What IPVS cannot do alone, a small nftables table (``table``) does, as kube-proxy's IPVS
mode does with iptables: a published port on any of the host's addresses is a firewall
mark (``fib daddr type local``) and a fwmark virtual service; an endpoint reaching itself
through its VIP is masqueraded (hairpin; needs ``net.ipv4.vs.conntrack=1``).  The VIPs
are bound to a dummy interface (``comp-ipvs0``, kept down so it answers no ARP) so that
traffic for them reaches IPVS's LOCAL_IN hook.  A port with no endpoint keeps its virtual
service with no real server: IPVS answers ICMP port unreachable ("connection refused").

IPVS has no transactions: a sync compares what the kernel holds (a dump) with what is
wanted and applies the difference service by service; if one step fails the error says
which, and the next sync, which starts again from a dump, finishes the job.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from comp_common.messages import EndpointCounter, ServiceEndpoints

from comp_lb.dataplane import DataplaneError, SyncReport
from comp_lb.ruleset import TABLE, State, backends

SCHEDULER = "rr"
INTERFACE = "comp-ipvs0"
# Published ports are firewall marks in this range: base | 0x10000 for udp | port.  Well
# away from the bits kube-proxy (0x4000, 0x8000) and Docker use.
MARK_BASE = 0x0C000000
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_MASQUERADE = 0  # IP_VS_CONN_F_MASQ; pyroute2's IPVSDest defaults to 3, direct routing


def published_mark(protocol: str, port: int) -> int:
    return MARK_BASE | (0x10000 if protocol == "udp" else 0) | port


# A virtual service: ("vip", protocol, address, port) or ("mark", protocol, mark, 0).
VirtualKey = tuple[str, str, str | int, int]


@dataclass(frozen=True, slots=True)
class IpvsPlan:
    """What the kernel should hold for a list of services."""

    virtual: Mapping[VirtualKey, frozenset[tuple[str, int]]]  # -> real servers (address, port)
    vips: frozenset[str]  # bound to the dummy interface
    marks: Mapping[tuple[str, int], int]  # (protocol, published port) -> firewall mark
    hairpin: frozenset[str]  # local endpoint addresses
    owners: Mapping[VirtualKey, tuple[str, str]]  # -> (service key, port name), for counters

    def nft_script(self, table: str) -> str:
        """The table that marks published ports and masquerades hairpin traffic, replaced
        whole (it is small: one element per published port and local endpoint)."""
        marks = ", ".join(f"{p} . {n} : {m:#x}" for (p, n), m in sorted(self.marks.items()))
        hairpin = ", ".join(f"{a} . {a}" for a in sorted(self.hairpin))
        return "\n".join([
            f"add table ip {table}",
            f"delete table ip {table}",
            f"table ip {table} {{",
            "\tmap published {",
            "\t\ttypeof meta l4proto . th dport : meta mark;",
            *([f"\t\telements = {{ {marks} }}"] if marks else []),
            "\t}",
            "\tset hairpin {",
            "\t\ttypeof ip saddr . ip daddr;",
            *([f"\t\telements = {{ {hairpin} }}"] if hairpin else []),
            "\t}",
            "\tchain prerouting {",
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
            "\t\tfib daddr type local meta mark set meta l4proto . th dport map @published",
            "\t}",
            "\tchain output {",
            "\t\ttype route hook output priority mangle; policy accept;",
            "\t\tfib daddr type local meta mark set meta l4proto . th dport map @published",
            "\t}",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            "\t\tip saddr . ip daddr @hairpin masquerade",
            "\t}",
            "}",
        ]) + "\n"


def plan(services: Sequence[ServiceEndpoints], node_id: str) -> IpvsPlan:
    """Raises ``RulesetError`` naming the service, with the nftables dataplane's checks."""
    State.build(node_id, services)  # the same refusals as nftables, before anything is applied
    virtual: dict[VirtualKey, frozenset[tuple[str, int]]] = {}
    owners: dict[VirtualKey, tuple[str, str]] = {}
    marks: dict[tuple[str, int], int] = {}
    vips: set[str] = set()
    hairpin: set[str] = set()
    for service in services:
        vip = service.vip if service.mode == "vip" else None
        for port in service.ports:
            serving = frozenset(backends(port, service))
            if vip is not None:
                key: VirtualKey = ("vip", port.protocol, vip, port.port)
                virtual[key], owners[key] = serving, (service.key, port.name)
                vips.add(vip)
            if port.published is not None:
                mark = published_mark(port.protocol, port.published)
                key = ("mark", port.protocol, mark, 0)
                virtual[key], owners[key] = serving, (service.key, port.name)
                marks[(port.protocol, port.published)] = mark
        hairpin.update(e.address for e in service.endpoints if e.node_id == node_id)
    return IpvsPlan(virtual, frozenset(vips), marks, frozenset(hairpin), owners)


class IpvsDataplane:
    name = "ipvs"

    def __init__(self, node_id: str, table: str = TABLE, *, interface: str = INTERFACE, scheduler: str = SCHEDULER):
        self.node_id = node_id
        self.table = table
        self.interface = interface
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._plan: IpvsPlan | None = None
        self._nft_applied: str | None = None

    def unavailable(self) -> str | None:
        if not os.path.exists("/proc/net/ip_vs"):
            modprobe = shutil.which("modprobe")
            if modprobe is None:
                return "the kernel has no ip_vs module (/proc/net/ip_vs is absent) and there is no modprobe to load it"
            loaded = subprocess.run([modprobe, "ip_vs"], capture_output=True, text=True)
            if loaded.returncode != 0 or not os.path.exists("/proc/net/ip_vs"):
                return f"the kernel has no ip_vs module: modprobe ip_vs: {loaded.stderr.strip() or 'no /proc/net/ip_vs after it'}"
        if shutil.which("nft") is None:
            return "no nft binary (published ports and hairpin need it): apt-get install nftables"
        return None

    # ---- sync -----------------------------------------------------------------------------

    def sync(self, services: Sequence[ServiceEndpoints]) -> SyncReport:
        from pyroute2 import IPVS, IPRoute  # imported here: only hosts with ip_vs need it

        with self._lock:
            start = time.perf_counter()
            wanted = plan(services, self.node_id)
            first = self._plan is None
            changed = 0
            try:
                with IPVS() as ipvs, IPRoute() as ipr:
                    # Dumped before the VIPs change: a service is known as this
                    # dataplane's by its VIP being bound to the interface.
                    held = self._dump(ipvs, ipr)
                    changed += self._bind(ipr, wanted.vips)
                    if first:
                        _set_sysctl("net/ipv4/vs/conntrack", "1")
                    script = wanted.nft_script(self.table)
                    if script != self._nft_applied:
                        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=60)
                        if done.returncode != 0:
                            raise DataplaneError(f"nft refused table ip {self.table}: {done.stderr.strip()}")
                        self._nft_applied = script
                        changed += 1
                    changed += self._sync_services(ipvs, wanted, held)
                    changed += self._unbind(ipr, wanted.vips)
            except DataplaneError:
                self._plan, self._nft_applied = None, None
                raise
            except Exception as error:  # pyroute2's NetlinkError and OSError: say what failed
                self._plan, self._nft_applied = None, None
                raise DataplaneError(f"ipvs sync: {error}") from error
            self._plan = wanted
            mode = "unchanged" if not changed else ("full" if first else "incremental")
            return SyncReport(mode, changed, changed, time.perf_counter() - start)

    def _interface(self, ipr, create: bool) -> int | None:
        found = ipr.link_lookup(ifname=self.interface)
        if not found and create:
            ipr.link("add", ifname=self.interface, kind="dummy")
            found = ipr.link_lookup(ifname=self.interface)
        return found[0] if found else None

    def _bound(self, ipr) -> set[str]:
        index = self._interface(ipr, create=False)
        if index is None:
            return set()
        return {msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr(index=index, family=socket.AF_INET)}

    def _bind(self, ipr, vips: frozenset[str]) -> int:
        missing = sorted(vips - self._bound(ipr))
        if missing:
            index = self._interface(ipr, create=True)
            for vip in missing:
                ipr.addr("add", index=index, address=vip, mask=32)
        return len(missing)

    def _unbind(self, ipr, vips: frozenset[str]) -> int:
        stale = sorted(self._bound(ipr) - vips)
        index = self._interface(ipr, create=False)
        for vip in stale:
            ipr.addr("del", index=index, address=vip, mask=32)
        return len(stale)

    def _sync_services(self, ipvs, wanted: IpvsPlan, held: Mapping[VirtualKey, frozenset[tuple[str, int]]]) -> int:
        changed = 0
        for key in sorted(held.keys() - wanted.virtual.keys(), key=str):
            ipvs.service("del", service=_service(key, self.scheduler))
            changed += 1
        for key, servers in sorted(wanted.virtual.items(), key=lambda kv: str(kv[0])):
            service = _service(key, self.scheduler)
            try:
                if key not in held:
                    ipvs.service("add", service=service)
                    changed += 1
                current = held.get(key, frozenset())
                for address, port in sorted(current - servers):
                    ipvs.dest("del", service=service, dest=_dest(address, port))
                for address, port in sorted(servers - current):
                    ipvs.dest("add", service=service, dest=_dest(address, port))
                changed += len(current ^ servers)
            except Exception as error:
                owner = wanted.owners.get(key, ("?", "?"))
                raise DataplaneError(f"ipvs: service {owner[0]} port {owner[1]} ({_describe(key)}): {error}") from error
        return changed

    def _dump(self, ipvs, ipr) -> dict[VirtualKey, frozenset[tuple[str, int]]]:
        """The virtual services this dataplane owns (a VIP bound to its interface, or a
        mark in its range) with their real servers; others' are left alone."""
        from pyroute2 import IPVSDest, IPVSService

        bound = self._bound(ipr)
        out: dict[VirtualKey, frozenset[tuple[str, int]]] = {}
        for message in ipvs.service("dump"):
            key = _key(IPVSService.from_message(message))
            if key is None or (key[0] == "vip" and key[2] not in bound):
                continue
            out[key] = frozenset(
                (dest["addr"], dest["port"])
                for dest in map(IPVSDest.from_message, ipvs.dest("dump", service=_service(key, self.scheduler)))
            )
        return out

    # ---- counters and cleanup ------------------------------------------------------------

    def counters(self, namespace: str, name: str) -> list[EndpointCounter]:
        """IPVS counts connections and inbound packets and bytes: ``packets`` here is
        connections, as in the nftables dataplane (which counts first packets)."""
        from pyroute2 import IPVS, IPVSDest, IPVSService

        current = self._plan
        if current is None:
            return []
        key_of = f"{namespace}.{name}"
        totals: dict[tuple[str, str], list[int]] = {}
        with IPVS() as ipvs:
            for message in ipvs.service("dump"):
                key = _key(IPVSService.from_message(message))
                owner = current.owners.get(key) if key else None
                if owner is None or owner[0] != key_of:
                    continue
                _add(totals, (owner[1], ""), _stats(message, "IPVS_CMD_ATTR_SERVICE", "IPVS_SVC_ATTR_STATS64"))
                for dest_message in ipvs.dest("dump", service=_service(key, self.scheduler)):
                    dest = IPVSDest.from_message(dest_message)
                    _add(totals, (owner[1], f"{dest['addr']}:{dest['port']}"),
                         _stats(dest_message, "IPVS_CMD_ATTR_DEST", "IPVS_DEST_ATTR_STATS64"))
        return [
            EndpointCounter(node_id=self.node_id, port=port, target=target, packets=p, bytes=b)
            for (port, target), (p, b) in totals.items()
        ]

    def cleanup(self) -> None:
        from pyroute2 import IPVS, IPRoute

        with self._lock:
            with IPVS() as ipvs, IPRoute() as ipr:
                for key in self._dump(ipvs, ipr):
                    ipvs.service("del", service=_service(key, self.scheduler))
                index = self._interface(ipr, create=False)
                if index is not None:
                    ipr.link("del", index=index)
            listed = subprocess.run(["nft", "list", "table", "ip", self.table], capture_output=True, text=True)
            if listed.returncode == 0:
                subprocess.run(["nft", "delete", "table", "ip", self.table], capture_output=True, text=True, check=True)
            self._plan, self._nft_applied = None, None


def _service(key: VirtualKey, scheduler: str):
    from pyroute2 import IPVSService

    kind, protocol, where, port = key
    if kind == "mark":
        return IPVSService(fwmark=where, af=socket.AF_INET, sched_name=scheduler)
    return IPVSService(addr=where, port=port, protocol=_PROTOCOLS[protocol], sched_name=scheduler)


def _dest(address: str, port: int):
    from pyroute2 import IPVSDest

    return IPVSDest(addr=address, port=port, fwd_method=_MASQUERADE)


def _key(record) -> VirtualKey | None:
    """A dumped virtual service's key, or None when it is not one of this dataplane's kinds."""
    mark = record.get("fwmark") or 0
    if mark:
        if mark & ~0x1FFFF != MARK_BASE:
            return None
        return ("mark", "udp" if mark & 0x10000 else "tcp", mark, 0)
    protocol = {v: k for k, v in _PROTOCOLS.items()}.get(record.get("protocol"))
    if protocol is None or record.get("addr") is None:
        return None
    return ("vip", protocol, record["addr"], record["port"])


def _describe(key: VirtualKey) -> str:
    kind, protocol, where, port = key
    return f"fwmark {where:#x}" if kind == "mark" else f"{protocol} {where}:{port}"


def _stats(message, outer: str, inner: str) -> tuple[int, int]:
    stats = message.get_attr(outer)
    stats = stats.get_attr(inner) if stats is not None else None
    if stats is None:
        return 0, 0
    return stats.get_attr("IPVS_STATS_ATTR_CONNS") or 0, stats.get_attr("IPVS_STATS_ATTR_INBYTES") or 0


def _add(totals: dict[tuple[str, str], list[int]], key: tuple[str, str], value: tuple[int, int]) -> None:
    total = totals.setdefault(key, [0, 0])
    total[0] += value[0]
    total[1] += value[1]


def _set_sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as out:
        out.write(value)
