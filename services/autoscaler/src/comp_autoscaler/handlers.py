"""Subscriptions only: metrics in, each validated by type and handed to the autoscaler.

Plain nats-py subscriptions: every node's metrics every period are control traffic that
joins no trace.  A message that does not validate is logged and dropped."""

from __future__ import annotations

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from comp_common import subjects
from comp_common.broker import typed_callback
from comp_common.messages import CustomMetric, NodeMetrics, ServiceRate
from comp_common.metrics import for_subject

from .service import Autoscaler, log


async def subscribe_metrics(connection: Client, autoscaler: Autoscaler) -> list[Subscription]:
    async def custom(msg: Msg) -> None:
        # comp.metrics.custom.<namespace>.<deployment>: the deployment is in the subject.
        _, _, _, namespace, name = msg.subject.split(".")
        counted = for_subject(msg.subject)
        counted.received.inc()
        try:
            metric = CustomMetric.model_validate_json(msg.data)
        except ValidationError as exc:
            counted.dropped("invalid")
            log.warning("dropped a message that is not a CustomMetric", extra={"subject": msg.subject, "error": str(exc)[:300]})
            return
        autoscaler.on_custom_metric(subjects.deployment_key(namespace, name), metric)

    return [
        await connection.subscribe(subjects.NODE_METRICS, cb=typed_callback(NodeMetrics, autoscaler.on_node_metrics)),
        await connection.subscribe(subjects.SERVICE_RATES, cb=typed_callback(ServiceRate, autoscaler.on_service_rate)),
        await connection.subscribe(subjects.CUSTOM_METRICS, cb=custom),
    ]
