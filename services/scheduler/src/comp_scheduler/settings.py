from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from comp_common.settings import CommonSettings


class SchedulerGroup(BaseModel):
    # Full re-read of desired state and a reconcile round, to repair missed events.
    resync_seconds: float = 5.0
    # Liveness is checked when the earliest node's grace runs out, but no more often than this.
    liveness_check_seconds: float = 0.05
    # Observed state is written to Redis as soon as it changes, then at most this often.
    flush_seconds: float = 0.25
    # Seed for task ids; None draws one from the OS.
    seed: int | None = None
    # How nodes are ranked for a deployment that names no placement.strategy: spread | binpack.
    default_strategy: Literal["spread", "binpack"] = "spread"
    # Leadership: a leader that has not renewed its lease for this long is replaced by a
    # standby; it renews every renew_seconds (a third of the lease by default).
    lease_seconds: float = 2.0
    renew_seconds: float | None = None
    # This instance's name in the lease record and logs (the host name by default).
    instance: str | None = None


class SchedulerSettings(CommonSettings):
    scheduler: SchedulerGroup = SchedulerGroup()
