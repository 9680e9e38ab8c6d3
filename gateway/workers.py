"""The gateway as several worker processes sharing one port (``SO_REUSEPORT``).

One Python process proxies on one core. ``gateway_workers: N`` (``autoscaler run
--gateway-workers``, ``autoscaler gateway --workers``) runs the data path in ``N``
processes instead, each a whole :class:`gateway.app.Gateway` bound to the same
``host:port`` with ``SO_REUSEPORT``: the kernel spreads incoming connections over them.
Each worker reads routes and keys from the store (its own change-log cursor,
``gateway.route_feed``), balances its own share of the traffic, and sends a replica at
most its share of the replica's cap (``gateway.window.worker_share``); async jobs and
batches live in the store, claimed row by row, so workers share them as separate
gateways do.

**The parent** (:class:`WorkerPool`) reserves the port (a bound, never listening
``SO_REUSEPORT`` socket, so a port of 0 picks one port for all and no other program takes
it between restarts), starts the workers (``python -m gateway.workers INDEX``, the
:class:`WorkerPlan` on the first line of their stdin) and waits until each serves. It
then keeps their stdin open: a line ``change`` is the management API's "reload now", and
end of file means the parent is gone, so a worker never outlives it, even one killed
with SIGKILL. A worker's stdout carries its events to the parent, one JSON object a
line: ready, and demand for a workload with no ready replica (which wakes the
controller at once). On SIGTERM the parent sends SIGTERM to every worker, which stops
accepting and lets requests in flight finish (:data:`STOP_GRACE_SEC`, then SIGKILL). A
worker that dies (a non-zero exit status, or killed by a signal it does not handle) is
logged with its status and started again after a backoff; more than
:data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW_SEC` and the pool gives up:
:meth:`WorkerPool.run` raises and the service stops, rather than serve on with a worker
that cannot stay up. A worker that stops cleanly (status 0) was told to by SIGTERM or
SIGINT sent to the whole process group or cgroup (Ctrl-C, systemd's stop), which stops
the parent too: it is not restarted, and when none is left running the pool gives up
as well.

**Signals and metrics.** Each worker also answers on a private Unix socket (in a
directory only its user can enter): ``GET /window``, its own signals as
``GET /internal/signals`` words them, and ``GET /metrics``, its own registry.
:class:`Peers` reads every worker's socket and merges: signals per workload by
``gateway.window.merge_views`` (counts summed, raw TTFT samples merged, so a percentile
is taken over every request), metrics by summing each series (:func:`merge_metrics`).
The controller in ``autoscaler run`` reads the pool's :meth:`WorkerPool.signals`; a
controller apart reads ``GET /internal/signals`` on the shared port, and whichever worker
answers it answers for all. A worker that does not answer (one restarting) is left out
of that read, logged, and named in the read's ``incomplete``
(``gateway.window.SignalsView``), so the controller counts no replica idle on it; the
next read has it again. Merged counters stay monotonic across a worker's death
(:class:`MetricsMerge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.app import Gateway, GatewaySettings, signals_from_json, signals_json
from gateway.routes import WorkloadRef
from gateway.window import SignalsView, merge_views

log = logging.getLogger("gateway.workers")  # also when run as __main__

MAX_RESTARTS = 5
"""Deaths of one worker within :data:`RESTART_WINDOW_SEC` that are restarted; one more
and the pool gives up."""
RESTART_WINDOW_SEC = 60.0
RESTART_BACKOFF_SEC = (0.5, 1.0, 2.0, 4.0, 8.0)
"""The wait before restarting a worker after its 1st, 2nd, … death in the window."""
READY_TIMEOUT_SEC = 60.0
"""How long a worker may take to start serving (imports, the first route load)."""
STOP_GRACE_SEC = 6.0
"""After SIGTERM, how long workers get to finish requests in flight before SIGKILL."""
PEER_TIMEOUT_SEC = 5.0
"""How long a read of one worker's control socket may take."""
INCARNATION_HEADER = "X-Gateway-Worker"
"""The header of a worker's control answers naming its process (pid and start time):
a new name in a slot is a new process, whose counters start from zero."""

Workers = int | Literal["auto"]


def resolve_workers(value: Workers, *, cpus: int | None = None) -> int:
    """How many worker processes ``value`` means: a count, or ``"auto"``: one per core."""
    if value == "auto":
        return max(1, cpus if cpus is not None else (os.cpu_count() or 1))
    if value < 1:
        raise ValueError(f"gateway workers {value}: expected at least 1, or 'auto'")
    return value


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What every worker is told at start: where to serve, the store, the settings."""

    database_url: str
    host: str
    port: int
    workers: int
    control_dir: str
    """The directory of the workers' control sockets (``worker-INDEX.sock``)."""
    data_dir: str | None
    """Where the store's sealing key file lives (SQLite in ``autoscaler run``); ``None``:
    the key comes from the environment, as for a gateway apart."""
    settings: GatewaySettings
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"

    def socket_of(self, index: int) -> str:
        return control_socket(self.control_dir, index)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["settings"]["cold_start_timeouts"] = dict(self.settings.cold_start_timeouts)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> WorkerPlan:
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(GatewaySettings)}
        settings = GatewaySettings(**{k: v for k, v in data.pop("settings").items() if k in fields})
        return cls(settings=settings, **data)


def control_socket(control_dir: str, index: int) -> str:
    return str(Path(control_dir) / f"worker-{index}.sock")


# -- reading the workers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """One worker's answer on its control socket: the body, and which process it is."""

    body: bytes
    incarnation: str


class Peers:
    """Every worker's control socket, read as one gateway (``gateway.app.Cluster``)."""

    def __init__(self, sockets: Sequence[str], *, timeout_sec: float = PEER_TIMEOUT_SEC) -> None:
        self._sockets = tuple(sockets)
        self._timeout = timeout_sec
        self._totals = MetricsMerge(len(self._sockets))

    async def signals(self) -> SignalsView:
        """Every answering worker's signals, merged per workload; the workers that did
        not answer are named in ``incomplete`` (their requests are in no count)."""
        answers = await self._read_all("/window")
        merged = merge_views(
            signals_from_json(a.body).snapshots.values() for a in answers if a is not None
        )
        missing = [index for index, a in enumerate(answers) if a is None]
        return SignalsView(merged, incomplete=missing_text(missing, len(self._sockets)))

    async def metrics(self) -> bytes:
        """Every worker's metrics, summed, with counters kept monotonic across a
        worker's death (:class:`MetricsMerge`)."""
        answers = await self._read_all("/metrics")
        return self._totals.merge(
            [None if a is None else (a.incarnation, a.body.decode()) for a in answers]
        )

    async def _read_all(self, path: str) -> list[_Answer | None]:
        """Each worker's answer, by index (``None``: it did not answer)."""
        return list(await asyncio.gather(*(self._read(sock, path) for sock in self._sockets)))

    async def _read(self, path_of_socket: str, path: str) -> _Answer | None:
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=path_of_socket),
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as http,
                http.get(f"http://worker{path}") as response,
            ):
                response.raise_for_status()
                body = await response.read()
                return _Answer(body, response.headers.get(INCARNATION_HEADER, ""))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("gateway worker at %s did not answer %s: %s", path_of_socket, path, exc)
            return None


def missing_text(missing: Sequence[int], workers: int) -> str | None:
    """What a read of ``workers`` missed, the workers by index as the pool logs them
    (``None``: nothing)."""
    if not missing:
        return None
    which = ", ".join(str(i) for i in missing)
    return f"{len(missing)} of {workers} gateway workers did not answer (worker {which})"


_Key = tuple[str, tuple[tuple[str, str], ...]]
"""A series: its sample name and sorted labels."""


class MetricsMerge:
    """The workers' metrics summed (:func:`merge_metrics`), with every counter (counters,
    histogram buckets, counts and sums) monotonic across a worker's death.

    A worker that dies takes its counters with it, and the one started in its slot
    counts from zero: summed as they are, the totals would drop, which a scraper takes
    for a counter reset (a ``rate()`` over it is wrong). So this keeps, per slot, the
    totals of its last answer and which process gave them (:data:`INCARNATION_HEADER`):
    when a new process answers in the slot, the old one's last totals are added for
    good, and the new one's count on from there; a worker that does not answer counts
    at its last totals. What a dead worker counted after the last read is lost (the
    totals stay monotonic, and low by that much); gauges (requests in flight, queue
    depth) are the live workers' only.

    The memory is this reader's: the service's parent, which outlives its workers,
    keeps it for the whole run; a worker answering ``/metrics`` on the shared port
    carries the restarts it has seen since its own start."""

    def __init__(self, slots: int) -> None:
        self._families: dict[str, Metric] = {}
        self._last: list[tuple[str | None, dict[_Key, float]]] = [(None, {})] * slots
        self._retired: list[dict[_Key, float]] = [{} for _ in range(slots)]

    def merge(self, answers: Sequence[tuple[str, str] | None]) -> bytes:
        """``answers[slot]``: the worker's process name and its metrics text, ``None``
        when it did not answer."""
        parsed: list[list[Metric]] = []
        carried: dict[_Key, float] = {}
        for slot, answer in enumerate(answers):
            incarnation, last = self._last[slot]
            if answer is None:
                _add(carried, last)
            else:
                families = list(text_string_to_metric_families(answer[1]))
                parsed.append(families)
                for family in families:
                    self._families.setdefault(family.name, _shell(family))
                if incarnation is not None and incarnation != answer[0]:
                    _add(self._retired[slot], last)  # a new process: the old one's for good
                self._last[slot] = (answer[0], _totals(families))
            _add(carried, self._retired[slot])
        return _merged(parsed, carried=carried, known=self._families)


def _add(into: dict[_Key, float], values: Mapping[_Key, float]) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + value


def _shell(family: Metric) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


def _totals(families: Iterable[Metric]) -> dict[_Key, float]:
    """The counting series of ``families``: what only grows while the process lives."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        if family.type in _COUNTING
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


_COUNTING = frozenset({"counter", "histogram", "summary"})


def merge_metrics(texts: Iterable[str]) -> bytes:
    """Several processes' metrics (Prometheus text) as one: each series' values summed
    (counters, histogram buckets, counts and sums, in-flight gauges), except a gauge every
    process reads from the store (the async queue depth), taken once; the creation time
    of a series is the earliest. (Summed as they are: :class:`MetricsMerge` keeps the
    counters of processes that died.)"""
    return _merged([list(text_string_to_metric_families(text)) for text in texts])


def _merged(
    parsed: Iterable[Iterable[Metric]],
    *,
    carried: Mapping[_Key, float] | None = None,
    known: Mapping[str, Metric] | None = None,
) -> bytes:
    """``parsed`` processes' families summed as :func:`merge_metrics` says, plus the
    ``carried`` totals of processes gone (their families in ``known``)."""
    families: dict[str, Metric] = {}
    values: dict[_Key, float] = {}
    for process in parsed:
        for family in process:
            families.setdefault(family.name, family)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                elif sample.name.endswith("_created"):
                    values[key] = min(values[key], sample.value)
                elif family.name in _READ_FROM_STORE:
                    values[key] = max(values[key], sample.value)
                else:
                    values[key] += sample.value
    for key, value in (carried or {}).items():
        values[key] = values.get(key, 0.0) + value
    for name, family in (known or {}).items():
        families.setdefault(name, family)
    merged = {
        name: Metric(name, family.documentation, family.type, family.unit)
        for name, family in families.items()
    }
    for (sample_name, labels), value in values.items():
        merged[_family_of(sample_name, families)].samples.append(
            Sample(sample_name, dict(labels), value)
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(merged.values())))
    return generate_latest(registry)


_READ_FROM_STORE = frozenset({"autoscaler_gateway_async_queue_depth"})
_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum")


def _family_of(sample_name: str, families: dict[str, Metric]) -> str:
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return sample_name


class _Fixed:
    """A collector of metric families already gathered."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# -- the parent ---------------------------------------------------------------------------


class WorkerPoolFailed(RuntimeError):
    """A worker kept dying: more than :data:`MAX_RESTARTS` deaths within the window."""


@dataclass(slots=True)
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    deaths: list[float] = dataclasses.field(default_factory=list)
    starts: int = 0


class WorkerPool:
    """Starts, watches, restarts and stops the worker processes (see the module doc)."""

    def __init__(
        self,
        *,
        database_url: str,
        workers: int,
        settings: GatewaySettings | None = None,
        data_dir: Path | None = None,
        on_demand: Callable[[WorkloadRef], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers {workers}: expected at least 1")
        self._database_url = database_url
        self._settings = dataclasses.replace(settings or GatewaySettings(), workers=workers)
        self._data_dir = data_dir
        self._on_demand = on_demand
        self._clock = clock
        self._slots = [_Slot(i) for i in range(workers)]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._reserved: socket.socket | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._failed: asyncio.Future[None] | None = None
        self._started = asyncio.Condition()
        self._stopping = False
        self._plan: WorkerPlan | None = None
        self.port: int | None = None
        self.peers: Peers | None = None

    @property
    def workers(self) -> int:
        return len(self._slots)

    @property
    def control_dir(self) -> str | None:
        """Where the workers' control sockets are (``None`` before start)."""
        return None if self._tmp is None else self._tmp.name

    def pids(self) -> list[int]:
        """The running workers' process ids, by index (0: none running in that slot)."""
        return [
            s.proc.pid if s.proc is not None and s.proc.returncode is None else 0
            for s in self._slots
        ]

    def starts(self) -> int:
        """Worker processes started so far (restarts included)."""
        return sum(s.starts for s in self._slots)

    async def start(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        """Reserve ``host:port`` and start every worker; return once all serve."""
        self._failed = asyncio.get_running_loop().create_future()
        self._reserved = _reserve(host, port)
        self.port = int(self._reserved.getsockname()[1])
        self._tmp = tempfile.TemporaryDirectory(prefix="autoscaler-gateway-")
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        self._plan = WorkerPlan(
            database_url=self._database_url,
            host=host,
            port=self.port,
            workers=self.workers,
            control_dir=self._tmp.name,
            data_dir=None if self._data_dir is None else str(self._data_dir),
            settings=self._settings,
            log_level=level if level in ("debug", "info", "warning", "error") else "info",
            log_format=_log_format(),
        )
        self.peers = Peers([self._plan.socket_of(i) for i in range(self.workers)])
        try:
            await asyncio.gather(*(self._spawn(slot) for slot in self._slots))
        except BaseException:
            await self.stop()
            raise
        self._watchers = [asyncio.create_task(self._watch(slot)) for slot in self._slots]

    async def run(self) -> None:
        """Until the pool gives up on a worker: then raise :class:`WorkerPoolFailed`."""
        assert self._failed is not None, "start() first"
        await asyncio.shield(self._failed)

    async def wait_started(self, count: int) -> None:
        """Until ``count`` worker processes have been started in all (restarts count)."""
        async with self._started:
            await self._started.wait_for(lambda: self.starts() >= count)

    def notify_change(self) -> None:
        """The store changed: every worker reloads its routes now."""
        for slot in self._slots:
            proc = slot.proc
            if proc is not None and proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    proc.stdin.write(b"change\n")

    async def signals(self) -> SignalsView:
        """Every worker's signals, merged per workload, and which did not answer."""
        assert self.peers is not None, "start() first"
        return await self.peers.signals()

    async def metrics(self) -> bytes:
        """Every worker's metrics, summed."""
        assert self.peers is not None, "start() first"
        return await self.peers.metrics()

    async def stop(self) -> None:
        """SIGTERM every worker, give them :data:`STOP_GRACE_SEC` to drain, then SIGKILL."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        procs = [s.proc for s in self._slots if s.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(proc.wait()) for proc in procs]
        if waits:
            await asyncio.wait(waits, timeout=STOP_GRACE_SEC)
            for proc in procs:
                if proc.returncode is None:
                    log.warning("gateway worker %d did not stop in time: killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*waits, return_exceptions=True)
        for slot in self._slots:
            if slot.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.reader
            if slot.proc is not None and slot.proc.stdin is not None:
                slot.proc.stdin.close()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- one slot ----------------------------------------------------------------------

    async def _spawn(self, slot: _Slot) -> None:
        assert self._plan is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.workers",
            str(slot.index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        slot.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(self._plan.to_json().encode() + b"\n")
        try:
            async with asyncio.timeout(READY_TIMEOUT_SEC):
                event = await _next_event(proc.stdout)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(
                f"gateway worker {slot.index} did not start serving within {READY_TIMEOUT_SEC:g}s"
            ) from None
        if event is None or event.get("event") != "ready":
            await proc.wait()
            raise RuntimeError(
                f"gateway worker {slot.index} exited with {proc.returncode} before serving"
            )
        slot.reader = asyncio.create_task(self._read_events(proc.stdout))
        async with self._started:
            slot.starts += 1
            self._started.notify_all()
        log.info("gateway worker %d serving (pid %d)", slot.index, proc.pid)

    async def _read_events(self, stdout: asyncio.StreamReader) -> None:
        while (event := await _next_event(stdout)) is not None:
            if event.get("event") == "demand" and self._on_demand is not None:
                self._on_demand((str(event["project"]), str(event["workload"])))

    async def _watch(self, slot: _Slot) -> None:
        """Restart the worker in ``slot`` each time it dies, within the restart bound."""
        while True:
            assert slot.proc is not None
            code = await slot.proc.wait()
            if self._stopping:
                return
            if code == 0:
                # A worker stops cleanly only when told to: SIGTERM or SIGINT sent to the
                # whole group (Ctrl-C, systemd's stop), where the parent stops as well.
                log.info("gateway worker %d stopped on a signal: not restarting", slot.index)
                if not any(self.pids()):
                    self._fail(slot, code)
                return
            now = self._clock()
            slot.deaths = [t for t in slot.deaths if now - t < RESTART_WINDOW_SEC] + [now]
            if len(slot.deaths) > MAX_RESTARTS:
                log.error(
                    "gateway worker %d died %d times within %gs (last exit status %s): giving up",
                    slot.index,
                    len(slot.deaths),
                    RESTART_WINDOW_SEC,
                    code,
                )
                self._fail(slot, code)
                return
            backoff = RESTART_BACKOFF_SEC[min(len(slot.deaths), len(RESTART_BACKOFF_SEC)) - 1]
            log.error(
                "gateway worker %d (pid %d) exited with status %s: restarting in %gs",
                slot.index,
                slot.proc.pid,
                code,
                backoff,
            )
            await asyncio.sleep(backoff)
            try:
                await self._spawn(slot)
            except RuntimeError as exc:
                log.error("%s", exc)  # counted as a death at the next turn

    def _fail(self, slot: _Slot, code: int | None) -> None:
        if self._failed is not None and not self._failed.done():
            why = (
                "no gateway worker is left running"
                if code == 0
                else f"gateway worker {slot.index} died {len(slot.deaths)} times within "
                f"{RESTART_WINDOW_SEC:g}s (last exit status {code})"
            )
            self._failed.set_exception(WorkerPoolFailed(why))


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` that never listens: it holds
    the port (and picks it when ``port`` is 0) for the workers, and takes no connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host, port))
    except BaseException:
        reserved.close()
        raise
    return reserved


async def _next_event(stdout: asyncio.StreamReader) -> dict[str, object] | None:
    """The worker's next event line, ``None`` at end of file (the worker is gone)."""
    while line := await stdout.readline():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                return event
    return None


def _log_format() -> Literal["text", "json"]:
    from autoscaler.logs import JsonFormatter

    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"


# -- the worker ---------------------------------------------------------------------------


def _say(event: dict[str, object]) -> None:
    """Tell the parent ``event`` (one line on stdout, written whole)."""
    with contextlib.suppress(OSError):
        os.write(1, json.dumps(event).encode() + b"\n")


class _DemandRelay:
    """Tells the parent of demand for a workload at zero, once a second at most per
    workload: the controller's wake-up coalesces the rest, and a burst held at zero
    would otherwise be a line per request."""

    def __init__(self, interval_sec: float = 1.0) -> None:
        self._interval = interval_sec
        self._said: dict[WorkloadRef, float] = {}

    def __call__(self, ref: WorkloadRef) -> None:
        now = time.monotonic()
        if now - self._said.get(ref, float("-inf")) >= self._interval:
            self._said[ref] = now
            _say({"event": "demand", "project": ref[0], "workload": ref[1]})


async def serve_worker(plan: WorkerPlan, index: int) -> None:
    """One worker: the gateway on the shared port, its control socket, until SIGTERM,
    SIGINT or the end of stdin (the parent is gone)."""
    from autoscaler.store import sealed
    from autoscaler.store.db import open_store, session_factory

    sealed.configure_from_environment(None if plan.data_dir is None else Path(plan.data_dir))
    async with open_store(plan.database_url) as engine:
        peers = Peers([plan.socket_of(i) for i in range(plan.workers)])
        gateway = Gateway(
            sessions=session_factory(engine),
            settings=plan.settings,
            on_demand=_DemandRelay(),
            cluster=peers,
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await gateway.start(plan.host, plan.port, reuse_port=True)
        control = web.AppRunner(_control_app(gateway), access_log=None)
        await control.setup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(plan.socket_of(index))  # left by this slot's previous worker
        await web.UnixSite(control, plan.socket_of(index)).start()
        listener = asyncio.create_task(_listen_to_parent(gateway, stopping))
        _say({"event": "ready", "pid": os.getpid()})
        try:
            await stopping.wait()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await gateway.stop()
            await control.cleanup()


def _control_app(gateway: Gateway) -> web.Application:
    incarnation = f"{os.getpid()}-{time.time_ns()}"

    async def window(_request: web.Request) -> web.Response:
        return web.json_response(
            signals_json(gateway.signals().values()), headers={INCARNATION_HEADER: incarnation}
        )

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(gateway.metrics.registry),
            headers={INCARNATION_HEADER: incarnation},
        )

    app = web.Application()
    app.router.add_get("/window", window)
    app.router.add_get("/metrics", metrics)
    return app


async def _listen_to_parent(gateway: Gateway, stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    # Unbuffered, so nothing past a line is taken from the pipe; the loop reads it.
    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    try:
        while line := await reader.readline():
            if line.strip() == b"change":
                gateway.notify_change()
        log.info("gateway worker: the parent is gone; stopping")
        stopping.set()
    finally:
        transport.close()


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read a byte at a time: a buffered read could take the
    parent's next lines too, which the event loop reads from the same pipe later."""
    line = bytearray()
    while (byte := os.read(fd, 1)) and byte != b"\n":
        line += byte
    return bytes(line)


def main(argv: Sequence[str]) -> None:
    from autoscaler.logs import configure_logging
    from autoscaler.uvloop import run_async

    index = int(argv[0])
    plan = WorkerPlan.from_json(_read_line(0).decode())
    os.umask(0o077)
    configure_logging(level=plan.log_level, fmt=plan.log_format)
    run_async(serve_worker(plan, index))
    # Everything is closed: skip the interpreter's teardown (a second or more of module
    # cleanup on a busy machine), which only delays the parent's stop.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
