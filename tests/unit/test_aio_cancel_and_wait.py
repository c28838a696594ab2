"""``comp_common.aio.cancel_and_wait``: a stop that ends even when a library call inside a
loop swallows the first cancellation (Python 3.11's ``wait_for``, inside nats-py's request)."""

from __future__ import annotations

import asyncio

import pytest

from comp_common.aio import cancel_and_wait, within


def swallowing_loop(swallow: int, wake: asyncio.Event) -> asyncio.Task[None]:
    """A ``while True`` loop whose first ``swallow`` cancellations are lost, as a library's
    ``wait_for`` loses them, and which then waits on an event nobody sets."""

    async def loop() -> None:
        lost = 0
        while True:
            try:
                await wake.wait()
            except asyncio.CancelledError:
                if lost >= swallow:
                    raise
                lost += 1

    return asyncio.create_task(loop())


@pytest.mark.parametrize("swallow", [0, 1, 3])
async def test_every_task_ends_however_many_cancellations_it_loses(swallow):
    wake = asyncio.Event()
    tasks = [swallowing_loop(swallow, wake) for _ in range(3)]
    await asyncio.sleep(0)
    await within(cancel_and_wait(tasks, again_every=0.01), 5)
    assert all(task.cancelled() for task in tasks)


async def test_one_cancel_and_gather_is_what_hung():
    wake = asyncio.Event()
    task = swallowing_loop(1, wake)
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.2)
    assert done == set(), "one cancellation lost: the loop waits on, and a gather over it would hang"
    await cancel_and_wait([task], again_every=0.01)


async def test_failed_finished_and_running_tasks_are_all_collected():
    async def fails() -> None:
        raise RuntimeError("boom")

    async def finishes() -> int:
        return 1

    failed, finished = asyncio.create_task(fails()), asyncio.create_task(finishes())
    await asyncio.sleep(0)
    await cancel_and_wait([failed, finished, asyncio.create_task(asyncio.sleep(60))])
    assert isinstance(failed.exception(), RuntimeError) and finished.result() == 1
    await cancel_and_wait([])
