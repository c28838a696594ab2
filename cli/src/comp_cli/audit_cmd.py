"""``comp audit log`` and ``comp audit verify``: the tamper-evident record of every API
request and every event, as the audit service keeps it.

Every request `comp` sends names its actor (``x-comp-actor: user@host``, see
``actor_headers``) so that the audit record says who did it.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import click

ACTOR_HEADER = "x-comp-actor"
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name in this environment (a container without passwd)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def actor_headers() -> dict[str, str]:
    return {ACTOR_HEADER: actor()}


def parse_since(text: str, now: float) -> float:
    """Seconds since the epoch from an RFC 3339 time or a duration ago (10m, 2h, 1d, 1h30m)."""
    match = _DURATION.match(text.strip())
    if match and any(match.groups()):
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        return now - (days * 86400 + hours * 3600 + minutes * 60 + seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a time (2026-12-01T10:00:00Z) nor a duration (10m, 2h, 1d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def record_line(record: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(record.get("time", 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    head = f"{record.get('seq', '?'):>6} {when} {record.get('kind', '?'):<7}"
    body = record.get("body")
    flag = f"  [malformed: {record['malformed']}]" if record.get("malformed") else ""
    if record.get("kind") == "request" and isinstance(body, dict):
        target = "/".join(str(body[k]) for k in ("resource", "namespace", "name") if body.get(k))
        return (f"{head} {body.get('actor', '?')} {body.get('verb', '?')} {body.get('path', '?')} -> {body.get('status', '?')}"
                f"{'  ' + target if target else ''}{'  op ' + body['operation_id'] if body.get('operation_id') else ''}{flag}")
    if record.get("kind") == "event":
        return f"{head} {record.get('subject', '?')} #{record.get('stream_seq', '?')}{flag}"
    return f"{head} {record.get('stream', '?')} {json.dumps(body if body is not None else record.get('raw'))[:160]}{flag}"


def register(cli: click.Group, client: Callable[[click.Context], Any]) -> None:
    @cli.group()
    def audit() -> None:
        """The tamper-evident record of every API request and every event."""

    @audit.command("log")
    @click.option("--actor", "actor_", metavar="USER@HOST", help="Only requests made by this actor.")
    @click.option("--resource", help="Only records about this kind: deployments, services, namespaces, nodes, ...")
    @click.option("-n", "--namespace", help="Only records in this namespace.")
    @click.option("--kind", type=click.Choice(["request", "event", "gap"]), help="Only api requests, only events, or only gaps.")
    @click.option("--since", metavar="TIME", help="From this RFC 3339 time or this long ago (10m, 2h, 1d).")
    @click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="The newest this many records.")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", help="json: each record as one JSON object a line.")
    @click.pass_context
    def log(ctx: click.Context, actor_: str | None, resource: str | None, namespace: str | None, kind: str | None,
            since: str | None, limit: int, output: str) -> None:
        """Audit records, oldest first: who did what to which resource, and every event."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("actor", actor_), ("resource", resource), ("namespace", namespace), ("kind", kind)):
            if value is not None:
                params[key] = value
        if since is not None:
            params["since"] = parse_since(since, time.time())
        answer = client(ctx).json("GET", "/v1/audit/log", params=params)
        for record in answer.get("records", []):
            click.echo(json.dumps(record) if output == "json" else record_line(record))
        if answer.get("truncated"):
            click.echo(f"({answer['truncated']} older matching records left out: too many for one answer; narrow with --since)", err=True)

    @audit.command("verify")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
    @click.pass_context
    def verify(ctx: click.Context, output: str) -> None:
        """Check the whole chain and its signed checkpoints; exit 1 naming the first bad record."""
        answer = client(ctx).json("GET", "/v1/audit/verify")
        if output == "json":
            click.echo(json.dumps(answer, indent=2))
        elif answer.get("ok"):
            click.echo(f"ok: {answer['records']} records, head {answer['head_seq']} {answer['head_hash']}, "
                       f"{answer['checkpoints']} signed checkpoints")
        if not answer.get("ok"):
            problem = answer.get("problem") or {}
            raise click.ClickException(
                f"the audit log FAILED verification: {problem.get('kind')} at record {problem.get('seq')}: {problem.get('detail')}"
            )
