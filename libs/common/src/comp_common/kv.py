"""JetStream KV helpers: typed get/put with compare-and-set on revision."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from . import subjects

from faststream.nats import NatsBroker

M = TypeVar("M", bound=BaseModel)


class ConflictError(RuntimeError):
    """The key changed since it was read: re-read and retry, or give up."""


# How many versions each bucket keeps.  Pinned here, not per caller: the server refuses to
# open a bucket with a configuration other than the one it was created with, so every
# process must ask for the same.  Earlier versions serve inspection (desired state); the
# buckets of one-value-per-key state (a lease, a VIP holder, endpoints) keep none.
_HISTORY = {
    subjects.LEASES_BUCKET: 1,
    subjects.VIPS_BUCKET: 1,
    subjects.ENDPOINTS_BUCKET: 1,
}


async def open_bucket(broker: NatsBroker, bucket: str) -> KeyValue:
    return await broker.key_value(bucket, history=_HISTORY.get(bucket, 10))


async def get_model(kv: KeyValue, key: str, model: type[M]) -> tuple[M, int] | None:
    """The value and its revision, or None where the key is absent or deleted."""
    value, revision = await read_model(kv, key, model)
    return None if value is None else (value, revision)


async def read_model(kv: KeyValue, key: str, model: type[M]) -> tuple[M | None, int]:
    """The value and its revision; for a deleted key None and the deletion's revision, for
    one never written None and 0.  Readers that may run out of order compare revisions: a
    value older than one already seen (a deletion included) is stale."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError as exc:
        deleted = getattr(exc, "entry", None)
        return None, (deleted.revision or 0) if deleted is not None else 0
    if entry.value is None or is_deletion(entry):
        return None, entry.revision or 0
    return model.model_validate_json(entry.value), entry.revision or 0


async def put_model(kv: KeyValue, key: str, value: BaseModel, last_revision: int | None) -> int:
    """Write ``value``; ``last_revision`` None means the key must not exist yet.

    Raises :class:`ConflictError` when someone else wrote in between.
    """
    return await put_json(kv, key, value.model_dump_json().encode(), last_revision)


async def put_json(kv: KeyValue, key: str, data: bytes, last_revision: int | None) -> int:
    """``put_model`` for a value already serialised (by a caller that caches the parts)."""
    try:
        if last_revision is None:
            return await kv.create(key, data)
        return await kv.update(key, data, last=last_revision)
    except KeyWrongLastSequenceError as exc:
        raise ConflictError(f"{key} changed concurrently") from exc


class ListingTimeout(RuntimeError):
    """A bucket's present values did not all arrive in time (NATS slow or away)."""


async def read_entries(
    kv: KeyValue, keys: str = ">", include_history: bool = False, timeout: float = 10.0
) -> list[KeyValue.Entry]:
    """Every entry under ``keys`` (a key or a pattern) present when called, deletions
    included, oldest first; with ``include_history`` every kept version, else the latest
    of each key.

    Why not nats-py's ``keys()``/``history()``: they stop at the watch's "initial values
    done" marker, which the client puts in as soon as the server reports nothing pending
    and the subscription has received nothing yet, which is also the case while the
    values are on the wire.  A listing then came back empty (the api listed no deployment
    right after an apply, in CI).  Here the end is the stream's last sequence under
    ``keys``, read first: the watch delivers in sequence order, and the last message of
    the pattern is the last of its key, so it (or a newer one) is always delivered.
    """
    # nats-py keeps the bucket's stream, subject prefix and JetStream context private.
    js, stream, prefix = kv._js, kv._stream, kv._pre  # noqa: SLF001
    try:
        last = (await js.get_last_msg(stream, f"{prefix}{keys}")).seq
    except NotFoundError:
        return []
    watcher = await kv.watch(keys, include_history=include_history, meta_only=False)
    entries: list[KeyValue.Entry] = []
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is None:
                    continue  # the client's marker: not trusted, see above
                entries.append(entry)
                if (entry.revision or 0) >= last:
                    break
    except TimeoutError as exc:
        raise ListingTimeout(
            f"listing {stream} {keys}: {len(entries)} entries in {timeout:.0f} s, the last by sequence ({last}) never came"
        ) from exc
    finally:
        await watcher.stop()
    return entries


def _latest_live(entries: list[KeyValue.Entry]) -> dict[str, KeyValue.Entry]:
    latest: dict[str, KeyValue.Entry] = {}
    for entry in entries:  # oldest first, so a later version of a key replaces the earlier
        latest[entry.key] = entry
    return {key: e for key, e in latest.items() if e.value is not None and not is_deletion(e)}


async def list_keys(kv: KeyValue, keys: str = ">") -> list[str]:
    """Every live key (under ``keys``)."""
    return list(_latest_live(await read_entries(kv, keys)))


async def list_models(kv: KeyValue, model: type[M], keys: str = ">") -> dict[str, tuple[M, int]]:
    """Every live key (under ``keys``) with its value and revision."""
    return {
        key: (model.model_validate_json(e.value), e.revision or 0)
        for key, e in _latest_live(await read_entries(kv, keys)).items()
    }


def is_deletion(entry: KeyValue.Entry) -> bool:
    return entry.operation is not None and str(entry.operation).endswith(("DEL", "PURGE"))


async def watch_bucket(
    kv: KeyValue, handle: Callable[[str, bytes | None], None], log: logging.Logger, retry_seconds: float = 1.0
) -> None:
    """Forever: ``handle(key, value)`` for every value in the bucket and every change to come
    (``None`` for a deletion).  A value ``handle`` cannot parse (it raises ValueError) is
    logged and skipped; a watch that ends (NATS away) is started again, from the bucket's
    present values, so a consumer is level-triggered across reconnects."""
    while True:
        try:
            watcher = await kv.watchall()
            async for entry in watcher:
                if entry is None:
                    continue  # the end of the values present when the watch began
                try:
                    handle(entry.key, None if is_deletion(entry) else entry.value)
                except ValueError:
                    log.warning("dropped a bucket entry that does not parse", extra={"key": entry.key}, exc_info=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("a bucket watch ended; starting it again", exc_info=True)
            await asyncio.sleep(retry_seconds)
