"""The failed-task webhook extension (examples/extensions/failed_task_webhook): its pure core as
tables and properties, its notifier with a recording webhook, and its handler through
FastStream's TestNatsBroker."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from faststream.nats import NatsBroker, TestNatsBroker
from hypothesis import given
from hypothesis import strategies as st

from comp_common import catalog, subjects
from comp_common.messages import TaskState, TaskStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "extensions"))

from failed_task_webhook.core import SUBJECT, FailureWatch, backoff_delays, failure_summary, trace_id_of  # noqa: E402
from failed_task_webhook.handlers import build_router  # noqa: E402
from failed_task_webhook.notifier import HttpWebhook, Notifier, RefusedError, RetryableError  # noqa: E402

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def status(state: TaskState, task_id: str = "default.web-1", **fields) -> TaskStatus:
    return TaskStatus(task_id=task_id, node_id="n1", deployment="default.web", state=state, updated_at=1_700_000_000.5, **fields)


class Recorder:
    """A webhook that fails its first ``failures`` calls in the given way."""

    def __init__(self, failures: int = 0, error: type[Exception] = RetryableError):
        self.calls: list[dict] = []
        self.failures, self.error = failures, error

    async def __call__(self, summary: dict) -> None:
        self.calls.append(summary)
        if len(self.calls) <= self.failures:
            raise self.error(f"try {len(self.calls)} refused")


class Sleeps:
    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_the_subject_and_model_come_from_the_catalog():
    assert SUBJECT == catalog.entry("task").subscribe == subjects.TASK_EVENTS
    assert catalog.entry("task").payload.model is TaskStatus


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (TRACEPARENT, TRACE),
        (TRACEPARENT.upper(), TRACE),
        (None, None),
        ("", None),
        ("garbage", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-short-01", None),
    ],
)
def test_trace_id_of(header, trace_id):
    assert trace_id_of(header) == trace_id


def test_failure_summary():
    summary = failure_summary(status(TaskState.FAILED, message="image nope:1 not found", exit_code=None), TRACE)
    assert summary == {
        "event": "task.failed", "deployment": "default.web", "namespace": "default", "name": "web",
        "task_id": "default.web-1", "node": "n1", "message": "image nope:1 not found", "exit_code": None,
        "time": "2023-11-14T22:13:20.500000+00:00", "trace_id": TRACE,
    }


S = TaskState


@pytest.mark.parametrize(
    ("states", "notified"),
    [
        ([S.FAILED], [True]),
        ([S.RUNNING], [False]),
        ([S.PENDING, S.STARTING, S.RUNNING, S.EXITED], [False] * 4),
        # Retries that fail again, and a duplicate delivery, are no news.
        ([S.STARTING, S.FAILED, S.STARTING, S.FAILED, S.FAILED], [False, True, False, False, False]),
        # Once it ran (or was stopped), the next failure is.
        ([S.FAILED, S.RUNNING, S.FAILED], [True, False, True]),
        ([S.FAILED, S.STOPPED, S.FAILED], [True, False, True]),
        ([S.FAILED, S.EXITED, S.FAILED], [True, False, False]),
    ],
)
def test_failure_watch(states, notified):
    watch = FailureWatch()
    assert [watch.observe(status(s)) for s in states] == notified


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(list(TaskState))), max_size=40))
def test_one_notification_per_failure_between_recoveries(events):
    watch = FailureWatch()
    armed = {"a": True, "b": True, "c": True}
    for task_id, state in events:
        notified = watch.observe(status(state, task_id=task_id))
        assert notified == (state is S.FAILED and armed[task_id])
        if state is S.FAILED:
            armed[task_id] = False
        elif state in (S.RUNNING, S.STOPPED):
            armed[task_id] = True


def test_failure_watch_forgets_the_oldest_past_its_capacity():
    watch = FailureWatch(capacity=2)
    for task_id in ("a", "b", "c"):
        assert watch.observe(status(S.FAILED, task_id=task_id))
    assert watch.observe(status(S.FAILED, task_id="a")), "a was forgotten, so its failure is news again"
    assert not watch.observe(status(S.FAILED, task_id="c"))


@pytest.mark.parametrize(
    ("attempts", "first", "cap", "delays"),
    [(1, 0.5, 8, []), (4, 0.5, 8, [0.5, 1.0, 2.0]), (6, 1, 5, [1, 2, 4, 5, 5]), (0, 1, 1, [])],
)
def test_backoff_delays(attempts, first, cap, delays):
    assert backoff_delays(attempts, first, cap) == delays


async def test_a_failing_webhook_is_retried_with_backoff_then_delivered():
    post, sleeps = Recorder(failures=2), Sleeps()
    notifier = Notifier(post, [0.5, 1.0, 2.0], max_bytes=1 << 20, sleep=sleeps)
    outcome = await notifier.on_message(status(S.FAILED).model_dump_json().encode(), {"traceparent": TRACEPARENT})
    assert outcome == "delivered" and len(post.calls) == 3 and sleeps.waits == [0.5, 1.0]
    assert post.calls[-1]["trace_id"] == TRACE


async def test_a_webhook_that_never_takes_it_is_given_up_and_the_next_event_still_handled():
    post, sleeps = Recorder(failures=100), Sleeps()
    notifier = Notifier(post, [0.5, 1.0], max_bytes=1 << 20, sleep=sleeps)
    assert await notifier.on_message(status(S.FAILED).model_dump_json().encode(), None) == "undelivered"
    assert len(post.calls) == 3 and sleeps.waits == [0.5, 1.0]
    refused = Recorder(failures=100, error=RefusedError)
    notifier = Notifier(refused, [0.5, 1.0], max_bytes=1 << 20, sleep=sleeps)
    assert await notifier.on_message(status(S.FAILED, task_id="other").model_dump_json().encode(), None) == "undelivered"
    assert len(refused.calls) == 1, "a refusal is not retried"


@pytest.mark.parametrize(
    "body",
    [b"\xff\x00 not json", b"[1, 2]", b'{"task_id": "x"}', b'{"task_id": "x", "node_id": "n", "deployment": "d", "state": "exploded"}', b""],
)
async def test_garbage_is_dropped(body):
    post = Recorder()
    notifier = Notifier(post, [], max_bytes=1 << 20)
    assert await notifier.on_message(body, None) == "dropped" and post.calls == []


async def test_an_oversized_event_is_dropped_unparsed():
    post = Recorder()
    body = status(S.FAILED, message="x" * 2000).model_dump_json().encode()
    assert await Notifier(post, [], max_bytes=1000).on_message(body, None) == "dropped" and post.calls == []


@pytest.mark.parametrize(
    ("answer", "error"),
    [(200, None), (204, None), (500, RetryableError), (503, RetryableError), (429, RetryableError), (408, RetryableError),
     (400, RefusedError), (404, RefusedError)],
)
async def test_http_webhook_maps_answers_to_retry_or_refusal(answer, error):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answer, text="no")

    webhook = HttpWebhook("http://hook.test/failed", 5, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    if error is None:
        await webhook({"task_id": "t"})
    else:
        with pytest.raises(error, match=str(answer)):
            await webhook({"task_id": "t"})
    assert seen[0].method == "POST" and seen[0].headers["content-type"] == "application/json"
    assert seen[0].read() == b'{"task_id":"t"}'
    await webhook.close()


async def test_http_webhook_unreachable_is_retryable():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    webhook = HttpWebhook("http://hook.test/failed", 5, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    with pytest.raises(RetryableError, match="hook.test"):
        await webhook({"task_id": "t"})


async def test_handler_posts_a_failed_task_not_a_running_one_and_drops_garbage():
    post = Recorder()
    broker = NatsBroker()
    broker.include_router(build_router(Notifier(post, [], max_bytes=1 << 20), durable="test"))
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(status(S.RUNNING, task_id="default.web-2"), subjects.task_event("n1"), stream=subjects.EVENTS_STREAM)
        assert post.calls == []
        for garbage in (b"\xff\x00 not json", b"[1, 2]", b'{"state": "failed"}'):
            await test_broker.publish(garbage, subjects.task_event("n1"), stream=subjects.EVENTS_STREAM)
        assert post.calls == []
        await test_broker.publish(
            status(S.FAILED, message="image nope:1 not found"), subjects.task_event("n1"),
            headers={"traceparent": TRACEPARENT}, stream=subjects.EVENTS_STREAM,
        )
        assert [(c["deployment"], c["task_id"], c["node"], c["message"], c["trace_id"]) for c in post.calls] == [
            ("default.web", "default.web-1", "n1", "image nope:1 not found", TRACE)
        ]
