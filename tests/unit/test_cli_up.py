"""`comp up` and `comp status` without a cluster: arguments to ClusterConfig, and what
status says from the state dir alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from comp_cli import main
from comp_cli.local import ClusterConfig, ClusterError, LocalCluster


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ClusterConfig]:
    """The configs `comp up` would start, instead of starting them."""
    configs: list[ClusterConfig] = []
    monkeypatch.setattr(LocalCluster, "start", lambda self: configs.append(self.config))
    return configs


def up(state_dir: Path, *args: str):
    return CliRunner().invoke(main.cli, ["--state-dir", str(state_dir), "up", *args])


@pytest.mark.parametrize(
    ("args", "schedulers", "names"),
    [
        ((), 1, ["scheduler"]),
        (("--schedulers", "1"), 1, ["scheduler"]),
        (("--schedulers", "3"), 3, ["scheduler", "scheduler-2", "scheduler-3"]),
    ],
)
def test_up_schedulers(tmp_path: Path, started: list[ClusterConfig], args: tuple[str, ...], schedulers: int, names: list[str]) -> None:
    result = up(tmp_path, "--nodes", "2", *args)
    assert result.exit_code == 0, result.output
    [config] = started
    assert (config.schedulers, config.scheduler_names(), config.nodes) == (schedulers, names, 2)
    assert f"{schedulers} scheduler(s)" in result.output


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_up_refuses_a_bad_scheduler_count(tmp_path: Path, started: list[ClusterConfig], value: str) -> None:
    result = up(tmp_path, "--schedulers", value)
    assert result.exit_code == 2
    assert "--schedulers" in result.output
    assert started == []


def test_a_cluster_config_without_schedulers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"schedulers must be at least 1 \(got 0\)"):
        ClusterConfig(tmp_path, schedulers=0)


def test_a_saved_config_keeps_its_schedulers_and_older_ones_have_one(tmp_path: Path) -> None:
    ClusterConfig(tmp_path, schedulers=2).save()
    assert ClusterConfig.load(tmp_path).schedulers == 2
    saved = json.loads((tmp_path / "cluster.json").read_text())
    del saved["schedulers"]  # as `comp up` wrote it before the option existed
    (tmp_path / "cluster.json").write_text(json.dumps(saved))
    assert ClusterConfig.load(tmp_path).schedulers == 1


def test_status_of_a_stopped_cluster_names_no_leader(tmp_path: Path) -> None:
    ClusterConfig(tmp_path, schedulers=2, api_port=1).save()
    result = CliRunner().invoke(main.cli, ["--state-dir", str(tmp_path), "status"])
    assert result.exit_code == 0, result.output
    assert "scheduler leader: unknown (redis is not running)" in result.output
