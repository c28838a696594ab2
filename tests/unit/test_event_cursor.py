"""How an event cursor ends a range when the server delivers nothing more: at once when the
server has nothing pending for it (the last event was removed by retention after the end
was read), with an error naming the stall when it has but does not send it.  The
subscription is a stand-in; tests/integration/test_event_history.py reads real streams."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nats.errors
import pytest

from comp_common.events import EventCursor, EventQuery, EventReadError


class SilentSubscription:
    """Delivers nothing; the consumer info says how many the server still holds for it."""

    def __init__(self, num_pending: int):
        self.num_pending = num_pending
        self.pending_msgs = 0
        self.waits = 0

    async def next_msg(self, timeout: float) -> None:
        self.waits += 1
        raise nats.errors.TimeoutError

    async def consumer_info(self) -> SimpleNamespace:
        return SimpleNamespace(num_pending=self.num_pending)


def reader(stall_seconds: float) -> SimpleNamespace:
    return SimpleNamespace(poll_seconds=0.001, stall_seconds=stall_seconds, stream="COMP_EVENTS")


async def test_a_range_whose_last_event_is_gone_ends_without_error() -> None:
    cursor = EventCursor(reader(stall_seconds=3600), EventQuery(), SilentSubscription(num_pending=0), start=5, end=9)
    assert await cursor.next() is None
    assert cursor.done


async def test_a_range_the_server_stops_delivering_fails_naming_where() -> None:
    sub = SilentSubscription(num_pending=3)
    cursor = EventCursor(reader(stall_seconds=0.05), EventQuery(), sub, start=5, end=9)
    with pytest.raises(EventReadError, match=r"nothing arrived for 0.05s after sequence 4, with the end at 9"):
        await cursor.next()
    assert sub.waits >= 50


async def test_a_follow_that_is_idle_returns_none_and_goes_on() -> None:
    cursor = EventCursor(reader(stall_seconds=0.001), EventQuery(follow=True), SilentSubscription(num_pending=3), start=1, end=0)
    assert await cursor.next(idle=0.01) is None
    assert not cursor.done  # idle is not the end, and not a stall: a follow waits for ever


@pytest.mark.parametrize("limit", [0, -1])
async def test_a_limit_below_one_delivers_nothing(limit: int) -> None:
    sub = SilentSubscription(num_pending=3)
    cursor = EventCursor(reader(stall_seconds=3600), EventQuery(limit=limit), sub, start=1, end=9)
    assert cursor.done and await cursor.next() is None
    assert sub.waits == 0


class FailingCursor:
    """Gives one event, then the read fails as a stalled server makes it fail."""

    def __init__(self, first):
        self.done = False
        self.last_seq = 0
        self.closed = False
        self._first = first

    async def next(self, idle: float | None = None):
        if self._first is not None:
            record, self._first = self._first, None
            self.last_seq = record.seq
            return record
        raise EventReadError("reading COMP_EVENTS: nothing arrived for 10s after sequence 7, with the end at 9")

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("sse", [False, True])
async def test_a_listing_that_fails_midway_ends_with_a_line_saying_why_and_where(sse: bool) -> None:
    from datetime import datetime, timezone

    from comp_api.event_routes import _stream
    from comp_common.events import record_from_message

    record = record_from_message(7, datetime(2026, 12, 1, tzinfo=timezone.utc), "comp.evt.capacity", b'{"fits": true}', None)
    cursor = FailingCursor(record)
    chunks = [chunk async for chunk in _stream(cursor, sse=sse, follow=False)]
    assert cursor.closed
    first, last = chunks
    if sse:
        assert first.startswith("id: 7\ndata: {")
        assert last.startswith("event: error\ndata: ") and last.endswith("\n\n")
        error = json.loads(last.split("data: ", 1)[1])
    else:
        assert json.loads(first)["seq"] == 7
        error = json.loads(last)
    assert error == {"error": "NATS is unavailable: reading COMP_EVENTS: nothing arrived for 10s after sequence 7, with the end at 9",
                     "after": 7}
