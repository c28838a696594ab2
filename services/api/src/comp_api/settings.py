"""The api's settings: the common ones plus the ``api`` group (``COMP_API__PORT``, ...)."""

from __future__ import annotations

from pydantic import BaseModel

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


class ApiSettings(CommonSettings):
    api: ApiGroup = ApiGroup()
