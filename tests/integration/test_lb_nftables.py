"""The lb's ruleset on the real kernel, in a network namespace of the test's own
(``unshare -n``): the kernel takes the document, a second sync leaves one copy of the
rules, counters carry over, and a document the kernel refuses changes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from comp_lb.ruleset import Endpoint, Service, ServicePort, build_ruleset, service_port_id


def _netns_usable() -> str | None:
    if shutil.which("nft") is None:
        return "no nft binary (apt-get install nftables)"
    probe = subprocess.run(["unshare", "-n", "nft", "list", "tables"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot run nft in a network namespace: {probe.stderr.strip()}"


pytestmark = pytest.mark.skipif(bool(_netns_usable()), reason=_netns_usable() or "")

WEB = Service(
    "default.web", "10.96.0.10",
    (ServicePort(80, "http", published=30080), ServicePort(53, 5353, "udp", name="dns")),
    (Endpoint("web-a", "10.0.0.2", {"http": 8080}), Endpoint("web-b", "10.0.0.3", {"http": 8080})),
)
EMPTY = Service("default.empty", "10.96.0.11", (ServicePort(80, 80),))


def in_namespace(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a fresh network namespace, from ``tmp_path``."""
    return subprocess.run(["unshare", "-n", "sh", "-ec", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_two_syncs_leave_one_copy_and_counters_carry_over(tmp_path):
    chain = service_port_id("default.web", WEB.ports[0])
    (tmp_path / "first.json").write_text(json.dumps(build_ruleset([WEB, EMPTY])))
    (tmp_path / "second.json").write_text(json.dumps(build_ruleset([WEB, EMPTY], carry={chain: (42, 4200)})))
    done = in_namespace(tmp_path, "nft -j -f first.json; nft -j -f second.json; nft -j list ruleset")
    assert done.returncode == 0, done.stderr
    listed = [next(iter(item.items())) for item in json.loads(done.stdout)["nftables"]]
    tables = [body for kind, body in listed if kind == "table"]
    assert [(t["family"], t["name"]) for t in tables] == [("ip", "comp_lb")], "one table, once"
    chains = [body["name"] for kind, body in listed if kind == "chain"]
    assert len(chains) == len(set(chains)) and {"services", "no-endpoints", chain} <= set(chains)
    rules = [body for kind, body in listed if kind == "rule"]
    assert sum(r["chain"] == "services" for r in rules) == 3  # VIP tcp, published tcp, VIP udp
    assert sum(r["chain"] == "no-endpoints" for r in rules) == 1
    counters = {body["name"]: (body["packets"], body["bytes"]) for kind, body in listed if kind == "counter"}
    assert counters[chain] == (42, 4200)


def test_a_document_the_kernel_refuses_leaves_the_last_ruleset_whole(tmp_path):
    good = build_ruleset([WEB])
    bad = build_ruleset([WEB, EMPTY])
    # A rule that jumps to a chain no one defined: the kernel refuses the transaction.
    bad["nftables"].append({"add": {"rule": {"family": "ip", "table": "comp_lb", "chain": "services", "expr": [{"jump": {"target": "nowhere"}}]}}})
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    done = in_namespace(
        tmp_path,
        "nft -j -f good.json; nft -j list ruleset > before.json; "
        "if nft -j -f bad.json 2> refused.txt; then echo applied; else echo refused; fi; nft -j list ruleset > after.json",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused" and (tmp_path / "refused.txt").read_text().strip()
    assert json.loads((tmp_path / "after.json").read_text()) == json.loads((tmp_path / "before.json").read_text())
