"""Leadership through a lease in a JetStream KV key: one instance of a role (the scheduler,
the autoscaler) acts, the others stand by.

Any number of contenders run.  The one whose record is in the lease key leads and renews
it every ``renew_seconds``; the others read the key every ``check_seconds`` and take it
over once it has gone stale.  The KV revision of the write that acquired the lease is the
**fencing epoch**: revisions only grow, so every new leader has a higher epoch than all
before it.  The scheduler stamps the epoch on every assignment it writes, and an agent
refuses an assignment older than one it has accepted.

Two halves, as elsewhere in COMP:

* :class:`LeaseMachine` is pure: what one contender knows about the lease and what it
  should do next, with the time passed in.  Tested with a fake clock.
* :class:`LeaseElector` is the I/O around it: reads, compare-and-set writes, the loop,
  and a callback on every change of leadership.

Time.  A lease is stale when the key's revision has not changed for the holder's
``lease_seconds`` on the *reader's own monotonic clock*, counted from when the reader
first saw that revision.  Wall-clock times in the record are for people and are never
compared across hosts, so clock skew cannot make two leaders.  The holder counts from
when it *sent* its last renewal that succeeded, which is never later than when any
reader saw it, so the holder always stops acting before anyone may take over.

Losing a compare-and-set (someone else wrote the key) ends leadership at once.  An
error that says nothing about the key (a timeout, NATS away) does not: the holder goes
on trying, and stops acting when its lease runs out unrenewed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .aio import cancel_and_wait, within
from .messages import LeaseRecord

log = logging.getLogger("scheduler.leader")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a contender is, as its lease record tells people."""

    holder: str  # unique per process and start
    name: str
    host: str
    pid: int

    @classmethod
    def of_this_process(cls, name: str | None = None) -> "Identity":
        host = socket.gethostname()
        name = name or host
        return cls(holder=f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}", name=name, host=host, pid=os.getpid())


class Step(StrEnum):
    WAIT = "wait"  # someone else holds a live lease
    ACQUIRE = "acquire"  # the key is absent: create it
    TAKE_OVER = "take-over"  # the holder let its lease go stale: replace its record, on its revision
    RENEW = "renew"  # ours: rewrite it, on our revision


class LeaseMachine:
    """One contender's view of the lease.  No I/O and no clock of its own.

    ``now`` is always the contender's monotonic time.
    """

    def __init__(self, identity: Identity, lease_seconds: float):
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.epoch: int | None = None  # set while we hold the lease
        self.revision: int | None = None  # the key's last known revision; None: absent or unknown
        self.record: LeaseRecord | None = None  # the key's last known value
        self._seen_at = 0.0  # when ``revision`` was first seen
        self._valid_until = -math.inf  # we act only before this
        self._acquired_at = 0.0  # wall clock, for the record

    # ---- questions ----------------------------------------------------------------------
    def leading(self, now: float) -> bool:
        return self.epoch is not None and now < self._valid_until

    def valid_for(self, now: float) -> float:
        """Seconds of leadership left without a renewal (0 when not leading)."""
        return max(0.0, self._valid_until - now) if self.epoch is not None else 0.0

    def stale_in(self, now: float) -> float | None:
        """Seconds until the current holder's lease may be taken over (None: no holder known)."""
        if self.record is None:
            return None
        return max(0.0, self._lease_of(self.record) - (now - self._seen_at))

    # ---- inputs -------------------------------------------------------------------------
    def observe(self, revision: int | None, record: LeaseRecord | None, now: float) -> Step:
        """The key as just read (``None``: absent or deleted); what to do next."""
        if revision != self.revision:
            self.revision, self._seen_at = revision, now
        self.record = record
        if record is None:
            self._step_down()  # whoever deleted it, we no longer hold it
            return Step.ACQUIRE
        if self.epoch is not None and record.holder == self.identity.holder:
            return Step.RENEW
        self._step_down()
        if now - self._seen_at >= self._lease_of(record):
            return Step.TAKE_OVER
        return Step.WAIT

    def next_record(self, step: Step, wall_now: float) -> LeaseRecord:
        """The value to write for ``step``."""
        acquired_at = self._acquired_at if step is Step.RENEW else wall_now
        identity = self.identity
        return LeaseRecord(
            holder=identity.holder,
            name=identity.name,
            host=identity.host,
            pid=identity.pid,
            lease_seconds=self.lease_seconds,
            acquired_at=acquired_at,
            renewed_at=wall_now,
            epoch=(self.epoch or 0) if step is Step.RENEW else 0,
        )

    def succeeded(self, step: Step, record: LeaseRecord, revision: int, sent_at: float) -> None:
        """The write for ``step``, sent at ``sent_at``, was accepted as ``revision``."""
        if step is Step.WAIT:
            raise ValueError("nothing is written for WAIT")
        if step is not Step.RENEW:
            self.epoch = revision
            self._acquired_at = record.acquired_at
        self.revision, self.record, self._seen_at = revision, record, sent_at
        self._valid_until = sent_at + self.lease_seconds

    def conflicted(self) -> None:
        """Someone else wrote the key first: whatever we held is gone, and the key must be read again."""
        self._step_down()
        self.revision = None

    def expire(self, now: float) -> bool:
        """Step down if the lease ran out unrenewed; True when that happened just now."""
        if self.epoch is not None and now >= self._valid_until:
            self._step_down()
            return True
        return False

    def resign(self) -> None:
        """Stop leading, by our own choice (shutting down)."""
        self._step_down()

    def _step_down(self) -> None:
        self.epoch = None
        self._valid_until = -math.inf

    def _lease_of(self, record: LeaseRecord) -> float:
        # The holder's own lease time rules, if it is longer than ours: contenders configured
        # differently never cut each other short.
        return max(self.lease_seconds, record.lease_seconds)


# Called with the new epoch on becoming leader, and with None on stepping down; with a reason.
OnChange = Callable[[int | None, str], None]
# The reason when the record taken over was this contender's own (it let its lease lapse and
# nobody else took it meanwhile): no other leader can have written anything since.
RETOOK_OWN = "took back its own lapsed lease"


class LeaseElector:
    """Runs a :class:`LeaseMachine` against one key of a KV bucket."""

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        identity: Identity,
        *,
        lease_seconds: float,
        renew_seconds: float | None = None,
        check_seconds: float | None = None,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.kv = kv
        self.key = key
        self.machine = LeaseMachine(identity, lease_seconds)
        self.renew_seconds = renew_seconds if renew_seconds is not None else lease_seconds / 3
        if self.renew_seconds >= lease_seconds:
            raise ValueError("renew_seconds must be shorter than lease_seconds")
        # A standby reads the key often, so that it sees the last renewal soon after it was
        # written: it takes over at most one lease plus two checks after that renewal.
        self.check_seconds = check_seconds if check_seconds is not None else min(self.renew_seconds, lease_seconds / 10)
        # One operation may not take longer than a renewal period: the loop must come round
        # to notice an expired lease.
        self.op_timeout = self.renew_seconds
        self.on_change = on_change
        self.clock = clock
        self.wall = wall
        self._task: asyncio.Task[None] | None = None
        self._held_revision: int | None = None  # our record's revision when stopped while leading

    @property
    def identity(self) -> Identity:
        return self.machine.identity

    def epoch(self) -> int | None:
        """Our epoch while we hold a live lease, else None.  Checked against the clock every time."""
        return self.machine.epoch if self.machine.leading(self.clock()) else None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.key}")

    async def stop(self) -> None:
        """Stop contending and stop leading, at once.  The record stays until :meth:`release`."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self.machine.epoch is not None:
            self._held_revision = self.machine.revision
            self.machine.resign()
            self._notify(None, "shutting down")

    async def release(self) -> None:
        """Delete the record we held when stopped, so that a standby takes over at once
        instead of after the lease time.  Call only once nothing acts on our behalf any more."""
        revision, self._held_revision = self._held_revision, None
        if revision is None:
            return
        try:
            # On our revision only: never delete a record someone else has written since.
            await within(self.kv.delete(self.key, last=revision), self.op_timeout)
            log.info("lease released", extra={"key": self.key, "holder": self.identity.holder})
        except Exception as exc:
            log.warning("could not release the lease; it will go stale instead", extra={"error": repr(exc)})

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease step failed")
            held = self.machine.epoch is not None
            await asyncio.sleep(self.renew_seconds if held else self.check_seconds)

    # ---- one step -------------------------------------------------------------------------
    async def step(self) -> Step:
        """Read or renew once; returns what was attempted."""
        machine = self.machine
        if machine.expire(self.clock()):
            log.warning("lease ran out before it could be renewed", extra={"key": self.key})
            self._notify(None, "lease ran out before it could be renewed")
        if machine.epoch is not None:
            step = Step.RENEW
        else:
            revision, record = await self._read()
            step = machine.observe(revision, record, self.clock())
            if step is Step.WAIT:
                return step
            if step is Step.TAKE_OVER and record is not None:
                log.warning(
                    "lease is stale; taking over",
                    extra={"key": self.key, "from": record.holder, "epoch": record.epoch, "revision": revision},
                )
        ours = step is Step.TAKE_OVER and record is not None and record.holder == self.identity.holder
        record = machine.next_record(step, self.wall())
        sent_at = self.clock()
        try:
            revision = await within(self._write(step, record), self.op_timeout)
        except KeyWrongLastSequenceError:
            was_leading = machine.epoch is not None
            machine.conflicted()
            if was_leading:
                log.warning("lost the lease: another contender wrote it", extra={"key": self.key})
                self._notify(None, "lost the lease to another contender")
            return step
        except Exception as exc:
            # Says nothing about the key: try again next time; the lease bounds how long we act.
            log.warning("lease write failed", extra={"key": self.key, "step": step.value, "error": repr(exc)})
            return step
        machine.succeeded(step, record, revision, sent_at)
        if step is not Step.RENEW:
            log.info("acquired the lease", extra={"key": self.key, "holder": self.identity.holder, "epoch": revision})
            reason = "acquired the lease" if step is Step.ACQUIRE else RETOOK_OWN if ours else "took over a stale lease"
            self._notify(revision, reason)
        return step

    async def _read(self) -> tuple[int | None, LeaseRecord | None]:
        try:
            entry = await within(self.kv.get(self.key), self.op_timeout)
        except KeyNotFoundError:
            return None, None  # absent, or deleted by a holder that let go
        if not entry.value:
            return None, None
        try:
            return entry.revision, LeaseRecord.model_validate_json(entry.value)
        except ValueError:
            # Not a lease record (written by hand?): treat it as a holder nobody renews, so
            # it is taken over once stale rather than blocking leadership for good.
            log.warning("lease key holds something that is not a lease record", extra={"key": self.key})
            return entry.revision, LeaseRecord(
                holder="?", name="?", host="?", pid=0, lease_seconds=0, acquired_at=0, renewed_at=0
            )

    async def _write(self, step: Step, record: LeaseRecord) -> int:
        data = record.model_dump_json().encode()
        if step is Step.ACQUIRE:
            return await self.kv.create(self.key, data)
        assert self.machine.revision is not None
        return await self.kv.update(self.key, data, last=self.machine.revision)

    def _notify(self, epoch: int | None, reason: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(epoch, reason)
        except Exception:
            log.exception("leadership callback failed")


class ElectorThread:
    """A :class:`LeaseElector` on a thread of its own, with its own loop and NATS connection.

    Renewals must not wait for the service's loop: a round that holds it for a second (a
    100,000-task apply) or a burst of messages would otherwise let the lease run out, and
    the leader would stand down and take over again in the middle of its work.  What the
    service needs from the elector crosses threads safely: :meth:`epoch` reads two fields
    that only this thread writes (a stale read errs towards "not leading" while acquiring
    and can be no later than ``valid_until`` while renewing), and every change of leadership
    is handed to the service's loop with ``call_soon_threadsafe``.
    """

    def __init__(
        self,
        url: str,
        bucket: str,
        key: str,
        identity: Identity,
        *,
        lease_seconds: float,
        renew_seconds: float | None = None,
        on_change: OnChange | None = None,
        connect_timeout: float = 5.0,
    ):
        self._url, self._bucket, self._key = url, bucket, key
        self._identity = identity
        self._lease_seconds, self._renew_seconds = lease_seconds, renew_seconds
        self._on_change = on_change
        self._connect_timeout = connect_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"lease-{key}", daemon=True)
        self._nc = None
        self.elector: LeaseElector | None = None

    # ---- what the service reads ----------------------------------------------------------
    def epoch(self) -> int | None:
        return self.elector.epoch() if self.elector is not None else None

    @property
    def check_seconds(self) -> float:
        assert self.elector is not None
        return self.elector.check_seconds

    @property
    def identity(self) -> Identity:
        return self._identity

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        service_loop = asyncio.get_running_loop()
        on_change = self._on_change

        def notify(epoch: int | None, reason: str) -> None:
            if on_change is not None:
                service_loop.call_soon_threadsafe(on_change, epoch, reason)

        self._thread.start()
        await self._run(self._start(notify))

    async def _start(self, notify: OnChange) -> None:
        import nats

        self._nc = await nats.connect(
            self._url, name=f"scheduler-lease-{self._identity.holder}", connect_timeout=int(max(1, self._connect_timeout)),
            max_reconnect_attempts=-1, reconnect_time_wait=1,
        )
        kv = await self._nc.jetstream().key_value(self._bucket)
        self.elector = LeaseElector(
            kv, self._key, self._identity,
            lease_seconds=self._lease_seconds, renew_seconds=self._renew_seconds, on_change=notify,
        )
        self.elector.start()

    async def stop(self) -> None:
        """As :meth:`LeaseElector.stop`; the step-down callback runs on the service's loop soon after."""
        if self.elector is not None and self._thread.is_alive():
            await self._run(self.elector.stop())

    async def release(self) -> None:
        """As :meth:`LeaseElector.release`."""
        if self.elector is not None and self._thread.is_alive():
            await self._run(self.elector.release())

    async def close(self) -> None:
        """End the thread and its connection (after :meth:`stop`, and :meth:`release` if wanted)."""
        if not self._thread.is_alive():
            return
        if self._nc is not None:
            try:
                await self._run(self._nc.close())
            except Exception as exc:
                log.warning("could not close the lease connection", extra={"error": repr(exc)})
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5)
        self._loop.close()

    async def _run(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))
