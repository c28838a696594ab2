"""``comp events``: the kept events, one line each, or following them as they come."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import click
import httpx

# The most a one-line summary shows of a body COMP does not know.
SUMMARY_LIMIT = 160


def register(cli: click.Group, client: Callable[[click.Context], Any]) -> None:
    @cli.command("events")
    @click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they are kept, until Ctrl-C.")
    @click.option("--since", metavar="TIME", help="From this RFC 3339 time (2026-12-01T10:00:00Z) or this long ago (10m, 2h, 1h30m).")
    @click.option("--after", type=click.IntRange(min=0), metavar="SEQ", help="Only events after this stream sequence.")
    @click.option("--for", "for_", metavar="KIND/NAME", help="Only events about deployment/NAME, service/NAME, node/NAME, task/ID or namespace/NAME.")
    @click.option("-n", "--namespace", help="The namespace of --for's deployment or service (default: default); alone, only that namespace's events.")
    @click.option("--limit", type=click.IntRange(min=1), help="At most this many events.")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", help="json: the API's records, one a line.")
    @click.pass_context
    def events(ctx: click.Context, follow: bool, since: str | None, after: int | None, for_: str | None,
               namespace: str | None, limit: int | None, output: str) -> None:
        """The event history, oldest first: what COMP did and why (applies, placements, task
        states, health verdicts, rollouts, scaling)."""
        params: dict[str, str] = {"follow": "true" if follow else "false"}
        for key, value in (("since", since), ("after", after), ("for", for_), ("namespace", namespace), ("limit", limit)):
            if value is not None:
                params[key] = str(value)
        try:
            for line in _lines(client(ctx), params, follow):
                click.echo(line if output == "json" else event_line(json.loads(line)))
        except KeyboardInterrupt:
            # Ctrl-C is how a follow ends; nothing went wrong.
            return


def _lines(api: Any, params: dict[str, str], follow: bool) -> Iterator[str]:
    """The records' lines as the API sends them; an error line ends it with an exception."""
    # A follow may sit quiet for hours: no read timeout then.
    timeout = httpx.Timeout(30.0, read=None if follow else 60.0)
    try:
        with api.stream("GET", "/v1/events", params=params, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise click.ClickException(error_text(response))
            for line in response.iter_lines():
                if not line.strip():
                    continue
                if line.startswith('{"error"'):
                    raise click.ClickException(f"the listing stopped early: {json.loads(line).get('error')}")
                yield line
    except httpx.RemoteProtocolError as exc:
        # Connected, then cut off mid-listing: the api stopped or restarted.
        raise click.ClickException(f"the COMP API at {api.base_url} ended the listing early: {exc}")
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the COMP API at {api.base_url}: {exc} (is the cluster up? `comp up`)")


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()}"
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):
        # FastAPI's validation errors: name the option as the API named the parameter.
        problems = [f"{(e.get('loc') or ['', '?'])[-1]}: {e.get('msg')}" for e in detail if isinstance(e, dict)]
        return f"HTTP {response.status_code}: " + "; ".join(problems)
    return f"HTTP {response.status_code}: {detail}"


# ---- one line per event -------------------------------------------------------------


def event_line(record: dict[str, Any]) -> str:
    """``<time> <kind> <namespace/name> <summary>``."""
    return f"{_time(record.get('time'))}  {record.get('kind', '?'):<16} {_target(record):<24} {summarize(record)}"


def _time(value: Any) -> str:
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _target(record: dict[str, Any]) -> str:
    namespace, name = record.get("namespace"), record.get("name")
    if namespace and name and record.get("kind") != "control":
        return f"{namespace}/{name}"
    return str(name or namespace or "-")


def summarize(record: dict[str, Any]) -> str:
    """What happened, in a few words: the state for a task, the reason for a placement."""
    data = record.get("data")
    if data is None and record.get("raw") is not None:
        return _cut(f"(not JSON) {record['raw']}")
    if not isinstance(data, dict):
        return _cut(json.dumps(data))
    summary = _SUMMARIES.get(str(record.get("kind")))
    try:
        text = summary(data) if summary else None
    except (TypeError, ValueError, AttributeError, KeyError):
        text = None  # a body of an unexpected shape: shown as it is below
    return _cut(text if text else json.dumps(data, separators=(",", ":")))


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 3] + "..."


def _task(d: dict) -> str:
    text = f"{d['task_id']} {d['state']} on {d['node_id']}"
    if d.get("exit_code") is not None:
        text += f" (exit {d['exit_code']})"
    if d.get("message"):
        text += f": {d['message']}"
    return text


def _health(d: dict) -> str:
    text = f"{d['task_id']} {d['check']} {d.get('previous', '?')} -> {d['state']}"
    return text + (f": {d['detail']}" if d.get("detail") else "")


def _placement(d: dict) -> str:
    parts = [f"placed {p.get('task_id')} on {p.get('node_id')} ({p.get('reason')})" for p in d.get("placed") or []]
    parts += [f"stopped {s.get('task_id')} on {s.get('node_id')} ({s.get('reason')})" for s in d.get("stopped") or []]
    if d.get("pending"):
        parts.append(f"{d['pending']} pending: {d.get('pending_reason') or 'no reason given'}")
    return "; ".join(parts) or "no change"


def _deployment(d: dict) -> str:
    return f"{d['action']} (generation {d.get('generation', '?')}, revision {d.get('revision', '?')})"


def _service(d: dict) -> str:
    return f"{d['action']} (revision {d.get('revision', '?')})"


def _rollout(d: dict) -> str:
    text = f"{d['state']} generation {d.get('generation', '?')}"
    if d.get("from_generation") is not None:
        text += f" from {d['from_generation']}"
    return text + (f": {d['message']}" if d.get("message") else "")


def _endpoints(d: dict) -> str:
    count = len(d.get("endpoints") or [])
    return f"{count} endpoint{'' if count == 1 else 's'}" + (f", vip {d['vip']}" if d.get("vip") else "")


def _autoscale(d: dict) -> str:
    if d.get("changed"):
        return f"{d['current']} -> {d['replicas']} replicas: {d.get('reason', '')}"
    return f"held at {d['current']} replicas: {d.get('reason', '')}"


def _control(d: dict) -> str:
    return str(d["action"])


def _capacity(d: dict) -> str:
    if d.get("fits"):
        return "everything desired fits"
    pending = d.get("pending") or {}
    return "cannot place: " + ", ".join(f"{key} {v.get('count')} ({v.get('reason')})" for key, v in pending.items())


def _leader(d: dict) -> str:
    text = f"{d['name']} {d['state']} (epoch {d.get('epoch', '?')})"
    return text + (f": {d['reason']}" if d.get("reason") else "")


_SUMMARIES: dict[str, Callable[[dict], str]] = {
    "task": _task,
    "health": _health,
    "placement": _placement,
    "deployment": _deployment,
    "service": _service,
    "rollout": _rollout,
    "endpoints": _endpoints,
    "autoscale": _autoscale,
    "control": _control,
    "capacity": _capacity,
    "scheduler.leader": _leader,
}
