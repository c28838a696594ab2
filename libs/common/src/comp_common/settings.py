"""Settings shared by every service.

Every value comes from the environment with the ``COMP_`` prefix; nested groups use
``__`` (``COMP_NATS__URL``, ``COMP_SCHEDULER__RESYNC_SECONDS``).  A service extends
:class:`CommonSettings` with its own group rather than inventing a second mechanism.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NatsSettings(BaseModel):
    url: str = "nats://127.0.0.1:4222"
    connect_timeout: float = 5.0
    # Larger bodies are refused before parsing; the server's own default limit is 1 MiB.
    max_message_bytes: int = 1024 * 1024


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"


class TelemetrySettings(BaseModel):
    # OTLP/HTTP traces endpoint (Jaeger, Tempo, a collector), e.g. http://127.0.0.1:4318/v1/traces
    otlp_endpoint: str | None = None
    # Finished spans are appended here as JSON lines, one span a line; tests read them back.
    span_file: Path | None = None
    # Finished spans are also published on NATS (comp.spans.<trace id>) and kept by the
    # COMP_SPANS stream, which `comp trace` reads: the oldest go first past either bound.
    spans_to_nats: bool = True
    span_stream_max_age_seconds: float = Field(default=24 * 3600, gt=0)
    span_stream_max_bytes: int = Field(default=256 * 1024**2, gt=0)
    # How often finished spans are sent, and how many may wait for a send; beyond that
    # (NATS slow or away) they are dropped and counted, never held against the service.
    span_batch_seconds: float = Field(default=0.2, gt=0)
    span_queue_size: int = Field(default=4096, ge=1)


class LogSettings(BaseModel):
    level: str = "INFO"
    json_format: bool = Field(default=True, alias="json")

    model_config = {"populate_by_name": True}


class MetricsSettings(BaseModel):
    # Prometheus' /metrics on host:port (COMP_METRICS__PORT); 0 serves none.  The api
    # serves its own on its app instead.
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)


class NodeLivenessSettings(BaseModel):
    heartbeat_seconds: float = 1.0
    # A node whose last heartbeat is older than this is down.
    grace_seconds: float = 3.0
    # A node that answers pings and is this late is pinged; if the NATS server says no one
    # is subscribed to its ping subject, its agent's connection is gone and the node is down
    # now instead of at its grace.  A ping that times out or is answered changes nothing,
    # so a busy or partitioned agent still has the whole grace.  0 turns pinging off.
    ping_after_seconds: float = Field(default=1.5, ge=0)
    ping_timeout_seconds: float = Field(default=0.5, gt=0)
    # When at least this fraction of the ready nodes (with at least disruption_min_nodes
    # ready) would go down at once, none does for up to disruption_hold_seconds: that is
    # likelier the network, NATS or the scheduler than the nodes (Kubernetes stops evicting
    # at 0.55 for the same reason).  A real mass failure is only delayed by the hold.
    disruption_fraction: float = Field(default=0.55, gt=0, le=1)
    disruption_min_nodes: int = Field(default=20, ge=1)
    disruption_hold_seconds: float = Field(default=30.0, ge=0)


class EventLogSettings(BaseModel):
    """Retention of the ``COMP_EVENTS`` stream (``COMP_EVENTS__MAX_AGE_SECONDS``, ...): the
    older events go first once either bound is passed.  Every service that ensures the
    stream asks for these, and an existing stream is brought to them."""

    max_age_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    max_bytes: int = Field(default=1024**3, gt=0)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COMP_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    # Names this cluster on shared infrastructure (the Docker engine, Redis keys).
    cluster: str = "local"
    nats: NatsSettings = NatsSettings()
    redis: RedisSettings = RedisSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    log: LogSettings = LogSettings()
    liveness: NodeLivenessSettings = NodeLivenessSettings()
    metrics: MetricsSettings = MetricsSettings()
    events: EventLogSettings = EventLogSettings()
