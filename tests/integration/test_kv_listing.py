"""Bucket listings on a real nats-server: complete the moment a write has returned, live
keys only, a key's whole history in order.

nats-py's own ``keys()`` ends at a marker the client can put in before the values arrive
(CI saw an empty listing right after an apply); ``comp_common.kv`` ends at the stream's
last sequence instead, which these tests hold it to."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.kv import KeyValue

from comp_common.kv import ListingTimeout, is_deletion, list_keys, list_models, read_entries
from comp_common.messages import NamespaceRecord


@pytest.fixture
async def two_clients(nats_url):
    """A writer and a reader on separate connections, as the api and the scheduler are."""
    writer, reader = await nats.connect(nats_url), await nats.connect(nats_url)
    yield writer.jetstream(), reader.jetstream()
    await writer.close()
    await reader.close()


def namespace(name: str, at: float = 1.0) -> NamespaceRecord:
    return NamespaceRecord(name=name, created_at=1.0, updated_at=at)


async def buckets(two_clients, name: str = "listing") -> tuple[KeyValue, KeyValue]:
    writer_js, reader_js = two_clients
    written = await writer_js.create_key_value(bucket=name, history=10)
    return written, await reader_js.key_value(name)


async def test_an_empty_bucket_lists_nothing(two_clients):
    _, kv = await buckets(two_clients)
    assert await list_keys(kv) == []
    assert await list_models(kv, NamespaceRecord) == {}
    assert await read_entries(kv, "a.*", include_history=True) == []


async def test_deleted_and_purged_keys_are_not_listed_and_the_latest_value_is(two_clients):
    written, kv = await buckets(two_clients)
    for name in ("a", "b", "c", "d"):
        await written.put(f"ns.{name}", namespace(name).model_dump_json().encode())
    second = await written.put("ns.b", namespace("b", at=2.0).model_dump_json().encode())
    await written.delete("ns.a")
    await written.purge("ns.c")
    assert sorted(await list_keys(kv)) == ["ns.b", "ns.d"]
    listed = await list_models(kv, NamespaceRecord)
    assert listed["ns.b"] == (namespace("b", at=2.0), second)
    assert set(listed) == {"ns.b", "ns.d"}


async def test_a_pattern_lists_only_its_keys_even_when_the_last_write_is_elsewhere(two_clients):
    written, kv = await buckets(two_clients)
    await written.put("shop.web.r00000001", b'{"name": "x"}')
    await written.put("shop.web.r00000002", b'{"name": "y"}')
    await written.put("shop.webx.r00000001", b'{"name": "z"}')
    await written.put("other", b'{"name": "z"}')  # the stream's last message is outside the pattern
    assert sorted(await list_keys(kv, "shop.web.*")) == ["shop.web.r00000001", "shop.web.r00000002"]
    assert await list_keys(kv, "nothing.*") == []


async def test_a_keys_history_comes_whole_and_in_order_deletions_included(two_clients):
    written, kv = await buckets(two_clients)
    revisions = [await written.put("k", f"v{i}".encode()) for i in range(3)]
    await written.put("other", b"x")
    await written.delete("k")
    history = await read_entries(kv, "k", include_history=True)
    assert [e.revision for e in history[:3]] == revisions
    assert [e.value for e in history[:3]] == [b"v0", b"v1", b"v2"]
    assert len(history) == 4 and is_deletion(history[3]) and history[3].revision > revisions[-1]


async def test_a_listing_right_after_a_write_on_another_connection_holds_it_every_time(two_clients):
    """The race that emptied the api's listing: the write returns on one connection, the
    listing starts at once on another.  Hundreds of rounds, each must see every key."""
    written, kv = await buckets(two_clients)
    for i in range(300):
        await written.put(f"key{i:04d}", b"v")
        listed = await list_keys(kv)
        assert len(listed) == i + 1, f"round {i}: listed {len(listed)} keys, {i + 1} were written"


async def test_a_listing_during_writes_holds_every_key_written_before_it_began(two_clients):
    written, kv = await buckets(two_clients)
    done = 0

    async def write() -> None:
        nonlocal done
        for i in range(400):
            await written.put(f"key{i:04d}", b"v")
            done = i + 1

    writer = asyncio.create_task(write())
    try:
        while not writer.done():
            before = done
            listed = set(await list_keys(kv))
            assert {f"key{i:04d}" for i in range(before)} <= listed
    finally:
        await writer


class _StalledWatch:
    """A watch whose values stop short of the last sequence (NATS stalled mid-listing)."""

    def __init__(self) -> None:
        self.stopped = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0.01)
        return None  # only markers, never the value at the last sequence

    async def stop(self) -> None:
        self.stopped = True


class _LastMessage:
    seq = 7


class _StalledJetStream:
    async def get_last_msg(self, stream, subject):
        return _LastMessage()


class _StalledBucket:
    def __init__(self) -> None:
        self.watcher = _StalledWatch()
        self._js, self._stream, self._pre = _StalledJetStream(), "KV_b", "$KV.b."

    async def watch(self, keys, **_):
        return self.watcher


async def test_a_listing_whose_last_value_never_comes_fails_loudly_and_stops_its_watch():
    bucket = _StalledBucket()
    with pytest.raises(ListingTimeout, match=r"KV_b .*the last by sequence \(7\) never came"):
        await read_entries(bucket, timeout=0.2)  # type: ignore[arg-type]
    assert bucket.watcher.stopped
