"""Node agent settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from comp_common.messages import Taint
from comp_nodeagent.settings import NodeAgentGroup, NodeAgentSettings, sanitise_node_id


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
    assert (group.driver, group.resync_seconds, group.stop_grace_seconds, group.restart_backoff_max_seconds) == ("docker", 5.0, None, 30.0)


def test_node_id_must_be_usable_in_a_subject(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMP_NODEAGENT__NODE_ID", "node.>")
    with pytest.raises(ValidationError, match="DNS label"):
        NodeAgentSettings()


# ---- taints ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "taints"),
    [
        ("", []),
        ("gpu:NoSchedule", [("gpu", "", "NoSchedule")]),
        ("dedicated=gpu:NoSchedule", [("dedicated", "gpu", "NoSchedule")]),
        ("dedicated=gpu", [("dedicated", "gpu", "NoSchedule")]),  # the only effect there is
        ("spot", [("spot", "", "NoSchedule")]),
        (" dedicated=gpu:NoSchedule , comp.io/spot:NoSchedule ", [("dedicated", "gpu", "NoSchedule"), ("comp.io/spot", "", "NoSchedule")]),
        ('["a=1:NoSchedule", "b"]', [("a", "1", "NoSchedule"), ("b", "", "NoSchedule")]),
        ('[{"key": "a", "value": "1"}, {"key": "b", "effect": "NoSchedule"}]', [("a", "1", "NoSchedule"), ("b", "", "NoSchedule")]),
        ("[]", []),
    ],
)
def test_taints_from_environment(monkeypatch: pytest.MonkeyPatch, raw: str, taints: list[tuple[str, str, str]]) -> None:
    monkeypatch.setenv("COMP_NODEAGENT__TAINTS", raw)
    assert [(t.key, t.value, t.effect) for t in NodeAgentSettings().nodeagent.taints] == taints


def test_taints_default_to_none() -> None:
    assert NodeAgentGroup().taints == []


def test_taints_as_a_list_of_strings_and_objects() -> None:
    group = NodeAgentGroup(taints=["a=1:NoSchedule", {"key": "b"}, Taint(key="c", value="x")])
    assert [str(t) for t in group.taints] == ["a=1:NoSchedule", "b:NoSchedule", "c=x:NoSchedule"]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("gpu:NoExecute", r"taints entry 1 \('gpu:NoExecute'\): effect 'NoExecute' is not supported \(only NoSchedule\)"),
        ("ok:NoSchedule,gpu:Noschedule", r"taints entry 2 \('gpu:Noschedule'\): effect 'Noschedule'"),
        ("=gpu:NoSchedule", r"taints entry 1 \('=gpu:NoSchedule'\): key '' is not a label key"),
        ("bad key:NoSchedule", r"taints entry 1 \('bad key:NoSchedule'\): key 'bad key' is not a label key"),
        ("a=b=c:NoSchedule", r"taints entry 1 \('a=b=c:NoSchedule'\): value 'b=c' is not a label value"),
        ("a=" + "v" * 64, r"taints entry 1 .*: value 'v{64}' is not a label value"),
        ("a:NoSchedule,,b:NoSchedule", r"taints entry 2 is empty"),
        ("a:NoSchedule,", r"taints entry 2 is empty"),
        ("a=1:NoSchedule,a=2:NoSchedule", r"taints entry 2 \(a=2:NoSchedule\) repeats key 'a' with effect NoSchedule of entry 1"),
        ('["a:NoSchedule", 3]', r"taints entry 2 \(3\): must be a string"),
        ('[{"key": "a", "taint": "x"}]', r"taints entry 1 .*: an object needs \"key\""),
        ('[{"value": "x"}]', r"taints entry 1 .*: an object needs \"key\""),
        ('[{"key": "a", "value": 1}]', r"taints entry 1 .*: key, value and effect must be strings"),
        ("[a:NoSchedule", r"taints '\[a:NoSchedule' is not a JSON list"),
        ('{"key": "a"}', r"taints entry 1 \('\{\"key\": \"a\"\}'\): key '\{\"key\"' is not a label key"),
    ],
)
def test_bad_taints_name_the_entry(monkeypatch: pytest.MonkeyPatch, raw: str, error: str) -> None:
    monkeypatch.setenv("COMP_NODEAGENT__TAINTS", raw)
    with pytest.raises(ValidationError, match=error) as caught:
        NodeAgentSettings()
    assert "nodeagent.taints" in str(caught.value)
