"""``COMP_AUTOSCALER__*`` settings, on top of the shared ones."""

from __future__ import annotations

import socket

from pydantic import BaseModel, Field

from comp_common.settings import CommonSettings


class AutoscalerGroup(BaseModel):
    # How often every policy is evaluated.  Below the metrics period, so that a new sample
    # is acted on within a fraction of a period of its arrival.
    evaluate_seconds: float = Field(default=0.5, gt=0)
    # A sample older than this many metrics periods is stale (its node went quiet).
    stale_periods: float = Field(default=3.0, gt=0)
    # The agents' COMP_NODEAGENT__METRICS_SECONDS, for the staleness above.
    metrics_seconds: float = Field(default=2.0, gt=0)
    lease_seconds: float = Field(default=5.0, gt=0)
    instance: str = Field(default_factory=socket.gethostname)


class AutoscalerSettings(CommonSettings):
    autoscaler: AutoscalerGroup = AutoscalerGroup()
