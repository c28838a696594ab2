"""The pure part: which task events become a notification, what the notification says, and
how long to wait between tries.  No I/O, no clock."""

from __future__ import annotations

import re
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from comp_common import catalog
from comp_common.messages import TaskState, TaskStatus

# The catalog's entry is where this extension learns its subject and its model.
TASK_EVENTS = catalog.entry("task")
SUBJECT = TASK_EVENTS.subscribe
MODEL: type[TaskStatus] = TASK_EVENTS.payload.model  # type: ignore[assignment]

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id in a W3C ``traceparent`` header (None when absent or malformed)."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or set(match.group(1)) == {"0"}:
        return None
    return match.group(1)


def failure_summary(status: TaskStatus, trace_id: str | None) -> dict[str, Any]:
    """What the webhook receives for a failed task."""
    namespace, _, name = status.deployment.partition(".")
    return {
        "event": "task.failed",
        "deployment": status.deployment,
        "namespace": namespace,
        "name": name,
        "task_id": status.task_id,
        "node": status.node_id,
        "message": status.message,
        "exit_code": status.exit_code,
        "time": datetime.fromtimestamp(status.updated_at, UTC).isoformat() if status.updated_at else None,
        "trace_id": trace_id,
    }


class FailureWatch:
    """Says which statuses announce a failure worth a notification.

    One notification per task and failure: the agent retries a failed start with a backoff
    and reports each retry's failure again, and an event may arrive twice; neither is news.
    A task that ran again (or was stopped) is news when it fails next.  At most ``capacity``
    failed tasks are remembered, the oldest forgotten first.
    """

    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._failed: OrderedDict[str, None] = OrderedDict()

    def observe(self, status: TaskStatus) -> bool:
        if status.state is TaskState.FAILED:
            if status.task_id in self._failed:
                return False
            self._failed[status.task_id] = None
            while len(self._failed) > self.capacity:
                self._failed.popitem(last=False)
            return True
        if status.state in (TaskState.RUNNING, TaskState.STOPPED):
            self._failed.pop(status.task_id, None)
        return False


def backoff_delays(attempts: int, first: float, cap: float) -> list[float]:
    """The waits between ``attempts`` tries: doubling from ``first``, never above ``cap``."""
    return [min(cap, first * 2**i) for i in range(max(0, attempts - 1))]
