"""``comp_common.aio.within``: a bounded wait that a cancellation always ends.

The loop below is the shape of the scheduler's flush and liveness loops.  It is cancelled
right after the event it waits on fired, which is when Python 3.11's ``asyncio.wait_for``
returns the result and drops the cancellation (the scheduler's shutdown then hung in CI).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from comp_common.aio import within

Bounded = Callable[[Awaitable[bool], float], Awaitable[bool]]


async def cancel_as_the_event_fires(bounded: Bounded) -> str:
    fired = asyncio.Event()
    rounds = 0

    async def loop() -> str:
        nonlocal rounds
        while True:
            try:
                await bounded(fired.wait(), 10)
            except TimeoutError:
                pass
            fired.clear()
            rounds += 1
            if rounds > 3:
                return "went on after being cancelled"
            await asyncio.sleep(0)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    fired.set()
    await asyncio.sleep(0)  # the inner wait completes in this step...
    task.cancel()  # ...and the cancellation arrives in the same one
    for _ in range(20):
        fired.set()
        await asyncio.sleep(0)
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def test_a_loop_cancelled_as_its_event_fires_ends():
    assert await cancel_as_the_event_fires(within) == "cancelled"


async def test_the_same_loop_on_wait_for_is_what_hung():
    # Documents why ``within`` exists; on a Python whose wait_for is fixed (3.12+) this
    # shape ends too, and the test says so rather than failing.
    outcome = await cancel_as_the_event_fires(asyncio.wait_for)
    if outcome == "cancelled":
        pytest.skip("this Python's asyncio.wait_for keeps the cancellation")
    assert outcome == "went on after being cancelled"


async def test_within_times_out_and_returns_results_as_wait_for_does():
    assert await within(asyncio.sleep(0, result=7), 1) == 7
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(5), 0.01)
