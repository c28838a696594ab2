"""bench metrics_overhead: what the shared message metrics add to the busiest receive path.

The scheduler takes every node's heartbeat (5,000 a second at 5,000 nodes) through
``comp_common.broker.typed_callback``, which now counts the message under its subject
pattern, observes the handler's latency and counts garbage.  Measured here, one process,
no I/O: the callback as shipped against the same callback without the metrics (the
baseline: parse, then handle, as it was before), on heartbeats of ``--tasks`` task
statuses from ``--nodes`` distinct nodes (distinct subjects, so the pattern cache is
exercised as in a cluster), in alternating rounds; the best round of each is printed with
the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import ValidationError

from comp_common import subjects
from comp_common.broker import typed_callback
from comp_common.messages import Capacity, Heartbeat, TaskState, TaskStatus


def baseline_callback(model: type[Heartbeat], handle: Callable[[Heartbeat], None]) -> Callable[[Msg], Awaitable[None]]:
    """typed_callback as it was before the metrics: validate, hand over, log nothing here."""

    async def on_message(msg: Msg) -> None:
        try:
            value = model.model_validate_json(msg.data)
        except ValidationError:
            return
        try:
            handle(value)
        except Exception:
            pass

    return on_message


def heartbeats(nodes: int, tasks: int) -> list[Msg]:
    out = []
    for n in range(nodes):
        node = f"node-{n:05d}"
        hb = Heartbeat(
            node_id=node, seq=1, sent_at=time.time(), started_at=0.0, driver="bench",
            capacity=Capacity(cpu=8.0, memory=16 * 1024**3), allocated=Capacity(cpu=1.0, memory=1024**3),
            tasks=[TaskStatus(task_id=f"t-{n}-{i}", node_id=node, deployment="default.web", state=TaskState.RUNNING)
                   for i in range(tasks)],
        )
        out.append(Msg(_client=None, subject=subjects.node_heartbeat(node), data=hb.model_dump_json().encode()))  # type: ignore[arg-type]
    return out


async def per_message_us(callback: Callable[[Msg], Awaitable[None]], messages: list[Msg]) -> float:
    began = time.perf_counter()
    for msg in messages:
        await callback(msg)
    return (time.perf_counter() - began) / len(messages) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=10, help="task statuses per heartbeat")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    messages = heartbeats(args.nodes, args.tasks)
    handled = 0

    def handle(hb: Heartbeat) -> None:
        nonlocal handled
        handled += 1

    shipped, baseline = typed_callback(Heartbeat, handle), baseline_callback(Heartbeat, handle)
    await per_message_us(shipped, messages)  # warm the pattern cache and the label children
    best_shipped, best_baseline = float("inf"), float("inf")
    for _ in range(args.rounds):
        best_baseline = min(best_baseline, await per_message_us(baseline, messages))
        best_shipped = min(best_shipped, await per_message_us(shipped, messages))
    assert handled == len(messages) * (2 * args.rounds + 1)

    print(f"heartbeats of {args.tasks} task statuses from {args.nodes} nodes, best of {args.rounds} rounds")
    print(f"typed_callback with metrics:    {best_shipped:8.2f} us/message")
    print(f"baseline (no metrics):          {best_baseline:8.2f} us/message")
    print(f"ratio:                          {best_shipped / best_baseline:8.3f}  (+{best_shipped - best_baseline:.2f} us/message)")


if __name__ == "__main__":
    asyncio.run(main())
