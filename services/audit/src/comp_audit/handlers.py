"""Subscriptions only: the two sources (ordered JetStream consumers from the log's own
positions) and the two request/reply subjects; each delegates to the service.

Plain nats-py subscriptions rather than FastStream's: a source delivers tens of thousands
of messages a second, and a request's body is checked by the service itself so that a
garbage request gets an answer that says what is wrong instead of no answer at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from comp_common import subjects

from .service import AuditService

log = logging.getLogger("audit.handlers")

SOURCE_SUBJECTS = {subjects.EVENTS_STREAM: subjects.EVENT_SUBJECTS, subjects.API_REQUESTS_STREAM: subjects.API_REQUEST_SUBJECT}


async def subscribe_sources(js: JetStreamContext, audit: AuditService) -> list[Subscription]:
    subscriptions = []
    for stream, subject in SOURCE_SUBJECTS.items():
        audit.resumed_from[stream] = audit.start_seq(stream)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=audit.resumed_from[stream])
        # Ordered: no acks to send, flow controlled, and re-created from the last stream
        # sequence delivered should it ever see a gap (a slow-consumer drop included).
        subscriptions.append(await js.subscribe(
            subject, stream=stream, cb=audit.on_message_for(stream), ordered_consumer=True, config=config,
        ))
    return subscriptions


async def subscribe_requests(connection: Client, audit: AuditService) -> list[Subscription]:
    subscriptions = [
        await connection.subscribe(subjects.AUDIT_QUERY, cb=_replying(connection, audit.query)),
        await connection.subscribe(subjects.AUDIT_VERIFY, cb=_replying(connection, lambda _: audit.verify())),
    ]
    return subscriptions


def _replying(connection: Client, handle: Callable[[bytes], Awaitable[dict[str, Any]]]) -> Callable[[Msg], Awaitable[None]]:
    async def on_request(msg: Msg) -> None:
        if not msg.reply:
            log.warning("ignored a request with no reply subject", extra={"subject": msg.subject})
            return
        try:
            answer = await handle(msg.data)
        except Exception as exc:
            log.exception("answering a request failed", extra={"subject": msg.subject})
            answer = {"error": f"the audit service failed to answer on {msg.subject}: {exc!r}"}
        await msg.respond(fit(answer, connection.max_payload))

    return on_request


def fit(answer: dict[str, Any], max_bytes: int) -> bytes:
    """The answer as JSON within ``max_bytes``: the oldest records dropped if need be, and
    ``truncated`` saying how many."""
    body = json.dumps(answer).encode()
    records = answer.get("records")
    if len(body) <= max_bytes or not isinstance(records, list):
        return body
    budget = max_bytes - 200 - (len(body) - len(json.dumps(records)))
    kept: list[Any] = []
    for record in reversed(records):
        budget -= len(json.dumps(record)) + 2
        if budget < 0:
            break
        kept.append(record)
    kept.reverse()
    return json.dumps({**answer, "records": kept, "truncated": len(records) - len(kept)}).encode()
