"""Settings: COMP's common ones (``COMP_NATS__URL``, logging, telemetry) plus the webhook's
(``COMP_WEBHOOK__URL``, ``COMP_WEBHOOK__ATTEMPTS``, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, Field

from comp_common.settings import CommonSettings


class WebhookGroup(BaseModel):
    # Where each failure summary is POSTed as JSON.
    url: AnyHttpUrl
    # Tries per summary, the first included; between them the wait doubles from
    # backoff_seconds up to backoff_max_seconds.
    attempts: int = Field(default=4, ge=1, le=20)
    backoff_seconds: float = Field(default=0.5, gt=0)
    backoff_max_seconds: float = Field(default=8.0, gt=0)
    timeout_seconds: float = Field(default=5.0, gt=0)
    # The JetStream consumer's name: a restarted extension goes on from where it stopped.
    durable: str = Field(default="failed-task-webhook", pattern=r"^[A-Za-z0-9_-]+$")
    # Where a consumer that does not exist yet starts: only failures from now on ("new"),
    # or every task event the stream still holds ("all").
    deliver: Literal["new", "all"] = "new"


class WebhookSettings(CommonSettings):
    webhook: WebhookGroup
