"""Slots: asyncio.Semaphore's contract (at most n holders, first come first served, a
cancelled waiter takes nothing with it), without its O(waiters) acquire."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_common.aio import Slots


async def _hold(slots: Slots, name: str, order: list[str], holding: list[int], peak: list[int], gate: asyncio.Event) -> None:
    async with slots:
        order.append(name)
        holding[0] += 1
        peak[0] = max(peak[0], holding[0])
        await gate.wait()
        holding[0] -= 1


@pytest.mark.parametrize("n, tasks", [(1, 1), (1, 5), (3, 2), (3, 10), (64, 200)])
async def test_never_more_than_n_holders_and_first_come_first_served(n: int, tasks: int) -> None:
    slots, order, holding, peak, gate = Slots(n), [], [0], [0], asyncio.Event()
    names = [f"t{i:03d}" for i in range(tasks)]
    running = [asyncio.create_task(_hold(slots, name, order, holding, peak, gate)) for name in names]
    await asyncio.sleep(0)
    assert order == names[:n], "the first n get in at once, the rest wait"
    gate.set()
    await asyncio.gather(*running)
    assert order == names and peak[0] == min(n, tasks)


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    slots, order, holding, peak, gate = Slots(1), [], [0], [0], asyncio.Event()
    first = asyncio.create_task(_hold(slots, "first", order, holding, peak, gate))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(slots, "cancelled", order, holding, peak, gate))
    last = asyncio.create_task(_hold(slots, "last", order, holding, peak, gate))
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await asyncio.gather(first, last)
    assert waiter.cancelled() and order == ["first", "last"]
    async with slots:  # the one slot is free again
        pass


async def test_a_waiter_cancelled_after_being_handed_the_slot_passes_it_on() -> None:
    slots = Slots(1)
    await slots.__aenter__()
    waiter = asyncio.create_task(slots.__aenter__())
    await asyncio.sleep(0)
    await slots.__aexit__(None, None, None)  # hands the slot to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(slots.__aenter__(), 1)  # the slot was passed on, not lost


def test_zero_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        Slots(0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5), holds=st.lists(st.integers(0, 3), min_size=1, max_size=30), cancel=st.sets(st.integers(0, 29)))
def test_holders_stay_within_n_whatever_is_cancelled(n: int, holds: list[int], cancel: set[int]) -> None:
    async def scenario() -> None:
        slots, holding, peak = Slots(n), [0], [0]

        async def hold(ticks: int) -> None:
            async with slots:
                holding[0] += 1
                peak[0] = max(peak[0], holding[0])
                try:
                    for _ in range(ticks):
                        await asyncio.sleep(0)
                finally:
                    holding[0] -= 1

        tasks = [asyncio.create_task(hold(t)) for t in holds]
        await asyncio.sleep(0)
        for i in cancel:
            if i < len(tasks):
                tasks[i].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert peak[0] <= n and holding[0] == 0
        for _ in range(n):  # every slot came back
            await asyncio.wait_for(slots.__aenter__(), 1)

    asyncio.run(scenario())


def test_a_full_collection_freezes_its_survivors_and_a_long_one_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    import gc
    import logging

    from comp_common.aio import contain_collections

    callback = contain_collections(logging.getLogger("test.gc"), over_seconds=0.0)
    gc.disable()  # only the collections asked for below
    try:
        gc.unfreeze()
        survivors = [[i] for i in range(10_000)]  # tracked containers that outlive the collection
        with caplog.at_level(logging.WARNING, logger="test.gc"):
            gc.collect(1)
            assert gc.get_freeze_count() == 0, "only a full collection freezes"
            gc.collect(2)
        assert gc.get_freeze_count() >= len(survivors)
        assert all(survivors[i] == [i] for i in (0, 9_999))
        logged = [r for r in caplog.records if r.getMessage() == "a garbage collection held the process"]
        assert [r.generation for r in logged] == [1, 2]  # type: ignore[attr-defined]
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()
        gc.enable()
