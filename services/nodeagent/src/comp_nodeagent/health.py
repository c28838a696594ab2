"""Health checks: a pure verdict state machine, and the probes that feed it.

:class:`Checker` is pure, as :func:`~comp_nodeagent.agent.plan_actions` is: probe results
in (ok or not, at a time), a verdict out.  The probes (:func:`probe_http`,
:func:`probe_tcp`, and the runtime's ``exec_check``) reach the container itself, on its
address on the engine's network and its *container* port, as Kubernetes' kubelet does:
a check must not depend on a port being published on the host.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from comp_common.aio import within
from comp_common.manifest import HealthCheck
from comp_common.messages import HealthState, TaskSpec

# What a probe's detail keeps of a command's output: enough to say why, not a log.
DETAIL_LIMIT = 200


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    """A change of the checker's state, and what the probe that caused it saw."""

    state: HealthState
    previous: HealthState
    detail: str


class Checker:
    """The verdict of one check of one container, from its probes' results.

    It starts ``STARTING``.  ``success_threshold`` consecutive successes make it
    ``HEALTHY``; ``failure_threshold`` consecutive failures make it ``UNHEALTHY``; a
    result of the other kind starts the count again.  A failure within ``start_period``
    of the container's start is ignored (the process may still be coming up) and leaves
    the counts as they were; a success then counts as any other.
    """

    def __init__(self, check: HealthCheck, started_at: float):
        self.failure_threshold = check.failure_threshold
        self.success_threshold = check.success_threshold
        self.start_period = check.start_period
        self.started_at = started_at
        self.state = HealthState.STARTING
        self.successes = 0
        self.failures = 0
        self.detail = ""

    def observe(self, ok: bool, detail: str, at: float) -> Verdict | None:
        """Take one probe result; the change of verdict it caused, if any."""
        if not ok and at - self.started_at < self.start_period:
            return None
        self.detail = detail
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            target = HealthState.HEALTHY if self.successes >= self.success_threshold else None
        else:
            self.successes, self.failures = 0, self.failures + 1
            target = HealthState.UNHEALTHY if self.failures >= self.failure_threshold else None
        if target is None or target == self.state:
            return None
        previous, self.state = self.state, target
        return Verdict(target, previous, detail)


def resolve_port(port: int | str | None, spec: TaskSpec) -> int | None:
    """The container port a check names, by number or by its name in the task's ports."""
    if isinstance(port, int) or port is None:
        return port
    return next((p.container_port for p in spec.ports if p.name == port), None)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


async def probe_http(client: httpx.AsyncClient, host: str, port: int, path: str, status: int, timeout: float) -> ProbeResult:
    what = f"GET {path} on :{port}"
    try:
        response = await client.get(f"http://{_host(host)}:{port}{path}", timeout=timeout)
    except httpx.TimeoutException:
        return ProbeResult(False, f"{what} timed out after {timeout:g}s")
    except httpx.HTTPError as exc:
        return ProbeResult(False, _clip(f"{what} failed: {type(exc).__name__} {exc}"))
    answer = f"{what} answered {response.status_code}"
    if response.status_code == status:
        return ProbeResult(True, answer)
    return ProbeResult(False, f"{answer}, expected {status}")


async def probe_tcp(host: str, port: int, timeout: float) -> ProbeResult:
    what = f"TCP connect to :{port}"
    try:
        _, writer = await within(asyncio.open_connection(host, port), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return ProbeResult(False, f"{what} timed out after {timeout:g}s")
    except OSError as exc:
        return ProbeResult(False, _clip(f"{what} failed: {exc.strerror or exc}"))
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the peer may close first; the connection did open
    return ProbeResult(True, f"{what} opened")


def exec_result(exit_code: int | None, output: str, command: list[str], timeout: float) -> ProbeResult:
    shown = " ".join(command)
    if exit_code is None:
        # The runtime's word for why there is no exit code (timed out, container gone).
        return ProbeResult(False, _clip(f"{shown}: {output or f'no exit code within {timeout:g}s'}"))
    said = f": {output}" if output.strip() else ""
    return ProbeResult(exit_code == 0, _clip(f"{shown} exited {exit_code}{said}"))


def new_http_client() -> httpx.AsyncClient:
    # No proxies from the environment: the container's address is only reachable directly.
    # No keep-alive: each probe opens its own connection, as a new client would, so a
    # server that accepts no new connections fails its check.
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": "comp-nodeagent-probe", "Connection": "close"},
    )


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
