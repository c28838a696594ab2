"""Manifest v1 lifecycle fields (``health``, ``restart``, ``stop_signal``, ``stop_grace_period``,
``update``, ``depends_on``): what is accepted, what is refused (where and why), durations, and
which of them make a replica's identity."""

from __future__ import annotations

import math
import textwrap

import pytest

from manifests import errors_of, only
from comp_common.manifest import Dependency, DeploymentSpec, HealthCheck
from comp_common.quantities import format_duration, parse_duration


def manifest(spec: str) -> str:
    return "metadata: {name: web}\nspec:\n" + textwrap.indent("image: nginx:1.27\n" + textwrap.dedent(spec).strip(), "  ") + "\n"


def spec_of(spec: str) -> DeploymentSpec:
    return only(manifest(spec)).spec


# ---- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0), ("500ms", 0.5), ("2m", 120.0), ("1.5m", 90.0), ("1h", 3600.0), ("0", 0.0), ("0s", 0.0),
        (" 3s ", 3.0), ("3 s", 3.0), ("7", 7.0), (7, 7.0), (2.5, 2.5), (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", None),  # valid: here only so the table reads as one
        ("-1s", "duration '-1s' is not like '500ms', '10s', '2m' or '1h'"),
        ("10d", "duration '10d' is not like '500ms', '10s', '2m' or '1h'"),
        ("s", "duration 's' is not like '500ms', '10s', '2m' or '1h'"),
        ("", "duration '' is not like '500ms', '10s', '2m' or '1h'"),
        ("1e3s", "duration '1e3s' is not like '500ms', '10s', '2m' or '1h'"),
        (-1, "a duration must not be negative, got -1"),
        (True, "a duration must be like '10s' or '500ms', not True"),
    ],
)
def test_parse_duration_refusals(text: str | float, message: str | None) -> None:
    if message is None:
        assert parse_duration(text) == 10.0
        return
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "500ms"), (10.0, "10s"), (120.0, "2m"), (90.0, "90s"), (0.0, "0s"), (3600.0, "60m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# ---- accepted -------------------------------------------------------------------------------


def test_defaults() -> None:
    spec = spec_of("")
    assert (spec.health.liveness, spec.health.readiness) == (None, None)
    assert (spec.restart.condition, spec.restart.max_delay, spec.restart.reset_after) == ("always", 60.0, 60.0)
    assert (spec.stop_signal, spec.stop_grace_period) == ("SIGTERM", 10.0)
    update = spec.update
    assert (update.max_surge, update.max_unavailable, update.min_healthy_time, update.healthy_deadline) == ("25%", 0, 0.0, 300.0)
    assert (update.canary, update.auto_revert) == (0, True)
    assert spec.depends_on == []


def test_everything_given() -> None:
    spec = spec_of(
        """
        ports: [{container_port: 8080, name: http}]
        health:
          liveness: {http: {path: /healthz, port: http, status: 204}, interval: 5s, timeout: 500ms, failure_threshold: 2, start_period: 1m}
          readiness: {tcp: {port: 8080}, success_threshold: 3}
        restart: {condition: on-failure, max_delay: 30s, reset_after: 5m}
        stop_signal: SIGQUIT
        stop_grace_period: 1m
        update: {max_surge: 1, max_unavailable: 50%, min_healthy_time: 10s, healthy_deadline: 2m, canary: 1, auto_revert: false}
        depends_on: [db, {name: cache, condition: started}]
        """
    )
    live, ready = spec.health.liveness, spec.health.readiness
    assert (live.kind, live.port, live.http.path, live.http.status) == ("http", "http", "/healthz", 204)
    assert (live.interval, live.timeout, live.failure_threshold, live.success_threshold, live.start_period) == (5.0, 0.5, 2, 1, 60.0)
    assert (ready.kind, ready.port, ready.success_threshold, ready.interval) == ("tcp", 8080, 3, 10.0)
    assert (spec.restart.condition, spec.restart.max_delay, spec.restart.reset_after) == ("on-failure", 30.0, 300.0)
    assert (spec.stop_signal, spec.stop_grace_period) == ("SIGQUIT", 60.0)
    u = spec.update
    assert (u.max_surge, u.max_unavailable, u.min_healthy_time, u.healthy_deadline, u.canary, u.auto_revert) == (1, "50%", 10.0, 120.0, 1, False)
    assert spec.depends_on == [Dependency(name="db", condition="healthy"), Dependency(name="cache", condition="started")]


@pytest.mark.parametrize(
    "probe",
    [
        "{exec: {command: [cat, /tmp/ready]}}",
        "{http: {port: 80}}",
        "{tcp: {port: 65535}}",
        "{tcp: {port: web}, interval: 2, timeout: 0.25}",
        "{tcp: {port: '80'}}",
    ],
)
def test_probes_accepted(probe: str) -> None:
    check = spec_of(f"ports: [{{container_port: 80, name: web}}]\nhealth: {{readiness: {probe}}}").health.readiness
    assert isinstance(check, HealthCheck)


@pytest.mark.parametrize(("amount", "value"), [("0", 0), ("3", 3), ("'0%'", "0%"), ("'100%'", "100%"), ("' 25% '", "25%")])
def test_surge_amounts(amount: str, value: int | str) -> None:
    assert spec_of(f"update: {{max_surge: {amount}, max_unavailable: 1}}").update.max_surge == value


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL", "SIGWINCH"])
def test_stop_signals(signal: str) -> None:
    assert spec_of(f"stop_signal: {signal}").stop_signal == signal


# ---- refused --------------------------------------------------------------------------------

DURATION_HELP = "is not like '500ms', '10s', '2m' or '1h'"
REFUSED = [
    # durations
    ("stop_grace_period: 10d", "spec.stop_grace_period", f"duration '10d' {DURATION_HELP}"),
    ("stop_grace_period: 2h", "spec.stop_grace_period", "Input should be less than or equal to 3600"),
    ("stop_grace_period: -5", "spec.stop_grace_period", "a duration must not be negative, got -5"),
    ("stop_grace_period:", "spec.stop_grace_period", "a duration must be like '10s', '500ms' or a number of seconds, not None"),
    ("stop_grace_period: [1]", "spec.stop_grace_period", "a duration must be like '10s', '500ms' or a number of seconds, not [1]"),
    ("stop_grace_period: .nan", "spec.stop_grace_period", "a duration must be finite, not nan"),
    ("restart: {max_delay: .inf}", "spec.restart.max_delay", "a duration must be finite, not inf"),
    ("restart: {max_delay: 0s}", "spec.restart.max_delay", "Input should be greater than 0"),
    ("restart: {condition: sometimes}", "spec.restart.condition", "Input should be 'always', 'on-failure' or 'never'"),
    ("health: {liveness: {exec: {command: [x]}, interval: 0}}", "spec.health.liveness.interval", "Input should be greater than 0"),
    ("health: {liveness: {exec: {command: [x]}, timeout: 1x}}", "spec.health.liveness.timeout", f"duration '1x' {DURATION_HELP}"),
    ("update: {healthy_deadline: 0}", "spec.update.healthy_deadline", "Input should be greater than 0"),
    # exactly one probe
    ("health: {liveness: {}}", "spec.health.liveness", "give exactly one of 'http', 'tcp' or 'exec' (got none)"),
    ("health: {readiness: {interval: 5s}}", "spec.health.readiness", "give exactly one of 'http', 'tcp' or 'exec' (got none)"),
    (
        "health: {liveness: {tcp: {port: 80}, exec: {command: [x]}}}",
        "spec.health.liveness",
        "give exactly one of 'http', 'tcp' or 'exec' (got tcp, exec)",
    ),
    (
        "health: {liveness: {http: {port: 80}, tcp: {port: 80}, exec: {command: [x]}}}",
        "spec.health.liveness",
        "give exactly one of 'http', 'tcp' or 'exec' (got http, tcp, exec)",
    ),
    ("health: {liveness: {grpc: {port: 80}}}", "spec.health.liveness.grpc", "unknown field"),
    ("health: {startup: {tcp: {port: 80}}}", "spec.health.startup", "unknown field"),
    ("health: {liveness: {exec: {command: []}}}", "spec.health.liveness.exec.command", "List should have at least 1 item after validation, not 0"),
    ("health: {liveness: {http: {path: healthz, port: 80}}}", "spec.health.liveness.http.path", "String should match pattern '^/'"),
    ("health: {liveness: {http: {port: 80, status: 99}}}", "spec.health.liveness.http.status", "Input should be greater than or equal to 100"),
    ("health: {liveness: {tcp: {port: 80}, failure_threshold: 0}}", "spec.health.liveness.failure_threshold", "Input should be greater than or equal to 1"),
    # probe ports
    ("health: {liveness: {tcp: {}}}", "spec.health.liveness.tcp.port", "required field is missing"),
    (
        "ports: [{container_port: 80, name: web}]\nhealth: {readiness: {http: {port: admin}}}",
        "spec",
        "health.readiness: port 'admin' is not the name of a port in 'ports' (web)",
    ),
    ("health: {liveness: {tcp: {port: web}}}", "spec", "health.liveness: port 'web' is not the name of a port in 'ports' (none are named)"),
    ("health: {liveness: {tcp: {port: 0}}}", "spec.health.liveness.tcp.port", "port 0 is not between 1 and 65535"),
    ("health: {liveness: {tcp: {port: 70000}}}", "spec.health.liveness.tcp.port", "port 70000 is not between 1 and 65535"),
    (
        "health: {liveness: {tcp: {port: true}}}",
        "spec.health.liveness.tcp.port",
        "True is neither a port number (1 to 65535) nor the name of a port in 'ports'",
    ),
    (
        "health: {liveness: {http: {port: Web_1}}}",
        "spec.health.liveness.http.port",
        "'Web_1' is neither a port number (1 to 65535) nor the name of a port in 'ports'",
    ),
    # surge and unavailable
    ("update: {max_surge: 0, max_unavailable: 0}", "spec.update", "max_surge and max_unavailable cannot both be 0: the rollout could never start a task"),
    ("update: {max_surge: '0%'}", "spec.update", "max_surge and max_unavailable cannot both be 0: the rollout could never start a task"),
    ("update: {max_surge: 0, max_unavailable: '0%'}", "spec.update", "max_surge and max_unavailable cannot both be 0: the rollout could never start a task"),
    ("update: {max_surge: '101%'}", "spec.update.max_surge", "'101%' is neither a count of replicas (0 or more) nor a percentage from 0% to 100%"),
    ("update: {max_surge: '5.5%'}", "spec.update.max_surge", "'5.5%' is neither a count of replicas (0 or more) nor a percentage from 0% to 100%"),
    ("update: {max_unavailable: -1}", "spec.update.max_unavailable", "-1 is neither a count of replicas (0 or more) nor a percentage from 0% to 100%"),
    ("update: {max_unavailable: 1.5}", "spec.update.max_unavailable", "1.5 is neither a count of replicas (0 or more) nor a percentage from 0% to 100%"),
    ("update: {max_unavailable: true}", "spec.update.max_unavailable", "True is neither a count of replicas (0 or more) nor a percentage from 0% to 100%"),
    ("update: {canary: -1}", "spec.update.canary", "Input should be greater than or equal to 0"),
    ("update: {strategy: recreate}", "spec.update.strategy", "unknown field"),
    # depends_on
    ("depends_on: [db, db]", "spec.depends_on", "depends_on lists db more than once"),
    ("depends_on: [db, {name: db, condition: started}, cache, cache]", "spec.depends_on", "depends_on lists cache, db more than once"),
    ("depends_on: db", "spec.depends_on", "Input should be a valid list"),
    ("depends_on: [5]", "spec.depends_on[0]", "a dependency is a deployment name or {name, condition}, not 5"),
    ("depends_on: [Db]", "spec.depends_on[0].name", "'Db' is not a valid name: use lower-case letters, digits and '-', starting and ending with a letter or digit"),
    ("depends_on: [{name: db, condition: ready}]", "spec.depends_on[0].condition", "Input should be 'started' or 'healthy'"),
    ("depends_on: [{condition: started}]", "spec.depends_on[0].name", "required field is missing"),
    # stop_signal
    (
        "stop_signal: SIGSTOP",
        "spec.stop_signal",
        "Input should be 'SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGKILL' or 'SIGWINCH'",
    ),
    (
        "stop_signal: sigterm",
        "spec.stop_signal",
        "Input should be 'SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGKILL' or 'SIGWINCH'",
    ),
]


@pytest.mark.parametrize(("spec", "path", "message"), REFUSED, ids=[f"{i}-{r[1]}" for i, r in enumerate(REFUSED)])
def test_refused_with_path_and_message(spec: str, path: str, message: str) -> None:
    assert errors_of(manifest(spec)) == [{"path": path, "message": message}]


def test_every_problem_is_reported_at_once() -> None:
    text = manifest("stop_signal: SIGSTOP\nupdate: {max_surge: 0, max_unavailable: 0}\ndepends_on: [a, a]")
    assert {e["path"] for e in errors_of(text)} == {"spec.stop_signal", "spec.update", "spec.depends_on"}


def test_errors_in_one_of_several_documents_name_it() -> None:
    text = manifest("") + "---\n" + manifest("health: {liveness: {}}").replace("name: web", "name: api")
    assert errors_of(text) == [
        {"path": "document[1].spec.health.liveness", "message": "give exactly one of 'http', 'tcp' or 'exec' (got none)"}
    ]


# ---- identity of a replica ------------------------------------------------------------------

# Computed by the manifest code of the commit before the lifecycle fields (8380ee2^), with the
# same manifests: an upgraded scheduler must not see every running replica as changed.
BEFORE_LIFECYCLE = [
    ("metadata: {name: web}\nspec: {image: nginx:1.27}", "2bbd9ce701b95dc8"),
    (
        "metadata: {name: web, namespace: shop}\nspec:\n  image: nginx:1.27\n  command: [nginx, -g, daemon off;]\n"
        "  env: {A: 1}\n  resources: {cpu: 500m, memory: 64Mi}\n"
        "  ports: [{container_port: 80, host_port: 8080, name: http}]\n"
        "  placement: {constraints: [{label: zone, value: a}]}",
        "64ae65c4220e530b",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BEFORE_LIFECYCLE, ids=["plain", "full"])
def test_a_spec_without_lifecycle_fields_keeps_its_identity(text: str, expected: str) -> None:
    assert only(text).spec.task_hash() == expected


@pytest.mark.parametrize(
    "defaults",
    [
        "health: {}",
        "restart: {condition: always, max_delay: 1m, reset_after: 60s}",
        "stop_signal: SIGTERM",
        "stop_grace_period: 10s",
        "update: {max_surge: 25%, max_unavailable: 0}",
        "depends_on: []",
    ],
)
def test_defaults_written_out_keep_the_identity(defaults: str) -> None:
    assert spec_of(defaults).task_hash() == spec_of("").task_hash() == "2bbd9ce701b95dc8"


@pytest.mark.parametrize(
    "changed",
    [
        "health: {liveness: {tcp: {port: 80}}}",
        "health: {readiness: {exec: {command: [test, -f, /ready]}}}",
        "health: {readiness: {exec: {command: [test, -f, /ready]}, interval: 2s}}",
        "restart: {condition: never}",
        "restart: {max_delay: 5s}",
        "stop_signal: SIGINT",
        "stop_grace_period: 30s",
    ],
)
def test_how_a_replica_is_checked_restarted_or_stopped_changes_the_identity(changed: str) -> None:
    assert spec_of(changed).task_hash() != spec_of("").task_hash()


def test_probe_settings_are_part_of_the_identity() -> None:
    base = "health: {readiness: {exec: {command: [test, -f, /ready]}}}"
    assert spec_of(base).task_hash() != spec_of(base.replace("}}}", "}, timeout: 2s}}")).task_hash()
    # Spelled differently, the same: 10s is the default interval.
    assert spec_of(base).task_hash() == spec_of(base.replace("}}}", "}, interval: 10s}}")).task_hash()


@pytest.mark.parametrize(
    "rollout",
    [
        "update: {max_surge: 1, max_unavailable: 1}",
        "update: {canary: 2, auto_revert: false}",
        "update: {min_healthy_time: 30s, healthy_deadline: 1m}",
        "depends_on: [db]",
        "depends_on: [{name: db, condition: started}, cache]",
    ],
)
def test_how_a_change_is_rolled_out_and_start_order_leave_the_identity(rollout: str) -> None:
    assert spec_of(rollout).task_hash() == spec_of("").task_hash()


def test_finite_durations_only() -> None:
    # .inf would make a probe that never runs again and a grace period that never ends.
    assert math.isfinite(spec_of("stop_grace_period: 3600").stop_grace_period)
