"""``comp trace ID``: one operation's spans, from every service, as a tree."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import click
import httpx
from pydantic import ValidationError

from comp_common.traces import SpanRecord, format_trace

_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")
# --wait: the trace counts as complete once a read this long after the last finds no new span.
SETTLE_SECONDS = 1.0


def register(cli: click.Group, client: Callable[[click.Context], Any]) -> None:
    @cli.command("trace")
    @click.argument("trace_id", metavar="ID")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
                  help="json: the API's answer (spans as a list and as a tree).")
    @click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
                  help="Wait up to this long for the trace to be kept and for its spans to stop arriving.")
    @click.pass_context
    def trace(ctx: click.Context, trace_id: str, output: str, wait_seconds: float) -> None:
        """The spans of one operation (the operation id `comp apply` prints) as a tree: each line
        the service, the span, its start in ms from the root, its duration in ms and its status."""
        if not _TRACE_ID.match(trace_id):
            raise click.BadParameter(f"{trace_id!r} is not a trace id (32 hex digits, as `comp apply` prints)", param_hint="ID")
        api = client(ctx)
        view = _read_settled(api, trace_id.lower(), wait_seconds)
        if output == "json":
            click.echo(json.dumps(view, indent=2))
            return
        try:
            spans = [SpanRecord.model_validate(s) for s in view["spans"]]
        except (KeyError, TypeError, ValidationError) as exc:
            raise click.ClickException(f"the API's answer for trace {trace_id} is not a list of spans: {str(exc)[:300]}")
        click.echo(format_trace(view["trace_id"], spans))
        if view.get("skipped"):
            click.echo(f"({view['skipped']} kept records under this trace were not spans of it and were skipped)")
        if view.get("truncated"):
            click.echo("(the trace has more spans than the API returns; the first are shown)")


def _read(api: Any, trace_id: str) -> tuple[dict[str, Any] | None, str]:
    """The API's answer, or None and why when it keeps no span of the trace (yet)."""
    response: httpx.Response = api.request("GET", f"/v1/traces/{trace_id}")
    if response.status_code == 404:
        return None, _detail(response)
    if response.status_code >= 400:
        raise click.ClickException(f"reading trace {trace_id}: {_detail(response)}")
    return response.json(), ""


def _read_settled(api: Any, trace_id: str, wait_seconds: float) -> dict[str, Any]:
    """Spans reach the stream a batch period after they end, from every host: with a wait,
    read again until the trace exists and a read finds nothing new."""
    deadline = time.monotonic() + wait_seconds
    view, why = _read(api, trace_id)
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(SETTLE_SECONDS, remaining))
        newer, why = _read(api, trace_id)
        settled = view is not None and newer is not None and len(newer["spans"]) == len(view["spans"])
        view = newer or view
        if settled:
            break
    if view is None:
        raise click.ClickException(why)
    return view


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return f"HTTP {response.status_code}: {detail if detail is not None else response.text.strip()}"
