"""Which records a query asks for, pure: filters over parsed records, newest kept."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AuditQuery(BaseModel):
    """What ``comp.audit.query`` accepts (every field optional)."""

    model_config = ConfigDict(extra="forbid")

    # Only api requests made by this actor (events have no actor).
    actor: str | None = None
    # deployments, services, namespaces, nodes, ...: a request's resource kind, an event's
    # subject kind (comp.evt.<kind>.…); singular or plural alike.
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    kind: Literal["request", "event", "gap"] | None = None
    # Records appended at or after this time (seconds since the epoch).
    since: float | None = None
    limit: int = Field(default=100, ge=1)


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") else word


def _field(record: dict[str, Any], name: str) -> Any:
    body = record.get("body")
    return body.get(name) if isinstance(body, dict) else None


def resource_of(record: dict[str, Any]) -> str | None:
    if record.get("kind") == "request":
        value = _field(record, "resource")
        return value if isinstance(value, str) else None
    parts = str(record.get("subject", "")).split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["comp", "evt"] else None


def matches(record: dict[str, Any], query: AuditQuery) -> bool:
    if query.kind is not None and record.get("kind") != query.kind:
        return False
    if query.since is not None and not (isinstance(record.get("time"), (int, float)) and record["time"] >= query.since):
        return False
    if query.actor is not None and (record.get("kind") != "request" or _field(record, "actor") != query.actor):
        return False
    if query.resource is not None:
        resource = resource_of(record)
        if resource is None or _singular(resource) != _singular(query.resource):
            return False
    if query.namespace is not None and _field(record, "namespace") != query.namespace:
        return False
    if query.name is not None and _field(record, "name") != query.name:
        return False
    return True


def newest_matching(lines_newest_first: Iterable[bytes], query: AuditQuery) -> list[dict[str, Any]]:
    """Up to ``query.limit`` matching records, oldest first, from lines read newest first.

    Reading stops at the first record older than ``since``: records are appended in time
    order.  A line that does not parse is skipped here; verification is where it is named.
    """
    found: list[dict[str, Any]] = []
    for line in lines_newest_first:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if query.since is not None and isinstance(record.get("time"), (int, float)) and record["time"] < query.since:
            break
        if matches(record, query):
            found.append(record)
            if len(found) >= query.limit:
                break
    found.reverse()
    return found
