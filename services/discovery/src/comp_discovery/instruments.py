"""Discovery's Prometheus families (beside the shared message families of
:mod:`comp_common.metrics`, on the same process registry).  What it holds is read from the
tracked :class:`~comp_discovery.service.Discovery` when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from comp_common.metrics import REGISTRY

if TYPE_CHECKING:
    from .service import Discovery

ENDPOINT_WRITES = Counter(
    "comp_discovery_endpoint_writes_total",
    "Writes of a service's endpoints to the comp-endpoints bucket, by change: updated (VIP, ports or ready endpoints), removed",
    ["change"],
)


class _DiscoveryGauges(Collector):
    def __init__(self) -> None:
        self.discovery: Discovery | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        vips = GaugeMetricFamily("comp_discovery_vips", "Virtual IPs allocated to services, as this process knows them")
        services = GaugeMetricFamily("comp_discovery_services", "Services applied")
        endpoints = GaugeMetricFamily("comp_discovery_ready_endpoints", "Ready endpoints over every service, as last written")
        discovery = self.discovery
        if discovery is not None:
            vips.add_metric([], len(discovery.holder_of))
            services.add_metric([], len(discovery.services))
            # list() copies at C level, under the GIL: the loop's thread changes the dict meanwhile.
            endpoints.add_metric([], sum(len(value.endpoints) for value in list(discovery.published.values())))
        yield from (vips, services, endpoints)


_GAUGES = _DiscoveryGauges()
REGISTRY.register(_GAUGES)


def track(discovery: Discovery) -> None:
    _GAUGES.discovery = discovery
