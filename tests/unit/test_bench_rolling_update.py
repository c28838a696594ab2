"""The pure helpers of bench/rolling_update.py (the bench itself is not run in the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from comp_common.manifest import parse_deployments

_PATH = Path(__file__).resolve().parents[2] / "bench" / "rolling_update.py"
_spec = importlib.util.spec_from_file_location("bench_rolling_update", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up while the class is built
_spec.loader.exec_module(bench)


# ---- what is deployed --------------------------------------------------------------------


def test_manifest_is_a_valid_deployment_with_the_bench_settings():
    [deployment] = parse_deployments(bench.manifest("1"))
    spec = deployment.spec
    assert deployment.key == f"default.{bench.NAME}"
    assert spec.replicas == 50
    assert spec.image == bench.IMAGE
    assert spec.command == bench.COMMAND
    assert spec.env == {"VERSION": "1"}
    assert spec.stop_grace_period == 10.0
    assert spec.stop_signal == "SIGTERM"
    assert (spec.update.max_surge, spec.update.max_unavailable) == (5, 0)
    assert spec.resources.cpu == pytest.approx(0.1)
    assert spec.resources.memory == 8 * 1024**2
    # No readiness check: running is serving, as it is for Swarm without a HEALTHCHECK.
    assert spec.health.readiness is None


def test_a_new_version_changes_only_the_env_and_is_a_new_task_spec():
    [one], [two], [one_again] = (parse_deployments(bench.manifest(v)) for v in ("1", "2", "1"))
    assert two.spec.env == {"VERSION": "2"}
    assert two.spec.model_copy(update={"env": one.spec.env}) == one.spec
    assert one.spec.task_hash() != two.spec.task_hash()
    assert one.spec.task_hash() == one_again.spec.task_hash()


def test_manifest_options_are_carried():
    [deployment] = parse_deployments(bench.manifest("7", 3, grace=2.5, surge=2, unavailable=1, cpu=0.05, memory="16Mi"))
    spec = deployment.spec
    assert (spec.replicas, spec.stop_grace_period, spec.env) == (3, 2.5, {"VERSION": "7"})
    assert (spec.update.max_surge, spec.update.max_unavailable) == (2, 1)
    assert (spec.resources.cpu, spec.resources.memory) == (pytest.approx(0.05), 16 * 1024**2)


def test_swarm_commands_match_the_comp_deployment():
    create = bench.swarm_create_argv("svc", "1", 50, 10.0, 0.01, "8m")
    assert create[:3] == ["docker", "service", "create"]
    joined = " ".join(create)
    for flag in ("--replicas 50", "--stop-grace-period 10s", "--limit-cpu 0.01", "--limit-memory 8m", "--env VERSION=1"):
        assert flag in joined
    assert create[-len(bench.COMMAND) - 1 :] == [bench.IMAGE, *bench.COMMAND]
    update = bench.swarm_update_argv("svc", "2", 5, "start-first")
    assert " ".join(update).endswith("--update-parallelism 5 --update-order start-first --env-add VERSION=2 svc")
    assert "--detach" in update


# ---- tallies -----------------------------------------------------------------------------


def comp_task(task_id: str, state: str = "running", deployment: str = "default.rollers") -> dict:
    return {"task_id": task_id, "state": state, "deployment": deployment}


def test_comp_tally_tells_old_from_new_and_drops_stopped_and_other_deployments():
    tasks = [
        comp_task("old-1"),
        comp_task("old-2"),
        comp_task("old-3", "stopped"),
        comp_task("new-1"),
        comp_task("new-2", "starting"),
        comp_task("other", deployment="default.else"),
    ]
    tally = bench.comp_tally(tasks, "default.rollers", {"old-1", "old-2", "old-3"})
    assert tally == bench.Tally(existing=4, running=3, new_running=1, old_left=2)
    assert not tally.done(1)
    told = bench.comp_tally(tasks, "default.rollers", {"old-1", "old-2", "old-3"}, {"old-1"})
    assert (told.counted, told.serving) == (3, 2)


def test_done_needs_every_replica_new_and_running_and_no_old_task():
    assert bench.comp_tally([comp_task("n1"), comp_task("n2")], "default.rollers", {"o"}).done(2)
    assert not bench.comp_tally([comp_task("n1"), comp_task("n2", "starting")], "default.rollers", {"o"}).done(2)
    assert not bench.comp_tally([comp_task("n1"), comp_task("n2"), comp_task("o")], "default.rollers", {"o"}).done(2)
    # An old task that has stopped for good is gone.
    assert bench.comp_tally([comp_task("n1"), comp_task("n2"), comp_task("o", "stopped")], "default.rollers", {"o"}).done(2)


def swarm_task(version: str, state: str = "running", desired: str = "running") -> dict:
    return {
        "Spec": {"ContainerSpec": {"Env": [f"VERSION={version}"]}},
        "Status": {"State": state},
        "DesiredState": desired,
    }


def test_swarm_tally_reads_the_version_from_the_task_spec_and_the_desired_state():
    tasks = [
        swarm_task("1"),  # old, serving
        swarm_task("1", "running", "shutdown"),  # old, in its stop grace
        swarm_task("1", "shutdown", "shutdown"),  # old, gone
        swarm_task("2"),
        swarm_task("2", "preparing"),
        swarm_task("2", "failed", "shutdown"),
    ]
    tally = bench.swarm_tally(tasks, "2")
    assert tally == bench.Tally(existing=4, running=3, new_running=1, old_left=2, counted=3, serving=2)
    assert bench.swarm_tally([swarm_task("2"), swarm_task("1", "complete", "shutdown")], "2").done(1)


def test_swarm_task_without_env_is_old():
    task = {"Spec": {"ContainerSpec": {}}, "Status": {"State": "running"}, "DesiredState": "running"}
    assert bench.swarm_tally([task], "2").old_left == 1


def test_engine_tally_counts_containers_by_whether_they_were_there_before():
    containers = [
        {"Id": "a", "State": "running"},
        {"Id": "b", "State": "exited"},
        {"Id": "c", "State": "running"},
        {"Id": "d", "State": "created"},
    ]
    assert bench.engine_tally(containers, {"a", "b"}) == bench.Tally(existing=3, running=2, new_running=1, old_left=1)


def test_extremes_keep_the_most_existing_and_fewest_running():
    extremes = bench.Extremes()
    for existing, running, counted, serving in ((50, 50, 50, 50), (60, 55, 55, 50), (52, 52, 50, 50)):
        extremes.add(bench.Tally(existing, running, 0, 0, counted, serving))
    assert (extremes.max_existing, extremes.min_running, extremes.max_counted, extremes.min_serving) == (60, 50, 55, 50)
    assert "held" in extremes.describe(50, 5, 0) and "NOT held" not in extremes.describe(50, 5, 0)
    assert "NOT held" in extremes.describe(50, 4, 0)
    without = bench.Extremes()
    without.add(bench.Tally(3, 2, 0, 0))
    assert "not told to stop" not in without.describe(2, 1, 0)


# ---- replaying RolloutEvents and task statuses ---------------------------------------------


def rollout(started=(), stopped=(), state="progressing", generation=2) -> tuple[str, dict]:
    return "rollout", {"state": state, "generation": generation, "started": list(started), "stopped": list(stopped)}


def status(task_id: str, state: str) -> tuple[str, dict]:
    return "task", {"task_id": task_id, "state": state, "deployment": "default.rollers"}


def test_replay_of_a_surge_one_rollout_holds_its_bounds():
    log = [
        rollout(started=["n1"]),
        status("n1", "starting"),
        status("n1", "running"),
        rollout(started=["n2"], stopped=["o1"]),
        status("n2", "running"),
        rollout(stopped=["o2"]),
        status("o1", "stopped"),
        status("o2", "stopped"),
        rollout(state="complete"),
    ]
    bounds = bench.replay(log, {"o1", "o2"})
    assert bounds == bench.EventBounds(
        steps=3, started=2, stopped=2, max_counted=3, min_serving=2, states=("progressing", "complete")
    )


def test_replay_sees_a_stop_before_the_replacement_runs():
    log = [rollout(started=["n1"], stopped=["o1"]), status("n1", "starting"), status("n1", "running")]
    bounds = bench.replay(log, {"o1", "o2"})
    assert bounds.min_serving == 1
    assert bounds.max_counted == 2


def test_replay_sees_a_surge_beyond_the_bound():
    bounds = bench.replay([rollout(started=["n1", "n2"])], {"o1"})
    assert bounds.max_counted == 3
    assert bounds.min_serving is None  # no task status: serving unknown


def test_replay_counts_an_old_task_that_dies_on_its_own_as_not_serving():
    bounds = bench.replay([status("o1", "exited"), status("o1", "running")], {"o1", "o2"})
    assert bounds.min_serving == 1


def test_latencies_from_start_to_running_and_stop_to_stopped():
    log = [
        rollout(started=["n1"]),
        status("n1", "starting"),
        status("n1", "running"),
        rollout(started=["n2"], stopped=["o1"]),
        status("n1", "running"),  # a repeat is not a second start
        status("o1", "stopped"),
        status("n2", "running"),
    ]
    at = [0.0, 0.5, 2.0, 2.5, 3.0, 12.5, 5.0]
    to_running, to_stopped = bench.latencies(log, at)
    assert to_running == [2.0, 2.5]
    assert to_stopped == [10.0]
    assert bench.spread(to_running) == "median 2.50 s, max 2.50 s over 2"
    assert bench.spread([]) == "none seen"


def test_parse_time_reads_docker_nanoseconds():
    a = bench.parse_time("2026-11-30T21:49:59.123456789Z")
    b = bench.parse_time("2026-11-30T21:50:01Z")
    assert b - a == pytest.approx(1.876543211, abs=1e-6)
    assert bench.swarm_start_latencies(
        [
            {**swarm_task("2"), "CreatedAt": "2026-11-30T21:49:59.5Z", "Status": {"State": "running", "Timestamp": "2026-11-30T21:50:02Z"}},
            {**swarm_task("1"), "CreatedAt": "2026-11-30T21:49:00Z", "Status": {"State": "running", "Timestamp": "2026-11-30T21:49:09Z"}},
        ],
        "2",
    ) == [pytest.approx(2.5)]


def test_median_seconds_counts_a_round_not_done_as_the_longest():
    assert bench.median_seconds([3.0, 1.0, 2.0]) == 2.0
    assert bench.median_seconds([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bench.median_seconds([None, 1.0, 2.0]) == 2.0
    assert bench.median_seconds([None, None, 2.0]) is None
    assert bench.median_seconds([None, 1.0]) is None
    assert bench.median_seconds([]) is None
