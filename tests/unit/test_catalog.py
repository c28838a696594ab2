"""The event catalog against the code: every subject has an entry, every entry's model is
what its publishers send (read from the publish call sites), its publishers and consumers
are the services that do so, and the committed documents are what the generator writes."""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from comp_common import catalog, messages, subjects
from comp_common.catalog import ENTRIES, OUTSIDE, STREAM_READERS, subject_covers, wildcard
from publish_sites import ROOT, scan

DOCS = ROOT / "docs"
MESSAGE_MODELS = {n for n, v in vars(messages).items() if isinstance(v, type) and issubclass(v, BaseModel)}


def subject_names() -> dict[str, str]:
    """Every name in subjects.py that is a NATS subject (constant or builder) -> its pattern."""
    found: dict[str, str] = {}
    for name, value in vars(subjects).items():
        if isinstance(value, str) and value.startswith("comp."):
            found[name] = value
        elif inspect.isfunction(value) and value.__module__ == subjects.__name__:
            parameters = inspect.signature(value).parameters.values()
            # Builders of keys take numbers (revision_key's generation); subjects take tokens.
            if all(p.annotation in ("str", str) for p in parameters):
                built = value(*(f"{{{p.name}}}" for p in parameters))
                if built.startswith("comp."):
                    found[name] = built
    return found


def entry_of(name: str) -> catalog.Entry | None:
    return next((e for e in ENTRIES if name in (e.family, e.builder)), None)


def test_every_subject_in_subjects_py_has_a_catalog_entry():
    # EVENT_SUBJECTS is the stream's filter over the kept families, not a family of its own.
    missing = sorted(n for n in subject_names() if n != "EVENT_SUBJECTS" and entry_of(n) is None)
    assert not missing, (
        f"subjects.py names subjects the catalog does not have: {missing}; add an Entry for each to "
        f"libs/common/src/comp_common/catalog.py, then run `{catalog.REGENERATE}`"
    )
    assert any(n.startswith("comp.evt.") for n in subject_names().values())


def test_entries_name_real_subjects_and_their_family_covers_their_pattern():
    names = subject_names()
    for e in ENTRIES:
        assert e.family is not None or e.builder is not None, e.id
        for name in (e.family, e.builder):
            assert name is None or name in names, f"{e.id}: subjects.{name} is not a subject in subjects.py"
        assert subject_covers(e.subscribe, wildcard(e.pattern)), f"{e.id}: {e.subscribe} does not cover {e.pattern}"
        assert set(e.tokens) <= set(catalog.TOKENS), f"{e.id}: tokens without a description: {set(e.tokens) - set(catalog.TOKENS)}"
    assert len({e.id for e in ENTRIES}) == len(ENTRIES)
    assert len({e.pattern for e in ENTRIES}) == len(ENTRIES)


def test_kept_is_the_event_streams_filter():
    kept = {e.id for e in ENTRIES if e.kept}
    assert {e.id for e in ENTRIES if e.pattern.startswith("comp.evt.")} == kept
    assert catalog.entry("task").kept and not catalog.entry("heartbeat").kept


@pytest.mark.parametrize(
    ("filter_subject", "subject", "covered"),
    [
        ("comp.evt.>", "comp.evt.task.*", True),
        ("comp.evt.>", "comp.evt.capacity", True),
        ("comp.evt.>", "comp.evt", False),
        ("comp.evt.task.*", "comp.evt.task.n1", True),
        ("comp.evt.task.*", "comp.evt.task.*", True),
        ("comp.evt.task.*", "comp.evt.task.>", False),
        ("comp.evt.task.*", "comp.evt.task.n1.x", False),
        ("comp.evt.task.n1", "comp.evt.task.*", False),
        ("comp.evt.deployment.>", "comp.evt.deployment.*.*", True),
        ("comp.metrics.node.*", "comp.metrics.service.*.*", False),
        ("comp.node.*.heartbeat", "comp.node.*.nudge", False),
        ("comp.node.*.heartbeat", "comp.node.h1.heartbeat", True),
        ("comp.evt.capacity", "comp.evt.capacity", True),
    ],
)
def test_subject_covers(filter_subject, subject, covered):
    assert subject_covers(filter_subject, subject) is covered


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)


@given(st.lists(st.one_of(token, st.just("*")), min_size=1, max_size=6), st.data())
def test_a_wildcard_covers_every_subject_it_stands_for_and_only_those(pattern, data):
    concrete = [data.draw(token) if t == "*" else t for t in pattern]
    assert subject_covers(".".join(pattern), ".".join(concrete))
    assert subject_covers(".".join(pattern[:1] + [">"]), ".".join(concrete + ["x"]))
    assert not subject_covers(".".join(pattern), ".".join(concrete + ["extra"]))
    assert not subject_covers(".".join(pattern + ["extra"]), ".".join(concrete))


def _resolve(site_subject: str) -> catalog.Entry | None:
    return entry_of(site_subject)


def model_mismatches(sites) -> tuple[list[str], set[str]]:
    """Publish sites whose resolved body is not their entry's model; and the entries checked."""
    checked: set[str] = set()
    wrong = []
    for site in sites:
        e = _resolve(site.subject)
        if site.role != "publish" or e is None or e.payload.model is None or site.models is None:
            continue
        if site.models != {e.payload.model.__name__}:
            wrong.append(f"{site}: sends {sorted(site.models)} on subjects.{site.subject}, the catalog says {e.payload.model.__name__}")
        checked.add(e.id)
    return wrong, checked


def test_every_publish_site_sends_the_catalogs_model():
    """Each publish call in the services whose body's type the source states (a constructor,
    an annotated variable or parameter, a return annotation) sends the entry's model; and
    every entry with a model and a COMP publisher has at least one such site checked."""
    wrong, checked = model_mismatches(scan(MESSAGE_MODELS))
    assert not wrong, "\n".join(wrong)
    published_by_comp = {e.id for e in ENTRIES if e.payload.model is not None and set(e.publishers) - set(OUTSIDE)}
    assert published_by_comp <= checked, f"no publish site resolved for {sorted(published_by_comp - checked)}"


WRONG_PUBLISHER = """
from comp_common import subjects
from comp_common.messages import Nudge, TaskStatus


class Agent:
    def __init__(self, broker):
        self.sent: dict[str, TaskStatus] = {}

    async def report(self, node_id: str, nudge: Nudge) -> None:
        await self.broker.publish(nudge, subjects.task_event(node_id))

    async def resend(self, node_id: str) -> None:
        for status in self.sent.values():
            await self._publish(status, subjects.task_event(node_id))

    async def announce(self, node_id: str) -> None:
        event = Nudge(node_id=node_id, version=1)
        await self._publish(event, subjects.health_event(node_id))
"""


def test_the_publish_check_finds_a_wrong_model(tmp_path: Path):
    source = tmp_path / "agent.py"
    source.write_text(WRONG_PUBLISHER)
    sites = scan(MESSAGE_MODELS, [("nodeagent", source)])
    assert {(s.line, s.subject, s.models) for s in sites} == {
        (11, "task_event", frozenset({"Nudge"})),
        (15, "task_event", frozenset({"TaskStatus"})),
        (19, "health_event", frozenset({"Nudge"})),
    }
    wrong, checked = model_mismatches(sites)
    assert len(wrong) == 2 and "agent.py:11" in wrong[0] and "the catalog says TaskStatus" in wrong[0]
    assert "agent.py:19" in wrong[1] and "HealthEvent" in wrong[1]
    assert checked == {"task", "health"}


def test_publishers_and_consumers_are_the_services_whose_code_does_so():
    sites = scan(MESSAGE_MODELS)
    found: dict[tuple[str, str], set[str]] = {}
    uncatalogued = []
    stream_readers = set()
    for site in sites:
        value = getattr(subjects, site.subject)
        if site.subject == "EVENT_SUBJECTS":
            stream_readers.add(site.service)
            continue
        e = _resolve(site.subject)
        if e is None:
            if isinstance(value, str) and not value.startswith("comp."):
                continue  # a stream or bucket name passed beside a subject
            uncatalogued.append(f"{site}: subjects.{site.subject}")
            continue
        # comp_common's code runs in every service (its tracer publishes spans).
        found.setdefault((e.id, site.role), set()).add(catalog.EVERY_SERVICE if site.service == "common" else site.service)
    assert not uncatalogued, f"the code uses subjects the catalog lacks: {uncatalogued}"
    assert stream_readers <= set(STREAM_READERS), f"read the whole stream but are not in STREAM_READERS: {stream_readers}"
    problems = []
    for e in ENTRIES:
        for role, declared in (("publish", set(e.publishers)), ("consume", set(e.consumers))):
            in_code = found.get((e.id, role), set())
            if in_code - declared:
                problems.append(f"{e.id}: {sorted(in_code - declared)} {role} it in code but are not in the entry")
            if declared - set(OUTSIDE) - in_code:
                problems.append(f"{e.id}: the entry says {sorted(declared - set(OUTSIDE) - in_code)} {role} it; no code does")
    assert not problems, "\n".join(problems)


def test_models_are_the_message_models_and_what_they_contain():
    known = catalog.models()
    assert {e.payload.model.__name__ for e in ENTRIES if e.payload.model} <= set(known)
    # Nested models of a catalog message are documented too (TaskStatus inside Heartbeat).
    assert {"TaskStatus", "Capacity", "Taint", "Endpoint", "EndpointPort", "TaskUsage"} <= set(known)
    assert set(catalog.schemas()) >= set(known)


def test_one_models_schema_and_an_unknown_name():
    schema = catalog.model_schema("TaskStatus")
    assert schema["title"] == "TaskStatus" and "state" in schema["properties"]
    assert schema == messages.TaskStatus.model_json_schema()
    with pytest.raises(KeyError) as raised:
        catalog.model_schema("NoSuchModel")
    assert "NoSuchModel" in str(raised.value) and "TaskStatus" in str(raised.value)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _pointer(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_asyncapi_document_is_whole():
    document = catalog.asyncapi_document()
    assert document["asyncapi"] == "3.0.0" and document["info"]["version"] == catalog.CATALOG_VERSION
    refs = _refs(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        _pointer(document, ref)  # a KeyError names the dangling reference
    # AsyncAPI 3.0's rules: a channel's parameters are its address's expressions; an
    # operation's (and its reply's) messages are among its channel's.
    for cid, channel in document["channels"].items():
        if channel["address"] is not None:
            assert set(channel.get("parameters", {})) == set(re.findall(r"\{(\w+)\}", channel["address"])), cid
    for oid, operation in document["operations"].items():
        assert operation["action"] in ("send", "receive"), oid
        for part in (operation, operation.get("reply")):
            if part is None:
                continue
            channel_ref = part["channel"]["$ref"]
            for message in part["messages"]:
                assert message["$ref"].startswith(channel_ref + "/messages/"), (oid, message)
    task = document["channels"]["task"]
    assert task["address"] == "comp.evt.task.{node_id}" and set(task["parameters"]) == {"node_id"}
    assert task["x-comp-kept"] is True and "audit" in task["x-comp-consumers"]
    assert document["operations"]["ping.send"]["reply"]["channel"] == {"$ref": "#/channels/ping-reply"}
    json.loads(catalog.render_json(document))


def test_field_meanings_come_from_the_models_comments():
    comments = catalog.field_comments(messages.TaskStatus)
    assert comments["host_ports"] == "container port/protocol -> host port, as the engine published them"
    assert "readiness check" in comments["ready"]
    assert "state" not in comments


def _last_committed_document() -> dict[str, Any] | None:
    """docs/asyncapi.json as the last commit holds it (None: not committed yet, or no git)."""
    try:
        shown = subprocess.run(
            ["git", "show", f"HEAD:docs/{catalog.ASYNCAPI_FILE}"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def test_the_catalog_version_is_bumped_as_its_changes_since_the_last_commit_need():
    """Against the last commit, not the working tree: regenerating the documents must not
    be a way around the bump."""
    committed = _last_committed_document()
    if committed is None:
        pytest.skip(f"docs/{catalog.ASYNCAPI_FILE} is in no commit yet: nothing to compare the version with")
    problem = catalog.version_problem(committed, catalog.asyncapi_document())
    assert problem is None, f"{problem} (libs/common/src/comp_common/catalog.py), then run `{catalog.REGENERATE}`"


def test_committed_documents_are_what_the_generator_writes_now():
    differing = catalog.stale(DOCS)
    assert not differing, (
        f"docs/{' and docs/'.join(differing)} differ from the catalog in the code; run "
        f"`.venv/bin/python -m comp_common.catalog --write docs/` and commit the result"
    )


def test_the_generator_writes_and_checks(tmp_path: Path, capsys):
    assert catalog.main(["--write", str(tmp_path)]) == 0
    assert catalog.main(["--check", str(tmp_path)]) == 0
    (tmp_path / catalog.MARKDOWN_FILE).write_text("edited by hand\n")
    assert catalog.main(["--check", str(tmp_path)]) == 1
    said = capsys.readouterr().err
    assert catalog.MARKDOWN_FILE in said and catalog.REGENERATE in said


def _edited(change) -> dict[str, Any]:
    document = copy.deepcopy(catalog.asyncapi_document())
    change(document)
    return document


def _drop_field(d):
    del d["components"]["schemas"]["TaskStatus"]["properties"]["message"]


def _rename_subject(d):
    d["channels"]["task"]["address"] = "comp.evt.tasks.{node_id}"


def _require_field(d):
    d["components"]["schemas"]["TaskStatus"]["required"].append("message")


def _retype_field(d):
    d["components"]["schemas"]["TaskStatus"]["properties"]["restarts"] = {"type": "string"}


def _drop_model(d):
    del d["components"]["schemas"]["CapacityEvent"]


def _drop_enum_value(d):
    d["components"]["schemas"]["TaskState"]["enum"].remove("stopped")


def _retype_message(d):
    d["channels"]["task"]["messages"] = {"Nudge": {"$ref": "#/components/messages/Nudge"}}


def _drop_inline_field(d):
    del d["components"]["messages"]["SpanRecord"]["payload"]["properties"]["links"]


def _add_optional_field(d):
    d["components"]["schemas"]["TaskStatus"]["properties"]["zone"] = {"type": "string", "default": ""}


def _add_subject(d):
    d["channels"]["new"] = {"address": "comp.evt.new"}


def _add_model(d):
    d["components"]["schemas"]["NewThing"] = {"type": "object", "properties": {}}


def _reword(d):
    d["channels"]["task"]["description"] = "reworded"


def _new_default(d):
    d["components"]["schemas"]["TaskStatus"]["properties"]["message"]["default"] = "none"


@pytest.mark.parametrize(
    ("change", "bump"),
    [
        (_drop_field, "major"),
        (_rename_subject, "major"),
        (_require_field, "major"),
        (_retype_field, "major"),
        (_drop_model, "major"),
        (_drop_enum_value, "major"),
        (_retype_message, "major"),
        (_drop_inline_field, "major"),
        (_add_optional_field, "minor"),
        (_add_subject, "minor"),
        (_add_model, "minor"),
        (_reword, "patch"),
        (_new_default, "patch"),
        (lambda d: None, None),
    ],
)
def test_required_bump(change, bump):
    assert catalog.required_bump(catalog.asyncapi_document(), _edited(change)) == bump


def test_a_change_without_its_bump_is_refused_and_with_it_accepted():
    old = catalog.asyncapi_document()
    old["info"]["version"] = "1.4.2"
    new = _edited(_drop_field)
    new["info"]["version"] = "1.5.0"
    problem = catalog.version_problem(old, new)
    assert problem is not None and "major" in problem and "2.0.0" in problem
    new["info"]["version"] = "2.0.0"
    assert catalog.version_problem(old, new) is None
    added = _edited(_add_subject)
    added["info"]["version"] = "1.4.3"
    assert "1.5.0" in (catalog.version_problem(old, added) or "")
    assert catalog.version_problem(old, copy.deepcopy(old)) is None


def test_streams_keep_what_their_filters_say():
    assert catalog.entry("task").stream == subjects.EVENTS_STREAM
    assert catalog.entry("heartbeat").stream is None and catalog.entry("ping").stream is None
    for e in ENTRIES:
        assert (e.stream == subjects.EVENTS_STREAM) is e.kept, e.id


def _inline_properties(entry_id: str, reply: bool = False) -> set[str]:
    payload = catalog.entry(entry_id).reply if reply else catalog.entry(entry_id).payload
    assert payload is not None and payload.model is None
    return set(payload.schema["properties"])


def test_the_span_body_is_what_the_tracer_publishes():
    from opentelemetry.sdk.trace import TracerProvider

    from comp_common.telemetry import span_record

    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("outer"):
        with provider.get_tracer("t").start_span("inner", attributes={"comp.task_id": "t1"}) as inner:
            pass
    record = span_record(inner)
    assert set(record) == _inline_properties("span")
    schema = catalog.entry("span").payload.schema
    assert set(schema["required"]) <= set(record)


def test_the_audit_query_body_is_the_audit_services_model():
    from comp_audit.query import AuditQuery

    assert _inline_properties("audit-query") == set(AuditQuery.model_fields)
