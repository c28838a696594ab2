"""The nftables dataplane: applies ``comp_lb.ruleset``'s scripts with ``nft -f -``.

The first sync of a process reconciles against the kernel: it reads the table (if any)
and, unless it already holds exactly what is wanted, replaces it whole in one
transaction, carrying its counters over.  Later syncs send only the element deletes and
adds between what this process last applied and what is wanted, in one transaction.
A failure makes the next sync a reconcile again, so the kernel is never assumed to hold
something it refused.

Native syntax rather than JSON (``nft -j -f``): nft parses it faster, and its error
messages quote the offending line, which names the element and so the service.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from comp_common.messages import EndpointCounter, ServiceEndpoints

from comp_lb.dataplane import DataplaneError, SyncReport
from comp_lb.ruleset import (
    COUNTED_SETS, STAMP, TABLE, Listing, State, change_script, counter_elements, full_script, parse_listing,
)

# Generous: a full load of 10,000 services x 10 endpoints takes seconds; a hung nft must
# still not hang the lb's sync thread for ever.
NFT_TIMEOUT = 300.0
_LINE = re.compile(r"^/dev/stdin:(\d+):", re.MULTILINE)
_ELEMENT = re.compile(r"\{ (.*) \}$")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A full sync makes a few hundred thousand small objects in a heap that already holds
    the services: the cyclic collector would walk that heap again and again (about a third
    of the sync's Python time at 100,000 endpoints) for cycles it does not make."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class NftablesDataplane:
    name = "nftables"

    def __init__(
        self,
        node_id: str,
        table: str = TABLE,
        *,
        docker_user_rule: bool = True,
        counters_max_age: float = 1.0,
        nft: str = "nft",
        iptables: str = "iptables",
    ):
        """``docker_user_rule``: where Docker's DOCKER-USER chain exists, keep one
        ``-m conntrack --ctstate DNAT -j ACCEPT`` rule in it (Docker's FORWARD policy is
        DROP, which would drop DNATed traffic to containers from other interfaces).
        ``counters_max_age``: ``counters`` reuses a read of the counted sets this recent,
        since one read costs the whole set (seconds at 100,000 endpoints)."""
        self.node_id = node_id
        self.table = table
        self.docker_user_rule = docker_user_rule
        self.counters_max_age = counters_max_age
        self._nft = nft
        self._iptables = iptables
        self._state: State | None = None  # what this process last applied; None: reconcile next
        self._applied: State | None = None  # the same, kept through a failure: for counters
        self._lock = threading.Lock()
        self._counted: dict[str, tuple[float, dict[str, tuple[int, int]]]] = {}

    # ---- the protocol --------------------------------------------------------------------

    def unavailable(self) -> str | None:
        if shutil.which(self._nft) is None:
            return f"no {self._nft} binary (apt-get install nftables)"
        probe = subprocess.run([self._nft, "list", "tables"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"nft cannot read the ruleset: {probe.stderr.strip()}"
        return None

    def sync(self, services: Sequence[ServiceEndpoints]) -> SyncReport:
        with self._lock, _gc_paused():
            start = time.perf_counter()
            if self._state is None:
                mode, elements, commands = self._reconcile(services)
            else:
                change, desired = self._state.update(services)
                if not change:
                    self._state = self._applied = desired  # the same services, maybe new objects
                    return SyncReport("unchanged", 0, 0, time.perf_counter() - start)
                script = change_script(change, self.table)
                self._apply(script, (self._state, desired))
                self._state = self._applied = desired
                mode, elements, commands = "incremental", change.elements, script.count("\n")
            return SyncReport(mode, elements, commands, time.perf_counter() - start)

    def counters(self, namespace: str, name: str) -> list[EndpointCounter]:
        state = self._applied
        held = state.services.get(f"{namespace}.{name}") if state else None
        if held is None:
            return []
        wanted = counter_elements(held[0])
        totals: dict[tuple[str, str], list[int]] = {}
        for port, target, set_name, element in wanted:
            packets, bytes_ = self._counted_set(set_name).get(element, (0, 0))
            total = totals.setdefault((port, target), [0, 0])
            total[0] += packets
            total[1] += bytes_
        return [
            EndpointCounter(node_id=self.node_id, port=port, target=target, packets=p, bytes=b)
            for (port, target), (p, b) in totals.items()
        ]

    def cleanup(self) -> None:
        with self._lock:
            self._state = self._applied = None
            self._counted.clear()
            if self._table_exists():
                done = self._run([self._nft, "delete", "table", "ip", self.table])
                if done.returncode != 0:
                    raise DataplaneError(f"nft delete table ip {self.table}: {done.stderr.strip()}")
            if self.docker_user_rule and self._docker_user_exists():
                while self._run([self._iptables, "-w", "-C", *self._docker_user_rule()]).returncode == 0:
                    self._run([self._iptables, "-w", "-D", *self._docker_user_rule()], check=True)

    # ---- syncs ---------------------------------------------------------------------------

    def _reconcile(self, services: Sequence[ServiceEndpoints]) -> tuple[str, int, int]:
        desired = State.build(self.node_id, services)  # refuses bad input first
        elements = desired.element_lists()
        listing = self._read_table()
        programmed = {n: e for n, e in listing.elements.items() if n not in COUNTED_SETS} if listing else None
        if listing is not None and listing.stamp == STAMP and programmed == desired.elements():
            mode, changed, commands = "unchanged", 0, 0
        else:
            carried = desired.carry(listing.counters) if listing else None
            script = full_script(elements, self.table, carried)
            self._apply(script, (desired,))
            # add table, delete table, and the table with everything in it
            mode, changed, commands = "full", sum(map(len, elements.values())), 3
        self._ensure_docker_user()
        self._state = self._applied = desired
        return mode, changed, commands

    def _apply(self, script: str, states: Sequence[State]) -> None:
        """Run ``script`` as one transaction.  On failure, the next sync reconciles, and the
        error names the service whose element nft pointed at, if any."""
        try:
            done = self._run([self._nft, "-f", "-"], input=script, timeout=NFT_TIMEOUT)
        except subprocess.TimeoutExpired as error:
            self._state = None
            raise DataplaneError(f"nft -f took over {error.timeout:.0f} s; the next sync replaces table {self.table}") from None
        self._counted.clear()
        if done.returncode != 0:
            self._state = None
            raise DataplaneError(self._explain(script, done.stderr, states))

    def _explain(self, script: str, stderr: str, states: Sequence[State]) -> str:
        lines = script.splitlines()
        blamed: list[str] = []
        for number in _LINE.findall(stderr):
            index = int(number) - 1
            if not 0 <= index < len(lines):
                continue
            text = lines[index].strip().rstrip(",")
            match = _ELEMENT.search(text)
            element = match.group(1) if match else text
            for state in states:
                key = state.owner(element)
                if key and key not in blamed:
                    blamed.append(key)
                    break
        who = f" (service {', '.join(blamed)})" if blamed else ""
        return f"nft refused the change to table ip {self.table}{who}: {stderr.strip()}"

    # ---- reading the kernel ---------------------------------------------------------------

    def _table_exists(self) -> bool:
        done = self._run([self._nft, "-j", "list", "tables", "ip"], check=True)
        return any(
            item.get("table", {}).get("name") == self.table for item in json.loads(done.stdout).get("nftables", [])
        )

    def _read_table(self) -> Listing | None:
        if not self._table_exists():
            return None
        done = self._run([self._nft, "-j", "list", "table", "ip", self.table], timeout=NFT_TIMEOUT)
        if done.returncode != 0:
            raise DataplaneError(f"nft list table ip {self.table}: {done.stderr.strip()}")
        return parse_listing(json.loads(done.stdout))

    def _counted_set(self, name: str) -> dict[str, tuple[int, int]]:
        assert name in COUNTED_SETS
        cached = self._counted.get(name)
        if cached is not None and time.monotonic() - cached[0] <= self.counters_max_age:
            return cached[1]
        done = self._run([self._nft, "-j", "list", "set", "ip", self.table, name], timeout=NFT_TIMEOUT)
        if done.returncode != 0:
            raise DataplaneError(f"nft list set ip {self.table} {name}: {done.stderr.strip()}")
        values = parse_listing(json.loads(done.stdout)).counters.get(name, {})
        # Aged from when the read ended: a read of a big set takes seconds of its own.
        self._counted[name] = (time.monotonic(), values)
        return values

    # ---- Docker's FORWARD policy -----------------------------------------------------------

    def _docker_user_rule(self) -> list[str]:
        return [
            "DOCKER-USER", "-m", "conntrack", "--ctstate", "DNAT",
            "-m", "comment", "--comment", f"comp-lb:{self.table}", "-j", "ACCEPT",
        ]

    def _docker_user_exists(self) -> bool:
        if shutil.which(self._iptables) is None:
            return False
        return self._run([self._iptables, "-w", "-n", "-L", "DOCKER-USER"]).returncode == 0

    def _ensure_docker_user(self) -> None:
        """Docker's filter FORWARD policy is DROP and only its own chains accept: a
        connection this table DNATs from another interface to a container would be
        dropped there (an accept in this table's own forward chain does not outvote
        another table's drop).  Docker leaves DOCKER-USER to its users."""
        if not self.docker_user_rule or not self._docker_user_exists():
            return
        if self._run([self._iptables, "-w", "-C", *self._docker_user_rule()]).returncode != 0:
            self._run([self._iptables, "-w", "-I", *self._docker_user_rule()], check=True)

    def _run(self, argv: list[str], *, input: str | None = None, timeout: float = 60.0, check: bool = False):
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise DataplaneError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done
