"""Leadership without a server: the lease state machine on a fake clock, the elector and the
applier over an in-memory KV, and the agent's refusal of an older epoch."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from comp_common.messages import LeaseRecord, NodeAssignments, Nudge, TaskSpec
from comp_nodeagent.agent import Agent
from comp_nodeagent.driver import RuntimeTask
from comp_nodeagent.settings import NodeAgentGroup
from comp_scheduler.applier import Applier, NotLeader
from comp_common.leader import Identity, LeaseElector, LeaseMachine, Step
from comp_scheduler.state import ClusterState

LEASE = 2.0


def identity(name: str) -> Identity:
    return Identity(holder=f"{name}-1-abcd", name=name, host="h", pid=1)


def record_of(machine: LeaseMachine, step: Step, wall: float = 1000.0) -> LeaseRecord:
    return machine.next_record(step, wall)


def foreign(holder: str = "other-9-ffff", lease: float = LEASE, renewed_at: float = 0.0) -> LeaseRecord:
    return LeaseRecord(
        holder=holder, name="other", host="h2", pid=9, lease_seconds=lease, acquired_at=0.0, renewed_at=renewed_at
    )


# ---- the machine -----------------------------------------------------------------------------


def test_absent_key_is_acquired_and_its_revision_is_the_epoch() -> None:
    m = LeaseMachine(identity("a"), LEASE)
    assert m.observe(None, None, now=10.0) is Step.ACQUIRE
    assert not m.leading(10.0)
    record = record_of(m, Step.ACQUIRE)
    m.succeeded(Step.ACQUIRE, record, revision=7, sent_at=10.0)
    assert m.epoch == 7 and m.leading(10.0)
    # Valid for one lease from when the write was *sent*, not when it was answered.
    assert m.leading(11.99) and not m.leading(12.0)


def test_renewals_keep_the_epoch_and_extend_the_lease() -> None:
    m = LeaseMachine(identity("a"), LEASE)
    m.observe(None, None, 0.0)
    m.succeeded(Step.ACQUIRE, record_of(m, Step.ACQUIRE), 7, 0.0)
    renewal = record_of(m, Step.RENEW, wall=1001.0)
    assert renewal.epoch == 7 and renewal.renewed_at == 1001.0
    m.succeeded(Step.RENEW, renewal, 8, sent_at=1.5)
    assert m.epoch == 7 and m.revision == 8
    assert m.leading(3.4) and not m.leading(3.5)


def test_a_holder_that_cannot_renew_steps_down_when_its_lease_runs_out() -> None:
    m = LeaseMachine(identity("a"), LEASE)
    m.observe(None, None, 0.0)
    m.succeeded(Step.ACQUIRE, record_of(m, Step.ACQUIRE), 7, 0.0)
    assert not m.expire(1.9)
    assert m.expire(2.0)
    assert m.epoch is None and not m.expire(2.1), "reported once"


def test_a_standby_counts_the_lease_from_when_it_first_saw_the_revision_not_from_the_record_clock() -> None:
    m = LeaseMachine(identity("b"), LEASE)
    # The record says it was renewed an hour ago by the holder's clock: no matter, this
    # contender has only just seen it.
    stale_looking = foreign(renewed_at=-3600.0)
    assert m.observe(5, stale_looking, now=100.0) is Step.WAIT
    assert m.stale_in(101.0) == pytest.approx(1.0)
    assert m.observe(5, stale_looking, now=101.99) is Step.WAIT
    assert m.observe(5, stale_looking, now=102.0) is Step.TAKE_OVER


def test_each_renewal_restarts_the_standby_count() -> None:
    m = LeaseMachine(identity("b"), LEASE)
    assert m.observe(5, foreign(), 0.0) is Step.WAIT
    assert m.observe(6, foreign(), 1.9) is Step.WAIT  # renewed: a new revision
    assert m.observe(6, foreign(), 3.8) is Step.WAIT
    assert m.observe(6, foreign(), 3.9) is Step.TAKE_OVER


def test_the_holders_longer_lease_is_honoured() -> None:
    m = LeaseMachine(identity("b"), LEASE)
    assert m.observe(5, foreign(lease=10.0), 0.0) is Step.WAIT
    assert m.observe(5, foreign(lease=10.0), 9.9) is Step.WAIT
    assert m.observe(5, foreign(lease=10.0), 10.0) is Step.TAKE_OVER


def test_take_over_gives_a_new_epoch() -> None:
    m = LeaseMachine(identity("b"), LEASE)
    m.observe(5, foreign(), 0.0)
    assert m.observe(5, foreign(), 2.0) is Step.TAKE_OVER
    record = record_of(m, Step.TAKE_OVER)
    assert record.holder == m.identity.holder and record.epoch == 0
    m.succeeded(Step.TAKE_OVER, record, 12, sent_at=2.0)
    assert m.epoch == 12 and m.leading(2.0)


def test_losing_a_compare_and_set_ends_leadership_at_once() -> None:
    m = LeaseMachine(identity("a"), LEASE)
    m.observe(None, None, 0.0)
    m.succeeded(Step.ACQUIRE, record_of(m, Step.ACQUIRE), 7, 0.0)
    m.conflicted()
    assert not m.leading(0.1) and m.epoch is None and m.revision is None
    # Reading the key again shows the new holder: wait a full lease from now on.
    assert m.observe(9, foreign(), 0.2) is Step.WAIT
    assert m.observe(9, foreign(), 2.2) is Step.TAKE_OVER


def test_a_deleted_lease_is_acquired_and_a_holder_that_finds_it_gone_steps_down() -> None:
    m = LeaseMachine(identity("a"), LEASE)
    m.observe(None, None, 0.0)
    m.succeeded(Step.ACQUIRE, record_of(m, Step.ACQUIRE), 7, 0.0)
    assert m.observe(None, None, 0.5) is Step.ACQUIRE
    assert not m.leading(0.5)


def test_our_own_stale_record_after_stepping_down_is_taken_over_with_a_new_epoch() -> None:
    m = LeaseMachine(identity("a"), LEASE)
    m.observe(None, None, 0.0)
    first = record_of(m, Step.ACQUIRE)
    m.succeeded(Step.ACQUIRE, first, 7, 0.0)
    assert m.expire(2.5)
    assert m.observe(7, first, 2.5) is Step.TAKE_OVER


@dataclass
class Contender:
    machine: LeaseMachine
    pauses: list[tuple[float, float]] = field(default_factory=list)  # (from, to): not running

    def paused(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.pauses)


@settings(max_examples=150, deadline=None)
@given(
    pauses=st.lists(
        st.tuples(st.integers(0, 2), st.floats(0, 20), st.floats(0.1, 6)), max_size=6
    ),
    check_every=st.sampled_from([0.1, 0.2, 0.3]),
)
def test_never_two_leaders_whatever_pauses_the_contenders_take(pauses, check_every) -> None:
    """Three contenders on one clock, each stalling now and then (a GC pause, a partition):
    at no moment do two of them believe they lead."""
    contenders = [Contender(LeaseMachine(identity(n), LEASE)) for n in "abc"]
    for who, start, length in pauses:
        contenders[who].pauses.append((start, start + length))
    kv: dict[str, object] = {"revision": None, "record": None, "seq": 0}
    renew = LEASE / 3
    next_step = [0.0, 0.05, 0.1]
    t, leaders_seen = 0.0, set()
    while t < 30.0:
        for i, c in enumerate(contenders):
            if t < next_step[i] or c.paused(t):
                continue
            m = c.machine
            m.expire(t)
            if m.epoch is not None:
                step = Step.RENEW
            else:
                step = m.observe(kv["revision"], kv["record"], t)  # type: ignore[arg-type]
            if step is not Step.WAIT:
                expected = None if step is Step.ACQUIRE else m.revision
                if kv["revision"] != expected:
                    m.conflicted()
                else:
                    record = m.next_record(step, t)
                    kv["seq"] = kv["seq"] + 1  # type: ignore[operator]
                    kv["revision"], kv["record"] = kv["seq"], record
                    m.succeeded(step, record, kv["seq"], t)  # type: ignore[arg-type]
            next_step[i] = t + (renew if m.epoch is not None else check_every)
        leading = [c.machine.identity.name for c in contenders if c.machine.leading(t)]
        assert len(leading) <= 1, f"two leaders at t={t:.2f}: {leading}"
        leaders_seen.update(leading)
        t = round(t + 0.01, 2)
    assert leaders_seen, "someone led at some point"


# ---- the elector over an in-memory KV ---------------------------------------------------------


@dataclass
class Entry:
    key: str
    value: bytes | None
    revision: int
    operation: str | None = None


class FakeKV:
    """The parts of nats' KeyValue that COMP uses, with the same errors."""

    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.seq = itertools.count(1)
        self.writes: list[tuple[str, bytes]] = []

    async def get(self, key: str) -> Entry:
        entry = self.data.get(key)
        if entry is None or entry.operation == "DEL":
            raise KeyNotFoundError
        return entry

    async def create(self, key: str, value: bytes) -> int:
        entry = self.data.get(key)
        if entry is not None and entry.operation != "DEL":
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        entry = self.data.get(key)
        if entry is None or entry.revision != last:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def delete(self, key: str, last: int | None = None) -> bool:
        entry = self.data.get(key)
        if last and (entry is None or entry.revision != last):
            raise KeyWrongLastSequenceError
        self.data[key] = Entry(key, None, next(self.seq), "DEL")
        return True

    async def keys(self) -> list[str]:
        return [k for k, e in self.data.items() if e.operation != "DEL"]

    def _put(self, key: str, value: bytes) -> int:
        revision = next(self.seq)
        self.data[key] = Entry(key, value, revision)
        self.writes.append((key, value))
        return revision


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def elector(kv: FakeKV, name: str, clock: Clock, changes: list) -> LeaseElector:
    return LeaseElector(
        kv, "scheduler", identity(name), lease_seconds=LEASE, clock=clock, wall=lambda: 1000.0 + clock.now,
        on_change=lambda epoch, reason: changes.append((name, epoch)),
    )


async def test_elector_acquires_renews_loses_and_releases() -> None:
    kv, clock, changes = FakeKV(), Clock(), []
    a, b = elector(kv, "a", clock, changes), elector(kv, "b", clock, changes)
    assert await a.step() is Step.ACQUIRE
    epoch = a.epoch()
    assert epoch is not None and changes == [("a", epoch)]
    assert await b.step() is Step.WAIT and b.epoch() is None

    clock.now = 0.6
    assert await a.step() is Step.RENEW and a.epoch() == epoch
    stored = LeaseRecord.model_validate_json(kv.data["scheduler"].value)
    assert stored.epoch == epoch and stored.name == "a"

    # a stalls: b sees the same revision for a whole lease and takes over with a higher epoch.
    clock.now = 1.0
    assert await b.step() is Step.WAIT
    clock.now = 3.0
    assert a.epoch() is None, "a's own clock ended its lease before b could take over"
    assert await b.step() is Step.TAKE_OVER
    assert b.epoch() is not None and b.epoch() > epoch

    # a wakes up: its renewal fails its compare-and-set (it had already expired by time).
    assert await a.step() is Step.WAIT
    assert changes == [("a", epoch), ("b", b.epoch()), ("a", None)]

    await b.stop()
    assert changes[-1] == ("b", None)
    await b.release()
    assert kv.data["scheduler"].operation == "DEL"
    assert await a.step() is Step.ACQUIRE and a.epoch() is not None


async def test_a_renewal_that_loses_its_compare_and_set_steps_down_at_once() -> None:
    kv, clock, changes = FakeKV(), Clock(), []
    a = elector(kv, "a", clock, changes)
    await a.step()
    # Someone overwrites the record (an operator, a contender with a broken clock...).
    await kv.update("scheduler", foreign().model_dump_json().encode(), last=kv.data["scheduler"].revision)
    clock.now = 0.1
    await a.step()
    assert a.epoch() is None and changes[-1] == ("a", None)


async def test_release_never_deletes_a_successors_record() -> None:
    kv, clock, changes = FakeKV(), Clock(), []
    a = elector(kv, "a", clock, changes)
    await a.step()
    await a.stop()
    await kv.update("scheduler", foreign().model_dump_json().encode(), last=kv.data["scheduler"].revision)
    await a.release()
    assert kv.data["scheduler"].operation is None, "the successor's record is still there"


# ---- the applier: epochs on every write --------------------------------------------------------


class FakeBroker:
    def __init__(self) -> None:
        self.published: list[tuple[object, str]] = []

    async def publish(self, message: object, subject: str) -> None:
        self.published.append((message, subject))


def spec(task_id: str) -> TaskSpec:
    return TaskSpec(
        task_id=task_id, deployment="default.web", namespace="default", name="web", spec_hash="h",
        image="img", cpu=0.1, memory=1024,
    )


async def stored(kv: FakeKV, node_id: str) -> NodeAssignments:
    return NodeAssignments.model_validate_json((await kv.get(node_id)).value)


async def test_applier_stamps_its_epoch_and_refuses_to_write_when_not_leading() -> None:
    kv, broker, state = FakeKV(), FakeBroker(), ClusterState(grace_seconds=3)
    epoch: list[int | None] = [5]
    applier = Applier(state, kv, broker, lambda: epoch[0])  # type: ignore[arg-type]
    await applier._write_node("n1", [spec("t1")], set(), now=1.0)
    assert (await stored(kv, "n1")).epoch == 5
    assert await applier.restamp(["n1"]) == ["n1"]
    nudge = broker.published[-1][0]
    assert isinstance(nudge, Nudge) and nudge.epoch == 5

    epoch[0] = None
    with pytest.raises(NotLeader):
        await applier._write_node("n1", [spec("t2")], set(), now=2.0)
    assert [t.task_id for t in (await stored(kv, "n1")).tasks] == ["t1"]


async def test_a_deposed_leaders_late_write_is_voided_and_a_newer_one_deposes_us() -> None:
    kv, broker, state = FakeKV(), FakeBroker(), ClusterState(grace_seconds=3)
    applier = Applier(state, kv, broker, lambda: 9)  # type: ignore[arg-type]
    await applier._write_node("n1", [spec("mine")], set(), now=1.0)
    # The old leader (epoch 4), not knowing it was deposed, writes on top.
    late = NodeAssignments(node_id="n1", version=7, tasks=[spec("mine"), spec("ghost")], epoch=4)
    await kv.update("n1", late.model_dump_json().encode(), last=kv.data["n1"].revision)

    await applier._write_node("n1", [spec("next")], set(), now=2.0)
    value = await stored(kv, "n1")
    assert [t.task_id for t in value.tasks] == ["mine", "next"], "the ghost is gone"
    assert value.epoch == 9 and value.version == 8

    newer = NodeAssignments(node_id="n1", version=9, tasks=[], epoch=12)
    await kv.update("n1", newer.model_dump_json().encode(), last=kv.data["n1"].revision)
    with pytest.raises(NotLeader):
        await applier._write_node("n1", [spec("more")], set(), now=3.0)
    assert (await stored(kv, "n1")).epoch == 12


async def test_the_written_value_is_the_models_json_and_nudges_go_to_the_given_publisher() -> None:
    kv, broker, state, nudges = FakeKV(), FakeBroker(), ClusterState(grace_seconds=3), []

    async def nudge(message: object, subject: str) -> None:
        nudges.append((message, subject))

    applier = Applier(state, kv, broker, lambda: 4, nudge=nudge)  # type: ignore[arg-type]
    first, second = spec("t1"), spec("t2").model_copy(update={"env": {"A": "1"}, "memory": 2048})
    await applier._write_node("n1", [first], set(), now=1.0)
    await applier._write_node("n1", [second], set(), now=2.0)  # t1's JSON is reused from the cache
    assert kv.data["n1"].value and NodeAssignments.model_validate_json(kv.data["n1"].value) == state.assignments["n1"][0]
    assert (await stored(kv, "n1")).tasks == [first, second]
    await applier._write_node("n1", [], {"t1"}, now=3.0)
    assert (await stored(kv, "n1")).tasks == [second] and "t1" not in applier._task_json

    assert await applier.restamp(["n1", "n2"]) == ["n1", "n2"]
    assert [(m.node_id, m.version, m.epoch, s) for m, s in nudges] == [  # type: ignore[attr-defined]
        ("n1", 4, 4, "comp.node.n1.nudge"), ("n2", 1, 4, "comp.node.n2.nudge")
    ]
    assert broker.published == [], "nudges went to the given publisher, not the broker"


def test_replacing_assignments_keeps_tasks_that_vanished_visible_as_stopping() -> None:
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n1", NodeAssignments(node_id="n1", tasks=[spec("a"), spec("b")], epoch=3), 4, now=0.0)
    state.replace_assignments({"n1": (NodeAssignments(node_id="n1", tasks=[spec("b"), spec("c")], epoch=5), 9)}, now=1.0)
    assert state.assignments["n1"][1] == 9
    assert state.assigned_ids("n1") == {"b", "c"}
    assert state.stopping == {"a": "n1"}
    assert set(state.statuses) == {"a", "b", "c"}


# ---- the agent refuses an older epoch ------------------------------------------------------------


class StillDriver:
    name = "still"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.containers: list[RuntimeTask] = []

    async def list_tasks(self) -> list[RuntimeTask]:
        return list(self.containers)

    async def start(self, task: TaskSpec) -> RuntimeTask:
        self.started.append(task.task_id)
        container = RuntimeTask(task.task_id, f"c-{task.task_id}", "running", spec_hash=task.spec_hash)
        self.containers.append(container)
        return container


async def test_agent_refuses_assignments_from_an_older_epoch_and_keeps_its_own() -> None:
    current: list[NodeAssignments] = []

    async def load() -> NodeAssignments | None:
        return current[-1]

    async def publish(message, subject) -> None:
        pass

    driver = StillDriver()
    agent = Agent(
        settings=NodeAgentGroup(node_id="n1"), heartbeat_seconds=3600, driver=driver,  # type: ignore[arg-type]
        load_assignments=load, publish=publish,
    )
    current.append(NodeAssignments(node_id="n1", tasks=[spec("a")], epoch=7))
    await agent.reconcile("test")
    current.append(NodeAssignments(node_id="n1", tasks=[spec("a"), spec("ghost")], epoch=6))
    await agent.reconcile("test")
    assert set(agent._desired) == {"a"}
    current.append(NodeAssignments(node_id="n1", tasks=[spec("a"), spec("b")], epoch=8))
    await agent.reconcile("test")
    assert set(agent._desired) == {"a", "b"}
    await asyncio.sleep(0.05)
    assert "ghost" not in driver.started
    for task in list(agent._inflight.values()):
        await task


class AnswerLostKV(FakeKV):
    """Writes land, but the answer to the next ``lose`` of them never comes."""

    def __init__(self, lose: int, land: bool = True) -> None:
        super().__init__()
        self.lose, self.land = lose, land

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if self.lose:
            self.lose -= 1
            if self.land:
                await super().update(key, value, last)
            raise TimeoutError
        return await super().update(key, value, last)


@pytest.mark.parametrize("land", [True, False])
async def test_a_write_whose_answer_timed_out_counts_only_if_it_landed(land: bool) -> None:
    kv, broker, state = AnswerLostKV(lose=0, land=land), FakeBroker(), ClusterState(grace_seconds=3)
    applier = Applier(state, kv, broker, lambda: 3)  # type: ignore[arg-type]
    await applier._write_node("n1", [spec("t1")], set(), now=1.0)
    kv.lose = 1
    if land:
        await applier._write_node("n1", [spec("t2")], set(), now=2.0)
        assert state.assignments["n1"] == (await stored(kv, "n1"), kv.data["n1"].revision)
        assert "t2" in state.statuses, "placed, as the bucket says"
    else:
        with pytest.raises(TimeoutError):
            await applier._write_node("n1", [spec("t2")], set(), now=2.0)
        assert [t.task_id for t in state.assignments["n1"][0].tasks] == ["t1"] == [t.task_id for t in (await stored(kv, "n1")).tasks]
        assert "t2" not in state.statuses
