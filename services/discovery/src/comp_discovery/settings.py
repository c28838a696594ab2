"""``COMP_DISCOVERY__*`` settings, on top of the shared ones."""

from __future__ import annotations

from pydantic import BaseModel, Field

from comp_common.settings import CommonSettings


class DiscoveryGroup(BaseModel):
    # Virtual IPs are taken from here; keep it out of every network a host routes.
    vip_cidr: str = "10.96.0.0/16"
    # Endpoint changes that arrive within this long are written together: a rollout's
    # burst of task statuses is one write per service, and one lb sync on every host.
    batch_seconds: float = Field(default=0.01, ge=0)
    # Full re-read of services, deployments and VIPs, to repair a missed watch update.
    resync_seconds: float = Field(default=10.0, gt=0)
    # DNS for NAME.NAMESPACE.svc.<cluster_domain>; port 0 picks a free one, None: no DNS.
    dns_host: str = "127.0.0.1"
    dns_port: int | None = 5353
    cluster_domain: str = "comp.local"
    # TTL of a VIP answer; dnsrr answers (task addresses, which change) carry a shorter one.
    dns_ttl_seconds: int = Field(default=5, ge=0)


class DiscoverySettings(CommonSettings):
    discovery: DiscoveryGroup = DiscoveryGroup()
