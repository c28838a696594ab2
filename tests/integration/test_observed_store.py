"""The observed store on a real redis-server: a node's record is written when it changes,
its heartbeat time on every flush, and a reader sees the two merged."""

from __future__ import annotations

from comp_common.messages import Capacity
from comp_common.observed import NodeRecord, ObservedStore, connect


def record(node_id: str, last_heartbeat: float) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, last_heartbeat=last_heartbeat, driver="hollow", address="127.0.0.1",
        capacity=Capacity(cpu=4, memory=1024), allocated=Capacity(cpu=0, memory=0),
    )


async def test_a_node_shows_its_latest_heartbeat_time_whichever_was_written_last(redis_url, cluster_name):
    store = ObservedStore(connect(redis_url), cluster_name)
    await store.put_nodes([record("a", 1.0), record("b", 1.0), record("c", 9.0)])
    await store.put_node_seen({"a": 5.0, "c": 3.0})  # c's record is newer than its seen time
    shown = {n.node_id: n.last_heartbeat for n in await store.list_nodes()}
    assert shown == {"a": 5.0, "b": 1.0, "c": 9.0}
    nodes = {n.node_id: n.info(now=6.0, grace_seconds=3.0).state for n in await store.list_nodes()}
    assert nodes == {"a": "ready", "b": "down", "c": "ready"}
    await store.r.aclose()
