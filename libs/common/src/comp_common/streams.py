"""The JetStream streams COMP keeps (events, api requests, spans): each is made with its
retention, and an existing one is brought to the retention its owner is configured with,
so an operator changes retention by changing settings, not by hand."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError

_log = logging.getLogger("comp.streams")


async def ensure_stream(
    js: JetStreamContext, name: str, subject: str, max_age_seconds: float, max_bytes: int, *, adjust: bool = True
) -> None:
    """Create stream ``name`` over ``subject`` (file storage) with this retention.  If it
    exists with another: ``adjust`` changes only its retention (the rest stays as it is);
    without it the stream is left alone, for a caller with no settings of its own that must
    not undo an operator's choice."""
    config = StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE, max_age=max_age_seconds, max_bytes=max_bytes)
    try:
        await js.add_stream(config)
        return
    except BadRequestError:
        if not adjust:
            return
    current = (await js.stream_info(name)).config
    before = (current.max_age, current.max_bytes)
    if _nanoseconds(current.max_age) == _nanoseconds(max_age_seconds) and current.max_bytes == max_bytes:
        return
    current.max_age = max_age_seconds
    current.max_bytes = max_bytes
    await js.update_stream(current)
    _log.warning(
        "changed the retention of the %s stream: max_age %ss -> %ss, max_bytes %s -> %s",
        name, before[0], max_age_seconds, before[1], max_bytes,
    )


def _nanoseconds(seconds: float | None) -> int:
    # The server keeps durations in nanoseconds; nats-py hands them back as float seconds.
    return round((seconds or 0) * 1_000_000_000)
