"""The api's settings: the common ones plus the ``api`` group (``COMP_API__PORT``, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from comp_common.settings import CommonSettings


class ApiGroup(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8470
    # A request body (a manifest) larger than this is refused with 413 before it is parsed.
    max_body_bytes: int = 1024 * 1024
    # How long one call to NATS or Redis may take before the request is answered with 503.
    dependency_timeout_seconds: float = 5.0
    # A service's counters are asked of every host's lb at once, with no count of how many
    # will answer: replies are gathered for this long.
    counters_window_seconds: float = 0.3
    # What the audit record of each request holds, as Kubernetes' audit levels: None (no
    # record), Metadata (who, what, outcome), Request (and the request body),
    # RequestResponse (and the response body); bodies cut at audit_max_body_bytes.
    audit_level: Literal["None", "Metadata", "Request", "RequestResponse"] = "Metadata"
    audit_max_body_bytes: int = Field(default=64 * 1024, ge=0)
    # Polled by machines, not operations anyone did: not recorded.
    audit_exclude_paths: list[str] = ["/healthz", "/metrics"]


class ApiSettings(CommonSettings):
    api: ApiGroup = ApiGroup()
