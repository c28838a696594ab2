"""The health checker's verdicts (pure), the probes against local servers, and the restart policy's decisions."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comp_common.manifest import HealthCheck, Port, RestartPolicy
from comp_common.messages import HealthState, TaskSpec
from comp_nodeagent.agent import exit_backoff, restart_wanted
from comp_nodeagent.health import Checker, exec_result, new_http_client, probe_http, probe_tcp, resolve_port

S, H, U = HealthState.STARTING, HealthState.HEALTHY, HealthState.UNHEALTHY


def check(**fields: object) -> HealthCheck:
    return HealthCheck(exec={"command": ["true"]}, **fields)


def run(checker: Checker, results: str, start: float = 0.0, step: float = 1.0) -> list[HealthState]:
    """The state after each result: ``+`` ok, ``-`` fail, one every ``step`` seconds from ``start``."""
    states = []
    for i, r in enumerate(results):
        checker.observe(r == "+", f"result {i}", start + i * step)
        states.append(checker.state)
    return states


@pytest.mark.parametrize(
    ("fields", "results", "states"),
    [
        ({}, "", []),
        ({}, "+", [H]),
        ({}, "--", [S, S]),
        ({}, "---", [S, S, U]),
        ({}, "+--+--", [H, H, H, H, H, H]),  # two failures never reach three in a row
        ({}, "+---", [H, H, H, U]),
        ({}, "+---+", [H, H, H, U, H]),
        ({"success_threshold": 2}, "+-+", [S, S, S]),
        ({"success_threshold": 2}, "++", [S, H]),
        ({"success_threshold": 2}, "---+-++", [S, S, U, U, U, U, H]),
        ({"failure_threshold": 1}, "+-", [H, U]),
        ({"failure_threshold": 1, "success_threshold": 3}, "-++-+++", [U, U, U, U, U, U, H]),
    ],
)
def test_verdicts(fields: dict, results: str, states: list[HealthState]) -> None:
    assert run(Checker(check(**fields), started_at=0.0), results) == states


def test_failures_within_the_start_period_do_not_count() -> None:
    checker = Checker(check(failure_threshold=2, start_period=5), started_at=100.0)
    # t = 100..104 are inside the start period, 105 and 106 are not.
    assert run(checker, "-----", start=100.0) == [S] * 5
    assert (checker.failures, checker.successes) == (0, 0)
    assert run(checker, "--", start=105.0) == [S, U]


def test_a_success_within_the_start_period_counts() -> None:
    checker = Checker(check(start_period=60), started_at=0.0)
    assert run(checker, "-+-", start=1.0) == [S, H, H]


def test_observe_returns_the_change_and_the_detail() -> None:
    checker = Checker(check(failure_threshold=2), started_at=0.0)
    assert checker.observe(True, "ok", 1.0).state == H  # type: ignore[union-attr]
    assert checker.observe(False, "exit 1", 2.0) is None
    verdict = checker.observe(False, "exit 2", 3.0)
    assert verdict is not None and (verdict.state, verdict.previous, verdict.detail) == (U, H, "exit 2")
    assert checker.observe(False, "exit 3", 4.0) is None  # no change, no verdict


@given(
    failure_threshold=st.integers(1, 5),
    success_threshold=st.integers(1, 5),
    results=st.lists(st.booleans(), max_size=60),
)
def test_a_verdict_flips_only_after_exactly_threshold_consecutive_results(
    failure_threshold: int, success_threshold: int, results: list[bool]
) -> None:
    checker = Checker(check(failure_threshold=failure_threshold, success_threshold=success_threshold), started_at=0.0)
    state = S
    for i, ok in enumerate(results):
        verdict = checker.observe(ok, "", float(i))
        # The run of equal results ending here.
        run_length = 0
        for earlier in reversed(results[: i + 1]):
            if earlier != ok:
                break
            run_length += 1
        threshold = success_threshold if ok else failure_threshold
        target = H if ok else U
        if run_length >= threshold and state != target:
            # The first result at which the run reaches the threshold is the one that flips.
            assert run_length == threshold
            assert verdict is not None and verdict.state == target and verdict.previous == state
            state = target
        else:
            assert verdict is None
        assert checker.state == state


# ---- ports and exec results -----------------------------------------------------------------
def test_ports_resolve_by_number_or_name() -> None:
    spec = TaskSpec(
        task_id="t", deployment="d", namespace="n", name="x", spec_hash="h", image="i", cpu=0.1, memory=1,
        ports=[Port(container_port=8080, name="http"), Port(container_port=9090, name="metrics")],
    )
    assert resolve_port(80, spec) == 80
    assert resolve_port("metrics", spec) == 9090
    assert resolve_port("admin", spec) is None


@pytest.mark.parametrize(
    ("exit_code", "output", "ok", "detail"),
    [
        (0, "", True, "cat /ready exited 0"),
        (1, "cat: can't open '/ready': No such file\n", False, "cat /ready exited 1: cat: can't open '/ready': No such file"),
        (None, "no exit within 1s", False, "cat /ready: no exit within 1s"),
    ],
)
def test_exec_results(exit_code: int | None, output: str, ok: bool, detail: str) -> None:
    result = exec_result(exit_code, output, ["cat", "/ready"], 1.0)
    assert (result.ok, result.detail) == (ok, detail)


# ---- probes against local servers ------------------------------------------------------------
async def test_http_probe_compares_the_status() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = (await reader.readuntil(b"\r\n\r\n")).decode()
        code = "200 OK" if request.startswith("GET /ok ") else "404 Not Found"
        writer.write(f"HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = new_http_client()
    try:
        ok = await probe_http(client, "127.0.0.1", port, "/ok", 200, 1.0)
        assert ok.ok and ok.detail == f"GET /ok on :{port} answered 200"
        missing = await probe_http(client, "127.0.0.1", port, "/gone", 200, 1.0)
        assert not missing.ok and missing.detail == f"GET /gone on :{port} answered 404, expected 200"
        assert (await probe_http(client, "127.0.0.1", port, "/gone", 404, 1.0)).ok
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_http_probe_times_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = new_http_client()
    try:
        result = await probe_http(client, "127.0.0.1", port, "/", 200, 0.2)
        assert not result.ok and result.detail == f"GET / on :{port} timed out after 0.2s"
    finally:
        await client.aclose()
        server.close()


async def test_tcp_probe() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert (await probe_tcp("127.0.0.1", port, 1.0)).ok
    server.close()
    await server.wait_closed()
    refused = await probe_tcp("127.0.0.1", port, 1.0)
    assert not refused.ok and refused.detail.startswith(f"TCP connect to :{port} failed")


# ---- restart policy --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("condition", "exit_code", "killed", "restart"),
    [
        ("always", 0, False, True),
        ("always", 1, False, True),
        ("on-failure", 0, False, False),
        ("on-failure", 1, False, True),
        ("on-failure", 137, False, True),
        ("on-failure", None, False, True),
        ("on-failure", 0, True, True),  # stopped for failing its liveness check: a failure
        ("never", 1, False, False),
        ("never", 0, True, False),
    ],
)
def test_restart_wanted(condition: str, exit_code: int | None, killed: bool, restart: bool) -> None:
    assert restart_wanted(condition, exit_code, killed=killed) is restart


@pytest.mark.parametrize(
    ("failures", "ran_for", "delay", "after"),
    [
        (0, 0.1, 0.0, 1),  # the first exit restarts at once
        (1, 0.1, 1.0, 2),
        (2, 0.1, 2.0, 3),
        (3, 0.1, 4.0, 4),
        (6, 0.1, 10.0, 7),  # capped at max_delay
        (6, 29.9, 10.0, 7),
        (6, 30.0, 0.0, 1),  # a run of reset_after was stable: the count starts afresh
        (2, None, 2.0, 3),  # run time unknown: no reset
    ],
)
def test_exit_backoff(failures: int, ran_for: float | None, delay: float, after: int) -> None:
    policy = RestartPolicy(max_delay=10, reset_after=30)
    assert exit_backoff(failures, ran_for, policy) == (delay, after)
