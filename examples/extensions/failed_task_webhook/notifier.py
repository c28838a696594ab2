"""From a raw task event to a delivered webhook call: parse (refusing what is not a task
status), decide (``core.FailureWatch``), deliver with retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from comp_common.broker import trace_headers

from .core import MODEL, FailureWatch, failure_summary, trace_id_of

log = logging.getLogger("failed_task_webhook")

Outcome = Literal["dropped", "ignored", "delivered", "undelivered"]


class RetryableError(Exception):
    """The webhook may take it later: no answer, a 5xx, 408 or 429."""


class RefusedError(Exception):
    """The webhook refused it (another 4xx): trying again would be refused again."""


Post = Callable[[dict[str, Any]], Awaitable[None]]


class HttpWebhook:
    """POSTs a summary as JSON; raises RetryableError or RefusedError when it was not taken."""

    def __init__(self, url: str, timeout: float, client: httpx.AsyncClient | None = None):
        self.url = url
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def __call__(self, summary: dict[str, Any]) -> None:
        try:
            # trace_headers(): content type and, inside the event's trace, its traceparent.
            response = await self._client.post(self.url, json=summary, headers=trace_headers())
        except httpx.HTTPError as exc:
            raise RetryableError(f"POST {self.url}: {exc.__class__.__name__}: {exc}") from exc
        if response.is_success:
            return
        said = f"POST {self.url} answered {response.status_code}: {response.text[:200]}"
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise RetryableError(said)
        raise RefusedError(said)

    async def close(self) -> None:
        await self._client.aclose()


class Notifier:
    def __init__(
        self,
        post: Post,
        delays: list[float],
        max_bytes: int,
        watch: FailureWatch | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.post, self.delays, self.max_bytes, self.sleep = post, delays, max_bytes, sleep
        self.watch = watch or FailureWatch()

    async def on_message(self, body: bytes, headers: Mapping[str, str] | None, subject: str = "") -> Outcome:
        """Never raises: a body that is not a task status is logged and dropped, a webhook
        that never takes the summary is logged; either way the next event is handled."""
        if len(body) > self.max_bytes:
            log.warning("dropped a task event of %d bytes (limit %d)", len(body), self.max_bytes, extra={"subject": subject})
            return "dropped"
        try:
            status = MODEL.model_validate_json(body)
        except ValidationError as exc:
            log.warning("dropped a message that is not a %s", MODEL.__name__, extra={"subject": subject, "error": str(exc)[:300]})
            return "dropped"
        if not self.watch.observe(status):
            return "ignored"
        summary = failure_summary(status, trace_id_of((headers or {}).get("traceparent")))
        return "delivered" if await self.deliver(summary) else "undelivered"

    async def deliver(self, summary: dict[str, Any]) -> bool:
        for attempt, wait in enumerate([*self.delays, None], start=1):
            try:
                await self.post(summary)
                log.info("posted failed task %s", summary["task_id"], extra={"attempt": attempt})
                return True
            except RefusedError as exc:
                log.error("webhook refused failed task %s: %s", summary["task_id"], exc)
                return False
            except RetryableError as exc:
                if wait is None:
                    log.error("gave up on failed task %s after %d tries: %s", summary["task_id"], attempt, exc)
                    return False
                log.warning("webhook try %d for %s failed, again in %gs: %s", attempt, summary["task_id"], wait, exc)
                await self.sleep(wait)
        return False
