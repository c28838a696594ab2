"""Manifest v1 ``spec.placement`` and ``spec.priority``: what is accepted, what is refused (where
and why), how label expressions read, and which parts make a replica's identity."""

from __future__ import annotations

import json
import textwrap

import pytest

from manifests import errors_of, only
from comp_common.manifest import Constraint, Deployment, LabelExpression, Preference, Toleration


def manifest(spec: str) -> str:
    return "metadata: {name: web}\nspec:\n" + textwrap.indent(textwrap.dedent(spec).strip(), "  ") + "\n"



# ---- accepted -------------------------------------------------------------------------


def test_defaults_mean_no_rules_and_priority_zero() -> None:
    d = only(manifest("image: x"))
    placement = d.spec.placement
    assert (placement.constraints, placement.tolerations, placement.affinity) == ([], [], [])
    assert (placement.spread_by, placement.strategy, placement.max_per_node) == (None, None, None)
    assert d.spec.priority == 0


def test_full_placement() -> None:
    d = only(
        manifest(
            """
            image: x
            priority: 100
            placement:
              constraints:
                - {label: zone, op: in, values: [a, b]}
                - {label: disk, value: ssd}
                - {label: gpu, op: not_exists}
              tolerations: [{key: dedicated, value: batch}, {key: spot}]
              spread_by: topology.comp.io/zone
              strategy: binpack
              affinity: [{label: disk, value: nvme, weight: 10}, {label: rack, op: "!=", value: r1}]
              max_per_node: 2
            """
        )
    )
    placement = d.spec.placement
    assert d.spec.priority == 100
    assert [str(c) for c in placement.constraints] == ["zone in (a, b)", "disk=ssd", "gpu does not exist"]
    assert placement.constraints[1].op == "="  # the default op
    assert [(t.key, t.value, t.effect) for t in placement.tolerations] == [("dedicated", "batch", "NoSchedule"), ("spot", None, "NoSchedule")]
    assert (placement.spread_by, placement.strategy, placement.max_per_node) == ("topology.comp.io/zone", "binpack", 2)
    assert [(p.label, p.weight) for p in placement.affinity] == [("disk", 10), ("rack", 1)]


def test_numbers_in_label_values_compare_as_written() -> None:
    # `value: 3` is an integer in YAML; node labels are strings.
    d = only(manifest("image: x\nplacement: {constraints: [{label: rack, value: 3}, {label: tier, op: in, values: [1, true]}]}"))
    assert d.spec.placement.constraints[0].value == "3"
    assert d.spec.placement.constraints[1].values == ["1", "true"]


def test_negative_priority_is_allowed() -> None:
    # Below the default 0: what gets preempted first (batch work).
    assert only(manifest("image: x\npriority: -10")).spec.priority == -10


def test_round_trip_through_json_keeps_the_placement() -> None:
    d = only(manifest("image: x\npriority: 5\nplacement: {constraints: [{label: zone, op: in, values: [a]}], spread_by: zone}"))
    assert Deployment.model_validate_json(d.model_dump_json()) == d
    assert only(json.dumps(d.model_dump(mode="json", by_alias=True))) == d


# ---- label expressions ----------------------------------------------------------------

LABELS = {"zone": "b", "disk": "ssd"}


@pytest.mark.parametrize(
    "expression, text, on_labels, on_empty",
    [
        ({"label": "zone", "op": "=", "value": "b"}, "zone=b", True, False),
        ({"label": "zone", "op": "=", "value": "a"}, "zone=a", False, False),
        ({"label": "zone", "op": "!=", "value": "a"}, "zone!=a", True, True),  # no label: not equal
        ({"label": "zone", "op": "!=", "value": "b"}, "zone!=b", False, True),
        ({"label": "zone", "op": "in", "values": ["a", "b"]}, "zone in (a, b)", True, False),
        ({"label": "zone", "op": "in", "values": ["c"]}, "zone in (c)", False, False),
        ({"label": "zone", "op": "not_in", "values": ["a", "c"]}, "zone not in (a, c)", True, True),
        ({"label": "zone", "op": "not_in", "values": ["b"]}, "zone not in (b)", False, True),
        ({"label": "disk", "op": "exists"}, "disk exists", True, False),
        ({"label": "gpu", "op": "exists"}, "gpu exists", False, False),
        ({"label": "gpu", "op": "not_exists"}, "gpu does not exist", True, True),
        ({"label": "disk", "op": "not_exists"}, "disk does not exist", False, True),
    ],
)
def test_label_expression(expression: dict, text: str, on_labels: bool, on_empty: bool) -> None:
    for model in (Constraint, Preference):
        parsed: LabelExpression = model.model_validate(expression)
        assert str(parsed) == text
        assert parsed.matches(LABELS) is on_labels
        assert parsed.matches({}) is on_empty


@pytest.mark.parametrize(
    "toleration, taint, tolerated",
    [
        ({"key": "dedicated", "value": "gpu"}, ("dedicated", "gpu", "NoSchedule"), True),
        ({"key": "dedicated", "value": "gpu"}, ("dedicated", "batch", "NoSchedule"), False),
        ({"key": "dedicated"}, ("dedicated", "batch", "NoSchedule"), True),  # no value: any value
        ({"key": "dedicated"}, ("dedicated", "", "NoSchedule"), True),
        ({"key": "dedicated"}, ("spot", "", "NoSchedule"), False),
        ({"key": "dedicated"}, ("dedicated", "gpu", "NoExecute"), False),  # an effect it does not name
    ],
)
def test_toleration(toleration: dict, taint: tuple[str, str, str], tolerated: bool) -> None:
    assert Toleration.model_validate(toleration).tolerates(*taint) is tolerated


# ---- refused --------------------------------------------------------------------------

INVALID = [
    pytest.param("placement: {spread: zone}", "spec.placement.spread", "unknown field", id="unknown-placement-field"),
    pytest.param(
        "placement: {constraints: [{label: zone, value: a, vlaue: b}]}",
        "spec.placement.constraints[0].vlaue", "unknown field", id="unknown-constraint-field",
    ),
    pytest.param(
        "placement: {constraints: [{label: zone, op: near, value: a}]}",
        "spec.placement.constraints[0].op",
        "Input should be '=', '!=', 'in', 'not_in', 'exists' or 'not_exists'",
        id="unknown-op",
    ),
    pytest.param(
        "placement: {constraints: [{label: zone}]}",
        "spec.placement.constraints[0]", "op '=' takes one 'value' (and no 'values')", id="equals-without-value",
    ),
    pytest.param(
        "placement: {constraints: [{label: zone, op: '!=', values: [a]}]}",
        "spec.placement.constraints[0]", "op '!=' takes one 'value' (and no 'values')", id="not-equals-with-values",
    ),
    pytest.param(
        "placement: {constraints: [{label: zone, op: in, value: a}]}",
        "spec.placement.constraints[0]", "op 'in' takes 'values', a non-empty list (and no 'value')", id="in-with-value",
    ),
    pytest.param(
        "placement: {constraints: [{label: zone, op: not_in, values: []}]}",
        "spec.placement.constraints[0]", "op 'not_in' takes 'values', a non-empty list (and no 'value')", id="not-in-empty",
    ),
    pytest.param(
        "placement: {constraints: [{label: gpu, op: exists, value: 'true'}]}",
        "spec.placement.constraints[0]", "op 'exists' takes no 'value' or 'values'", id="exists-with-value",
    ),
    pytest.param(
        "placement: {constraints: [{label: 'my zone', op: exists}]}",
        "spec.placement.constraints[0].label",
        "'my zone' is not a valid label key: use letters, digits, '-', '_', '.' and '/', starting and ending with a letter or digit",
        id="bad-label-key",
    ),
    pytest.param(
        "placement: {constraints: [{label: zone, value: [a]}]}",
        "spec.placement.constraints[0].value", "label values must be strings or numbers, not list", id="list-as-value",
    ),
    pytest.param(
        "placement: {constraints: {label: zone, value: a}}",
        "spec.placement.constraints", "Input should be a valid list", id="constraints-not-a-list",
    ),
    pytest.param(
        "placement: {tolerations: [{key: dedicated, effect: NoExecute}]}",
        "spec.placement.tolerations[0].effect", "Input should be 'NoSchedule'", id="unsupported-effect",
    ),
    pytest.param(
        "placement: {tolerations: [{value: gpu}]}",
        "spec.placement.tolerations[0].key", "required field is missing", id="toleration-without-key",
    ),
    pytest.param(
        "placement: {strategy: pack}", "spec.placement.strategy", "Input should be 'spread' or 'binpack'", id="unknown-strategy",
    ),
    pytest.param(
        "placement: {spread_by: -zone}",
        "spec.placement.spread_by",
        "'-zone' is not a valid label key: use letters, digits, '-', '_', '.' and '/', starting and ending with a letter or digit",
        id="bad-spread-by",
    ),
    pytest.param(
        "placement: {max_per_node: 0}", "spec.placement.max_per_node", "Input should be greater than or equal to 1", id="zero-max-per-node",
    ),
    pytest.param(
        "placement: {affinity: [{label: disk, value: ssd, weight: 0}]}",
        "spec.placement.affinity[0].weight", "Input should be greater than or equal to 1", id="zero-weight",
    ),
    pytest.param(
        "placement: {affinity: [{label: disk, value: ssd, weight: 101}]}",
        "spec.placement.affinity[0].weight", "Input should be less than or equal to 100", id="weight-too-high",
    ),
    pytest.param(
        "placement: {affinity: [{label: disk, op: in}]}",
        "spec.placement.affinity[0]", "op 'in' takes 'values', a non-empty list (and no 'value')", id="affinity-in-without-values",
    ),
    pytest.param("priority: high", "spec.priority", "Input should be a valid integer, unable to parse string as an integer", id="priority-not-int"),
    pytest.param("priority: 1000001", "spec.priority", "Input should be less than or equal to 1000000", id="priority-too-high"),
    pytest.param("placement: [zone]", "spec.placement", "Input should be a valid dictionary or instance of Placement", id="placement-not-mapping"),
]


@pytest.mark.parametrize(("spec", "path", "message"), INVALID)
def test_invalid_placement(spec: str, path: str, message: str) -> None:
    assert {"path": path, "message": message} in errors_of(manifest("image: x\n" + spec))


def test_every_placement_problem_is_reported_at_once() -> None:
    text = manifest("image: x\npriority: x\nplacement: {strategy: pack, constraints: [{label: zone}, {label: a b, op: exists}]}")
    assert {e["path"] for e in errors_of(text)} == {
        "spec.priority",
        "spec.placement.strategy",
        "spec.placement.constraints[0]",
        "spec.placement.constraints[1].label",
    }


# ---- identity of a replica --------------------------------------------------------------


def hash_of(spec: str) -> str:
    return only(manifest(spec)).spec.task_hash()


def test_a_deployment_without_placement_keeps_the_identity_it_had_before() -> None:
    # Computed by the manifest code before placement existed: an upgraded scheduler must not
    # see every running replica as changed and replace it.
    spec = "image: nginx:1.27\nenv: {A: 1}\nresources: {cpu: 500m, memory: 64Mi}\nports: [{container_port: 80, host_port: 8080}]"
    assert hash_of(spec) == "e66dbec4339150ea"
    assert hash_of(spec + "\npriority: 0\nplacement: {}") == "e66dbec4339150ea"


@pytest.mark.parametrize(
    "hard",
    [
        "placement: {constraints: [{label: zone, value: a}]}",
        "placement: {tolerations: [{key: dedicated}]}",
        "placement: {max_per_node: 1}",
    ],
)
def test_hard_placement_rules_change_the_identity(hard: str) -> None:
    # A replica may have to move: it is replaced, as after any change to what runs.
    assert hash_of("image: x") != hash_of("image: x\n" + hard)


@pytest.mark.parametrize(
    "soft",
    [
        "priority: 7",
        "placement: {strategy: binpack}",
        "placement: {spread_by: zone}",
        "placement: {affinity: [{label: disk, value: ssd}]}",
    ],
)
def test_priority_and_preferences_leave_the_identity(soft: str) -> None:
    # They only rank nodes for new replicas: changing them restarts nothing.
    assert hash_of("image: x") == hash_of("image: x\n" + soft)
