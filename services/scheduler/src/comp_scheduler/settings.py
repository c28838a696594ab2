from __future__ import annotations

from pydantic import BaseModel

from comp_common.settings import CommonSettings


class SchedulerGroup(BaseModel):
    # Full re-read of desired state and a reconcile round, to repair missed events.
    resync_seconds: float = 5.0
    # How often node liveness is checked against the heartbeat grace.
    liveness_check_seconds: float = 0.25
    # Observed state is written to Redis in batches this often.
    flush_seconds: float = 0.25
    # Seed for task ids; None draws one from the OS.
    seed: int | None = None


class SchedulerSettings(CommonSettings):
    scheduler: SchedulerGroup = SchedulerGroup()
