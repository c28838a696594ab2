"""discovery's pure core: which tasks are a service's endpoints, on which ports; VIP ranges."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from comp_common.manifest import parse_objects
from comp_common.messages import TaskState, TaskStatus
from comp_discovery.endpoints import same_endpoints, selected, service_endpoints
from comp_discovery.vips import VipRange

DEPLOYMENTS = """
kind: Deployment
metadata: {name: web, labels: {app: shop, tier: front}}
spec: {image: x, ports: [{container_port: 8080, name: http}, {container_port: 9090, name: admin}]}
---
kind: Deployment
metadata: {name: web-canary, labels: {app: shop, tier: front}}
spec: {image: x, ports: [{container_port: 8081, name: http}]}
---
kind: Deployment
metadata: {name: db, labels: {app: shop, tier: back}}
spec: {image: x}
---
kind: Deployment
metadata: {name: web, namespace: other, labels: {app: shop, tier: front}}
spec: {image: x, ports: [{container_port: 8080, name: http}]}
"""
DEPLOYMENT_OF = {obj.key: obj for _, obj in parse_objects(DEPLOYMENTS)}


def service(spec: str, name: str = "front", namespace: str = "default"):
    [(_, obj)] = parse_objects(f"kind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n")
    return obj


def task(task_id: str, deployment: str, *, state=TaskState.RUNNING, ready=True, address="172.17.0.9", node="n1"):
    return TaskStatus(task_id=task_id, node_id=node, deployment=deployment, state=state, ready=ready, address=address)


BY_NAME = "{selector: {deployment: web}, ports: [{port: 80, target_port: 8080}]}"
BY_LABELS = "{selector: {labels: {tier: front}}, ports: [{name: http, port: 80, target_port: http}]}"


@pytest.mark.parametrize(
    ("spec", "namespace", "expected"),
    [
        pytest.param(BY_NAME, "default", {"default.web"}, id="by-name"),
        pytest.param(BY_LABELS, "default", {"default.web", "default.web-canary"}, id="by-labels"),
        pytest.param(BY_LABELS, "other", {"other.web"}, id="own-namespace-only"),
        pytest.param("{selector: {labels: {tier: none}}, ports: [{port: 80}]}", "default", set(), id="no-match"),
        pytest.param("{selector: {deployment: gone}, ports: [{port: 80}]}", "default", set(), id="absent-deployment"),
    ],
)
def test_selected(spec, namespace, expected):
    assert selected(service(spec, namespace=namespace), DEPLOYMENT_OF) == expected


@pytest.mark.parametrize(
    ("status", "counts", "why"),
    [
        (task("t1", "default.web"), True, "running, ready, with an address"),
        (task("t1", "default.web", ready=False), False, "not ready"),
        (task("t1", "default.web", state=TaskState.STARTING, ready=False), False, "starting"),
        (task("t1", "default.web", state=TaskState.EXITED, ready=False), False, "exited"),
        (task("t1", "default.web", address=None), False, "no address"),
        (task("t1", "default.web", node="dead"), False, "its node is down"),
        (task("t1", "default.db"), False, "another deployment"),
    ],
)
def test_which_tasks_are_endpoints(status, counts, why):
    found = service_endpoints(service(BY_NAME), "10.96.0.1", DEPLOYMENT_OF, [status], lambda n: n != "dead", now=1.0)
    assert [e.task_id for e in found.endpoints] == (["t1"] if counts else []), why


def test_named_target_port_resolves_per_deployment():
    tasks = [task("a", "default.web", address="10.0.0.1"), task("b", "default.web-canary", address="10.0.0.2")]
    found = service_endpoints(service(BY_LABELS), "10.96.0.1", DEPLOYMENT_OF, tasks, lambda n: True, now=1.0)
    assert [(e.address, e.ports) for e in found.endpoints] == [("10.0.0.1", {"http": 8080}), ("10.0.0.2", {"http": 8081})]
    assert [(p.name, p.port, p.named) for p in found.ports] == [("http", 80, True)]


def test_a_replica_without_the_named_port_is_no_endpoint():
    spec = "{selector: {labels: {app: shop}}, ports: [{name: admin, port: 9000, target_port: admin}]}"
    tasks = [task("a", "default.web"), task("b", "default.web-canary"), task("c", "default.db")]
    found = service_endpoints(service(spec), "10.96.0.1", DEPLOYMENT_OF, tasks, lambda n: True, now=1.0)
    assert [(e.task_id, e.ports) for e in found.endpoints] == [("a", {"admin": 9090})]


def test_dnsrr_has_no_vip_and_unnamed_ports_get_a_key():
    spec = "{selector: {deployment: web}, mode: dnsrr, ports: [{port: 53, protocol: udp}]}"
    found = service_endpoints(service(spec), "10.96.0.1", DEPLOYMENT_OF, [task("a", "default.web")], lambda n: True, now=1.0)
    assert found.vip is None and found.mode == "dnsrr"
    assert [(p.name, p.named) for p in found.ports] == [("udp-53", False)]
    assert found.endpoints[0].ports == {"udp-53": 53}


@given(st.permutations(["a", "b", "c", "d"]), st.floats(0, 1e9), st.floats(0, 1e9))
def test_endpoints_do_not_depend_on_task_order_or_time(order, t1, t2):
    tasks = [task(t, "default.web", address=f"10.0.0.{i}") for i, t in enumerate(sorted(order))]
    by_order = {t.task_id: t for t in tasks}
    one = service_endpoints(service(BY_NAME), "10.96.0.1", DEPLOYMENT_OF, tasks, lambda n: True, now=t1)
    two = service_endpoints(service(BY_NAME), "10.96.0.1", DEPLOYMENT_OF, [by_order[t] for t in order], lambda n: True, now=t2)
    assert same_endpoints(one, two)
    assert [e.task_id for e in two.endpoints] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("cidr", ["10.96.0.0/30", "10.96.0.0/29", "192.168.7.0/24"])
@given(key=st.text(min_size=1, max_size=20))
def test_vip_candidates_are_every_usable_address_once(cidr, key):
    vips = VipRange(cidr)
    found = list(vips.candidates(key))
    assert len(found) == len(set(found)) == vips.size
    assert str(vips.network.network_address) not in found and str(vips.network.broadcast_address) not in found
    assert all(vips.contains(a) for a in found)


def test_first_free_skips_held_and_runs_out():
    vips = VipRange("10.96.0.0/30")
    assert vips.first_free("a.b", held={"10.96.0.1"}) == "10.96.0.2"
    assert vips.first_free("a.b", held={"10.96.0.1", "10.96.0.2"}) is None


@pytest.mark.parametrize(("cidr", "message"), [("10.96.0.0/31", "too small"), ("10.96.0.1/24", "host bits"), ("nope", "not an IPv4 network")])
def test_bad_vip_range_is_refused_at_start(cidr, message):
    with pytest.raises(ValueError, match=message):
        VipRange(cidr)
