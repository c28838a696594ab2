"""The audit chain's pure core: records and their hashes, signed checkpoints, and
verification naming the first problem (which record, and what happened to it)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from comp_audit.chain import GENESIS, Checkpoint, Entry, Head, content_json, extend, line_hash, parse_record, seal_record, sign_checkpoint, verify
from comp_audit.query import AuditQuery, matches, newest_matching

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def event(n: int, data: bytes | None = None) -> Entry:
    return Entry("event", "COMP_EVENTS", n, f"comp.evt.deployment.default.web{n}", data or json.dumps({"n": n}).encode())


def build(count: int, checkpoint_every: int | None = None, key: Ed25519PrivateKey = KEY) -> tuple[list[bytes], list[bytes]]:
    """``count`` records appended two at a time, a checkpoint after each batch that passes a
    multiple of ``checkpoint_every`` and one at the head (as the service does at shutdown)."""
    head, lines, checkpoints = Head(), [], []
    for start in range(1, count + 1, 2):
        batch = [event(n) for n in range(start, min(start + 2, count + 1))]
        head, text, _ = extend(head, 1000.0 + start, batch)
        lines.extend(text.splitlines())
        if checkpoint_every and head.seq // checkpoint_every > (head.seq - len(batch)) // checkpoint_every:
            checkpoints.append(sign_checkpoint(key, head, 2000.0 + head.seq).to_line())
    if count and (not checkpoints or Checkpoint.from_line(checkpoints[-1]).seq != head.seq):
        checkpoints.append(sign_checkpoint(key, head, 3000.0).to_line())
    return lines, checkpoints


def problem_of(lines, checkpoints, key=KEY):
    verdict = verify(lines, checkpoints, key.public_key())
    return None if verdict.problem is None else (verdict.problem.kind, verdict.problem.seq)


def edit(line: bytes, **changes) -> bytes:
    record = json.loads(line)
    record.update(changes)
    return json.dumps(record).encode()


def rehash(line: bytes, **changes) -> bytes:
    return seal_record(json.loads(edit(line, **changes)))


# ---- records ---------------------------------------------------------------------------------
def test_records_link_each_to_the_one_before():
    lines, _ = build(5)
    records = [parse_record(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records, records[1:]):
        assert after["prev"] == before["hash"]
    assert all(line_hash(line) == r["hash"] for line, r in zip(lines, records))
    assert [r["stream_seq"] for r in records] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "entry, fields",
    [
        (Entry("event", "S", 1, "comp.evt.x", b'{"a": 1}'), {"body": {"a": 1}}),
        (Entry("event", "S", 1, "comp.evt.x", b'{\n  "a": [1,\r\n 2]\n}'), {"body": {"a": [1, 2]}}),
        (Entry("event", "S", 1, "comp.evt.x", b"[1, 2]"), {"body": [1, 2]}),
        (Entry("event", "S", 1, "comp.evt.x", b"not json"), {"raw": "not json", "malformed": "not JSON: Expecting value: line 1 column 1 (char 0)"}),
        (Entry("event", "S", 1, "comp.evt.x", b'{"a": "x\ny"}'), {"raw": '{"a": "x\ny"}', "malformed": "not JSON: Invalid control character at: line 1 column 9 (char 8)"}),
        (Entry("event", "S", 1, "comp.evt.x", b"\xff\xfe"),
         {"raw": base64.b64encode(b"\xff\xfe").decode(), "encoding": "base64", "malformed": "not JSON: not UTF-8"}),
        (Entry("request", "R", 1, "comp.audit.request", b'{"verb": "GET", "path": "/", "status": 200}'),
         {"body": {"verb": "GET", "path": "/", "status": 200}}),
        (Entry("request", "R", 1, "comp.audit.request", b'{"verb": "GET"}'),
         {"body": {"verb": "GET"}, "malformed": "not an api request record: missing path, status"}),
    ],
)
def test_content_is_the_body_or_the_raw_bytes_flagged(entry, fields):
    content = content_json(entry)
    assert b"\n" not in content and b"\r" not in content
    assert json.loads(b"{" + content + b"}") == fields


def test_a_log_of_malformed_and_odd_bodies_verifies():
    entries = [event(1, b"\xff garbage"), event(2, "{\"é\": \"ü\", \"n\": 1e400}".encode()), event(3, b'{"b": 1, "a": [null, true]}')]
    head, text, count = extend(Head(), 5.5, entries)
    assert count == 3
    assert verify(text.splitlines(), [sign_checkpoint(KEY, head, 6.0).to_line()], KEY.public_key()).ok


# ---- verification: tables --------------------------------------------------------------------
def test_an_untouched_log_verifies():
    lines, checkpoints = build(10, checkpoint_every=4)
    verdict = verify(lines, checkpoints, KEY.public_key())
    assert verdict.ok and verdict.records == 10 and verdict.head.seq == 10
    assert verdict.checkpoints == len(checkpoints) >= 3


def test_an_empty_log_with_no_checkpoint_verifies():
    assert verify([], [], KEY.public_key()).ok


def _delete(lines, i):
    return lines[:i] + lines[i + 1 :]


def _swap(lines, i, j):
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def _replace(lines, i, line):
    return lines[:i] + [line] + lines[i + 1 :]


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda l: _replace(l, 3, edit(l[3], body={"n": 99})), ("altered", 4)),
        (lambda l: _replace(l, 3, edit(l[3], time=1.0)), ("altered", 4)),
        (lambda l: _replace(l, 3, edit(l[3], hash="0" * 64)), ("altered", 4)),
        (lambda l: _replace(l, 3, edit(l[3], seq=9)), ("altered", 4)),
        (lambda l: _replace(l, 3, b"{not json"), ("altered", 4)),
        (lambda l: _replace(l, 0, edit(l[0], prev="1" * 64)), ("altered", 1)),
        # Edited and re-hashed: record 4 is self-consistent, record 5 no longer links to it.
        (lambda l: _replace(l, 3, rehash(l[3], body={"n": 99})), ("altered", 4)),
        (lambda l: _replace(l, 0, rehash(l[0], prev="1" * 64)), ("altered", 1)),
        (lambda l: _delete(l, 0), ("removed", 1)),
        (lambda l: _delete(l, 4), ("removed", 5)),
        (lambda l: l[:2] + l[5:], ("removed", 3)),
        (lambda l: _swap(l, 2, 3), ("reordered", 3)),
        (lambda l: _swap(l, 1, 7), ("reordered", 2)),
        (lambda l: l[:5] + [l[2]] + l[5:], ("duplicated", 3)),
        (lambda l: l[:6], ("truncated", 7)),
        (lambda l: [], ("truncated", 1)),
        # The last record re-hashed: only the checkpoint at its seq can tell.
        (lambda l: _replace(l, 9, rehash(l[9], body={"n": 0})), ("rewritten", 10)),
    ],
    ids=[
        "body", "time", "hash", "seq", "not-json", "prev", "rehashed", "rehashed-first", "first-removed",
        "middle-removed", "three-removed", "adjacent-swap", "distant-swap", "duplicate", "tail-cut", "all-cut", "last-rehashed",
    ],
)
def test_tampering_is_named(tamper, expected):
    lines, checkpoints = build(10, checkpoint_every=4)
    assert problem_of(tamper(lines), checkpoints) == expected


def test_a_rehashed_tail_is_caught_by_the_checkpoint_after_it():
    lines, checkpoints = build(10, checkpoint_every=4)
    records = [parse_record(line) for line in lines]
    # Record 6 changed and every record after it re-linked and re-hashed: the chain is
    # consistent in itself, only the checkpoint at 8 (signed before) disagrees.
    records[5]["body"] = {"n": "forged"}
    forged = [line for line in lines[:5]]
    for i in range(5, 10):
        records[i]["prev"] = records[i - 1]["hash"]
        forged.append(seal_record(records[i]))
        records[i]["hash"] = parse_record(forged[-1])["hash"]
    verdict = verify(forged, checkpoints, KEY.public_key())
    assert (verdict.problem.kind, verdict.problem.seq) == ("rewritten", 8)
    assert "after 4 and up to 8" in verdict.problem.detail


@pytest.mark.parametrize(
    "checkpoints, expected",
    [
        (lambda c: [c[0][:-20] + b'"0000"}'], ("bad-checkpoint", 0)),
        (lambda c: [edit(c[0], head="ab" * 32)], ("bad-checkpoint", 4)),
        (lambda c: [edit(c[0], seq=3)], ("bad-checkpoint", 3)),
        (lambda c: [edit(c[0], signature="zz")], ("bad-checkpoint", 4)),
        (lambda c: [b"nonsense"], ("bad-checkpoint", 0)),
    ],
    ids=["cut", "head-changed", "seq-changed", "signature-not-hex", "not-json"],
)
def test_a_bad_checkpoint_is_reported(checkpoints, expected):
    lines, good = build(10, checkpoint_every=4)
    assert problem_of(lines, checkpoints(good)) == expected


def test_a_checkpoint_signed_by_another_key_is_reported():
    lines, _ = build(6, checkpoint_every=3)
    _, foreign = build(6, checkpoint_every=3, key=OTHER_KEY)
    verdict = verify(lines, foreign, KEY.public_key())
    assert verdict.problem.kind == "bad-checkpoint" and "does not verify" in verdict.problem.detail


def test_checkpoints_without_a_public_key_are_reported():
    lines, checkpoints = build(3)
    assert verify(lines, checkpoints, None).problem.kind == "bad-checkpoint"


# ---- verification: properties ----------------------------------------------------------------
sizes = st.integers(min_value=2, max_value=25)


@settings(max_examples=60, deadline=None)
@given(count=sizes, every=st.integers(min_value=1, max_value=10))
def test_property_an_untouched_log_verifies(count, every):
    lines, checkpoints = build(count, checkpoint_every=every)
    assert problem_of(lines, checkpoints) is None


@settings(max_examples=100, deadline=None)
@given(data=st.data(), count=sizes)
def test_property_any_alteration_is_named_at_its_record(data, count):
    lines, checkpoints = build(count, checkpoint_every=5)
    i = data.draw(st.integers(0, count - 1), label="record index")
    field = data.draw(st.sampled_from(["body", "time", "kind", "stream", "stream_seq", "subject", "prev", "hash"]), label="field")
    record = json.loads(lines[i])
    value = data.draw(st.one_of(st.integers(), st.text(max_size=8), st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    if value == record[field]:
        value = [value]
    # Re-hashing after changing the hash itself would only put the true hash back.
    rehashed = field != "hash" and data.draw(st.booleans(), label="re-hashed")
    tampered = rehash(lines[i], **{field: value}) if rehashed else edit(lines[i], **{field: value})
    assert problem_of(_replace(lines, i, tampered), checkpoints) == (
        ("rewritten", count) if rehashed and i == count - 1 and field != "prev" else ("altered", i + 1)
    )


@settings(max_examples=100, deadline=None)
@given(data=st.data(), count=sizes)
def test_property_any_deletion_is_named(data, count):
    lines, checkpoints = build(count, checkpoint_every=5)
    i = data.draw(st.integers(0, count - 1), label="deleted index")
    expected = ("truncated", count) if i == count - 1 else ("removed", i + 1)
    assert problem_of(_delete(lines, i), checkpoints) == expected


@settings(max_examples=100, deadline=None)
@given(data=st.data(), count=sizes)
def test_property_any_swap_is_named_at_the_first_record_out_of_place(data, count):
    lines, checkpoints = build(count, checkpoint_every=5)
    i = data.draw(st.integers(0, count - 2), label="first")
    j = data.draw(st.integers(i + 1, count - 1), label="second")
    assert problem_of(_swap(lines, i, j), checkpoints) == ("reordered", i + 1)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), count=sizes)
def test_property_any_truncation_is_named_at_the_first_missing_record(data, count):
    lines, checkpoints = build(count, checkpoint_every=5)
    keep = data.draw(st.integers(0, count - 1), label="kept")
    assert problem_of(lines[:keep], checkpoints) == ("truncated", keep + 1)


@settings(max_examples=50, deadline=None)
@given(batches=st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=5), min_size=1, max_size=6))
def test_property_any_bodies_in_any_batches_verify(batches):
    head, lines, n = Head(), [], 0
    for batch in batches:
        entries = []
        for data in batch:
            n += 1
            entries.append(event(n, data))
        head, text, _ = extend(head, float(n), entries)
        lines.extend(text.splitlines())
    assert head.seq == n == len(lines)
    assert verify(lines, [sign_checkpoint(KEY, head, 0.5).to_line()], KEY.public_key()).ok


# ---- queries ---------------------------------------------------------------------------------
def request(seq, actor, verb="GET", resource="deployments", namespace="default", time=100.0):
    body = {"actor": actor, "verb": verb, "path": f"/v1/{resource}", "status": 200, "resource": resource, "namespace": namespace}
    return {"seq": seq, "time": time, "kind": "request", "subject": "comp.audit.request", "body": body}


@pytest.mark.parametrize(
    "query, record, expected",
    [
        (AuditQuery(), request(1, "ann"), True),
        (AuditQuery(actor="ann"), request(1, "ann"), True),
        (AuditQuery(actor="bob"), request(1, "ann"), False),
        (AuditQuery(actor="ann"), {"kind": "event", "subject": "comp.evt.deployment.default.web", "body": {"actor": "ann"}}, False),
        (AuditQuery(resource="deployment"), request(1, "ann"), True),
        (AuditQuery(resource="services"), request(1, "ann"), False),
        (AuditQuery(resource="deployments"), {"kind": "event", "subject": "comp.evt.deployment.default.web", "body": {}}, True),
        (AuditQuery(resource="deployments"), {"kind": "event", "subject": "comp.evt.task.n1", "body": {}}, False),
        (AuditQuery(namespace="team-a"), request(1, "ann", namespace="team-a"), True),
        (AuditQuery(namespace="team-a"), request(1, "ann"), False),
        (AuditQuery(since=100.0), request(1, "ann", time=100.0), True),
        (AuditQuery(since=100.5), request(1, "ann", time=100.0), False),
        (AuditQuery(kind="event"), request(1, "ann"), False),
        (AuditQuery(actor="ann"), {"kind": "request", "raw": "garbage", "malformed": "not JSON"}, False),
    ],
)
def test_query_filters(query, record, expected):
    assert matches(record, query) is expected


def test_a_query_keeps_the_newest_matches_oldest_first_and_stops_at_since():
    records = [request(n, "ann" if n % 2 else "bob", time=float(n)) for n in range(1, 21)]
    newest_first = [json.dumps(r).encode() for r in reversed(records)] + [b"garbage"]
    got = newest_matching(newest_first, AuditQuery(actor="ann", limit=3))
    assert [r["seq"] for r in got] == [15, 17, 19]
    got = newest_matching(newest_first, AuditQuery(since=17.0, limit=100))
    assert [r["seq"] for r in got] == [17, 18, 19, 20]


@pytest.mark.parametrize("bad", ['{"limit": 0}', '{"since": "yesterday"}', '{"colour": "red"}', '{"kind": "other"}'])
def test_a_bad_query_is_refused(bad):
    with pytest.raises(ValueError):
        AuditQuery.model_validate_json(bad)
