"""The Docker Engine as a runtime, through the (synchronous) docker SDK.

Every engine call runs in a worker thread of the driver's own pools so the agent's event
loop never waits on the engine; engine events are read by a thread of their own and
handed to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, InvalidVersion, NotFound

from comp_common import labels
from comp_common.aio import within
from comp_common.messages import Capacity, TaskSpec

from .driver import ALIVE_STATES, EventWatch, ExecOutcome, RuntimeTask, StartError
from .metrics import DEFAULT_CGROUP_ROOT, CgroupUsage, Counters, counters_from_engine_stats

log = logging.getLogger(__name__)

# Engine events after which a container of ours may need the agent: it ended or vanished.
_WATCHED_EVENTS = ["die", "destroy"]
_RECONNECT_SECONDS = 1.0
# Engine calls that wait on a container rather than on the engine (a stop waits out the
# grace, an exec its command) run on threads of their own, this many at once.  On the
# default executor (cores + 4 threads) ten 10 s stops would hold up every other engine
# call, and stops beyond the thread count would wait for a whole grace each.
WAIT_THREADS = 64
# Engine threads beyond the agent's parallelism: a listing and an address lookup for a
# health check, beside a full set of starts.
SPARE_ENGINE_THREADS = 2
# The most of an exec check's output kept: enough for its detail line.
EXEC_OUTPUT_LIMIT = 4096
# Name prefix of an ended container set aside for removal (see DockerDriver.set_aside).
SET_ASIDE_PREFIX = "comp-ended-"

T = TypeVar("T")


def container_name(cluster: str, task_id: str) -> str:
    # Docker names allow [a-zA-Z0-9][a-zA-Z0-9_.-]*; task ids are DNS-ish already.
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"comp-{cluster}-{task_id}")


class DockerDriver:
    name = "docker"

    def __init__(
        self,
        cluster: str,
        node_id: str,
        max_concurrency: int = 8,
        client: docker.DockerClient | None = None,
        cgroup_root: str | Path = DEFAULT_CGROUP_ROOT,
    ):
        self.cluster = cluster
        self.node_id = node_id
        # One pooled connection per engine thread and per waiting thread: a call never waits
        # for a connection.
        self._client = client or docker.from_env(max_pool_size=max_concurrency + SPARE_ENGINE_THREADS + WAIT_THREADS)
        # Not the loop's default executor: that has cores + 4 threads (6 on a 2-core host),
        # fewer than the agent's parallelism, so there the 7th and 8th start of a deploy
        # waited for a thread while holding an engine slot.
        self._engine = ThreadPoolExecutor(
            max_workers=max_concurrency + SPARE_ENGINE_THREADS, thread_name_prefix="docker-engine"
        )
        self._waits = ThreadPoolExecutor(max_workers=WAIT_THREADS, thread_name_prefix="docker-wait")
        # container id -> its address on its network; fixed for the container's life.
        self._addresses: dict[str, str] = {}
        self._label_filter = [f"{labels.CLUSTER}={cluster}", f"{labels.NODE}={node_id}"]
        # Containers an engine event said died or vanished.  The engine's container listing
        # lags its events (it can still say "running" just after "die"), so these are
        # inspected, which is exact, until a listing agrees.
        self._ended_by_event: set[str] = set()
        self._ended_lock = threading.Lock()
        self._cgroups = CgroupUsage(Path(cgroup_root))
        # Until the engine refuses it: one-shot stats need API 1.41 (Docker 20.10).
        self._one_shot_stats = True

    # ---- RuntimeDriver -----------------------------------------------------------------
    async def capacity(self) -> Capacity:
        info = await self._call(self._client.info)
        return Capacity(cpu=float(info["NCPU"]), memory=int(info["MemTotal"]))

    async def list_tasks(self) -> list[RuntimeTask]:
        return await self._call(self._list_tasks)

    async def start(self, task: TaskSpec) -> RuntimeTask:
        return await self._call(self._start, task)

    async def stop(self, runtime_task: RuntimeTask, grace_seconds: float | None) -> None:
        await asyncio.get_running_loop().run_in_executor(self._waits, self._stop, runtime_task.container_id, grace_seconds)

    async def remove(self, runtime_task: RuntimeTask) -> None:
        self._addresses.pop(runtime_task.container_id, None)
        await self._call(self._remove, runtime_task.container_id)

    async def set_aside(self, runtime_task: RuntimeTask) -> None:
        """Free the task's container name for its next container at once.

        A rename is metadata only (~10 ms here); a removal deletes the container's
        filesystem (~100 ms), time a restart need not wait for: the agent removes the
        set-aside container while the new one starts."""
        try:
            await self._call(self._client.api.rename, runtime_task.container_id, _set_aside_name(runtime_task.container_id))
        except NotFound:
            pass

    async def probe_target(self, container_id: str) -> str | None:
        address = self._addresses.get(container_id)
        if address is None:
            try:
                attrs = await self._call(self._client.api.inspect_container, container_id)
            except NotFound:
                return None
            address = _container_address(attrs)
            if address is not None and attrs["State"].get("Running"):
                self._addresses[container_id] = address
        return address

    async def exec_check(self, container_id: str, command: Sequence[str], timeout: float) -> ExecOutcome:
        run = _Exec(self._client, container_id, list(command))
        future = asyncio.get_running_loop().run_in_executor(self._waits, run.run)
        try:
            return await within(asyncio.shield(future), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            # Closing the stream ends the thread's read at once.  The command itself runs on
            # in the container (the engine has no way to end an exec), as with Kubernetes.
            run.cancel()
            return ExecOutcome(None, f"no exit within {timeout:g}s")

    async def usage(self, container_ids: Collection[str]) -> dict[str, Counters]:
        """From the containers' cgroup files, or the engine's one-shot stats for those not
        found there (the agent in a cgroup namespace of its own, an unknown layout): all at
        once, as each may wait up to a second for the engine's collector.

        On the waiting threads, not the engine's: a deploy's starts may hold every engine
        thread, and a metrics sample should not queue behind them."""
        loop = asyncio.get_running_loop()
        counters, elsewhere = await loop.run_in_executor(self._waits, self._cgroups.read, list(container_ids))
        if elsewhere:
            from_engine = await asyncio.gather(
                *(loop.run_in_executor(self._waits, self._engine_counters, container_id) for container_id in elsewhere)
            )
            counters.update((cid, found) for cid, found in zip(elsewhere, from_engine) if found is not None)
        return counters

    def _engine_counters(self, container_id: str) -> Counters | None:
        try:
            if self._one_shot_stats:
                try:
                    stats = self._client.api.stats(container_id, stream=False, one_shot=True)
                except InvalidVersion:
                    self._one_shot_stats = False
            if not self._one_shot_stats:
                # An older engine samples twice, a second apart: slow, but it is all there is.
                stats = self._client.api.stats(container_id, stream=False)
        except NotFound:
            return None
        except DockerException as exc:
            log.warning("could not read container stats", extra={"container_id": container_id, "error": str(exc)})
            return None
        return counters_from_engine_stats(stats)

    async def watch(self, on_event: Callable[[str | None], None]) -> EventWatch:
        watch = _DockerEventWatch(
            client_factory=docker.from_env,
            filters={"type": "container", "event": _WATCHED_EVENTS, "label": self._label_filter},
            loop=asyncio.get_running_loop(),
            on_event=on_event,
            note_ended=self._note_ended,
        )
        watch.start()
        return watch

    async def close(self) -> None:
        self._waits.shutdown(wait=False, cancel_futures=True)
        await self._call(self._client.close)
        self._engine.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        # The caller's context goes along, as with asyncio.to_thread: a span open around the
        # call stays the current one in the thread.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._engine, functools.partial(context.run, fn, *args))

    # ---- listing -----------------------------------------------------------------------
    def _list_tasks(self) -> list[RuntimeTask]:
        # The summary listing costs one call for all containers; only ended ones are
        # inspected, for the exit code and run times the summary lacks.
        out: list[RuntimeTask] = []
        with self._ended_lock:
            ended_by_event = set(self._ended_by_event)
        for summary in self._client.api.containers(all=True, filters={"label": self._label_filter}):
            container_labels = summary.get("Labels") or {}
            task_id = container_labels.get(labels.TASK_ID)
            if not task_id:
                continue
            state = summary.get("State", "")
            if any(name.lstrip("/").startswith(SET_ASIDE_PREFIX) for name in summary.get("Names") or []):
                # Set aside by a restart that did not live to remove it: garbage, not a task.
                if state not in ALIVE_STATES:
                    self._waits.submit(self._remove_quietly, summary["Id"])
                    continue
            # A created container never ran: it has no exit code or run times to inspect for.
            # It is also, most often, one whose start is under way, and the engine answers
            # an inspect of it only once the start is done, so the listing would wait for it.
            if (state in ALIVE_STATES or state == "created") and summary["Id"] not in ended_by_event:
                out.append(
                    RuntimeTask(
                        task_id=task_id,
                        container_id=summary["Id"],
                        state=state,
                        spec_hash=container_labels.get(labels.SPEC_HASH, ""),
                        deployment=container_labels.get(labels.DEPLOYMENT, ""),
                        host_ports=_ports_from_summary(summary.get("Ports") or []),
                        started_at=(float(summary.get("Created") or 0) or None) if state != "created" else None,
                    )
                )
                continue
            try:
                attrs = self._client.api.inspect_container(summary["Id"])
            except NotFound:
                continue  # removed since the listing
            out.append(_runtime_task(attrs))
        still_alive = {t.container_id for t in out if t.alive}
        with self._ended_lock:
            # Seen ended or gone by inspection: nothing more to check for those.
            self._ended_by_event -= ended_by_event - still_alive
        return out

    def _note_ended(self, container_id: str) -> None:
        with self._ended_lock:
            self._ended_by_event.add(container_id)

    # ---- starting ----------------------------------------------------------------------
    # The low-level API throughout: one engine call each for create and start, and an
    # inspect only when the engine chose something the agent must report.  The engine is the
    # bottleneck on a small host, so every call saved is a faster deploy.
    def _start(self, task: TaskSpec) -> RuntimeTask:
        container_id, already_running = self._create(task)
        if already_running:
            return _runtime_task(self._client.api.inspect_container(container_id))
        try:
            self._client.api.start(container_id)
        except APIError as exc:
            # e.g. the host port is taken or the entrypoint does not exist
            self._remove(container_id)
            raise StartError(f"container for task {task.task_id} could not start: {_reason(exc)}") from exc
        started_at = time.time()
        if any(port.host_port is None for port in task.ports):
            # A host port the engine picked is known only from the container.
            return _runtime_task(self._client.api.inspect_container(container_id))
        # Everything else reported for a started container is the spec's: its fixed host
        # ports, and a start time that is the engine's answer to the start, as good as its
        # own for a health check's start period.
        return RuntimeTask(
            task_id=task.task_id,
            container_id=container_id,
            state="running",
            spec_hash=task.spec_hash,
            deployment=task.deployment,
            host_ports={f"{p.container_port}/{p.protocol}": p.host_port for p in task.ports if p.host_port is not None},
            started_at=started_at,
        )

    def _pull(self, image: str) -> None:
        try:
            self._client.images.pull(image)
        except DockerException as exc:
            raise StartError(f'image "{image}" is not present locally and could not be pulled: {_reason(exc)}') from exc

    def _create(self, task: TaskSpec) -> tuple[str, bool]:
        """The task's container id, created; or the one already there, if it is this task running."""
        config = self._container_config(task)
        try:
            return self._create_container(config, task), False
        except APIError as exc:
            if exc.status_code != 409:
                raise StartError(f"container for task {task.task_id} could not be created: {_reason(exc)}") from exc
        # The name is taken: by this very task (an earlier start whose result was lost), or
        # by a leftover (another node's copy, a different spec, a dead container).
        try:
            existing = self._client.api.inspect_container(config["name"])
        except NotFound:
            existing = None
        if existing is not None:
            running = existing["State"].get("Status") == "running"
            if running and _carries_labels(existing["Config"].get("Labels") or {}, config["labels"]):
                log.info("adopting existing container", extra={"task_id": task.task_id, "container_id": existing["Id"]})
                return existing["Id"], True
            log.info("replacing leftover container", extra={"task_id": task.task_id, "container_id": existing["Id"]})
            self._remove(existing["Id"])
        try:
            return self._create_container(config, task), False
        except APIError as exc:
            raise StartError(f"container for task {task.task_id} could not be created: {_reason(exc)}") from exc

    def _create_container(self, config: dict[str, Any], task: TaskSpec) -> str:
        # Create first and pull only when the engine says the image is missing: the usual
        # case (image present) then costs no extra call.
        try:
            return self._client.api.create_container(**config)["Id"]
        except ImageNotFound:
            self._pull(task.image)
        except APIError as exc:
            if exc.status_code == 400 and "No such image" in str(exc.explanation or ""):
                self._pull(task.image)
            else:
                raise
        return self._client.api.create_container(**config)["Id"]

    def _container_config(self, task: TaskSpec) -> dict[str, Any]:
        container_labels = {
            **task.labels,
            labels.CLUSTER: self.cluster,
            labels.NODE: self.node_id,
            labels.TASK_ID: task.task_id,
            labels.DEPLOYMENT: task.deployment,
            labels.SPEC_HASH: task.spec_hash,
        }
        host_config = self._client.api.create_host_config(
            nano_cpus=int(task.cpu * 1e9),
            mem_limit=task.memory,
            # None lets the engine pick a free host port.
            port_bindings={f"{p.container_port}/{p.protocol}": p.host_port for p in task.ports},
            # No restart policy: the agent restarts, so that it sees and reports every exit.
        )
        return {
            "image": task.image,
            "name": container_name(self.cluster, task.task_id),
            # Kubernetes meanings: command replaces the image's entrypoint, args its CMD.  The
            # engine drops the image's CMD when the entrypoint is given, as Kubernetes does.
            "entrypoint": task.command,
            "command": task.args,
            "environment": dict(task.env),
            "labels": container_labels,
            "ports": [(p.container_port, p.protocol) for p in task.ports],
            "host_config": host_config,
            "detach": True,
            # Kept with the container, so that a stop with no spec at hand (a container of a
            # task the agent never knew) still uses the task's signal and grace.
            "stop_signal": task.stop_signal,
            "stop_timeout": math.ceil(task.stop_grace_seconds),
        }

    # ---- stopping ----------------------------------------------------------------------
    def _stop(self, container_id: str, grace_seconds: float | None) -> None:
        # The engine sends the container's stop signal, waits the timeout, then SIGKILLs.
        try:
            if grace_seconds is None:
                # Given explicitly: the SDK's HTTP timeout allows for the timeout it is given,
                # not for one the engine reads from the container.
                config = self._client.api.inspect_container(container_id)["Config"]
                grace_seconds = config.get("StopTimeout")
                grace_seconds = 10 if grace_seconds is None else grace_seconds
            self._client.api.stop(container_id, timeout=math.ceil(grace_seconds))
        except NotFound:
            pass

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self._remove(container_id)
        except DockerException as exc:
            log.warning("could not remove a set-aside container", extra={"container_id": container_id, "error": str(exc)})

    def _remove(self, container_id: str) -> None:
        try:
            self._client.api.remove_container(container_id, force=True)
        except NotFound:
            pass
        except APIError as exc:
            # Someone else is already removing it: the end result is the same.
            if exc.status_code != 409:
                raise


class _Exec:
    """One exec check, run on a waiting thread and cancellable from the loop."""

    def __init__(self, client: docker.DockerClient, container_id: str, command: list[str]):
        self._api = client.api
        self._container_id = container_id
        self._command = command
        self._lock = threading.Lock()
        self._cancelled = False
        self._stream: Any = None

    def run(self) -> ExecOutcome:
        # Nothing may escape: after a timeout no one awaits the result any more.
        try:
            return self._run()
        except Exception as exc:
            return ExecOutcome(None, "cancelled" if self._cancelled else f"exec failed: {exc}")

    def _run(self) -> ExecOutcome:
        try:
            exec_id = self._api.exec_create(self._container_id, self._command, stdout=True, stderr=True)["Id"]
            # stream=True: a stream the loop can close, unlike a plain blocking read.
            stream = self._api.exec_start(exec_id, stream=True)
        except NotFound:
            return ExecOutcome(None, "container not found")
        except APIError as exc:
            return ExecOutcome(None, _reason(exc))
        with self._lock:
            self._stream = stream
            cancelled = self._cancelled
        output = bytearray()
        try:
            if not cancelled:
                for chunk in stream:
                    if len(output) < EXEC_OUTPUT_LIMIT:
                        output += chunk[: EXEC_OUTPUT_LIMIT - len(output)]
        finally:
            stream.close()
        if self._cancelled:
            return ExecOutcome(None, "cancelled")
        try:
            exit_code = self._api.exec_inspect(exec_id).get("ExitCode")
        except APIError as exc:
            return ExecOutcome(None, _reason(exc))
        return ExecOutcome(exit_code, output.decode(errors="replace").strip())

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # already closed by the reading thread
                pass


class _DockerEventWatch:
    """Reads the engine's event stream in a daemon thread, reconnecting when it breaks."""

    def __init__(
        self,
        client_factory: Callable[[], docker.DockerClient],
        filters: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[str | None], None],
        note_ended: Callable[[str], None],
    ):
        self._client_factory = client_factory
        self._note_ended = note_ended
        self._filters = filters
        self._loop = loop
        self._on_event = on_event
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # the connection may already be gone
                pass

    def _run(self) -> None:
        while not self._closed.is_set():
            client = None
            try:
                client = self._client_factory()
                stream = client.events(decode=True, filters=self._filters)
                with self._lock:
                    if self._closed.is_set():
                        stream.close()
                        return
                    self._stream = stream
                # Whatever happened while not connected was missed: have the agent re-list.
                self._notify(None)
                for event in stream:
                    actor = event.get("Actor") or {}
                    task_id = (actor.get("Attributes") or {}).get(labels.TASK_ID)
                    container_id = actor.get("ID") or event.get("id")
                    if task_id and container_id:
                        self._note_ended(container_id)
                        self._notify(task_id)
            except Exception as exc:
                if self._loop.is_closed():
                    return  # nobody is listening any more
                # Whatever broke, this thread must live on: it is how deaths are seen at once.
                log.warning("docker event stream failed; reconnecting", extra={"error": str(exc)})
            finally:
                if client is not None:
                    client.close()
            self._closed.wait(_RECONNECT_SECONDS)

    def _notify(self, task_id: str | None) -> None:
        self._loop.call_soon_threadsafe(self._on_event, task_id)


def _carries_labels(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in want.items())


def _reason(exc: Exception) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


def _runtime_task(attrs: Mapping[str, Any]) -> RuntimeTask:
    container_labels = attrs["Config"].get("Labels") or {}
    state = attrs["State"]
    alive = state.get("Status") in ALIVE_STATES
    return RuntimeTask(
        task_id=container_labels.get(labels.TASK_ID, ""),
        container_id=attrs["Id"],
        state=state.get("Status", ""),
        exit_code=None if alive else state.get("ExitCode"),
        spec_hash=container_labels.get(labels.SPEC_HASH, ""),
        deployment=container_labels.get(labels.DEPLOYMENT, ""),
        host_ports=_ports_from_inspect((attrs.get("NetworkSettings") or {}).get("Ports") or {}),
        started_at=_parse_engine_time(state.get("StartedAt")),
        finished_at=None if alive else _parse_engine_time(state.get("FinishedAt")),
    )


def _set_aside_name(container_id: str) -> str:
    return f"{SET_ASIDE_PREFIX}{container_id[:16]}"


def _container_address(attrs: Mapping[str, Any]) -> str | None:
    settings = attrs.get("NetworkSettings") or {}
    for network in (settings.get("Networks") or {}).values():
        if network and network.get("IPAddress"):
            return str(network["IPAddress"])
    return settings.get("IPAddress") or None


def _ports_from_inspect(ports: Mapping[str, list[dict[str, str]] | None]) -> dict[str, int]:
    # {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}, {"HostIp": "::", ...}]}
    out: dict[str, int] = {}
    for key, bindings in ports.items():
        for binding in bindings or []:
            if binding.get("HostPort"):
                out[key] = int(binding["HostPort"])
                break
    return out


def _ports_from_summary(ports: list[dict[str, Any]]) -> dict[str, int]:
    # [{"IP": "0.0.0.0", "PrivatePort": 8080, "PublicPort": 32768, "Type": "tcp"}, ...]
    out: dict[str, int] = {}
    for port in ports:
        if port.get("PublicPort"):
            out.setdefault(f"{port['PrivatePort']}/{port['Type']}", int(port["PublicPort"]))
    return out


def _parse_engine_time(value: str | None) -> float | None:
    """Seconds since the epoch from the engine's RFC 3339 time with nanoseconds; None for its zero time."""
    if not value or value.startswith("0001-"):
        return None
    whole, _, fraction = value.rstrip("Z").partition(".")
    seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    digits = re.match(r"\d*", fraction).group(0)  # type: ignore[union-attr]
    return seconds + (float(f"0.{digits}") if digits else 0.0)
