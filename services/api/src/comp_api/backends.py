"""What the routes talk to: NATS (deployments and services buckets, events) and Redis (observed state).

NATS may be down when the api starts or go away later; the api keeps answering
either way (503 naming the dependency) and connects in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats.errors
from nats.js.kv import KeyValue
import redis.exceptions
from faststream.exceptions import IncorrectState
from faststream.nats import NatsBroker
from pydantic import BaseModel

from comp_common import subjects
from comp_common.broker import ensure_event_stream
from comp_common.kv import open_bucket
from comp_common.observed import ObservedStore
from comp_common.revisions import open_revisions

from .settings import ApiSettings
from .controls import NamespaceStore, NodeControlStore
from .service_store import ServiceStore
from .store import DeploymentStore

log = logging.getLogger("api.backends")

NATS = "NATS"
REDIS = "Redis"

_NATS_ERRORS = (nats.errors.Error, OSError)
_REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


class DependencyUnavailable(Exception):
    """NATS or Redis could not answer; the request fails with 503, the service goes on."""

    def __init__(self, dependency: str, reason: str):
        self.dependency = dependency
        self.reason = reason
        super().__init__(f"{dependency} is unavailable: {reason}")


class Backends:
    def __init__(self, settings: ApiSettings, broker: NatsBroker, observed: ObservedStore):
        self.settings = settings
        self.broker = broker
        self.observed = observed
        # Set once NATS answered and the deployments bucket is open.
        self._store: DeploymentStore | None = None
        self._namespaces: NamespaceStore | None = None
        self._node_controls: NodeControlStore | None = None
        self._services: ServiceStore | None = None
        self._buckets: dict[str, KeyValue] = {}

    def nats_connected(self) -> bool:
        try:
            return self._store is not None and self.broker.connection.is_connected
        except IncorrectState:  # the broker has no connection object at all yet
            return False

    def deployments(self) -> DeploymentStore:
        if self._store is None or not self.nats_connected():
            # Fail now rather than let a KV call wait out its timeout on a dead connection.
            raise DependencyUnavailable(NATS, f"not connected to {self.settings.nats.url}")
        return self._store

    def namespaces(self) -> NamespaceStore:
        self.deployments()  # the same connection check
        assert self._namespaces is not None
        return self._namespaces

    def node_controls(self) -> NodeControlStore:
        self.deployments()
        assert self._node_controls is not None
        return self._node_controls

    def services(self) -> ServiceStore:
        self.deployments()
        assert self._services is not None
        return self._services

    def bucket(self, name: str) -> KeyValue:
        """A bucket opened at connect, for the helpers in libs/common that take one
        (``comp_common.scaling``)."""
        self.deployments()
        return self._buckets[name]

    async def connect(self, retry_seconds: float = 1.0) -> None:
        """Connect to NATS and open what the api needs there, retrying until it works."""
        # Reconnects forever on its own (max_reconnect_attempts=-1), so this returns once connected.
        await self.broker.start()
        while True:
            try:
                # The api publishes the first events; the log must exist before they are sent.
                await ensure_event_stream(self.broker, self.settings.events)
                kv = await open_bucket(self.broker, subjects.DEPLOYMENTS_BUCKET)
                namespaces = await open_bucket(self.broker, subjects.NAMESPACES_BUCKET)
                node_controls = await open_bucket(self.broker, subjects.NODE_CONTROLS_BUCKET)
                revisions = await open_revisions(self.broker)
                services = await open_bucket(self.broker, subjects.SERVICES_BUCKET)
                # Discovery writes it; opened (created if need be) here so that a service is
                # shown, without endpoints, before discovery has ever run.
                endpoints = await open_bucket(self.broker, subjects.ENDPOINTS_BUCKET)
                break
            except _NATS_ERRORS as exc:
                log.warning("cannot open JetStream state yet, retrying: %r", exc)
                await asyncio.sleep(retry_seconds)
        self._buckets = {subjects.DEPLOYMENTS_BUCKET: kv, subjects.NAMESPACES_BUCKET: namespaces}
        self._namespaces = NamespaceStore(namespaces)
        self._node_controls = NodeControlStore(node_controls)
        self._services = ServiceStore(services, endpoints)
        self._store = DeploymentStore(kv, revisions)
        log.info("connected to NATS at %s", self.settings.nats.url)

    async def close(self) -> None:
        try:
            await self.broker.stop()
        except nats.errors.Error:
            # drain() refuses while the connection is down and reconnecting; there is
            # nothing to flush then, so close it outright.
            with contextlib.suppress(IncorrectState, nats.errors.Error):
                await self.broker.connection.close()
        await self.observed.r.aclose()

    @contextlib.asynccontextmanager
    async def calling(self, dependency: str) -> AsyncIterator[None]:
        """Turn a failing or hanging call to ``dependency`` into :class:`DependencyUnavailable`."""
        errors = _NATS_ERRORS if dependency == NATS else _REDIS_ERRORS
        timeout = self.settings.api.dependency_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            raise DependencyUnavailable(dependency, f"no answer within {timeout:g}s") from None
        except errors as exc:
            raise DependencyUnavailable(dependency, str(exc) or type(exc).__name__) from exc

    async def publish(self, event: BaseModel, subject: str) -> None:
        async with self.calling(NATS):
            await self.broker.publish(event, subject)
