"""bench span_export: what collecting spans on NATS costs the service that makes them.

COMP's figure: microseconds per span (start, two attributes, end) on the service's own
thread with the NATS span processor attached (``comp_common.telemetry.add_nats_export``,
default settings), and how long until the round's spans are all kept in COMP_SPANS.
Baselines, in the same run: the same spans with no processor at all (the bare SDK), and
with the JSON-lines file exporter that the local cluster also writes (a SimpleSpanProcessor,
one write(2) per span).  A round is 2,000 spans, under the default queue of 4,096, so
nothing is dropped; the drops are printed to show it.

    scripts/bench span_export [--rounds 5] [--spans 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import nats
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from comp_cli.local import _bin, free_port, wait_for_port
from comp_common import subjects
from comp_common.settings import TelemetrySettings
from comp_common.telemetry import JsonLinesSpanExporter, add_nats_export


def make_spans(provider: TracerProvider, count: int) -> float:
    """Seconds to start and end ``count`` spans, each the child of one root."""
    tracer = provider.get_tracer("bench")
    started = time.perf_counter()
    with tracer.start_as_current_span("root"):
        for i in range(count):
            with tracer.start_as_current_span("work", attributes={"comp.task_id": f"t{i}", "comp.n": i}):
                pass
    return time.perf_counter() - started


async def kept(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(subjects.SPANS_STREAM)).state.messages
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spans", type=int, default=2000)
    args = parser.parse_args()
    resource = Resource.create({"service.name": "bench"})
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"nats://127.0.0.1:{port}"
        (Path(tmp) / "js").mkdir()
        log = Path(tmp) / "nats.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", f"{tmp}/js"],
                                      stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, 15, "nats-server", server, log)
            bare = TracerProvider(resource=resource)
            to_file = TracerProvider(resource=resource)
            to_file.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(Path(tmp) / "spans.jsonl")))
            to_nats = TracerProvider(resource=resource)
            processor = add_nats_export(to_nats, "bench", url, TelemetrySettings())
            while not processor.connected:
                time.sleep(0.01)
            figures: dict[str, list[float]] = {"bare": [], "file": [], "nats": []}
            delivered: list[float] = []
            expected = 0
            for _ in range(args.rounds):
                figures["bare"].append(make_spans(bare, args.spans))
                figures["file"].append(make_spans(to_file, args.spans))
                started = time.perf_counter()
                figures["nats"].append(make_spans(to_nats, args.spans))
                expected += args.spans + 1
                while asyncio.run(kept(url)) < expected - processor.dropped:
                    time.sleep(0.01)
                delivered.append(time.perf_counter() - started)
            per_span = {name: statistics.median(values) / (args.spans + 1) * 1e6 for name, values in figures.items()}
            print(f"{args.rounds} rounds of {args.spans + 1} spans; medians, microseconds per span on the caller's thread:")
            print(f"  bare SDK (no processor)          {per_span['bare']:8.1f}")
            print(f"  JSON-lines file (the baseline)   {per_span['file']:8.1f}")
            print(f"  NATS span processor (COMP)       {per_span['nats']:8.1f}")
            print(f"  ratio NATS / file                {per_span['nats'] / per_span['file']:8.2f}")
            print(f"  ratio NATS / bare                {per_span['nats'] / per_span['bare']:8.2f}")
            print(f"round made and all kept in COMP_SPANS: median {statistics.median(delivered) * 1000:.0f} ms "
                  f"(batch period {TelemetrySettings().span_batch_seconds * 1000:.0f} ms); sent {processor.sent}, dropped {processor.dropped}")
            to_nats.shutdown()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
