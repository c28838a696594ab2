"""Small asyncio pieces the standard library lacks or gets slow at scale."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")


class Slots:
    """At most ``n`` holders at once, the rest served first come first served.

    What ``asyncio.Semaphore`` does, in O(1) an acquire: Python 3.11's ``Semaphore.locked``
    looks at every waiter, so thousands of waiters (a fleet's agents all reading their
    assignments after one deploy) cost a scan of all of them per acquire.
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"Slots needs at least one slot, got {n}")
        self._free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():
                # Handed a slot, then cancelled before taking it: pass it on.
                self._release()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter stays queued until reached here
                waiter.set_result(None)
                return
        self._free += 1


def contain_collections(logger: logging.Logger, over_seconds: float = 0.1) -> Callable[[str, dict[str, int]], None]:
    """Keep the cyclic garbage collector's pauses short in a process holding a large, growing
    state, and log any pause longer than ``over_seconds``.

    CPython 3.11 scans every tracked object in a full collection, and runs one whenever the
    objects promoted since the last reach a quarter of those that survived it.  A scheduler
    taking on 100,000 tasks grows by millions of objects: its full collections came every few
    seconds and held the process (GIL included, so the lease thread too) for up to 2.5 s
    each, long enough to lose the lease and to let heartbeats go stale.  After each full
    collection its survivors are frozen (``gc.freeze``): later collections scan only what was
    promoted since, so a pause is bounded by the growth between two, not by the whole state.
    The cost: a frozen object that later becomes part of a reference cycle is never freed.
    Objects here are freed by reference counting (plain values, no back references); a cycle
    among them (a stored exception's traceback) is the exception, not the rule.
    """
    started: list[float] = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if info.get("generation") == 2:
            gc.freeze()
        if took > over_seconds:
            logger.warning(
                "a garbage collection held the process",
                extra={
                    "seconds": round(took, 3), "generation": info.get("generation"),
                    "collected": info.get("collected"), "frozen": gc.get_freeze_count(),
                },
            )

    gc.callbacks.append(on_collection)
    return on_collection  # for gc.callbacks.remove


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``asyncio.wait_for`` that cannot swallow a cancellation.

    Python 3.11's ``wait_for`` returns the inner result when the task is cancelled in the
    same moment the inner awaitable completes, so the cancellation is lost: a ``while True``
    loop around it then never ends, and the ``gather`` that stops it hangs (the scheduler's
    shutdown hung so in CI).  ``asyncio.timeout`` raises the cancellation as it should.
    Raises ``TimeoutError`` as ``wait_for`` does.
    """
    async with asyncio.timeout(seconds):
        return await awaitable


async def cancel_and_wait(tasks: Iterable[asyncio.Future[object]], again_every: float = 0.5) -> None:
    """Cancel ``tasks`` and return once every one has ended, cancelling again any still
    running every ``again_every`` seconds.

    One ``cancel()`` is not enough for a ``while True`` loop: a library call inside it that
    uses Python 3.11's ``wait_for`` (nats-py's request, so every KV put and JetStream
    publish) can swallow the cancellation, and the loop goes round to wait forever; a
    discovery test's teardown hung 300 s in CI so.  Exceptions the tasks end with are
    theirs to log; here they are only collected.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_every)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn that nobody did
