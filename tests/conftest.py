"""Fixtures that start the real parts: nats-server (JetStream), redis-server, Docker."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from comp_cli.images import import_busybox
from comp_cli.local import ClusterConfig, LocalCluster, _bin, free_port, remove_cluster_containers, wait_for_port

TEST_IMAGE = "comp/busybox:test"


def _start(argv: list[str], port: int, log: Path, what: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for_port(port, 15, what, proc, log)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A fresh nats-server with JetStream on a random port, data in a temp dir."""
    port = free_port()
    data = tmp_path / "nats"
    data.mkdir()
    proc = _start(
        [_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)],
        port, tmp_path / "nats.log", "nats-server",
    )
    yield f"nats://127.0.0.1:{port}"
    _stop(proc)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = _start(
        [_bin("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"],
        port, tmp_path / "redis.log", "redis-server",
    )
    yield f"redis://127.0.0.1:{port}/0"
    _stop(proc)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"these tests need a running Docker engine (scripts/test starts one): {exc}")
    return client


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    import_busybox(TEST_IMAGE, docker_client)
    return TEST_IMAGE


@pytest.fixture
def cluster_name() -> Iterator[str]:
    """A cluster name of this test's own; its containers are removed afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    remove_cluster_containers(name)


@pytest.fixture
def one_node_cluster(tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str) -> Iterator[LocalCluster]:
    """Every COMP process on one docker node, on free ports; its workloads purged afterwards."""
    local = LocalCluster(ClusterConfig.private(tmp_path / "cluster", "one", nodes=1))
    local.start()
    try:
        yield local
    finally:
        local.stop(purge_workloads=True)
