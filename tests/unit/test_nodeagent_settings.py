"""Node agent settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from comp_nodeagent.settings import NodeAgentSettings, sanitise_node_id


@pytest.mark.parametrize(
    ("hostname", "node_id"),
    [("worker-1", "worker-1"), ("Build_Box.example.com", "build-box-example-com"), ("--x--", "x"), ("", "node"), ("a" * 80, "a" * 63)],
)
def test_node_id_from_hostname_is_a_dns_label(hostname: str, node_id: str) -> None:
    assert sanitise_node_id(hostname) == node_id


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMP_CLUSTER", "c1")
    monkeypatch.setenv("COMP_NODEAGENT__NODE_ID", "node-7")
    monkeypatch.setenv("COMP_NODEAGENT__LABELS", '{"zone": "a"}')
    monkeypatch.setenv("COMP_NODEAGENT__CPU", "500m")
    monkeypatch.setenv("COMP_NODEAGENT__MEMORY", "2Gi")
    monkeypatch.setenv("COMP_NODEAGENT__PARALLELISM", "3")
    settings = NodeAgentSettings()
    group = settings.nodeagent
    assert settings.cluster == "c1"
    assert (group.node_id, group.labels, group.cpu, group.memory, group.parallelism) == ("node-7", {"zone": "a"}, 0.5, 2 * 1024**3, 3)
    assert (group.driver, group.resync_seconds, group.stop_grace_seconds, group.restart_backoff_max_seconds) == ("docker", 5.0, 10.0, 30.0)


def test_node_id_must_be_usable_in_a_subject(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMP_NODEAGENT__NODE_ID", "node.>")
    with pytest.raises(ValidationError, match="DNS label"):
        NodeAgentSettings()
