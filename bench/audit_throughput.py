"""bench audit_throughput: events per second through the whole audit path, against
nats-py's own JetStream publish rate measured in the same run.

On a fresh nats-server (JetStream, files in a temp dir):

baseline  N events published into COMP_EVENTS with nats-py's ``publish_async`` (every
          ack awaited at the end): the rate at which events can enter the log at all.
audit     the stream made again, ``comp-audit`` started as its own process on an empty
          data dir; once its consumers are bound, the same N events published the same
          way, timed from the first publish until the audit log holds record N and it is
          on disk (the bench fsyncs the segment itself once it sees record N, which
          returns only when the writer's data is durable).
drain     (a capacity figure, no publisher competing for the CPU) a comp-audit process
          started on the baseline's stream, already holding N events, timed from its
          start until its log holds record N.

--consumers (why the audit reads with an ordered push consumer) nats-py handing the N
          stored events to a do-nothing callback through an ordered push consumer, and
          through a pull consumer fetching 5,000 at a time.

The ratio is audit / baseline: 1.0 would mean recording costs publishers nothing.
Target: the audit keeps up with at least 20,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from comp_cli.local import _bin, free_port, wait_for_port
from comp_common import subjects

TARGET = 20_000


def event_body(i: int) -> bytes:
    # About the size of a task status event.
    return json.dumps({
        "task_id": f"default.web.{i}", "deployment": "default.web", "node_id": f"node-{i % 50}",
        "state": "running", "generation": 3, "container_id": f"{i:064x}", "host_ports": {"8080": 30000 + i % 1000},
        "at": 1764590000.0 + i / 1000, "message": "started",
    }).encode()


async def make_stream(js) -> None:
    try:
        await js.delete_stream(subjects.EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENT_SUBJECTS], storage=StorageType.FILE))


async def publish_all(js, bodies: list[bytes]) -> float:
    started = time.perf_counter()
    for i, body in enumerate(bodies):
        await js.publish_async(f"comp.evt.task.node-{i % 50}", body)
    await js.publish_async_completed()
    return started


def last_seq(log_dir: Path) -> int:
    files = sorted(log_dir.glob("*.jsonl")) if log_dir.is_dir() else []
    if not files:
        return 0
    with open(files[-1], "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 65536))
        data = f.read()
    data = data[: data.rfind(b"\n")]
    if not data:
        return 0
    return json.loads(data[data.rfind(b"\n") + 1 :])["seq"]


def fsync_segments(log_dir: Path) -> None:
    for path in log_dir.glob("*.jsonl"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def consumer_rates(js, n: int) -> tuple[float, float]:
    """Messages/s nats-py hands over to a do-nothing consumer of the N events in the stream:
    an ordered push consumer (what the audit uses) and a pull consumer fetching 5,000 at a time."""
    received = 0
    all_in = asyncio.Event()

    async def count(msg) -> None:
        nonlocal received
        received += 1
        if received >= n:
            all_in.set()

    start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1)
    started = time.perf_counter()
    push = await js.subscribe(subjects.EVENT_SUBJECTS, cb=count, ordered_consumer=True, config=start)
    await all_in.wait()
    ordered = n / (time.perf_counter() - started)
    await push.unsubscribe()

    started = time.perf_counter()
    pull = await js.pull_subscribe(subjects.EVENT_SUBJECTS, durable=None, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1))
    fetched = 0
    while fetched < n:
        fetched += len(await pull.fetch(batch=5000, timeout=10))
    pulled = n / (time.perf_counter() - started)
    await pull.unsubscribe()
    return ordered, pulled


def start_audit(port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "COMP_NATS__URL": f"nats://127.0.0.1:{port}", "COMP_AUDIT__DATA_DIR": str(data_dir),
           "COMP_LOG__LEVEL": "WARNING"}
    with open(log, "ab") as out:
        return subprocess.Popen([_bin("comp-audit")], env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_consuming(js, audit: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while (await js.stream_info(subjects.EVENTS_STREAM)).state.consumer_count < 1:
        if audit.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"comp-audit did not start consuming: {log.read_text()[-2000:]}")
        await asyncio.sleep(0.05)


async def wait_recorded(data_dir: Path, n: int, audit: subprocess.Popen, log: Path) -> None:
    log_dir = data_dir / "log"
    deadline = time.monotonic() + 600
    while last_seq(log_dir) < n:
        if audit.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the audit log holds {last_seq(log_dir)} of {n}: {log.read_text()[-2000:]}")
        await asyncio.sleep(0.005)
    fsync_segments(log_dir)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run(n: int, work: Path, consumers: bool) -> tuple[float, float, float, tuple[float, float] | None]:
    """(baseline, drain, through the audit, consumer rates or None) in events per second."""
    port = free_port()
    (work / "nats").mkdir()
    with open(work / "nats.log", "wb") as out:
        server = subprocess.Popen([_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(work / "nats")],
                                  stdout=out, stderr=subprocess.STDOUT)
    audit: subprocess.Popen | None = None
    log = work / "audit.log"
    try:
        wait_for_port(port, 15, "nats-server", server, work / "nats.log")
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream(publish_async_max_pending=4000)
        bodies = [event_body(i) for i in range(n)]

        await make_stream(js)
        started = await publish_all(js, bodies)
        baseline = n / (time.perf_counter() - started)
        rates = await consumer_rates(js, n) if consumers else None

        # The audit alone, no publisher beside it: all N already in the stream.
        started = time.perf_counter()
        audit = start_audit(port, work / "audit-drain", log)
        await wait_recorded(work / "audit-drain", n, audit, log)
        drain = n / (time.perf_counter() - started)
        stop(audit)

        await make_stream(js)
        audit = start_audit(port, work / "audit", log)
        await wait_consuming(js, audit, log)
        started = await publish_all(js, bodies)
        await wait_recorded(work / "audit", n, audit, log)
        through_audit = n / (time.perf_counter() - started)
        await nc.close()
        return baseline, drain, through_audit, rates
    finally:
        stop(audit)
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="events per run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--consumers", action="store_true",
                        help="also time nats-py's ordered push consumer against pull fetches of 5,000 (why the audit uses the former)")
    args = parser.parse_args()
    for round_ in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="comp-bench-audit-") as tmp:
            baseline, drain, through_audit, rates = asyncio.run(run(args.n, Path(tmp), args.consumers))
        print(
            f"round {round_}: {args.n} events\n"
            f"  baseline  nats-py publish_async into {subjects.EVENTS_STREAM}: {baseline:,.0f}/s\n"
            f"  audit     published, consumed, recorded, fsynced:      {through_audit:,.0f}/s  "
            f"ratio {through_audit / baseline:.2f}  target >= {TARGET:,}/s: {'met' if through_audit >= TARGET else 'MISSED'}\n"
            f"  drain     the audit alone recording N already in the stream (process start included): {drain:,.0f}/s"
        )
        if rates is not None:
            print(f"  consumers nats-py handing over N stored events: ordered push {rates[0]:,.0f}/s, "
                  f"pull fetch(5000) {rates[1]:,.0f}/s, ratio {rates[0] / rates[1]:.1f}")


if __name__ == "__main__":
    main()
