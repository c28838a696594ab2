"""The autoscaler: replica counts from metrics, for every deployment with an autoscale policy.

Every instance keeps the inputs current (a standby can take over hot); only the leader
(the ``autoscaler`` lease, as the scheduler's) decides and writes.  Each round, per policy:
the fresh samples of the deployment's metric go through the pure ``strategy.decide``; a
changed count is written through ``comp_common.scaling`` (the path ``comp scale`` takes)
and announced as a deployment event, and every decision that changed a count or was held
back from one is published as an ``AutoscaleDecision`` and kept in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from faststream.nats import NatsBroker

from comp_common import subjects
from comp_common.aio import cancel_and_wait
from comp_common.broker import raw_publisher
from comp_common.kv import open_bucket, watch_bucket
from comp_common.leader import ElectorThread, Identity
from comp_common.manifest import Deployment, Service
from comp_common.messages import (
    AutoscaleDecision,
    CustomMetric,
    DeploymentEvent,
    DeploymentRecord,
    NodeMetrics,
    ServiceRate,
    ServiceRecord,
)
from comp_common.metrics import timed
from comp_common.observed import ObservedStore
from comp_common.scaling import ScaleRefused, scale_deployment

from . import instruments
from .settings import AutoscalerSettings
from .strategy import Memory, Sample, decide, deployment_sample

log = logging.getLogger("autoscaler")


class Autoscaler:
    def __init__(
        self,
        settings: AutoscalerSettings,
        broker: NatsBroker,
        store: ObservedStore | None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.broker = broker
        self.store = store
        self.clock = clock
        self.deployments: dict[str, Deployment] = {}
        self.services: dict[str, Service] = {}
        # deployment key -> task id -> (at, cpu share, memory share)
        self.usage: dict[str, dict[str, tuple[float, float | None, float | None]]] = {}
        self._task_deployment: dict[str, str] = {}
        self._node_tasks: dict[str, set[str]] = {}
        self._unsaved: dict[str, NodeMetrics] = {}  # the latest report of each node, for Redis
        self.rates: dict[str, dict[str, tuple[float, float]]] = {}  # service key -> node -> (at, conn/s)
        self.custom: dict[str, dict[str, tuple[float, float]]] = {}  # deployment key -> metric -> (at, total)
        self.memory: dict[str, Memory] = {}
        self.decisions: list[AutoscaleDecision] = []  # this process's, newest last (tests)
        self.elector: ElectorThread | None = None
        self._last_hold: dict[str, tuple] = {}  # per deployment: the last hold recorded
        self._tasks: list[asyncio.Task[None]] = []
        self._publish = raw_publisher(broker)

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.deployments_kv = await open_bucket(self.broker, subjects.DEPLOYMENTS_BUCKET)
        self.namespaces_kv = await open_bucket(self.broker, subjects.NAMESPACES_BUCKET)
        services_kv = await open_bucket(self.broker, subjects.SERVICES_BUCKET)
        await open_bucket(self.broker, subjects.LEASES_BUCKET)
        group = self.settings.autoscaler
        self.elector = ElectorThread(
            self.settings.nats.url, subjects.LEASES_BUCKET, subjects.AUTOSCALER_LEASE_KEY,
            Identity.of_this_process(group.instance), lease_seconds=group.lease_seconds,
            on_change=self._on_leadership, connect_timeout=self.settings.nats.connect_timeout,
        )
        await self.elector.start()
        self._tasks = [
            asyncio.create_task(watch_bucket(self.deployments_kv, self._on_deployment, log), name="autoscaler-deployments"),
            asyncio.create_task(watch_bucket(services_kv, self._on_service, log), name="autoscaler-services"),
            asyncio.create_task(self._evaluate_forever(), name="autoscaler-evaluate"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self.elector is not None:
            await self.elector.stop()
            await self.elector.release()  # a standby takes over now, not after the lease
            await self.elector.close()

    @property
    def leading(self) -> bool:
        return self.elector is not None and self.elector.epoch() is not None

    def _on_leadership(self, epoch: int | None, reason: str) -> None:
        # A new leader starts with no memory; the strategy then takes the current count as
        # a recommendation made now, so no scale-down passes until a whole scale-down
        # window has gone by under this leader.
        self.memory.clear()
        self._last_hold.clear()
        log.info("leadership changed", extra={"epoch": epoch, "reason": reason})

    # ---- inputs ------------------------------------------------------------------------
    def on_node_metrics(self, metrics: NodeMetrics) -> None:
        # A report lists every running task of its node: one it no longer lists is gone.
        listed = {usage.task_id for usage in metrics.tasks}
        for task_id in self._node_tasks.get(metrics.node_id, set()) - listed:
            deployment = self._task_deployment.pop(task_id, None)
            if deployment is not None:
                self.usage.get(deployment, {}).pop(task_id, None)
        self._node_tasks[metrics.node_id] = listed
        self._unsaved[metrics.node_id] = metrics
        for usage in metrics.tasks:
            previous = self._task_deployment.get(usage.task_id)
            if previous is not None and previous != usage.deployment:
                self.usage.get(previous, {}).pop(usage.task_id, None)
            self._task_deployment[usage.task_id] = usage.deployment
            self.usage.setdefault(usage.deployment, {})[usage.task_id] = (metrics.at, usage.cpu_share, usage.memory_share)

    def on_service_rate(self, rate: ServiceRate) -> None:
        key = subjects.deployment_key(rate.namespace, rate.name)
        self.rates.setdefault(key, {})[rate.node_id] = (rate.at, rate.connections_per_second)

    def on_custom_metric(self, deployment: str, metric: CustomMetric) -> None:
        self.custom.setdefault(deployment, {})[metric.name] = (metric.at, metric.value)

    def _on_deployment(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.deployments.pop(key, None)
            self.memory.pop(key, None)
        else:
            self.deployments[key] = DeploymentRecord.model_validate_json(value).deployment

    def _on_service(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.services.pop(key, None)
        else:
            self.services[key] = ServiceRecord.model_validate_json(value).service

    # ---- decisions ---------------------------------------------------------------------
    def samples_of(self, key: str, deployment: Deployment, now: float) -> tuple[list[Sample], int]:
        """The policy's metric as strategy samples, and how many replicas report usage."""
        policy = deployment.spec.autoscale
        assert policy is not None
        # Replicas whose node has gone quiet are not counted as ready, nor are their samples.
        fresh_after = now - self._stale_after()
        tasks = {task_id: entry for task_id, entry in self.usage.get(key, {}).items() if entry[0] >= fresh_after}
        ready = len(tasks)
        if policy.metric in ("cpu", "memory"):
            index = 1 if policy.metric == "cpu" else 2
            return [Sample(task_id, entry[0], entry[index]) for task_id, entry in tasks.items() if entry[index] is not None], ready
        current = deployment.spec.replicas
        if policy.metric == "rps":
            total, latest, seen = 0.0, 0.0, False
            for service_key, service in self.services.items():
                if service.metadata.namespace == deployment.metadata.namespace and service.spec.selector.selects(deployment):
                    for at, rate in self.rates.get(service_key, {}).values():
                        if at >= fresh_after:
                            total, latest, seen = total + rate, max(latest, at), True
            return ([deployment_sample(total, current, latest)] if seen else []), ready
        found = self.custom.get(key, {}).get(policy.metric)
        return ([deployment_sample(found[1], current, found[0])] if found else []), ready

    def _stale_after(self) -> float:
        group = self.settings.autoscaler
        return group.stale_periods * group.metrics_seconds

    @timed(instruments.EVALUATION_SECONDS)
    async def evaluate(self) -> list[AutoscaleDecision]:
        """One round over every policy (the leader's; tests call it directly)."""
        now = self.clock()
        made = []
        for key, deployment in list(self.deployments.items()):
            policy = deployment.spec.autoscale
            if policy is None:
                continue
            samples, ready = self.samples_of(key, deployment, now)
            current = deployment.spec.replicas
            decision, self.memory[key] = decide(
                policy, samples, now, current, ready, self.memory.get(key, Memory()), stale_after=self._stale_after()
            )
            instruments.decided(decision, current)
            record = AutoscaleDecision(
                deployment=key, at=now, metric=policy.metric, target=policy.target, observed=decision.observed,
                samples=len(samples), current=current, replicas=decision.replicas, reason=decision.reason,
                changed=decision.changed,
            )
            if decision.changed:
                if not await self._write(deployment, decision.replicas, record):
                    continue
            elif not decision.bounds or self._last_hold.get(key) == (decision.bounds, decision.recommendation, decision.replicas):
                # Nothing happened, or the same hold as last round (its observed value may
                # have moved): once is worth an event.
                continue
            self._last_hold[key] = (decision.bounds, decision.recommendation, decision.replicas)
            made.append(record)
            await self._record(record, deployment)
        return made

    async def _write(self, deployment: Deployment, replicas: int, record: AutoscaleDecision) -> bool:
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        try:
            scaled = await scale_deployment(
                self.deployments_kv, self.namespaces_kv, namespace, name, replicas, within_policy=False, clock=self.clock
            )
        except ScaleRefused as exc:
            instruments.SCALE_REFUSED.inc()
            log.warning("could not scale", extra={"deployment": record.deployment, "replicas": replicas, "error": str(exc)})
            return False
        self.deployments[record.deployment] = scaled.record.deployment  # before the watch says so
        await self._publish(
            DeploymentEvent(action="applied", namespace=namespace, name=name, revision=scaled.revision,
                            generation=scaled.record.generation),
            subjects.deployment_event(namespace, name),
        )
        log.info("scaled", extra={"deployment": record.deployment, "from": record.current, "to": replicas, "reason": record.reason})
        return True

    async def _record(self, record: AutoscaleDecision, deployment: Deployment) -> None:
        self.decisions.append(record)
        del self.decisions[:-100]
        await self._publish(record, subjects.autoscale_event(deployment.metadata.namespace, deployment.metadata.name))
        if self.store is not None:
            await self.store.put_autoscale_decision(record)

    async def _save_metrics(self) -> None:
        # `comp top` reads usage from Redis (observed state); the leader keeps it current.
        if self.store is not None and self._unsaved:
            unsaved, self._unsaved = self._unsaved, {}
            await self.store.put_node_metrics(unsaved.values())

    async def _evaluate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.autoscaler.evaluate_seconds)
            if not self.leading:
                continue
            try:
                await self._save_metrics()
                await self.evaluate()
            except Exception:
                log.exception("an autoscaling round failed; the next one tries again")
