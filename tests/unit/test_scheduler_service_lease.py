"""Taking back one's own lapsed lease is told apart from taking over someone else's."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from comp_common.leader import RETOOK_OWN, Identity, LeaseElector

LEASE = 2.0


@dataclass
class Entry:
    key: str
    value: bytes | None
    revision: int
    operation: str | None = None


class KV:
    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.seq = itertools.count(1)

    async def get(self, key: str) -> Entry:
        if key not in self.data:
            raise KeyNotFoundError
        return self.data[key]

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if key not in self.data or self.data[key].revision != last:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        revision = next(self.seq)
        self.data[key] = Entry(key, value, revision)
        return revision


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def contender(kv: KV, name: str, clock: Clock, changes: list) -> LeaseElector:
    identity = Identity(holder=f"{name}-1", name=name, host="h", pid=1)
    return LeaseElector(
        kv, "scheduler", identity, lease_seconds=LEASE, clock=clock, wall=lambda: clock.now,  # type: ignore[arg-type]
        on_change=lambda epoch, reason: changes.append((name, epoch, reason)),
    )


async def test_a_lapsed_lease_taken_back_by_its_holder_says_so_and_one_taken_by_another_does_not():
    kv, clock, changes = KV(), Clock(), []
    a = contender(kv, "a", clock, changes)
    await a.step()
    assert changes == [("a", 1, "acquired the lease")]

    clock.now = LEASE + 0.5  # a's loop stalled past its lease: nobody renewed, nobody took it
    await a.step()
    assert [reason for _, _, reason in changes[1:]] == ["lease ran out before it could be renewed", RETOOK_OWN]
    assert changes[-1][1] == 2 and a.epoch() == 2

    b = contender(kv, "b", clock, changes)
    await b.step()  # sees a's record for the first time: waits a lease from now
    clock.now += LEASE + 0.5
    await b.step()
    assert changes[-1] == ("b", 3, "took over a stale lease"), "someone else's lease: a full takeover"
