"""Checks of a scheduler plan that several test modules share."""

from __future__ import annotations

from comp_scheduler.placement import Request, Usage, filters_for


def assert_feasible_everywhere(want, obs, plan) -> None:
    """Each place passes every filter on the ledger as the plan leaves it up to that place."""
    stopped = {s.task_id for s in plan.stops}
    usage = Usage()
    for t in obs.tasks.values():
        if t.task_id not in stopped:
            usage.add(t.node_id, Request(t.deployment, t.cpu, t.memory, t.host_ports))
    taints = {t for n in obs.nodes.values() for t in n.taints}
    for place in plan.places:
        node = obs.nodes[place.node_id]
        request = Request.of(want[place.deployment])
        failed = [f.reason for f in filters_for(request, taints) if not f.feasible(node, usage.of(node.node_id), request)]
        assert not failed, (place, failed)
        usage.add(node.node_id, request)
