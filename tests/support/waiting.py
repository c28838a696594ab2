"""Waiting for a condition with a deadline: how tests observe eventual state without fixed sleeps."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """The first truthy result of ``check``, polled every 0.1 s; fails naming ``what`` and the last result."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def eventually(check: Callable[[], T | None | Awaitable[T | None]], what: str, timeout: float = 10.0) -> T:
    """``wait_until`` for tests inside an event loop: polls every 10 ms without blocking the loop.
    ``check`` may return an awaitable (a read from Redis or KV), which is awaited each time."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
