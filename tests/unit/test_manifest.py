"""Manifest v1 parsing: what is accepted (with its defaults) and what is refused, with where and why."""

from __future__ import annotations

import json
import textwrap

import pytest

from manifests import errors_of, only
from comp_common.manifest import DEFAULT_CPU, DEFAULT_MEMORY, Deployment, ManifestError, parse_deployments

MiB = 1024**2

MINIMAL = """
apiVersion: comp/v1
kind: Deployment
metadata: {name: web}
spec: {image: nginx:1.27}
"""


def manifest(spec: str = "image: nginx:1.27", metadata: str = "name: web", top: str = "") -> str:
    """A one-document manifest with the given blocks (each indented under its key)."""
    return (
        "apiVersion: comp/v1\nkind: Deployment\n"
        + top
        + "metadata:\n"
        + textwrap.indent(textwrap.dedent(metadata).strip(), "  ")
        + "\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec).strip(), "  ")
        + "\n"
    )



# ---- accepted -------------------------------------------------------------------------


def test_defaults_are_filled_in() -> None:
    d = only(MINIMAL)
    assert d.metadata.namespace == "default"
    assert d.metadata.labels == {}
    assert d.spec.replicas == 1
    assert d.spec.resources.cpu == DEFAULT_CPU == 0.1
    assert d.spec.resources.memory == DEFAULT_MEMORY == 128 * MiB
    assert d.spec.env == {} and d.spec.ports == []
    assert d.key == "default.web"


def test_api_version_and_kind_may_be_left_out() -> None:
    d = only("metadata: {name: web}\nspec: {image: nginx}\n")
    assert (d.api_version, d.kind) == ("comp/v1", "Deployment")


@pytest.mark.parametrize(
    ("cpu", "cores"),
    [("500m", 0.5), ("250m", 0.25), ("2", 2.0), ("0.5", 0.5), ("1.5", 1.5), ("'1'", 1.0), ("'100m'", 0.1)],
)
def test_cpu_quantities(cpu: str, cores: float) -> None:
    assert only(manifest(f"image: x\nresources: {{cpu: {cpu}}}")).spec.resources.cpu == pytest.approx(cores)


@pytest.mark.parametrize(
    ("memory", "n_bytes"),
    [
        ("64Mi", 64 * MiB),
        ("1Gi", 1024**3),
        ("1.5Gi", int(1.5 * 1024**3)),
        ("512M", 512 * 1000**2),
        ("1G", 1000**3),
        ("8192Ki", 8 * MiB),
        ("10000000", 10_000_000),
        ("'67108864'", 64 * MiB),
    ],
)
def test_memory_quantities(memory: str, n_bytes: int) -> None:
    assert only(manifest(f"image: x\nresources: {{memory: {memory}}}")).spec.resources.memory == n_bytes


@pytest.mark.parametrize(
    ("value", "as_string"),
    [("8080", "8080"), ("1.5", "1.5"), ("true", "true"), ("false", "false"), ("'007'", "007"), ("''", ""), ("hello", "hello")],
)
def test_env_values_become_strings(value: str, as_string: str) -> None:
    assert only(manifest(f"image: x\nenv: {{VALUE: {value}}}")).spec.env == {"VALUE": as_string}


def test_full_manifest() -> None:
    d = only(
        manifest(
            metadata="""
            name: api-v2
            namespace: shop
            labels: {tier: backend}
            """,
            spec="""
            replicas: 3
            image: registry.local:5000/shop/api@sha256:abc
            command: [/bin/api]
            args: [--port, "8080"]
            env: {PORT: 8080}
            resources: {cpu: 250m, memory: 64Mi}
            ports:
              - {container_port: 8080, host_port: 18080, name: http}
              - {container_port: 8080, protocol: udp}
            """,
        )
    )
    assert d.key == "shop.api-v2"
    assert d.metadata.labels == {"tier": "backend"}
    assert d.spec.replicas == 3
    assert d.spec.command == ["/bin/api"] and d.spec.args == ["--port", "8080"]
    assert [(p.container_port, p.host_port, p.protocol) for p in d.spec.ports] == [(8080, 18080, "tcp"), (8080, None, "udp")]


def test_zero_replicas_is_allowed() -> None:
    assert only(manifest("image: x\nreplicas: 0")).spec.replicas == 0


def test_several_yaml_documents() -> None:
    text = MINIMAL + "---\n" + MINIMAL.replace("name: web", "name: worker") + "---\n"
    assert [d.key for d in parse_deployments(text)] == ["default.web", "default.worker"]


def test_same_name_in_other_namespaces_is_not_a_duplicate() -> None:
    text = manifest(metadata="name: web\nnamespace: a") + "---\n" + manifest(metadata="name: web\nnamespace: b")
    assert [d.key for d in parse_deployments(text)] == ["a.web", "b.web"]


@pytest.mark.parametrize("indent", [None, 2, "\t"])
def test_json_input(indent: int | str | None) -> None:
    body = {"apiVersion": "comp/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"image": "nginx", "replicas": 2}}
    d = only(json.dumps(body, indent=indent))
    assert (d.key, d.spec.replicas) == ("default.web", 2)


def test_bytes_input() -> None:
    assert only(MINIMAL.encode()).key == "default.web"


def test_round_trip_through_json_keeps_the_deployment() -> None:
    d = only(manifest("image: x\nenv: {A: 1}\nresources: {cpu: 500m, memory: 64Mi}\nports: [{container_port: 80}]"))
    assert Deployment.model_validate_json(d.model_dump_json()) == d
    assert only(json.dumps(d.model_dump(mode="json", by_alias=True))) == d


# ---- refused --------------------------------------------------------------------------

INVALID = [
    pytest.param(manifest(top="replicas: 3\n"), "replicas", "unknown field", id="unknown-top-level-field"),
    pytest.param(manifest(metadata="name: web\nnamepsace: shop"), "metadata.namepsace", "unknown field", id="unknown-metadata-field"),
    pytest.param(manifest("image: x\nreplicass: 3"), "spec.replicass", "unknown field", id="unknown-spec-field"),
    pytest.param(manifest("image: x\nresources: {cpus: 1}"), "spec.resources.cpus", "unknown field", id="unknown-resources-field"),
    pytest.param(
        manifest("image: x\nports: [{container_port: 80, hostport: 8080}]"),
        "spec.ports[0].hostport", "unknown field", id="unknown-port-field",
    ),
    pytest.param(
        manifest("image: x\nresources: {memory: 64Mb}"),
        "spec.resources.memory", "memory '64Mb' has unknown unit 'Mb'; use bytes or one of k, M, G, T, Ki, Mi, Gi, Ti",
        id="bad-memory-unit",
    ),
    pytest.param(
        manifest("image: x\nresources: {memory: lots}"),
        "spec.resources.memory", "memory 'lots' is not a quantity like '64Mi' (bytes or one of k, M, G, T, Ki, Mi, Gi, Ti)",
        id="memory-not-a-quantity",
    ),
    pytest.param(
        manifest("image: x\nresources: {memory: 1Mi}"),
        "spec.resources.memory", "memory must be at least 6Mi (the engine's minimum)", id="memory-too-small",
    ),
    pytest.param(
        manifest("image: x\nresources: {cpu: 0}"), "spec.resources.cpu", "cpu must be more than 0 cores", id="zero-cpu",
    ),
    pytest.param(
        manifest("image: x\nresources: {cpu: 2cores}"),
        "spec.resources.cpu", "cpu '2cores' is not a number of cores like 0.5 or millicores like '500m'", id="bad-cpu",
    ),
    pytest.param(
        manifest("image: x\nreplicas: -1"), "spec.replicas", "Input should be greater than or equal to 0", id="negative-replicas",
    ),
    pytest.param(manifest("replicas: 2"), "spec.image", "required field is missing", id="missing-image"),
    pytest.param(manifest("image: ''"), "spec.image", "String should have at least 1 character", id="empty-image"),
    pytest.param(manifest("image: 'nginx latest'"), "spec.image", "image 'nginx latest' must not contain spaces", id="image-with-space"),
    pytest.param(manifest(metadata="namespace: shop"), "metadata.name", "required field is missing", id="missing-name"),
    pytest.param(
        manifest(metadata="name: Web"),
        "metadata.name",
        "'Web' is not a valid name: use lower-case letters, digits and '-', starting and ending with a letter or digit",
        id="upper-case-name",
    ),
    pytest.param(
        manifest(metadata="name: web_1"),
        "metadata.name",
        "'web_1' is not a valid name: use lower-case letters, digits and '-', starting and ending with a letter or digit",
        id="underscore-in-name",
    ),
    pytest.param(
        manifest(metadata="name: " + "a" * 64), "metadata.name", "String should have at most 63 characters", id="name-too-long",
    ),
    pytest.param(
        manifest(metadata="name: web\nnamespace: -shop"),
        "metadata.namespace",
        "'-shop' is not a valid name: use lower-case letters, digits and '-', starting and ending with a letter or digit",
        id="bad-namespace",
    ),
    pytest.param(
        manifest("image: x\nports: [{container_port: 70000}]"),
        "spec.ports[0].container_port", "Input should be less than or equal to 65535", id="container-port-out-of-range",
    ),
    pytest.param(
        manifest("image: x\nports: [{container_port: 80, host_port: 0}]"),
        "spec.ports[0].host_port", "Input should be greater than or equal to 1", id="host-port-out-of-range",
    ),
    pytest.param(
        manifest("image: x\nports: [{container_port: 80}, {container_port: 80, host_port: 8080}]"),
        "spec.ports", "container port 80/tcp is listed twice", id="duplicate-container-port",
    ),
    pytest.param(
        manifest("image: x\nports: [{container_port: 53, protocol: sctp}]"),
        "spec.ports[0].protocol", "Input should be 'tcp' or 'udp'", id="bad-protocol",
    ),
    pytest.param(
        manifest("image: x\nenv: {A: [1, 2]}"), "spec.env.A", "environment values must be strings or numbers, not list", id="env-list",
    ),
    pytest.param(
        manifest("image: x\nenv: {A: }"), "spec.env.A", "environment value is empty (null); write '' for an empty string", id="env-null",
    ),
    pytest.param(MINIMAL.replace("comp/v1", "comp/v2"), "apiVersion", "Input should be 'comp/v1'", id="wrong-api-version"),
    pytest.param(MINIMAL.replace("kind: Deployment", "kind: Pod"), "kind", "kind 'Pod' is not one of Deployment, Service", id="wrong-kind"),
    pytest.param("- web\n- worker\n", "", "a manifest must be a mapping", id="list-not-mapping"),
    pytest.param("just a string\n", "", "a manifest must be a mapping", id="string-not-mapping"),
    pytest.param("metadata: {name: web\n", "", "not valid YAML or JSON: expected ',' or '}', but got '<stream end>' (line 2, column 1)", id="invalid-yaml"),
    pytest.param(
        manifest("image: x\nreplicas: 1\nreplicas: 2"),
        "", "not valid YAML or JSON: found duplicate key 'replicas' (line 8, column 3)", id="duplicate-yaml-key",
    ),
    pytest.param(
        '{"metadata": {"name": "web"}, "spec": {"image": "x", "image": "y"}}',
        "", "not valid JSON: found duplicate key 'image'", id="duplicate-json-key",
    ),
    pytest.param("", "", "manifest is empty", id="empty-text"),
    pytest.param("# nothing here\n---\n---\n", "", "manifest is empty", id="only-empty-documents"),
    pytest.param("null", "", "manifest is empty", id="json-null"),
    pytest.param(MINIMAL + "---\n" + MINIMAL, "", "deployment default.web appears twice", id="duplicate-deployment"),
    pytest.param(
        MINIMAL + "---\n" + manifest(metadata="name: worker", spec="replicas: 1"),
        "document[1].spec.image", "required field is missing", id="bad-second-document",
    ),
    pytest.param(
        # The position counts empty documents too, so it points at the right one in the file.
        MINIMAL + "---\n---\n" + manifest(metadata="name: worker", spec="replicas: 1"),
        "document[2].spec.image", "required field is missing", id="bad-document-after-an-empty-one",
    ),
    pytest.param(MINIMAL + "---\n- a list\n", "document[1]", "a manifest must be a mapping", id="second-document-not-mapping"),
]


@pytest.mark.parametrize(("text", "path", "message"), INVALID)
def test_invalid_manifest(text: str, path: str, message: str) -> None:
    assert {"path": path, "message": message} in errors_of(text)


def test_every_problem_is_reported_at_once() -> None:
    text = manifest(metadata="name: Web", spec="replicas: -1\nresources: {memory: 64Mb}")
    paths = {e["path"] for e in errors_of(text)}
    assert paths == {"metadata.name", "spec.replicas", "spec.image", "spec.resources.memory"}


def test_problems_in_several_documents_are_all_reported() -> None:
    text = manifest(spec="replicas: 1") + "---\n" + manifest(metadata="name: b", spec="image: x\nreplicass: 2")
    assert errors_of(text) == [
        {"path": "document[0].spec.image", "message": "required field is missing"},
        {"path": "document[1].spec.replicass", "message": "unknown field"},
    ]


def test_oversized_manifest() -> None:
    text = MINIMAL + "#" * (1024 * 1024)
    assert errors_of(text) == [{"path": "", "message": "manifest is larger than 1048576 bytes"}]


def test_error_text_names_path_and_message() -> None:
    with pytest.raises(ManifestError, match=r"spec\.replicass: unknown field"):
        parse_deployments(manifest("image: x\nreplicass: 3"))


# ---- task identity --------------------------------------------------------------------


def spec_of(spec: str) -> Deployment:
    return only(manifest(spec))


def test_task_hash_ignores_replicas() -> None:
    assert spec_of("image: x\nreplicas: 1").spec.task_hash() == spec_of("image: x\nreplicas: 5").spec.task_hash()


@pytest.mark.parametrize(
    "changed",
    [
        "image: y",
        "image: x\nenv: {A: '1'}",
        "image: x\ncommand: [sh]",
        "image: x\nresources: {memory: 64Mi}",
        "image: x\nports: [{container_port: 80}]",
    ],
)
def test_task_hash_changes_with_what_runs(changed: str) -> None:
    assert spec_of("image: x").spec.task_hash() != spec_of(changed).spec.task_hash()


def test_task_hash_is_stable_across_spellings() -> None:
    # The same spec written differently is the same task: nothing restarts.
    a = spec_of("image: x\nenv: {PORT: 8080}\nresources: {cpu: 500m, memory: 64Mi}")
    b = spec_of("image: x\nenv: {PORT: '8080'}\nresources: {cpu: 0.5, memory: 67108864}")
    assert a.spec.task_hash() == b.spec.task_hash()
