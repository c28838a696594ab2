"""Every NATS subject and JetStream name COMP uses, in one place.

Subjects are built from tokens that the manifest validation already restricts to
DNS labels, so no token can contain ``.``, ``*`` or ``>``.

``comp.evt.>`` is the event log: everything published there is kept by the
``COMP_EVENTS`` stream.  Heartbeats and nudges are control traffic and are not kept.
"""

from __future__ import annotations

EVENTS_STREAM = "COMP_EVENTS"
EVENT_SUBJECTS = "comp.evt.>"

DEPLOYMENTS_BUCKET = "comp-deployments"
ASSIGNMENTS_BUCKET = "comp-assignments"
# Leadership leases, one key per role (``scheduler``); a key's revision when its holder
# acquired it is that holder's fencing epoch.
LEASES_BUCKET = "comp-leases"
SCHEDULER_LEASE_KEY = "scheduler"
AUTOSCALER_LEASE_KEY = "autoscaler"
NAMESPACES_BUCKET = "comp-namespaces"
NODE_CONTROLS_BUCKET = "comp-node-controls"
# Every applied version of every deployment, key ``revision_key(deployment key, generation)``.
REVISIONS_BUCKET = "comp-revisions"
# Services as applied (ServiceRecord), key namespace.name.
SERVICES_BUCKET = "comp-services"
# Virtual IPs held (VipAllocation), key the address; discovery allocates and frees them.
VIPS_BUCKET = "comp-vips"
# Each service's VIP, ports and ready endpoints (ServiceEndpoints), key namespace.name;
# written by discovery, watched by every host's lb.
ENDPOINTS_BUCKET = "comp-endpoints"

# Deployment applied or deleted (published by api, consumed by scheduler).
DEPLOYMENT_EVENTS = "comp.evt.deployment.>"
# Task state changes (published by nodeagent, consumed by scheduler).
TASK_EVENTS = "comp.evt.task.*"
# One placement round's decisions (published by scheduler).
PLACEMENT_EVENTS = "comp.evt.placement.>"
# A scheduler started or stopped leading (published by scheduler), with holder and epoch.
SCHEDULER_LEADER_EVENTS = "comp.evt.scheduler.leader"
# A task's liveness or readiness verdict changed (published by nodeagent).
HEALTH_EVENTS = "comp.evt.health.*"
# A rollout started, progressed, paused for its canary, completed, failed or was reverted
# (published by scheduler; promote, abort and undo requests are published by api).
ROLLOUT_EVENTS = "comp.evt.rollout.>"
# Node heartbeats (nodeagent -> scheduler), not kept in the event log.
NODE_HEARTBEATS = "comp.node.*.heartbeat"


def deployment_event(namespace: str, name: str) -> str:
    return f"comp.evt.deployment.{namespace}.{name}"


# Namespace or node control changed (api -> scheduler).
CONTROL_EVENTS = "comp.evt.control.>"


def control_event(kind: str, name: str) -> str:
    return f"comp.evt.control.{kind}.{name}"


def task_event(node_id: str) -> str:
    return f"comp.evt.task.{node_id}"


def placement_event(namespace: str, name: str) -> str:
    return f"comp.evt.placement.{namespace}.{name}"


def node_heartbeat(node_id: str) -> str:
    return f"comp.node.{node_id}.heartbeat"


def node_nudge(node_id: str) -> str:
    """The scheduler's hint that this node's assignments changed."""
    return f"comp.node.{node_id}.nudge"


def node_ping(node_id: str) -> str:
    """The agent answers here while its connection lives (see ``Heartbeat.answers_pings``)."""
    return f"comp.node.{node_id}.ping"


def deployment_key(namespace: str, name: str) -> str:
    """KV key of a deployment; also the deployment's id in every message."""
    return f"{namespace}.{name}"


def revision_key(deployment: str, generation: int) -> str:
    # Zero-padded so that a listing of a deployment's keys sorts by revision.
    return f"{deployment}.r{generation:08d}"


def revision_prefix(deployment: str) -> str:
    return f"{deployment}.r"


def health_event(node_id: str) -> str:
    return f"comp.evt.health.{node_id}"


def rollout_event(namespace: str, name: str) -> str:
    return f"comp.evt.rollout.{namespace}.{name}"


# A service applied or deleted (api -> discovery).
SERVICE_EVENTS = "comp.evt.service.>"
# A service's endpoints changed (discovery -> anyone; lb watches ENDPOINTS_BUCKET instead).
ENDPOINT_EVENTS = "comp.evt.endpoints.>"
# Request/reply: {"namespace", "name"} -> ServiceEndpoints, or {"error"} (discovery answers).
DISCOVERY_LOOKUP = "comp.discovery.lookup"
# Request, many replies: every host's lb answers with its EndpointCounter list.
LB_COUNTERS = "comp.lb.counters.*.*"


def service_event(namespace: str, name: str) -> str:
    return f"comp.evt.service.{namespace}.{name}"


def endpoints_event(namespace: str, name: str) -> str:
    return f"comp.evt.endpoints.{namespace}.{name}"


def lb_counters(namespace: str, name: str) -> str:
    return f"comp.lb.counters.{namespace}.{name}"


# Resource and traffic metrics: control traffic, not kept in the event log.
NODE_METRICS = "comp.metrics.node.*"
SERVICE_RATES = "comp.metrics.service.*.*"
CUSTOM_METRICS = "comp.metrics.custom.*.*"


def node_metrics(node_id: str) -> str:
    return f"comp.metrics.node.{node_id}"


def service_rate(namespace: str, name: str) -> str:
    return f"comp.metrics.service.{namespace}.{name}"


def custom_metric(namespace: str, deployment: str) -> str:
    return f"comp.metrics.custom.{namespace}.{deployment}"

# Every autoscaler decision that changed a count, or that was held back (published by autoscaler).
AUTOSCALE_EVENTS = "comp.evt.autoscale.>"


def autoscale_event(namespace: str, name: str) -> str:
    return f"comp.evt.autoscale.{namespace}.{name}"

# The scheduler can no longer place everything that is desired, or can again.
CAPACITY_EVENTS = "comp.evt.capacity"

# Finished spans of every service, one subject per trace (published by every service's
# tracer, read back by the api's /v1/traces); kept by the COMP_SPANS stream, not the event log.
SPANS_STREAM = "COMP_SPANS"
SPAN_SUBJECTS = "comp.spans.*"


def span_subject(trace_id: str) -> str:
    return f"comp.spans.{trace_id}"

# One record per API request (published by api after answering, consumed by audit);
# kept by the COMP_API_REQUESTS stream until the audit log holds it.
API_REQUESTS_STREAM = "COMP_API_REQUESTS"
API_REQUEST_SUBJECT = "comp.audit.request"
# Request/reply to the audit service: records matching filters, and the chain's verification.
AUDIT_QUERY = "comp.audit.query"
AUDIT_VERIFY = "comp.audit.verify"
