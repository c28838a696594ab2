"""Virtual IPs: which addresses of the configured range are free, and taking one.

A VIP is held by the key of that address in the ``comp-vips`` bucket.  Taking one is the
KV's create-if-absent, so two allocators (or two services at once) can never hold the
same address; an address is free again once its key is deleted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from ipaddress import IPv4Address, IPv4Network


class VipRange:
    def __init__(self, cidr: str):
        try:
            self.network = IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"VIP range {cidr!r} is not an IPv4 network: {exc}") from None
        if self.network.num_addresses < 4:
            raise ValueError(f"VIP range {cidr} is too small: it needs at least a /30")

    @property
    def size(self) -> int:
        return self.network.num_addresses - 2  # not the network or broadcast address

    def candidates(self, service_key: str) -> Iterator[str]:
        """Every usable address once, starting at one derived from the service's key: a
        service deleted and applied again most often gets its old VIP back, and services
        applied together do not all race for the first free address."""
        digest = int.from_bytes(hashlib.sha256(service_key.encode()).digest()[:8], "big")
        first = int(self.network.network_address) + 1
        start = digest % self.size
        for offset in range(self.size):
            yield str(IPv4Address(first + (start + offset) % self.size))

    def contains(self, address: str) -> bool:
        try:
            return IPv4Address(address) in self.network
        except ValueError:
            return False

    def first_free(self, service_key: str, held: Collection[str]) -> str | None:
        for address in self.candidates(service_key):
            if address not in held:
                return address
        return None
