"""``COMP_LB__*`` settings, on top of the shared ones."""

from __future__ import annotations

import socket

from pydantic import BaseModel, Field

from comp_common.settings import CommonSettings


class LbGroup(BaseModel):
    # The node agent's id on this host: its endpoints are the ones that can hairpin.
    node_id: str = Field(default_factory=socket.gethostname)
    dataplane: str = "nftables"
    # The nftables table this lb owns (one lb per host, so one table per network namespace).
    table: str = "comp_lb"
    # Endpoint changes that arrive within this long are one dataplane transaction.
    batch_seconds: float = Field(default=0.005, ge=0)
    # Remove the rules on exit.  Off by default: traffic keeps flowing through a restart,
    # and the next lb's first sync reconciles whatever it finds.
    cleanup_on_exit: bool = False
    # Each service's connections a second from the counters, published this often for the
    # autoscaler's rps policies (comp.metrics.service.<ns>.<name>); 0 turns it off.
    rates_seconds: float = Field(default=2.0, ge=0)


class LbSettings(CommonSettings):
    lb: LbGroup = LbGroup()
