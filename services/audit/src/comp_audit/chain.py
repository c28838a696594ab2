"""The audit chain, pure: records, their hashes, signed checkpoints and verification.

A record is one JSON object a line, its fields always in this order::

    {"seq":7,"time":1764590000.123,"kind":"event","stream":"COMP_EVENTS","stream_seq":42,
     "subject":"comp.evt.deployment.default.web","prev":"<hash of record 6>","body":{...},
     "hash":"<sha256, hex>"}

``hash`` is SHA-256 over the line's own bytes up to (not including) ``,"hash":``, so it
covers ``prev`` and with it the whole history before.  Hashing the stored bytes rather
than a re-encoded form needs no canonical JSON: verification hashes exactly what is on
disk (a changed space is a change), and the writer embeds a JSON body as it arrived
instead of parsing and encoding it again, which is most of what a record costs.

A linear chain rather than an RFC 6962 Merkle tree: the log is only ever appended to and
verified from the start by whoever holds the files, which a chain does in one pass with
one hash per record; a Merkle tree's gain (short inclusion and consistency proofs for a
third party holding only a root) has no user here yet.

Keeping ``prev`` in each record (not only inside the hash) is what lets verification name
the record that changed: a record edited and re-hashed still checks against its own
bytes, and it is the next record's ``prev`` (or the checkpoint at it) that disagrees.

A record whose input was not JSON keeps the bytes as ``raw`` (UTF-8 text, or base64 with
``encoding: base64``) with ``malformed`` saying why, instead of ``body``.

Checkpoints ``{seq, head, time}`` are signed with Ed25519 and kept apart from the records;
they are what catches a tail cut off, or a chain re-hashed from some record on.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
KINDS = ("request", "event", "gap")
# A request record must carry these (written by the api's audit middleware).
REQUEST_FIELDS = ("verb", "path", "status")

ProblemKind = Literal["altered", "removed", "reordered", "duplicated", "truncated", "rewritten", "bad-checkpoint"]


def canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Entry:
    """One message as a source delivered it, before it is a record."""

    kind: str  # "request" | "event" | "gap"
    stream: str
    stream_seq: int
    subject: str
    data: bytes


@dataclass(frozen=True)
class Head:
    seq: int = 0
    hash: str = GENESIS


def content_json(entry: Entry) -> bytes:
    """The record's content fields as JSON text (``"body":...``, or ``"raw":...,"malformed":...``).

    A JSON body is embedded as it arrived, its line breaks (only ever whitespace between
    tokens in valid JSON) made spaces so that a record stays one line.
    """
    try:
        text = entry.data.decode()
        body = json.loads(text)
    except UnicodeDecodeError:
        return _raw(entry.data, "not JSON: not UTF-8")
    except ValueError as exc:
        return _raw(entry.data, f"not JSON: {exc}")
    if "\n" in text or "\r" in text:
        text = text.replace("\n", " ").replace("\r", " ")
    content = b'"body":' + text.encode()
    if entry.kind == "request":
        missing = [f for f in REQUEST_FIELDS if not isinstance(body, dict) or f not in body]
        if missing:
            content += b',"malformed":' + _json(f"not an api request record: missing {', '.join(missing)}")
    return content


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _raw(data: bytes, why: str) -> bytes:
    try:
        raw = b'"raw":' + _json(data.decode())
    except UnicodeDecodeError:
        raw = b'"raw":' + _json(base64.b64encode(data).decode()) + b',"encoding":"base64"'
    return raw + b',"malformed":' + _json(why[:200])


HASH_PREFIX = b',"hash":"'
# ,"hash":"<64 hex>"}
SEAL_BYTES = len(HASH_PREFIX) + 64 + 2


def seal(unsealed: bytes) -> tuple[bytes, str]:
    """A record's line (no newline) and hash from its JSON object text without ``hash``."""
    hashed = unsealed[:-1]
    digest = hashlib.sha256(hashed).hexdigest()
    return b"%s%s%s\"}" % (hashed, HASH_PREFIX, digest.encode()), digest


def line_hash(line: bytes) -> str | None:
    """The hash of a stored line's own bytes, or None when it does not end as a record does."""
    if len(line) < SEAL_BYTES or line[-SEAL_BYTES:-66] != HASH_PREFIX or not line.endswith(b'"}'):
        return None
    return hashlib.sha256(line[:-SEAL_BYTES]).hexdigest()


def extend(head: Head, time: float, entries: Iterable[Entry]) -> tuple[Head, bytes, int]:
    """The records for ``entries`` appended after ``head``: the new head, the lines (each
    ending in a newline) as one buffer, and how many there are."""
    seq, prev = head.seq, head.hash
    lines: list[bytes] = []
    stamp = repr(float(time)).encode()
    quoted: dict[str, bytes] = {}
    for entry in entries:
        seq += 1
        subject = quoted.get(entry.subject)
        if subject is None:
            subject = quoted[entry.subject] = _json(entry.subject)
        stream = quoted.get(entry.stream)
        if stream is None:
            stream = quoted[entry.stream] = _json(entry.stream)
        unsealed = b'{"seq":%d,"time":%s,"kind":"%s","stream":%s,"stream_seq":%d,"subject":%s,"prev":"%s",%s}' % (
            seq, stamp, entry.kind.encode(), stream, entry.stream_seq, subject, prev.encode(), content_json(entry),
        )
        line, prev = seal(unsealed)
        lines.append(line)
    lines.append(b"")
    return Head(seq, prev), b"\n".join(lines), len(lines) - 1


def parse_record(line: bytes | str) -> dict[str, Any]:
    """A stored line as a record; ValueError when it is not one."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for name, kind in (("seq", int), ("hash", str), ("prev", str)):
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            raise ValueError(f"no {name}")
    return record


def seal_record(record: Mapping[str, Any]) -> bytes:
    """A record (as a mapping, ``hash`` ignored) written out and sealed with its own hash:
    what someone re-hashing an edited record would store."""
    fields = {k: v for k, v in record.items() if k != "hash"}
    return seal(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode())[0]


# ---- checkpoints -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head: str
    time: float
    signature: str  # hex

    def signed_bytes(self) -> bytes:
        return canonical({"seq": self.seq, "head": self.head, "time": self.time})

    def to_line(self) -> bytes:
        return canonical({"seq": self.seq, "head": self.head, "time": self.time, "signature": self.signature}) + b"\n"

    @classmethod
    def from_line(cls, line: bytes | str) -> "Checkpoint":
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            seq, head, time, signature = data["seq"], data["head"], data["time"], data["signature"]
        except KeyError as exc:
            raise ValueError(f"no {exc.args[0]}") from None
        if not isinstance(seq, int) or not isinstance(head, str) or not isinstance(signature, str):
            raise ValueError("fields of the wrong type")
        if not isinstance(time, (int, float)):
            raise ValueError("time is not a number")
        return cls(seq, head, time, signature)


def sign_checkpoint(key: Ed25519PrivateKey, head: Head, time: float) -> Checkpoint:
    unsigned = Checkpoint(head.seq, head.hash, time, "")
    return Checkpoint(head.seq, head.hash, time, key.sign(unsigned.signed_bytes()).hex())


def signature_valid(public_key: Ed25519PublicKey, checkpoint: Checkpoint) -> bool:
    try:
        public_key.verify(bytes.fromhex(checkpoint.signature), checkpoint.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


# ---- verification ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    seq: int  # the record named (for a checkpoint problem: the checkpoint's seq)
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at record {self.seq}: {self.detail}"


@dataclass(frozen=True)
class Verdict:
    records: int
    checkpoints: int
    head: Head
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "records": self.records, "checkpoints": self.checkpoints,
            "head_seq": self.head.seq, "head_hash": self.head.hash,
            "problem": None if self.problem is None else {
                "kind": self.problem.kind, "seq": self.problem.seq, "detail": self.problem.detail,
            },
        }


def verify(
    lines: Sequence[bytes],
    checkpoint_lines: Sequence[bytes],
    public_key: Ed25519PublicKey | None,
) -> Verdict:
    """The first problem in the stored log, or none.

    ``lines`` are the stored records in stored order; ``checkpoint_lines`` the stored
    checkpoints.  Checkpoints are checked first (a forged one would vouch for anything),
    then the records one by one from the first: each must be self-consistent (its hash
    matches its content), come right after the one before (seq), and link to it (prev); a
    record at a checkpoint's seq must have the hash the checkpoint signed; and the log
    must reach the last checkpoint.
    """
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(checkpoint_lines, 1):
        try:
            checkpoint = Checkpoint.from_line(line)
        except ValueError as exc:
            return Verdict(0, len(checkpoints), Head(), Problem("bad-checkpoint", 0, f"checkpoint line {number} is unreadable: {exc}"))
        if public_key is None or not signature_valid(public_key, checkpoint):
            why = "no public key to check it with" if public_key is None else "its signature does not verify with the audit public key"
            return Verdict(0, len(checkpoints), Head(), Problem("bad-checkpoint", checkpoint.seq, f"checkpoint line {number} (seq {checkpoint.seq}): {why}"))
        checkpoints.append(checkpoint)
    signed: dict[int, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        signed.setdefault(checkpoint.seq, []).append(checkpoint)

    head = Head()
    seen: set[int] = set()

    def verdict(problem: Problem | None) -> Verdict:
        return Verdict(head.seq, len(checkpoints), head, problem)

    for position, line in enumerate(lines):
        expected = head.seq + 1
        try:
            record = parse_record(line)
        except ValueError as exc:
            return verdict(Problem("altered", expected, f"line {position + 1} is not a record: {exc}"))
        seq = record["seq"]
        if line_hash(line) != record["hash"]:
            claimed = "" if seq == expected else f" (it now says seq {seq})"
            return verdict(Problem("altered", expected, f"record {expected}'s content does not match its hash{claimed}"))
        if seq in seen:
            return verdict(Problem("duplicated", seq, f"record {seq} is stored twice (again at line {position + 1})"))
        if seq != expected:
            if seq > expected and not _appears_later(lines, position + 1, expected):
                missing = f"record {expected} is" if seq == expected + 1 else f"records {expected} to {seq - 1} are"
                return verdict(Problem("removed", expected, f"{missing} missing (record {seq} follows record {head.seq})"))
            return verdict(Problem("reordered", expected, f"record {expected} is out of order: record {seq} is stored in its place"))
        if record["prev"] != head.hash:
            if head.seq == 0:
                return verdict(Problem("altered", seq, "record 1 does not start the chain (its prev is not the genesis hash)"))
            # Either this record's prev was edited and the record re-hashed (then the next
            # record, or the checkpoint at this one, no longer agrees with it), or the record
            # before was edited and re-hashed.
            following = _links_to(lines, position + 1, record["hash"])
            if following is False or (following is None and any(c.head != record["hash"] for c in signed.get(seq, ()))):
                return verdict(Problem("altered", seq, f"record {seq} was changed and re-hashed: it links to another record {head.seq}"))
            return verdict(Problem(
                "altered", head.seq,
                f"record {head.seq} was changed and re-hashed: record {seq} links to a different record {head.seq}",
            ))
        for checkpoint in signed.get(seq, ()):
            if checkpoint.head != record["hash"]:
                if _links_to(lines, position + 1, checkpoint.head):
                    return verdict(Problem(
                        "altered", seq,
                        f"record {seq} was changed and re-hashed: the checkpoint and record {seq + 1} both hold its former hash",
                    ))
                since = max((c.seq for c in checkpoints if c.seq < seq), default=0)
                return verdict(Problem(
                    "rewritten", seq,
                    f"the checkpoint signed at {checkpoint.time:.3f} says record {seq} hashes to {checkpoint.head[:16]}..., "
                    f"it now hashes to {record['hash'][:16]}...: a record after {since} and up to {seq} was changed and the chain re-hashed",
                ))
        seen.add(seq)
        head = Head(seq, record["hash"])

    beyond = [c for c in checkpoints if c.seq > head.seq]
    if beyond:
        last = max(beyond, key=lambda c: c.seq)
        return verdict(Problem(
            "truncated", head.seq + 1,
            f"the log ends at record {head.seq} but a checkpoint signed at {last.time:.3f} covers records up to {last.seq}",
        ))
    return verdict(None)


def _links_to(lines: Sequence[bytes], position: int, hash_: str) -> bool | None:
    """Whether the record at ``position`` is intact and links to ``hash_``; None when there
    is no such record or it is itself damaged (it says nothing then)."""
    if position >= len(lines):
        return None
    try:
        record = parse_record(lines[position])
    except ValueError:
        return None
    if line_hash(lines[position]) != record["hash"]:
        return None
    return record["prev"] == hash_


def _appears_later(lines: Sequence[bytes], start: int, seq: int) -> bool:
    # Only on the failure path: tells a record moved further down from one removed.
    for line in lines[start:]:
        try:
            if parse_record(line)["seq"] == seq:
                return True
        except ValueError:
            continue
    return False
