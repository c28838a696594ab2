"""The audit log on disk: append-only segment files of records, and checkpoints apart.

``DATA_DIR/log/<first seq, 12 digits>.jsonl``   the records, one JSON line each
``DATA_DIR/checkpoints/checkpoints.jsonl``      signed checkpoints, one JSON line each
``DATA_DIR/checkpoints/audit.pub``             the Ed25519 public key (PEM) that verifies them
``DATA_DIR/audit.key``                          the signing key (PEM, mode 0600), created on first start

Every batch of records is one ``write`` and one ``fsync``; a checkpoint is written only
after the records it covers are on disk.  A crash in the middle of a batch can leave a
torn last line: it was never acknowledged to anyone (the sources are read again from the
log's own positions), so opening the log cuts it off.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .chain import Checkpoint, Head, Verdict, verify

log = logging.getLogger("audit.store")

LOG_DIR = "log"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "checkpoints.jsonl"
PUBLIC_KEY_FILE = "audit.pub"
KEY_FILE = "audit.key"


class StoreError(RuntimeError):
    """The data dir cannot be used (unreadable, not a log, a key that is not ours)."""


def segment_name(first_seq: int) -> str:
    return f"{first_seq:012d}.jsonl"


def segments(data_dir: Path) -> list[Path]:
    directory = data_dir / LOG_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".jsonl")


def read_records(data_dir: Path) -> list[bytes]:
    """Every complete stored line in stored order (a torn last line, still being written
    or left by a crash, is not a record yet)."""
    lines: list[bytes] = []
    for path in segments(data_dir):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        lines.extend(line for line in data[:end].split(b"\n") if line)
    return lines


def read_checkpoints(data_dir: Path) -> list[bytes]:
    path = data_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.exists():
        return []
    data = path.read_bytes()
    return [line for line in data[: data.rfind(b"\n") + 1].split(b"\n") if line]


def read_public_key(data_dir: Path) -> Ed25519PublicKey | None:
    path = data_dir / CHECKPOINT_DIR / PUBLIC_KEY_FILE
    if not path.exists():
        return None
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise StoreError(f"{path} is not an Ed25519 public key")
    return key


def verify_dir(data_dir: Path) -> Verdict:
    """Verify what is stored under ``data_dir``: needs only the files and the public key."""
    if not (data_dir / LOG_DIR).is_dir():
        raise StoreError(f"{data_dir} holds no audit log (no {LOG_DIR}/ directory)")
    # Checkpoints first: each one is written after its records, so records read afterwards cover it.
    checkpoints = read_checkpoints(data_dir)
    return verify(read_records(data_dir), checkpoints, read_public_key(data_dir))


def load_or_create_key(path: Path, public_path: Path) -> Ed25519PrivateKey:
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{path} is not a usable signing key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise StoreError(f"{path} is not an Ed25519 private key")
        if path.stat().st_mode & 0o077:
            log.warning("the audit signing key is readable by others than its owner; chmod 600 it", extra={"key_file": str(path)})
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600 from the first byte, never readable by others even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    if not public_path.exists() or public_path.read_bytes() != public_pem:
        public_path.write_bytes(public_pem)
    return key


@dataclass
class Tail:
    """What the log says it holds: its head and, per stream, the last stream sequence recorded."""

    head: Head = field(default_factory=Head)
    positions: dict[str, int] = field(default_factory=dict)


def read_tail(data_dir: Path, streams: tuple[str, ...]) -> Tail:
    """The head and each stream's position, read from the end of the log backwards.

    A stream's position is the ``stream_seq`` of its last record: found with a byte search
    for its name (its records are JSON written by us, so the name appears exactly as
    ``"stream":"NAME"``), and only the lines found are parsed.
    """
    tail = Tail()
    wanted = set(streams)
    for path in reversed(segments(data_dir)):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        data = data[:end]
        if not data:
            continue
        if tail.head.seq == 0:
            last = json.loads(data[data.rfind(b"\n", 0, end - 1) + 1 : end])
            tail.head = Head(last["seq"], last["hash"])
        for stream in list(wanted):
            position = _last_position(data, stream)
            if position is not None:
                tail.positions[stream] = position
                wanted.discard(stream)
        if not wanted:
            break
    return tail


def _last_position(data: bytes, stream: str) -> int | None:
    needle = b'"stream":' + json.dumps(stream).encode()
    end = len(data)
    while (at := data.rfind(needle, 0, end)) >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        record = json.loads(data[start : data.find(b"\n", at)])
        # The same bytes inside a body are not the record's own stream.
        if record.get("stream") == stream:
            return record["stream_seq"]
        end = start
    return None


def find_record(data_dir: Path, seq: int) -> dict | None:
    """Record ``seq`` as stored, found by a byte search in the segment that should hold it."""
    candidates = [p for p in segments(data_dir) if int(p.stem) <= seq]
    if not candidates:
        return None
    data = candidates[-1].read_bytes()
    needle = b'{"seq":%d,' % seq
    at = 0 if data.startswith(needle) else data.find(b"\n" + needle) + 1
    if at == 0 and not data.startswith(needle):
        return None
    end = data.find(b"\n", at)
    if end < 0:
        return None
    return json.loads(data[at:end])


def tail_damage(data_dir: Path, head: Head, last: Checkpoint | None) -> str | None:
    """Why the log's end disagrees with the last signed checkpoint, if it does: it was cut
    short or rewritten while the service was down.  Appending then would bury the evidence."""
    if last is None:
        return None
    if last.seq > head.seq:
        return f"the log ends at record {head.seq} but the last checkpoint covers records up to {last.seq} (truncated)"
    record = find_record(data_dir, last.seq)
    if record is None or record.get("hash") != last.head:
        return f"record {last.seq} is not the one the last checkpoint signed (rewritten)"
    return None


class SegmentWriter:
    """Appends batches of lines to the current segment; one write and one fsync each."""

    def __init__(self, data_dir: Path, segment_bytes: int):
        self.directory = data_dir / LOG_DIR
        self.segment_bytes = segment_bytes
        self._fd: int | None = None
        self._size = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = segments(self.directory.parent)
        if existing:
            self._open_segment(existing[-1])

    def _open_segment(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        if size:
            # A torn last line (a batch cut short by a crash) is not a record: cut it off.
            with open(path, "rb") as reader:
                reader.seek(max(0, size - 1))
                if reader.read(1) != b"\n":
                    data = path.read_bytes()
                    keep = data.rfind(b"\n") + 1
                    log.warning("cutting off a torn last line", extra={"segment": str(path), "bytes": size - keep})
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
                    size = keep
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size = fd, size
        _fsync_dir(self.directory)

    def append(self, lines: bytes, first_seq: int) -> None:
        """Write ``lines`` (records ``first_seq`` on) and wait until they are on disk."""
        if self._fd is None or (self._size and self._size + len(lines) > self.segment_bytes):
            self._open_segment(self.directory / segment_name(first_seq))
        assert self._fd is not None
        try:
            view = memoryview(lines)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            # A batch is all or nothing: whatever part of it got in is cut off again.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.exception("cannot cut a failed batch off the segment")
            raise
        self._size += len(lines)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CheckpointWriter:
    def __init__(self, data_dir: Path, key_path: Path | None = None):
        self.directory = data_dir / CHECKPOINT_DIR
        self.key_path = key_path or data_dir / KEY_FILE
        self.key: Ed25519PrivateKey | None = None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_key(self.key_path, self.directory / PUBLIC_KEY_FILE)

    def last(self) -> Checkpoint | None:
        lines = read_checkpoints(self.directory.parent)
        return Checkpoint.from_line(lines[-1]) if lines else None

    def append(self, checkpoint: Checkpoint) -> None:
        fd = os.open(self.directory / CHECKPOINT_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, checkpoint.to_line())
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # A new segment's directory entry must survive a crash as well as its content.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
