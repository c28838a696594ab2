"""tests/support/netns.py on the real kernel: namespaces joined through a router reach
each other's servers, and deleting a namespace leaves neither it nor its processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from netns import Namespace, add_route, enable_forwarding, http_get, require_netns, veth_link, wait_for_http

pytestmark = [
    pytest.mark.skipif(bool(require_netns()), reason=require_netns() or ""),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox (apt-get install busybox)"),
]


def serve(ns: Namespace, address: str, root: Path, page: str) -> subprocess.Popen:
    root.mkdir()
    (root / "index.html").write_text(page)
    return ns.popen(["busybox", "httpd", "-f", "-p", f"{address}:80", "-h", str(root)])


def test_two_namespaces_reach_each_other_through_a_router(tmp_path):
    with Namespace("router") as router, Namespace("left") as left, Namespace("right") as right:
        enable_forwarding(router)
        left_link = veth_link(left, router)
        right_link = veth_link(right, router)
        add_route(left, "0.0.0.0/0", left_link.b_ip)
        add_route(right, "0.0.0.0/0", right_link.b_ip)
        serve(left, left_link.a_ip, tmp_path / "left", "from left\n")
        serve(right, right_link.a_ip, tmp_path / "right", "from right\n")

        # Neither end is on the other's subnet: the answers crossed the router.
        assert wait_for_http(left, f"http://{right_link.a_ip}/") == (200, "from right\n")
        assert wait_for_http(right, f"http://{left_link.a_ip}/") == (200, "from left\n")
        assert http_get(left, f"http://{right_link.a_ip}/missing.html")[0] == 404


def test_delete_removes_the_namespace_and_kills_its_processes(tmp_path):
    ns = Namespace("doomed")
    try:
        server = serve(ns, "127.0.0.1", tmp_path / "www", "here\n")
        # Not started through popen: delete() must find it by its namespace.
        stray = ns.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
        stray_pid = int(stray.stdout)
        assert wait_for_http(ns, "http://127.0.0.1/")[0] == 200
        assert ns.exists() and ns.name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        ns.delete()
    assert not ns.exists()
    assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert server.poll() is not None
    assert not _alive(stray_pid)
    ns.delete()  # twice is harmless


def _alive(pid: int) -> bool:
    # The stray was reparented to init, which reaps it: gone means no /proc entry, or a
    # zombie for the instant before init reaps it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
