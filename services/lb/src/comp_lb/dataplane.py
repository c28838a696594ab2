"""The lb's dataplane: what programs the kernel with the services and their endpoints.

One protocol, chosen by name from ``DATAPLANES`` (``nftables``, the default on Linux;
``ipvs``, where the kernel has ip_vs).  The lb calls ``sync`` with every service it knows,
whole, each time (level-triggered: a missed update is repaired by the next), from one
thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from comp_common.messages import EndpointCounter, ServiceEndpoints


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one sync did: ``full`` (the whole table or service list replaced),
    ``incremental`` (only what changed), ``unchanged`` (the kernel already held it)."""

    mode: Literal["full", "incremental", "unchanged"]
    elements: int  # set/map elements (nftables) or services and real servers (ipvs) added or removed
    commands: int  # commands sent to the kernel in the transaction (0 when unchanged)
    seconds: float


class DataplaneError(RuntimeError):
    """The kernel refused a change: the message has the kernel's (or nft's) words, and the
    service when one is to blame.  Nothing of that change was applied, and the next sync
    starts again from what the kernel holds."""


class Dataplane(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """None if this dataplane can run here, else why not."""
        ...

    def sync(self, services: Sequence[ServiceEndpoints]) -> SyncReport:
        """Make the kernel hold exactly ``services`` (their ready endpoints), atomically.
        Raises ``comp_lb.ruleset.RulesetError`` (a ValueError naming the service) before
        applying anything for a service it cannot program, and DataplaneError when the
        kernel refuses."""
        ...

    def counters(self, namespace: str, name: str) -> list[EndpointCounter]:
        """Connections counted on this host for the service: one per port (target "")
        and one per port and endpoint (target "address:port")."""
        ...

    def cleanup(self) -> None:
        """Remove everything this dataplane put in the kernel."""
        ...


def _nftables(**kwargs) -> Dataplane:
    from comp_lb.nftables import NftablesDataplane

    return NftablesDataplane(**kwargs)


def _ipvs(**kwargs) -> Dataplane:
    from comp_lb.ipvs import IpvsDataplane

    return IpvsDataplane(**kwargs)


# Imported on use, so that choosing nftables never needs pyroute2's IPVS bits and the
# other way round.
DATAPLANES: dict[str, Callable[..., Dataplane]] = {"nftables": _nftables, "ipvs": _ipvs}
