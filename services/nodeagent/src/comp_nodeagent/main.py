"""Composition root of the node agent: settings, logging, tracing, broker, driver, agents.

One process runs one agent (a host), or with ``--count N`` and the hollow driver N
agents sharing one NATS connection, for scale tests (as Kubernetes' kubemark runs many
hollow kubelets in one pod).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

from faststream import FastStream
from faststream.nats import NatsBroker
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, TypeAdapter

from comp_common import subjects
from comp_common.aio import Slots, cancel_and_wait, contain_collections
from comp_common.broker import make_app, make_broker
from comp_common.kv import get_model, open_bucket
from comp_common.logs import configure_logging
from comp_common.metrics import for_subject, serve_metrics
from comp_common.messages import Heartbeat, NodeAssignments, TaskStatus
from comp_common.telemetry import setup_tracing

from . import instruments
from .agent import Agent, Publish
from .driver import make_driver
from .handlers import make_fleet_router, make_router
from .settings import NodeAgentSettings

SERVICE = "nodeagent"
log = logging.getLogger(SERVICE)
# Agents of a fleet start in this many groups a second, so their heartbeats and resyncs
# are spread evenly over the period.
START_SLOTS_PER_SECOND = 20
# How long a fleet's messages wait to share one socket write.
BATCH_WINDOW_SECONDS = 0.02
# Assignment reads a fleet has in flight at once.
KV_READS_IN_FLIGHT = 128
_TRACE_CONTEXT = TraceContextTextMapPropagator()
_TASK_LIST = TypeAdapter(list[TaskStatus])


class FleetPublisher:
    """How a fleet of agents publishes: straight on the connection, many messages a write.

    Through the broker, a message costs ~300 us of CPU (encoding, middlewares, and a span
    of its own made by the telemetry middleware, also for a heartbeat that belongs to no
    trace) and one socket write.  For one agent that is nothing; for 5,000 agents it was
    most of the process's CPU, and a deploy's burst of task statuses held up the
    heartbeats behind it long enough for the scheduler to declare nodes down.  Here a
    message is its JSON body (what the broker would send) and, inside a trace, the W3C
    ``traceparent`` header (what the broker's middleware would add, so consumers still
    join the trace), gathered for ``window`` seconds into one write.
    """

    def __init__(self, broker: NatsBroker, window: float = BATCH_WINDOW_SECONDS):
        self._broker = broker
        self._window = window
        self._batch: list[tuple[str, bytes, dict[str, str] | None]] = []
        self._sender: asyncio.Task[None] | None = None
        # node id -> (the statuses its last heartbeat carried, their JSON)
        self._task_lists: dict[str, tuple[tuple[TaskStatus, ...], bytes]] = {}

    async def publish(self, message: BaseModel, subject: str) -> None:
        headers: dict[str, str] = {}
        _TRACE_CONTEXT.inject(headers)
        data = self._heartbeat_json(message) if isinstance(message, Heartbeat) else message.model_dump_json().encode()
        self._batch.append((subject, data, headers or None))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_batch(), name="nodeagent-fleet-publish")

    def _heartbeat_json(self, hb: Heartbeat) -> bytes:
        """The heartbeat as ``model_dump_json`` writes it, but a full one's task list serialised
        again only when a status changed: an agent replaces a status object on every change and
        otherwise sends the same ones each period (the cache holds them, so their ids are
        not reused).  The list stays the body's last field, byte for byte the same while
        nothing changed, which lets the scheduler skip validating it too."""
        tasks = tuple(hb.tasks)
        last = self._task_lists.get(hb.node_id) if hb.full else None
        if last is not None and len(last[0]) == len(tasks) and all(a is b for a, b in zip(last[0], tasks)):
            tasks_json = last[1]
        else:
            tasks_json = _TASK_LIST.dump_json(list(tasks))
            if hb.full:  # a partial list (the changes, mostly none) is not worth keeping
                self._task_lists[hb.node_id] = (tasks, tasks_json)
        head = hb.model_dump_json(exclude={"tasks"}).encode()
        return head[:-1] + b',"tasks":' + tasks_json + b"}"

    async def _send_batch(self) -> None:
        await asyncio.sleep(self._window)
        batch, self._batch, self._sender = self._batch, [], None
        connection = self._broker.connection
        sent = 0
        try:
            # Each call only appends to the client's buffer; its flusher writes them all at once.
            for subject, data, headers in batch:
                await connection.publish(subject, data, headers=headers)
                for_subject(subject).published.inc()
                sent += 1
        except Exception as exc:
            # Heartbeats carry every task's status, so the next ones repair what is lost here.
            # No traceback: while NATS is away this fires for every batch, and formatting
            # thousands of tracebacks was what kept a busy fleet from catching up.
            log.warning("could not publish %d messages: %r", len(batch) - sent, exc)

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None


class AssignmentsReader:
    """How the agents of one process read their assignments: one bucket handle, a bounded
    number of reads in flight, and a value parsed once per revision.

    A deploy nudges thousands of a fleet's agents at once, and each pass re-reads its key.
    Unbounded, the requests of a whole fleet went out together and those at the back timed
    out before the loop came round to their answers; each failure was a pass that did
    nothing and a traceback logged, which slowed the loop further.  A read waiting for a
    slot has not been sent, so it cannot time out.  Follow-up passes and resyncs mostly find
    the revision they already have, and skip validating its every task again.
    """

    def __init__(self, broker: NatsBroker, in_flight: int = KV_READS_IN_FLIGHT):
        self._broker = broker
        self._slots = Slots(in_flight)
        self._kv: KeyValue | None = None
        self._parsed: dict[str, tuple[int, NodeAssignments]] = {}

    async def read(self, node_id: str) -> NodeAssignments | None:
        async with self._slots:
            if self._kv is None:
                self._kv = await open_bucket(self._broker, subjects.ASSIGNMENTS_BUCKET)
            try:
                entry = await self._kv.get(node_id)
            except KeyNotFoundError:
                self._parsed.pop(node_id, None)
                return None
        if entry.value is None or entry.operation is not None and str(entry.operation).endswith(("DEL", "PURGE")):
            self._parsed.pop(node_id, None)
            return None
        cached = self._parsed.get(node_id)
        if cached is not None and cached[0] == entry.revision:
            return cached[1]
        value = NodeAssignments.model_validate_json(entry.value)
        if entry.revision is not None:
            self._parsed[node_id] = (entry.revision, value)
        return value


def make_agent(
    settings: NodeAgentSettings,
    broker: NatsBroker,
    node_id: str,
    publish: Publish | None = None,
    reader: AssignmentsReader | None = None,
    own_clock: bool = True,
) -> Agent:
    """The agent of node ``node_id``, with its own driver, reading its own assignments key."""
    node_settings = settings.model_copy(
        update={"nodeagent": settings.nodeagent.model_copy(update={"node_id": node_id})}
    )

    if reader is not None:
        async def load_assignments() -> NodeAssignments | None:
            return await reader.read(node_id)
    else:
        async def load_assignments() -> NodeAssignments | None:
            kv = await open_bucket(broker, subjects.ASSIGNMENTS_BUCKET)
            found = await get_model(kv, node_id, NodeAssignments)
            return found[0] if found else None

    return Agent(
        settings=node_settings.nodeagent,
        heartbeat_seconds=settings.liveness.heartbeat_seconds,
        driver=make_driver(node_settings),
        load_assignments=load_assignments,
        publish=publish or broker.publish,
        own_clock=own_clock,
    )


async def start_spread(agents: Sequence[Agent], over_seconds: float) -> None:
    """Start the agents group by group, evenly over ``over_seconds``, so that their first
    passes (a KV read each) come steadily rather than all at once.  Their heartbeats and
    resyncs are the fleet clock's (``run_on_a_clock``), which skips an agent until it runs."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    slots = max(1, min(len(agents), round(over_seconds * START_SLOTS_PER_SECOND)))
    for slot in range(slots):
        delay = began + slot * over_seconds / slots - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        group = agents[slot * len(agents) // slots : (slot + 1) * len(agents) // slots]
        await asyncio.gather(*(agent.start() for agent in group))


async def run_on_a_clock(agents: Sequence[Agent], period: float, act: Callable[[Agent], Awaitable[None] | None]) -> None:
    """``act`` on every running agent once a ``period``, in groups spread evenly over it.

    A fleet's clock: one task and one timer a group, where each agent's own loops were two
    tasks and two timers an agent (5,000 agents: 10,000 sleeps a second, a tenth of the
    fleet's CPU at idle).  The schedule is fixed from the start, so a late group is acted on
    at once and the next ones keep their times.
    """
    loop = asyncio.get_running_loop()
    slots = max(1, min(len(agents), round(period * START_SLOTS_PER_SECOND)))
    groups = [agents[i * len(agents) // slots : (i + 1) * len(agents) // slots] for i in range(slots)]
    began = loop.time()
    for turn in itertools.count():
        for i, group in enumerate(groups):
            delay = began + (turn + i / slots) * period - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for agent in group:
                if agent.running:
                    done = act(agent)
                    if done is not None:
                        await done


def build_app(settings: NodeAgentSettings) -> FastStream:
    logger = configure_logging(SERVICE, settings.log)
    provider = setup_tracing(SERVICE, settings.telemetry, settings.nats.url)
    broker = make_broker(settings.nats, SERVICE, provider)
    group = settings.nodeagent

    fleet = FleetPublisher(broker) if group.count > 1 else None
    reader = AssignmentsReader(broker) if group.count > 1 else None
    agents = [
        make_agent(settings, broker, node_id, fleet.publish if fleet else None, reader, own_clock=fleet is None)
        for node_id in group.node_ids()
    ]
    instruments.track(agents)
    if len(agents) == 1:
        # One host: a subscription to its own subject only, which is all its NATS user may read.
        broker.include_router(make_router(agents[0]))
    else:
        broker.include_router(make_fleet_router({agent.node_id: agent for agent in agents}))

    app = make_app(broker, logger=logger)
    starting: list[asyncio.Task[None]] = []

    @app.after_startup
    async def start_agents() -> None:
        if len(agents) == 1:
            await agents[0].start()
            return
        # Spread, so that the first passes (a KV read each) do not all come at once.
        spread = max(settings.liveness.heartbeat_seconds, group.resync_seconds)
        starting.append(asyncio.create_task(start_spread(agents, spread), name="nodeagent-start-fleet"))
        starting.append(asyncio.create_task(
            run_on_a_clock(agents, settings.liveness.heartbeat_seconds, Agent.beat), name="nodeagent-fleet-heartbeats"
        ))
        starting.append(asyncio.create_task(
            run_on_a_clock(agents, group.resync_seconds, Agent.resync), name="nodeagent-fleet-resyncs"
        ))
        if group.metrics_period > 0:
            starting.append(asyncio.create_task(
                run_on_a_clock(agents, group.metrics_period, Agent.publish_metrics), name="nodeagent-fleet-metrics"
            ))
        log.info("starting hollow nodes", extra={"count": len(agents), "over_seconds": spread})

    @app.on_shutdown
    async def stop_agents() -> None:
        # Loops and watchers only: the containers stay up for the next agent to adopt.
        await cancel_and_wait(starting)
        await asyncio.gather(*(agent.stop() for agent in agents))
        if fleet is not None:
            await fleet.close()

    @app.after_shutdown
    async def flush_spans() -> None:
        provider.shutdown()

    return app


def parse_args(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Command-line overrides of the ``COMP_NODEAGENT__...`` settings (flags win)."""
    parser = argparse.ArgumentParser(
        prog="comp-nodeagent",
        description="COMP node agent: runs the tasks assigned to this node. "
        "Every setting also comes from the environment (COMP_NODEAGENT__...).",
    )
    parser.add_argument("--driver", help="runtime driver: docker (default) or hollow (simulated, for scale tests)")
    parser.add_argument("--count", type=int, help="agents in this process (hollow driver only); nodes are <node-id>-1 ... <node-id>-N")
    parser.add_argument("--node-id", help="this node's id, or with --count the prefix of the nodes' ids")
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def run(argv: Sequence[str] | None = None) -> None:
    overrides = parse_args(argv)
    try:
        settings = NodeAgentSettings(nodeagent=overrides) if overrides else NodeAgentSettings()
        app = build_app(settings)
    except Exception as exc:
        # Bad settings or no engine to talk to: one clear line rather than a traceback.
        logging.getLogger(SERVICE).error("node agent cannot start: %s", exc)
        sys.exit(1)
    contain_collections(log)
    serve_metrics(settings.metrics)
    asyncio.run(app.run())


if __name__ == "__main__":
    run()
