"""The shared message metrics on a real nats-server: what a FastStream subscriber takes and
a broker publishes (comp_common.broker.make_broker's middleware), what raw_publisher sends
and a plain typed_callback subscription takes, each counted under its subject pattern;
garbage and failing handlers counted, and the subscriber serving on after them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from pydantic import BaseModel
from waiting import eventually

from comp_common import metrics, subjects
from comp_common.broker import make_broker, raw_publisher, server_caught_up, typed_callback
from comp_common.messages import Nudge
from comp_common.settings import NatsSettings


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Order(BaseModel):
    value: int


@pytest.fixture
async def plain(nats_url: str) -> AsyncIterator[nats.NATS]:
    connection = await nats.connect(nats_url)
    yield connection
    await connection.drain()


async def test_faststream_subscriber_and_publisher_counts(nats_url: str, plain: nats.NATS) -> None:
    broker = make_broker(NatsSettings(url=nats_url), "metrics-test")
    handled: list[int] = []
    pattern = "comp.metrics.custom.*.*"

    @broker.subscriber(pattern)
    async def on_order(order: Order) -> None:
        if order.value < 0:
            raise ArithmeticError("negative")
        handled.append(order.value)

    before = {
        "in": sample("comp_messages_received_total", subject=pattern),
        "out": sample("comp_messages_published_total", subject=pattern),
        "seconds": sample("comp_message_handler_seconds_count", subject=pattern),
        "dropped": sample("comp_messages_dropped_total", subject=pattern, reason="invalid"),
        "errors": sample("comp_message_handler_errors_total", subject=pattern, error="ArithmeticError"),
    }
    await broker.start()
    try:
        await broker.publish(Order(value=1), subjects.custom_metric("default", "web"))
        # Garbage and a failing handler, both from outside the broker, as any client could send.
        await plain.publish(subjects.custom_metric("team-a", "api"), b"{not json")
        await plain.publish(subjects.custom_metric("team-a", "api"), b'{"value": -1}')
        await server_caught_up(plain)
        await broker.publish(Order(value=2), subjects.custom_metric("team-b", "db"))

        await eventually(lambda: handled == [1, 2], "both good orders handled, in order, after the bad ones")
        await eventually(
            lambda: sample("comp_messages_received_total", subject=pattern) == before["in"] + 4, "four messages counted in"
        )
        assert sample("comp_messages_published_total", subject=pattern) == before["out"] + 2
        assert sample("comp_messages_dropped_total", subject=pattern, reason="invalid") == before["dropped"] + 1
        assert sample("comp_message_handler_errors_total", subject=pattern, error="ArithmeticError") == before["errors"] + 1
        # Latency is observed for the handled and the failed message, not for the garbage.
        assert sample("comp_message_handler_seconds_count", subject=pattern) == before["seconds"] + 3
        assert sample("comp_messages_received_total", subject=subjects.custom_metric("default", "web")) == 0
    finally:
        await broker.stop()


async def test_raw_publisher_and_typed_callback_count_on_the_wire(nats_url: str, plain: nats.NATS) -> None:
    broker = make_broker(NatsSettings(url=nats_url), "metrics-test")
    await broker.connect()
    pattern = "comp.node.*.nudge"
    taken: list[Nudge] = []
    subscription = await plain.subscribe(pattern, cb=typed_callback(Nudge, taken.append))
    await server_caught_up(plain)
    before_out = sample("comp_messages_published_total", subject=pattern)
    before_in = sample("comp_messages_received_total", subject=pattern)
    before_dropped = sample("comp_messages_dropped_total", subject=pattern, reason="invalid")
    try:
        publish = raw_publisher(broker)
        for node in ("n1", "n2", "n3"):
            await publish(Nudge(node_id=node, version=1, epoch=1), subjects.node_nudge(node))
        await broker.connection.publish(subjects.node_nudge("n4"), b'{"node_id": 4}')
        await server_caught_up(broker.connection)

        await eventually(lambda: len(taken) == 3, "three nudges taken")
        await eventually(
            lambda: sample("comp_messages_dropped_total", subject=pattern, reason="invalid") == before_dropped + 1,
            "the malformed nudge dropped and counted",
        )
        assert sample("comp_messages_published_total", subject=pattern) == before_out + 3
        assert sample("comp_messages_received_total", subject=pattern) == before_in + 4
    finally:
        await subscription.unsubscribe()
        await broker.stop()


class Blob(BaseModel):
    text: str


async def test_a_failed_raw_publish_is_counted_and_raised(nats_url: str) -> None:
    broker = make_broker(NatsSettings(url=nats_url), "metrics-test")
    await broker.connect()
    pattern = "comp.evt.task.*"
    failed = sample("comp_message_publish_errors_total", subject=pattern)
    published = sample("comp_messages_published_total", subject=pattern)
    try:
        # Over the server's 1 MiB max_payload: the client refuses it before sending.
        with pytest.raises(nats.errors.MaxPayloadError):
            await raw_publisher(broker)(Blob(text="x" * (2 * 1024 * 1024)), subjects.task_event("n1"))
        assert sample("comp_message_publish_errors_total", subject=pattern) == failed + 1
        assert sample("comp_messages_published_total", subject=pattern) == published
        await raw_publisher(broker)(Blob(text="small"), subjects.task_event("n1"))
        assert sample("comp_messages_published_total", subject=pattern) == published + 1
    finally:
        await broker.stop()
