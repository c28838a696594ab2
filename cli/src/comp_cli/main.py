"""The ``comp`` command: a client of the API, plus ``up``/``down`` for a local cluster."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click
import httpx

from comp_common.messages import LeaderChange
from comp_common.quantities import format_memory

from . import audit_cmd, events_cmd, trace_cmd
from .images import DEFAULT_BUSYBOX_TAG, ImageError, import_busybox
from .local import ClusterConfig, ClusterError, LocalCluster


def default_state_dir() -> Path:
    return Path(os.environ.get("COMP_STATE_DIR", Path.home() / ".comp"))


class Client:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return httpx.request(method, f"{self.base_url}{path}", timeout=30, headers=_with_actor(kwargs), **kwargs)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the COMP API at {self.base_url}: {exc} (is the cluster up? `comp up`)")

    def stream(self, method: str, path: str, **kwargs: Any) -> AbstractContextManager[httpx.Response]:
        """A response read as it comes; httpx's errors are the caller's to word, since a
        listing cut off midway means something else than an API never reached."""
        return httpx.stream(method, f"{self.base_url}{path}", headers=_with_actor(kwargs), **kwargs)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise click.ClickException(describe_error(response))
        return response.json()


def _with_actor(kwargs: dict[str, Any]) -> dict[str, str]:
    """The request's headers, naming who does it for the audit record of the request."""
    return {**audit_cmd.actor_headers(), **kwargs.pop("headers", {})}


def describe_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()}"
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        lines = [f"  {e.get('path') or '(manifest)'}: {e.get('message')}" for e in body["errors"]]
        return f"manifest rejected (HTTP {response.status_code}):\n" + "\n".join(lines)
    detail = body.get("detail") if isinstance(body, dict) else body
    return f"HTTP {response.status_code}: {detail}"


def api_url(state_dir: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return ClusterConfig.load(state_dir).api_url
    except ClusterError:
        return "http://127.0.0.1:8470"


@click.group()
@click.option("--state-dir", type=click.Path(path_type=Path), default=default_state_dir, show_default="~/.comp or $COMP_STATE_DIR",
              help="Where `comp up` keeps its config, logs, pids and data.")
@click.option("--api", "api", envvar="COMP_API_URL", help="API base URL (default: the local cluster's).")
@click.pass_context
def cli(ctx: click.Context, state_dir: Path, api: str | None) -> None:
    """COMP: run containers on a cluster of hosts."""
    ctx.obj = {"state_dir": state_dir, "api": api}


def client(ctx: click.Context) -> Client:
    return Client(api_url(ctx.obj["state_dir"], ctx.obj["api"]))


# ---- local cluster -------------------------------------------------------------------------
@cli.command()
@click.option("--nodes", default=1, show_default=True, help="Node agents to run on this machine.")
@click.option("--cluster", default="local", show_default=True, help="Cluster name (labels its containers).")
@click.option("--nats-port", default=14222, show_default=True)
@click.option("--redis-port", default=16379, show_default=True)
@click.option("--api-port", default=8470, show_default=True)
@click.option("--schedulers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Scheduler processes: one leads, the others stand by to take over.")
@click.option("--networking/--no-networking", default=True, show_default=True,
              help="Run discovery (VIPs, DNS) and the lb (nftables rules on this host, needs root).")
@click.option("--vip-cidr", default="10.96.0.0/16", show_default=True, help="Where services' virtual IPs come from.")
@click.option("--dns-port", default=5353, show_default=True, help="Discovery's DNS port on 127.0.0.1 (udp and tcp).")
@click.pass_context
def up(ctx: click.Context, nodes: int, cluster: str, nats_port: int, redis_port: int, api_port: int, schedulers: int,
       networking: bool, vip_cidr: str, dns_port: int) -> None:
    """Start a local cluster: nats-server, redis-server, api, scheduler(s), discovery, lb and node agents."""
    state_dir: Path = ctx.obj["state_dir"]
    local = LocalCluster(ClusterConfig(state_dir, cluster, nats_port, redis_port, api_port, nodes,
                                       span_file=state_dir / "spans.jsonl", schedulers=schedulers,
                                       networking=networking, vip_cidr=vip_cidr, dns_port=dns_port))
    if any(pid for pid in local.running().values()):
        raise click.ClickException(f"a cluster is already running from {state_dir} (`comp status`, `comp down`)")
    try:
        local.start()
    except ClusterError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"cluster {cluster!r} is up: API {local.config.api_url}, {nodes} node(s), {schedulers} scheduler(s); "
               f"state in {state_dir}")


@cli.command()
@click.option("--keep-workloads", is_flag=True, help="Leave the cluster's containers running.")
@click.option("--purge", is_flag=True, help="Also delete the desired state (NATS data), logs and spans.")
@click.pass_context
def down(ctx: click.Context, keep_workloads: bool, purge: bool) -> None:
    """Stop the local cluster (and, unless told otherwise, its containers).

    Desired state survives in the state dir: the next `comp up` runs the same deployments.
    """
    try:
        config = ClusterConfig.load(ctx.obj["state_dir"])
    except ClusterError as exc:
        raise click.ClickException(str(exc))
    local = LocalCluster(config)
    local.stop(purge_workloads=not keep_workloads)
    if purge:
        local.purge_data()
    click.echo(f"cluster {config.cluster!r} is down{' and its data removed' if purge else ''}")


@cli.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the local cluster's processes, which scheduler leads, and whether the API answers."""
    try:
        config = ClusterConfig.load(ctx.obj["state_dir"])
    except ClusterError as exc:
        raise click.ClickException(str(exc))
    local = LocalCluster(config)
    running = local.running()
    leader, leader_error = None, ""
    if running.get("redis"):
        try:
            leader = local.scheduler_leader()
        except ClusterError as exc:
            leader_error = str(exc)
    schedulers = set(config.scheduler_names())
    rows = []
    for name, pid in running.items():
        role = ""
        if name in schedulers and pid and leader is not None:
            role = f"leader (epoch {leader.epoch})" if leader.name == name else "standby"
        rows.append([name, str(pid) if pid else "-", "running" if pid else "stopped", role])
    click.echo(table(["PROCESS", "PID", "STATE", "ROLE"], rows))
    click.echo(f"scheduler leader: {_leader_text(leader, leader_error, running)}")
    try:
        healthy = httpx.get(f"{config.api_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        healthy = False
    click.echo(f"API {config.api_url}: {'healthy' if healthy else 'not answering'}")
    scraped = {name: url for name, url in config.metrics_urls().items() if running.get(name)}
    if scraped:
        click.echo("metrics (Prometheus):")
        click.echo(table(["PROCESS", "URL"], [[name, url] for name, url in scraped.items()]))


def _leader_text(leader: LeaderChange | None, error: str, running: dict[str, int | None]) -> str:
    if error:
        return f"unknown ({error})"
    if not running.get("redis"):
        return "unknown (redis is not running)"
    if leader is None:
        return "none yet"
    # Redis keeps the last announcement after its process is gone, until another one leads.
    alive = "" if running.get(leader.name) else "; not running now, its lease expires unrenewed"
    return f"{leader.name} (epoch {leader.epoch}, since {time.strftime('%H:%M:%S', time.localtime(leader.at))}{alive})"


# ---- workloads -----------------------------------------------------------------------------
@cli.command()
@click.option("-f", "--filename", "filename", required=True, type=click.File("rb"), help="Manifest file (YAML or JSON), or - for stdin.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def apply(ctx: click.Context, filename, output: str) -> None:
    """Create or update the deployments and services in a manifest."""
    body = client(ctx).json("POST", "/v1/apply", content=filename.read(), headers={"content-type": "application/yaml"})
    if output == "json":
        click.echo(json.dumps(body, indent=2))
        return
    for result in body.get("results", []):
        click.echo(f"deployment {result['namespace']}/{result['name']} {result['action']}")
    for result in body.get("services", []):
        click.echo(f"service {result['namespace']}/{result['name']} {result['action']}")
    click.echo(f"operation {body.get('operation_id')}")


SERVICE_KINDS = ("services", "service", "svc")


@cli.command()
@click.argument("kind", type=click.Choice(["deployment", "deployments", "deploy", *SERVICE_KINDS]))
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_context
def delete(ctx: click.Context, kind: str, name: str, namespace: str) -> None:
    """Delete a deployment (its tasks are stopped) or a service (its VIP and rules go)."""
    if kind in SERVICE_KINDS:
        body = client(ctx).json("DELETE", f"/v1/namespaces/{namespace}/services/{name}")
        click.echo(f"service {namespace}/{name} deleted")
    else:
        body = client(ctx).json("DELETE", f"/v1/deployments/{namespace}/{name}")
        click.echo(f"deployment {namespace}/{name} deleted")
    if body.get("operation_id"):
        click.echo(f"operation {body['operation_id']}")


@cli.command()
@click.argument("deployment")
@click.argument("replicas", type=click.IntRange(min=0))
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_context
def scale(ctx: click.Context, deployment: str, replicas: int, namespace: str) -> None:
    """Set a deployment's replica count (within its autoscale bounds, if it has a policy)."""
    body = client(ctx).json("POST", f"/v1/deployments/{namespace}/{deployment}/scale", json={"replicas": replicas})
    if body["changed"]:
        click.echo(f"deployment {namespace}/{deployment} scaled from {body['previous']} to {body['replicas']}")
    else:
        click.echo(f"deployment {namespace}/{deployment} already has {body['replicas']} replicas")


@cli.command()
@click.argument("kind", type=click.Choice(["deployment", "deploy", *SERVICE_KINDS]))
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_context
def describe(ctx: click.Context, kind: str, name: str, namespace: str) -> None:
    """A deployment in full: spec, status, why tasks are pending, where each task went and why.
    A service: selector, mode, VIP, ports, and each ready endpoint with what the lbs counted."""
    c = client(ctx)
    if kind in SERVICE_KINDS:
        click.echo(describe_service(c, namespace, name))
        return
    d = c.json("GET", f"/v1/deployments/{namespace}/{name}")
    spec = d["manifest"]["spec"]
    st = d.get("status") or {}
    lines = [
        f"Name:        {namespace}/{name}",
        f"Image:       {spec['image']}",
        f"Command:     {' '.join(spec.get('command') or []) or '(image default)'}",
        f"Resources:   cpu {spec['resources']['cpu']}, memory {format_memory(spec['resources']['memory'])}",
        f"Replicas:    {spec['replicas']} desired, {st.get('placed', 0)} placed, {st.get('running', 0)} running",
        f"Generation:  {d['generation']} (revision {d['revision']}; {d['change_cause']})",
    ]
    if st.get("pending_reason"):
        lines.append(f"Pending:     {st['pending_reason']}")
    if st.get("rollout_state"):
        message = f": {st['rollout_message']}" if st.get("rollout_message") else ""
        lines.append(f"Rollout:     generation {st['rollout_generation']} {st['rollout_state']}{message}")
    response = c.request("GET", f"/v1/deployments/{namespace}/{name}/placement")
    if response.status_code == 200:
        placement = response.json()
        lines.append("Last placement decision:")
        for p in placement.get("placed", []):
            lines.append(f"  placed  {p['task_id']} on {p['node_id']}: {p['reason']}")
        for s in placement.get("stopped", []):
            lines.append(f"  stopped {s['task_id']} on {s['node_id']}: {s['reason']}")
        if placement.get("pending"):
            lines.append(f"  pending {placement['pending']}: {placement['pending_reason']}")
    policy = spec.get("autoscale")
    if policy:
        lines.append(f"Autoscale:   {policy['min']}..{policy['max']} replicas on {policy['metric']}, target {policy['target']:g} "
                     f"(tolerance {policy['tolerance']:g}; down after {policy['scale_down']['stabilization']:g} s)")
        response = c.request("GET", f"/v1/deployments/{namespace}/{name}/autoscale", params={"count": 5})
        decisions = response.json() if response.status_code == 200 else []
        for decision in decisions:
            when = time.strftime("%H:%M:%S", time.localtime(decision["at"]))
            lines.append(f"  {when}  {decision['current']} -> {decision['replicas']}: {decision['reason']}")
        if not decisions:
            lines.append("  (no decision recorded yet)")
    tasks = [t for t in c.json("GET", "/v1/tasks", params={"deployment": f"{namespace}.{name}"})]
    lines.append("Tasks:")
    lines.append(tasks_table(tasks) if tasks else "  (none)")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("kind", type=click.Choice(["deployments", "deployment", "deploy", *SERVICE_KINDS, "tasks", "task", "nodes", "node",
                                           "namespaces", "namespace", "ns"]))
@click.option("-n", "--namespace", default=None, help="Only this namespace.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def get(ctx: click.Context, kind: str, namespace: str | None, output: str) -> None:
    """List deployments, services, tasks, nodes or namespaces."""
    c = client(ctx)
    if kind.startswith("deploy"):
        items = c.json("GET", "/v1/deployments", params={"namespace": namespace} if namespace else None)
        render = deployments_table
    elif kind in SERVICE_KINDS:
        items = c.json("GET", "/v1/services", params={"namespace": namespace} if namespace else None)
        render = services_table
    elif kind.startswith("task"):
        items = c.json("GET", "/v1/tasks")
        if namespace:
            items = [t for t in items if t["deployment"].split(".", 1)[0] == namespace]
        render = tasks_table
    elif kind in ("namespaces", "namespace", "ns"):
        items = c.json("GET", "/v1/namespaces")
        render = namespaces_table
    else:
        items = c.json("GET", "/v1/nodes")
        render = nodes_table
    click.echo(json.dumps(items, indent=2) if output == "json" else render(items))


def deployments_table(items: list[dict]) -> str:
    rows = []
    for d in items:
        spec = d["manifest"]["spec"]
        st = d.get("status") or {}  # null while the API cannot read Redis
        rows.append([
            d["namespace"], d["name"], f"{st.get('running', 0)}/{spec['replicas']}", str(st.get("placed", 0)),
            spec["image"], str(d["generation"]), st.get("pending_reason", ""),
        ])
    return table(["NAMESPACE", "NAME", "RUNNING", "PLACED", "IMAGE", "GEN", "PENDING"], rows)


def services_table(items: list[dict]) -> str:
    rows = [[s["namespace"], s["name"], s["mode"], _vip_text(s), ",".join(_port_text(p) for p in s["ports"]), str(len(s["endpoints"]))]
            for s in items]
    return table(["NAMESPACE", "NAME", "MODE", "VIP", "PORTS", "ENDPOINTS"], rows)


def _vip_text(service: dict) -> str:
    if service["vip"]:
        return service["vip"]
    # dnsrr answers DNS with the replicas' own addresses and never gets one.
    return "<none>" if service["mode"] == "dnsrr" else "<pending>"


def _port_text(port: dict) -> str:
    """``[published:]port/protocol[->target]``: ``80/tcp->8080``, ``8443:443/tcp``."""
    published = f"{port['published']}:" if port.get("published") else ""
    target = "" if port["target_port"] == port["port"] else f"->{port['target_port']}"
    return f"{published}{port['port']}/{port['protocol']}{target}"


def describe_service(c: Client, namespace: str, name: str) -> str:
    s = c.json("GET", f"/v1/namespaces/{namespace}/services/{name}")
    selector = s["manifest"]["spec"]["selector"]
    selected = (f"deployment {selector['deployment']}" if selector.get("deployment")
                else "labels " + ", ".join(f"{k}={v}" for k, v in sorted(selector["labels"].items())))
    response = c.request("GET", f"/v1/namespaces/{namespace}/services/{name}/counters")
    counted = SummedCounters(response.json()) if response.status_code == 200 else None
    if counted is None:
        counters = f"unavailable ({describe_error(response)})"
    elif not counted.hosts:
        counters = "no lb answered"
    else:
        # nftables counts in its NAT chains, which see only the first packet of a connection.
        counters = f"summed over the lbs of {len(counted.hosts)} host(s) (nftables: one packet per connection)"
    lines = [
        f"Name:        {namespace}/{name}",
        f"Selector:    {selected}",
        f"Mode:        {s['mode']}",
        f"VIP:         {_vip_text(s)}",
        f"Generation:  {s['generation']} (revision {s['revision']})",
        f"Counters:    {counters}",
        "Ports:",
    ]
    for port in s["ports"]:
        traffic = ""
        if counted and counted.hosts:
            packets, n_bytes = counted.of(port["name"], "")
            traffic = f"  {packets} packets, {n_bytes} bytes"
        lines.append(f"  {port['name']}: {_port_text(port)}{traffic}")
    if s["endpoints_updated_at"] is None:
        lines.append("Endpoints:   none yet (discovery has not written this service's endpoints)")
        return "\n".join(lines)
    lines.append(f"Endpoints:   {len(s['endpoints'])} ready (as of {_when(s['endpoints_updated_at'])})")
    rows = []
    for e in sorted(s["endpoints"], key=lambda e: e["task_id"]):
        for port in s["ports"]:
            target = e["ports"].get(port["name"])
            if target is None:
                continue  # a named target port this replica does not have: no traffic goes to it
            address = f"{e['address']}:{target}"
            packets, n_bytes = counted.of(port["name"], address) if counted and counted.hosts else ("-", "-")
            rows.append([e["task_id"], e["node_id"], port["name"], address, str(packets), str(n_bytes)])
    if rows:
        lines += ["  " + line for line in table(["TASK", "NODE", "PORT", "ADDRESS", "PACKETS", "BYTES"], rows).splitlines()]
    return "\n".join(lines)


class SummedCounters:
    """EndpointCounter replies summed over the hosts that sent them, by (port, target)."""

    def __init__(self, counters: list[dict]):
        self.hosts = {c["node_id"] for c in counters}
        self._sums: dict[tuple[str, str], tuple[int, int]] = {}
        for c in counters:
            packets, n_bytes = self._sums.get((c["port"], c["target"]), (0, 0))
            self._sums[c["port"], c["target"]] = (packets + c["packets"], n_bytes + c["bytes"])

    def of(self, port: str, target: str) -> tuple[int, int]:
        return self._sums.get((port, target), (0, 0))


def tasks_table(items: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = []
    for t in sorted(items, key=lambda t: (t["deployment"], t["task_id"])):
        ports = ",".join(f"{hp}->{cp}" for cp, hp in sorted(t.get("host_ports", {}).items()))
        rows.append([t["task_id"], t["deployment"].replace(".", "/", 1), t["node_id"], _task_state(t, now), _health(t),
                     str(t.get("restarts", 0)), ports, t.get("message", "")])
    return table(["TASK", "DEPLOYMENT", "NODE", "STATE", "HEALTH", "RESTARTS", "PORTS", "MESSAGE"], rows)


def _task_state(task: dict, now: float) -> str:
    if not task.get("crash_loop"):
        return task["state"]
    next_at = task.get("next_restart_at")
    if next_at is None:
        return "crash-loop"
    return f"crash-loop (next in {max(0, math.ceil(next_at - now))}s)"


def _health(task: dict) -> str:
    """readiness/liveness, '-' for a check the deployment does not have."""
    verdicts = [task.get(check) or "none" for check in ("readiness", "liveness")]
    if verdicts == ["none", "none"]:
        return "-"
    return "/".join("-" if v == "none" else v for v in verdicts)


def namespaces_table(items: list[dict]) -> str:
    rows = [[n["name"], _quota_text(n["quota"]), f"cpu {n['usage']['cpu']:g}, memory {format_memory(int(n['usage']['memory']))}, "
             f"tasks {int(n['usage']['tasks'])}"] for n in items]
    return table(["NAMESPACE", "QUOTA", "RESERVED"], rows)


def nodes_table(items: list[dict]) -> str:
    rows = []
    now = time.time()
    for n in items:
        cap, alloc = n["capacity"], n["allocated"]
        rows.append([n["node_id"], n["state"], n.get("driver", ""), str(n.get("tasks", 0)),
                     f"{alloc['cpu']:.2f}/{cap['cpu']:.2f}", f"{format_memory(alloc['memory'])}/{format_memory(cap['memory'])}",
                     f"{max(0.0, now - n['last_heartbeat']):.1f}s ago"])
    return table(["NODE", "STATE", "DRIVER", "TASKS", "CPU", "MEMORY", "HEARTBEAT"], rows)


@cli.command()
@click.argument("kind", type=click.Choice(["nodes", "node", "tasks", "task"]))
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def top(ctx: click.Context, kind: str, output: str) -> None:
    """What each node has, has promised and uses, or what each task uses (from the agents' metrics)."""
    c = client(ctx)
    if kind.startswith("node"):
        items = c.json("GET", "/v1/top/nodes")
        summary = c.json("GET", "/v1/capacity")
        if output == "json":
            click.echo(json.dumps({"nodes": items, "capacity": summary}, indent=2))
            return
        rows = [[n["node_id"], n["state"],
                 f"{n['allocatable']['cpu']:.2f}", f"{n['allocated']['cpu']:.2f}", _used_cpu(n["used_cpu"]),
                 format_memory(n["allocatable"]["memory"]), format_memory(n["allocated"]["memory"]), _used_memory(n["used_memory"]),
                 str(n["tasks"])] for n in items]
        click.echo(table(["NODE", "STATE", "CPU ALLOCATABLE", "ALLOCATED", "USED", "MEMORY ALLOCATABLE", "ALLOCATED", "USED", "TASKS"], rows))
        desired = summary["desired"]
        click.echo(f"\ncluster: {summary['ready_nodes']}/{summary['nodes']} nodes ready; cpu {summary['allocated']['cpu']:.2f} "
                   f"of {summary['allocatable']['cpu']:.2f} allocated, {summary['used_cpu']:.2f} used, {desired['cpu']:.2f} desired; "
                   f"memory {format_memory(summary['allocated']['memory'])} of {format_memory(summary['allocatable']['memory'])} "
                   f"allocated, {format_memory(summary['used_memory'])} used")
        if not summary["fits"]:
            click.echo(f"what is desired does not fit: {summary['shortfall']}")
        return
    items = c.json("GET", "/v1/top/tasks")
    if output == "json":
        click.echo(json.dumps(items, indent=2))
        return
    rows = [[t["task_id"], t["deployment"].replace(".", "/", 1), t["node_id"], f"{t['cpu_cores']:.3f}", _share(t["cpu_share"]),
             format_memory(t["memory_bytes"]), _share(t["memory_share"])] for t in items]
    click.echo(table(["TASK", "DEPLOYMENT", "NODE", "CPU", "OF LIMIT", "MEMORY", "OF LIMIT"], rows))


def _used_cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _used_memory(value: int | None) -> str:
    return "-" if value is None else format_memory(value)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---- rollouts ------------------------------------------------------------------------------
@cli.group()
def rollout() -> None:
    """A deployment's revisions and rollout: status, history, undo, promote, abort."""


def _rollout_path(namespace: str, name: str, action: str = "") -> str:
    return f"/v1/deployments/{namespace}/{name}/rollout" + (f"/{action}" if action else "")


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


@rollout.command("status")
@click.argument("deployment")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def rollout_status(ctx: click.Context, deployment: str, namespace: str, output: str) -> None:
    """The current generation, the last rollout event and the deployment's tasks."""
    body = client(ctx).json("GET", _rollout_path(namespace, deployment))
    click.echo(json.dumps(body, indent=2) if output == "json" else rollout_status_text(body))


def rollout_status_text(body: dict) -> str:
    generation = body["generation"]
    lines = [
        f"Deployment:  {body['namespace']}/{body['name']}",
        f"Generation:  {generation} ({body['change_cause']})",
        f"Replicas:    {body['replicas']}",
    ]
    if body["canary"]:
        promoted = body["promoted_generation"] == generation
        lines.append(f"Canary:      {body['canary']} ({'promoted' if promoted else 'waiting for `comp rollout promote`'})")
    event = body.get("last_event")
    if event:
        older = "" if event["generation"] == generation else f" (of generation {event['generation']}, not the current one)"
        text = f"{event['state']}{older} at {_when(event['at'])}"
        lines.append(f"Last event:  {text}" + (f": {event['message']}" if event.get("message") else ""))
    else:
        lines.append("Last event:  none recorded")
    tasks = body.get("tasks")
    if tasks is None:
        lines.append("Tasks:       unknown (the API cannot read the observed state)")
    else:
        states = ", ".join(f"{state} {count}" for state, count in tasks["by_state"].items())
        summary = f"{tasks['total']} total, {tasks['ready']} ready"
        if tasks["crash_looping"]:
            summary += f", {tasks['crash_looping']} crash-looping"
        lines.append(f"Tasks:       {summary}" + (f" ({states})" if states else ""))
    return "\n".join(lines)


@rollout.command("history")
@click.argument("deployment")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def rollout_history(ctx: click.Context, deployment: str, namespace: str, output: str) -> None:
    """Every recorded revision, oldest first; * marks the current one."""
    body = client(ctx).json("GET", f"/v1/deployments/{namespace}/{deployment}/revisions")
    if output == "json":
        click.echo(json.dumps(body, indent=2))
        return
    rows = [
        [f"{r['generation']}{' *' if r['current'] else ''}", _when(r["applied_at"]), _when(r["healthy_at"]), r["image"], r["change_cause"]]
        for r in body["revisions"]
    ]
    click.echo(table(["REVISION", "APPLIED", "HEALTHY", "IMAGE", "CHANGE-CAUSE"], rows))


@rollout.command("undo")
@click.argument("deployment")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--to-revision", type=click.IntRange(min=1), help="The revision to return to (default: the one before the current).")
@click.pass_context
def rollout_undo(ctx: click.Context, deployment: str, namespace: str, to_revision: int | None) -> None:
    """Return to an earlier revision's spec, keeping the replica count."""
    body = client(ctx).json("POST", _rollout_path(namespace, deployment, "undo"),
                            json={"to_revision": to_revision} if to_revision is not None else None)
    click.echo(f"deployment {namespace}/{deployment} rolled back to revision {body['to_revision']} "
               f"(generation {body['generation']})")
    click.echo(f"operation {body['operation_id']}")


@rollout.command("promote")
@click.argument("deployment")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_context
def rollout_promote(ctx: click.Context, deployment: str, namespace: str) -> None:
    """Release the current generation's canary to every replica."""
    body = client(ctx).json("POST", _rollout_path(namespace, deployment, "promote"))
    click.echo(f"deployment {namespace}/{deployment}: canary of generation {body['generation']} promoted")
    click.echo(f"operation {body['operation_id']}")


@rollout.command("abort")
@click.argument("deployment")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.pass_context
def rollout_abort(ctx: click.Context, deployment: str, namespace: str) -> None:
    """Stop the current rollout: back to the last revision that ran healthy (or the previous one)."""
    body = client(ctx).json("POST", _rollout_path(namespace, deployment, "abort"))
    click.echo(f"deployment {namespace}/{deployment}: rollout of generation {body['from_generation']} aborted, "
               f"back to revision {body['to_revision']} (generation {body['generation']})")
    click.echo(f"operation {body['operation_id']}")


# ---- namespaces and nodes -----------------------------------------------------------------
@cli.group()
def namespace() -> None:
    """Namespaces and their quotas."""


@namespace.command("set")
@click.argument("name")
@click.option("--cpu", help="Total cores the namespace may reserve, e.g. 4 or 4000m.")
@click.option("--memory", help="Total memory, e.g. 8Gi.")
@click.option("--tasks", type=int, help="Total replicas.")
@click.pass_context
def namespace_set(ctx: click.Context, name: str, cpu: str | None, memory: str | None, tasks: int | None) -> None:
    """Create NAME or replace its quota (an option left out is unbounded)."""
    quota = {k: v for k, v in {"cpu": cpu, "memory": memory, "tasks": tasks}.items() if v is not None}
    body = client(ctx).json("PUT", f"/v1/namespaces/{name}", json={"quota": quota})
    click.echo(f"namespace {body['name']} set: {_quota_text(body['quota'])}")


@namespace.command("delete")
@click.argument("name")
@click.pass_context
def namespace_delete(ctx: click.Context, name: str) -> None:
    client(ctx).json("DELETE", f"/v1/namespaces/{name}")
    click.echo(f"namespace {name} deleted")


def _quota_text(quota: dict) -> str:
    parts = []
    if quota.get("cpu") is not None:
        parts.append(f"cpu {quota['cpu']:g}")
    if quota.get("memory") is not None:
        parts.append(f"memory {format_memory(quota['memory'])}")
    if quota.get("tasks") is not None:
        parts.append(f"tasks {quota['tasks']}")
    return ", ".join(parts) or "no quota"


@cli.group()
def node() -> None:
    """Cordon, drain and uncordon nodes."""


def _node_action(action: str, help_text: str):
    @node.command(action, help=help_text)
    @click.argument("node_id")
    @click.pass_context
    def command(ctx: click.Context, node_id: str) -> None:
        body = client(ctx).json("POST", f"/v1/nodes/{node_id}/{action}")
        click.echo(f"node {node_id}: cordoned={body['cordoned']} draining={body['draining']}")

    return command


_node_action("cordon", "Place nothing new on NODE_ID.")
_node_action("drain", "Cordon NODE_ID and move its tasks elsewhere, each stopped once its replacement runs.")
_node_action("uncordon", "Undo cordon and drain.")


# ---- images --------------------------------------------------------------------------------
@cli.group()
def image() -> None:
    """Local images for machines without a registry."""


@image.command("import-busybox")
@click.argument("tag", default=DEFAULT_BUSYBOX_TAG)
def import_busybox_cmd(tag: str) -> None:
    """Build TAG from this host's static busybox (sh, httpd, sleep, nc, ...)."""
    try:
        image_id = import_busybox(tag)
    except ImageError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"{tag} {image_id[:19]}")


# ---- the record: events, audit, traces (each in its own module) --------------------------
for _module in (events_cmd, audit_cmd, trace_cmd):
    _module.register(cli, client)


if __name__ == "__main__":
    sys.exit(cli())
