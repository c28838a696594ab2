"""The service's snapshot carries what placement needs from heartbeats: labels and taints."""

from __future__ import annotations

import pytest

from comp_common.messages import Capacity, Heartbeat, NodeAssignments, Taint
from comp_common.observed import NodeRecord
from comp_scheduler.model import NodeStatus
from comp_scheduler.model import Taint as NodeTaint
from comp_scheduler.settings import SchedulerSettings
from comp_scheduler.state import ClusterState


def heartbeat(**extra) -> Heartbeat:
    return Heartbeat(
        node_id="n1", seq=1, sent_at=0.0, started_at=0.0, driver="hollow",
        capacity=Capacity(cpu=4, memory=8 * 1024**3), allocated=Capacity(cpu=0, memory=0), **extra,
    )


def test_snapshot_carries_labels_and_taints():
    state = ClusterState(grace_seconds=3)
    state.record_heartbeat(
        heartbeat(labels={"zone": "a"}, taints=[Taint(key="dedicated", value="gpu"), Taint(key="spot")]), now=1.0
    )
    node = state.snapshot().nodes["n1"]
    assert node.status is NodeStatus.READY and dict(node.labels) == {"zone": "a"}
    assert node.taints == frozenset({NodeTaint("dedicated", "gpu", "NoSchedule"), NodeTaint("spot", "", "NoSchedule")})
    assert sorted(str(t) for t in node.taints) == ["dedicated=gpu:NoSchedule", "spot:NoSchedule"]


def test_a_node_known_only_from_assignments_has_no_taints():
    state = ClusterState(grace_seconds=3)
    state.load_assignments("n2", NodeAssignments(node_id="n2"), None, now=0.0)
    assert state.snapshot().nodes["n2"].taints == frozenset()


def test_heartbeat_without_taints_from_an_older_agent_is_valid():
    hb = Heartbeat.model_validate_json(heartbeat().model_dump_json(exclude={"taints"}))
    assert hb.taints == []
    assert NodeRecord.from_heartbeat(hb, 1.0).taints == []


def test_an_unknown_taint_effect_does_not_invalidate_a_heartbeat():
    # A newer agent may send an effect this scheduler does not act on; the heartbeat must pass.
    hb = Heartbeat.model_validate({**heartbeat().model_dump(), "taints": [{"key": "k", "effect": "NoExecute"}]})
    assert str(hb.taints[0]) == "k:NoExecute"


@pytest.mark.parametrize("value", ["spread", "binpack"])
def test_default_strategy_setting(monkeypatch, value):
    monkeypatch.setenv("COMP_SCHEDULER__DEFAULT_STRATEGY", value)
    assert SchedulerSettings().scheduler.default_strategy == value


def test_default_strategy_setting_refuses_unknown(monkeypatch):
    monkeypatch.setenv("COMP_SCHEDULER__DEFAULT_STRATEGY", "pack")
    with pytest.raises(ValueError, match="spread"):
        SchedulerSettings()
