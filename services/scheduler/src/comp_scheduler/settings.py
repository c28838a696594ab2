from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .model import RebalancePolicy

from comp_common.settings import CommonSettings


class RebalanceGroup(BaseModel):
    """``COMP_SCHEDULER__REBALANCE__*``: how far each round goes to spread deployments back
    out onto joined or recovered nodes (see :class:`RebalancePolicy`, whose defaults these are)."""

    enabled: bool = True
    max_moves: int = Field(default=4, ge=0)
    max_moves_per_deployment: int = Field(default=1, ge=0)
    # Below 2 a move could be undone by the next one.
    margin: int = Field(default=2, ge=2)
    start_timeout: float = Field(default=300.0, gt=0)

    def policy(self) -> RebalancePolicy:
        return RebalancePolicy(**self.model_dump())


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
    # Rounds asked for by task statuses (a rollout or a rebalancing move waiting for tasks
    # to come up or be ready) run at most this often.
    task_round_seconds: float = Field(default=0.1, ge=0)
    # A round asked for by deployment events starts once none has come for this long (at
    # most two seconds after the first): an apply of many deployments is one round.
    apply_quiet_seconds: float = Field(default=0.05, ge=0)
    rebalance: RebalanceGroup = RebalanceGroup()


class SchedulerSettings(CommonSettings):
    scheduler: SchedulerGroup = SchedulerGroup()
