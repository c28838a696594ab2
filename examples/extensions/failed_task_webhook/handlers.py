"""Subscriptions only: the catalog's task-event family, from the event stream, to the notifier."""

from __future__ import annotations

from typing import Any

from faststream.nats import JStream, NatsRouter, PullSub
from faststream.nats.annotations import NatsMessage
from nats.js.api import DeliverPolicy

from comp_common import subjects

from .core import SUBJECT
from .notifier import Notifier


async def _raw(message: Any) -> bytes:
    # The notifier validates the body itself: FastStream's own JSON decoding would turn a
    # garbage body into an error before the handler could drop it quietly.
    return message.body


def build_router(notifier: Notifier, durable: str, deliver: str = "new") -> NatsRouter:
    router = NatsRouter()

    # A durable consumer of the event stream rather than a plain subscription: events
    # published while the extension was down are still delivered when it is back, and
    # each is acknowledged only once the notifier is done with it.  One message a fetch:
    # a larger batch waits for the whole batch, and when the fetch times out with fewer,
    # nats-py raises and the ones it had go unacknowledged until the server redelivers
    # them (seen: failures posted 15 s late).
    @router.subscriber(
        SUBJECT,
        stream=JStream(name=subjects.EVENTS_STREAM, declare=False),
        durable=durable,
        deliver_policy=DeliverPolicy.NEW if deliver == "new" else DeliverPolicy.ALL,
        pull_sub=PullSub(batch_size=1, timeout=5.0),
        decoder=_raw,
    )
    async def task_changed(message: NatsMessage) -> None:
        await notifier.on_message(message.body, message.headers, message.raw_message.subject)

    return router
