"""The audit service: messages from the sources into the chain, batch by batch, and the
answers to queries and verification.

Each source is consumed from right after the stream sequence that the log itself says was
recorded last (``store.read_tail``), never from a consumer's acknowledgements: the log is
the truth, so a crash between an append and anything else neither loses nor repeats a
record.  Messages arrive into one pending list; a single writer task takes all there is
(up to ``max_batch`` messages or ``max_batch_bytes``), turns it into records (``chain.extend``) and writes them with one
write and one fsync in a worker thread, while the sources keep delivering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from pydantic import ValidationError

from comp_common import subjects
from comp_common.aio import within

from . import instruments, store
from .chain import Entry, Head, extend, sign_checkpoint
from .query import AuditQuery, newest_matching
from .settings import AuditGroup

log = logging.getLogger("audit")

# stream name -> record kind
SOURCES = {subjects.EVENTS_STREAM: "event", subjects.API_REQUESTS_STREAM: "request"}


class AuditService:
    def __init__(self, settings: AuditGroup, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.clock = clock
        self.segments = store.SegmentWriter(self.data_dir, settings.segment_bytes)
        self.checkpoints = store.CheckpointWriter(self.data_dir, settings.key_file)
        # On disk (fsynced): the chain's head and each stream's last recorded sequence.
        self.head = Head()
        self.positions: dict[str, int] = {}
        # Where each source's reading began on this start: what came while it was down
        # is read from there.
        self.resumed_from: dict[str, int] = {}
        self.checkpointed_seq = 0
        self._checkpointed_at = time.monotonic()
        self._pending: list[tuple[str, Msg]] = []
        self._pending_bytes = 0
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self.dropped_duplicates = 0
        # Set when the log's end fails its last checkpoint: then nothing more is recorded
        # (queries and verification still answer) until an operator moves the log aside.
        self.damage: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        await asyncio.to_thread(self._open_files)
        log.info(
            "audit log opened",
            extra={"data_dir": str(self.data_dir), "head_seq": self.head.seq, "positions": json.dumps(self.positions)},
        )

    def _open_files(self) -> None:
        self.segments.open()
        self.checkpoints.open()
        try:
            tail = store.read_tail(self.data_dir, tuple(SOURCES))
            last = self.checkpoints.last()
            damage = store.tail_damage(self.data_dir, tail.head, last)
        except (ValueError, KeyError, TypeError) as exc:
            # The log's own end (or its last checkpoint) is not what this service wrote.
            self.damage = f"the end of the log or of its checkpoints is unreadable: {exc!r}"
            return
        self.head, self.positions = tail.head, tail.positions
        self.checkpointed_seq = last.seq if last else 0
        self.damage = damage

    def start_writing(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        self._writer.add_done_callback(_log_writer_end)

    async def close(self) -> None:
        """Write what has arrived, sign a last checkpoint, close the files."""
        self._stopping = True
        self._arrived.set()
        if self._writer is not None:
            await asyncio.wait([self._writer])  # a writer that failed has logged why already
        await self._checkpoint()
        self.segments.close()

    def start_seq(self, stream: str) -> int:
        return self.positions.get(stream, 0) + 1

    async def note_stream_reset(self, stream: str, stream_last_seq: int) -> None:
        """The stream holds fewer messages than the log recorded from it: it was deleted
        and made again.  Recorded, and the stream is read again from its start."""
        recorded = self.positions.get(stream, 0)
        body = {
            "reason": "stream reset: it ends before the last message recorded from it",
            "recorded_last": recorded, "stream_last": stream_last_seq,
        }
        log.warning("a source stream was reset; reading it from its start", extra={"stream": stream, **body})
        await self._append([Entry("gap", stream, 0, "", json.dumps(body).encode())], {stream: 0})

    # ---- sources -------------------------------------------------------------------------
    def on_message_for(self, stream: str) -> Callable[[Msg], Any]:
        async def on_message(msg: Msg) -> None:
            while len(self._pending) >= self.settings.max_pending or self._pending_bytes >= self.settings.max_pending_bytes:
                # Not returning holds this subscription; JetStream's flow control holds the rest.
                self._room.clear()
                await self._room.wait()
            self._pending.append((stream, msg))
            self._pending_bytes += len(msg.data)
            self._arrived.set()

        return on_message

    def _entries(self, arrived: list[tuple[str, Msg]]) -> tuple[list[Entry], dict[str, int]]:
        """Records-to-be for what arrived, skipping what the log already holds and noting
        stream sequences that are gone (expired from the stream before they were read)."""
        positions: dict[str, int] = {}
        entries: list[Entry] = []
        for stream, msg in arrived:
            stream_seq = stream_sequence(msg.reply)
            if stream_seq is None:  # not a JetStream delivery: nothing to place it by
                log.warning("ignored a message without JetStream metadata", extra={"subject": msg.subject, "reply": msg.reply})
                continue
            last = positions.get(stream, self.positions.get(stream, 0))
            if stream_seq <= last:
                self.dropped_duplicates += 1
                instruments.DUPLICATES.inc()
                continue
            if stream_seq > last + 1:
                body = {"first": last + 1, "last": stream_seq - 1, "reason": "no longer in the stream when audit read it"}
                log.warning("source messages lost before they were recorded", extra={"stream": stream, **body})
                entries.append(Entry("gap", stream, stream_seq - 1, "", json.dumps(body).encode()))
            entries.append(Entry(SOURCES[stream], stream, stream_seq, msg.subject, msg.data))
            positions[stream] = stream_seq
        return entries, positions

    def _take_batch(self) -> list[tuple[str, Msg]]:
        """The oldest pending messages, up to ``max_batch`` of them or ``max_batch_bytes`` of
        bodies (at least one)."""
        count, size, limit = 0, 0, self.settings.max_batch_bytes
        for _, msg in self._pending[: self.settings.max_batch]:
            if count and size + len(msg.data) > limit:
                break
            count += 1
            size += len(msg.data)
        batch = self._pending[:count]
        del self._pending[:count]
        self._pending_bytes -= size
        return batch

    async def _write_loop(self) -> None:
        every = self.settings.checkpoint_every_seconds
        while True:
            try:
                await within(self._arrived.wait(), every)
            except TimeoutError:
                await self._checkpoint()
                continue
            self._arrived.clear()
            while self._pending:
                arrived = self._take_batch()
                self._room.set()
                entries, positions = self._entries(arrived)
                while True:
                    try:
                        await self._append(entries, positions)
                        break
                    except OSError:
                        instruments.WRITE_FAILURES.inc()
                        # Nothing of the batch counts as written (the segment is cut back);
                        # the same batch is tried again, and the sources wait meanwhile.
                        if self._stopping:
                            # Not lost: the log's positions are behind them, so the next start reads them again.
                            log.error("stopping with records not written; they are recorded on the next start")
                            return
                        log.exception("writing the audit log failed; retrying", extra={"data_dir": str(self.data_dir)})
                        await asyncio.sleep(1.0)
                # By count under load, by time for a trickle that never leaves the loop idle.
                if (self.head.seq - self.checkpointed_seq >= self.settings.checkpoint_every_records
                        or time.monotonic() - self._checkpointed_at >= every):
                    await self._checkpoint()
            if self._stopping:
                return

    async def _append(self, entries: list[Entry], positions: dict[str, int]) -> None:
        if not entries:
            self.positions.update(positions)
            return
        head, lines, _ = extend(self.head, self.clock(), entries)
        with instruments.BATCH_WRITES.time():
            await asyncio.to_thread(self.segments.append, lines, self.head.seq + 1)
        self.head = head
        self.positions.update(positions)
        for kind, count in Counter(e.kind for e in entries).items():
            instruments.RECORDS.labels(kind).inc(count)

    async def _checkpoint(self) -> None:
        # Never sign over a damaged log: that would vouch for what was done to it.
        if self.head.seq <= self.checkpointed_seq or self.damage is not None:
            return
        assert self.checkpoints.key is not None
        checkpoint = sign_checkpoint(self.checkpoints.key, self.head, self.clock())
        try:
            await asyncio.to_thread(self.checkpoints.append, checkpoint)
        except OSError:
            log.exception("writing a checkpoint failed; the next one will cover these records")
            return
        self.checkpointed_seq = checkpoint.seq
        self._checkpointed_at = time.monotonic()

    # ---- reading -------------------------------------------------------------------------
    async def query(self, request: bytes) -> dict[str, Any]:
        try:
            query = AuditQuery.model_validate_json(request or b"{}")
        except ValidationError as exc:
            return {"error": f"bad audit query: {_first_error(exc)}"}
        if query.limit > self.settings.max_query_limit:
            return {"error": f"bad audit query: limit {query.limit} is over the maximum {self.settings.max_query_limit}"}
        records = await asyncio.to_thread(self._query, query)
        return {"records": records, "head_seq": self.head.seq}

    def _query(self, query: AuditQuery) -> list[dict[str, Any]]:
        def newest_first():
            for path in reversed(store.segments(self.data_dir)):
                data = path.read_bytes()
                data = data[: data.rfind(b"\n") + 1]
                yield from reversed(data.split(b"\n")[:-1])

        return newest_matching(newest_first(), query)

    async def verify(self) -> dict[str, Any]:
        try:
            verdict = await asyncio.to_thread(store.verify_dir, self.data_dir)
        except (store.StoreError, OSError, ValueError) as exc:
            return {"error": f"cannot verify the audit log in {self.data_dir}: {exc}"}
        return verdict.to_json()


def _log_writer_end(task: asyncio.Task[None]) -> None:
    # Only a bug ends the writer early; say so loudly rather than stop recording in silence.
    if not task.cancelled() and task.exception() is not None:
        log.error("the audit writer stopped: nothing more is recorded", exc_info=task.exception())


def stream_sequence(reply: str) -> int | None:
    """The stream sequence in a JetStream delivery's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or with ``<domain>.<account hash>`` after ``ACK`` and a token at the end (the v2 form).
    Read here because ``Msg.metadata`` builds a whole object per message, a fifth of the
    cost of recording one.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        index = 5
    elif len(tokens) >= 11:
        index = 7
    else:
        return None
    if tokens[0] != "$JS" or tokens[1] != "ACK" or not tokens[index].isdigit():
        return None
    return int(tokens[index])


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "(body)"
    return f"{where}: {error.get('msg')}"
