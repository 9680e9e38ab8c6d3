"""The gateway process: routes, the store refresh loop, job workers, metrics.

``Gateway(sessions=…)`` runs inside ``autoscaler run`` (the management API calls
``notify_change()`` on every change, the controller reads ``signals()``), and
``serve_gateway()`` runs it alone (``autoscaler gateway``) against a shared database,
where the controller reads ``GET /internal/signals`` with an admin token instead. Either
may run the gateway as several worker processes sharing its port (``gateway.workers``);
each worker then answers ``/internal/signals`` and ``/metrics`` for all of them
(a :class:`Cluster`).

Routes (all under ``/endpoint/{project}/{workload}/v1/``): ``chat/completions``,
``completions``, ``embeddings``, ``images/generations``, ``audio/speech``,
``audio/transcriptions`` are proxied; ``models`` is answered from the spec (no replica
needed, so it never wakes a workload); ``jobs`` and ``jobs/{id}`` are async jobs;
``files…`` and ``batches…`` are OpenAI's Files and Batches API (``gateway.batches``).
``/metrics`` and ``/internal/signals`` answer only an admin token: their series and
signals name every project and workload (``autoscaler run`` serves the same metrics on
the management port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.spec import EndpointType
from autoscaler.store import sealed
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Workload
from gateway import batches, jobs
from gateway.auth import authorize, bearer_secret, digest, is_admin
from gateway.dispatch import Dispatcher, DispatchLimits
from gateway.errors import GatewayError, error_response
from gateway.proxy import Forwarder, ProxyLimits
from gateway.route_feed import RouteFeed
from gateway.routes import (
    RouteTable,
    WorkloadRef,
    WorkloadRoute,
    knows_data_key,
    load_keys,
    load_route_table,
    load_routes,
)
from gateway.signals import Metrics, Signals
from gateway.upstream import UpstreamPool
from gateway.window import (
    COLD_START_TIMEOUT_SEC,
    QUEUE_TIMEOUT_SEC,
    REPLICA_CONCURRENCY_CAP,
    SIGNAL_WINDOW_SEC,
    SignalSnapshot,
    SignalsView,
    gateway_cap,
    replica_cap,
)

log = logging.getLogger(__name__)

PROXIED_ROUTES = frozenset(
    {
        "chat/completions",
        "completions",
        "embeddings",
        "images/generations",
        "audio/speech",
        "audio/transcriptions",
    }
)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Limits and timings. Durations are seconds; sizes are bytes."""

    refresh_interval_sec: float = 1.0
    #: A refresh reloads only the workloads the change log names (``gateway.route_feed``);
    #: the whole table is read again this often all the same, as a safety net.
    route_resync_sec: float = 120.0
    #: How long a request to a workload with no ready replica is held (GPU boot time).
    cold_start_timeout_sec: float = COLD_START_TIMEOUT_SEC
    #: Per-workload overrides of the cold-start deadline, keyed ``"project/slug"``.
    cold_start_timeouts: Mapping[str, float] = field(default_factory=dict)
    cold_start_retry_after_sec: float = 30.0
    queue_timeout_sec: float = QUEUE_TIMEOUT_SEC
    max_queued_per_workload: int = 1000
    replica_concurrency_cap: int = REPLICA_CONCURRENCY_CAP
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    idle_timeout_sec: float = 300.0
    keepalive_timeout_sec: float = 75.0
    connect_timeout_sec: float = 5.0
    refused_cooldown_sec: float = 2.0
    signal_window_sec: float = SIGNAL_WINDOW_SEC
    #: The most async jobs this gateway runs at once (over all workloads); each also
    #: needs a replica with room under its workload's per-replica cap.
    job_workers: int = 256
    job_poll_interval_sec: float = 1.0
    job_timeout_sec: float = 900.0
    #: Normal traffic updates ``workloads.last_request_at`` at most this often.
    last_request_write_interval_sec: float = 10.0
    #: Worker processes serving this gateway's port (``gateway.workers``): each sends a
    #: replica at most its share of the replica's cap (``gateway.window.worker_share``).
    workers: int = 1

    def cold_start_deadline(self, ref: WorkloadRef) -> float:
        return self.cold_start_timeouts.get(f"{ref[0]}/{ref[1]}", self.cold_start_timeout_sec)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Cluster(Protocol):
    """The gateway processes that share a port, seen as one (``gateway.workers.Peers``):
    what ``/internal/signals`` and ``/metrics`` answer when there are several."""

    async def signals(self) -> SignalsView:
        """Every process's signals, merged per workload, and which processes did not
        answer (``SignalsView.incomplete``)."""
        ...

    async def metrics(self) -> bytes:
        """Every process's metrics, summed, in Prometheus's text format."""
        ...


class Gateway:
    """The OpenAI-compatible data plane over the store's routes and keys."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: GatewaySettings | None = None,
        on_demand: Callable[[WorkloadRef], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings or GatewaySettings()
        self._sessions = sessions
        self._cluster = cluster
        self._on_demand = on_demand
        self._wall_clock = wall_clock
        self._table = RouteTable()
        self._feed = RouteFeed(resync_sec=self.settings.route_resync_sec)
        self.full_reloads = 0
        """Reloads that read the whole table (the first, resyncs, and where the change log
        could not say what changed); the rest read only what changed."""
        self.metrics = Metrics()
        self._signals = Signals(
            window_sec=self.settings.signal_window_sec,
            metrics=self.metrics,
            concurrency_cap=gateway_cap(
                self.settings.replica_concurrency_cap, self.settings.workers
            ),
        )
        s = self.settings
        self._dispatcher = Dispatcher(
            limits=DispatchLimits(
                replica_concurrency_cap=s.replica_concurrency_cap,
                max_queued_per_workload=s.max_queued_per_workload,
                queue_timeout_sec=s.queue_timeout_sec,
                cold_start_timeout_sec=s.cold_start_deadline,
                cold_start_retry_after_sec=s.cold_start_retry_after_sec,
                refused_cooldown_sec=s.refused_cooldown_sec,
                workers=s.workers,
            ),
            signals=self._signals,
            on_cold_start=self._cold_start,
            rng=rng,
        )
        self._changed: asyncio.Event | None = None
        self._client: aiohttp.ClientSession | None = None
        self._upstream: UpstreamPool | None = None
        self._forwarder: Forwarder | None = None
        self._jobs: jobs.JobRunner | None = None
        self._runner: web.AppRunner | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._written_last_request: dict[WorkloadRef, float] = {}
        self._queue_depths: dict[WorkloadRef, int] = {}
        self._requeued_at = float("-inf")
        self._refreshes = 0
        self._refresh_lock = asyncio.Lock()
        self.port: int | None = None

    # -- public interface ----------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 8000, *, reuse_port: bool = False
    ) -> None:
        """Load routes, start serving on ``host:port`` (0 picks a free port; see ``port``);
        ``reuse_port``: share the port with other processes (``SO_REUSEPORT``)."""
        self._changed = asyncio.Event()
        await self.refresh()
        s = self.settings
        self._client = aiohttp.ClientSession(  # jobs' requests; live ones use the pool below
            # A keep-alive pool per replica, unbounded here: the dispatcher caps requests.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            # Bodies pass through as the replica encoded them.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            # One session serves every caller: a cookie a replica sets for one caller must
            # not be replayed to the next (and a jar costs a lookup per request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._upstream = UpstreamPool(
            connect_timeout_sec=s.connect_timeout_sec, idle_timeout_sec=s.idle_timeout_sec
        )
        self._forwarder = Forwarder(
            pool=self._upstream,
            dispatcher=self._dispatcher,
            signals=self._signals,
            limits=ProxyLimits(
                max_body_bytes=s.max_body_bytes,
                idle_timeout_sec=s.idle_timeout_sec,
                connect_timeout_sec=s.connect_timeout_sec,
            ),
            wall_clock=self._wall_clock,
        )
        self._jobs = jobs.JobRunner(
            sessions=self._sessions,
            dispatcher=self._dispatcher,
            client=self._client,
            routes=lambda: self._table.workloads,
            queued=lambda: self._queue_depths,
            now=_utc_now,
            workers=s.job_workers,
            poll_interval_sec=s.job_poll_interval_sec,
            job_timeout_sec=s.job_timeout_sec,
            on_batch_line_done=self._batch_line_done,
        )
        self._runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=s.keepalive_timeout_sec,
            max_field_size=s.max_header_bytes,
            max_line_size=s.max_header_bytes,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._refresher = asyncio.create_task(self._refresh_loop())
        self._jobs.start()

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._jobs is not None:
            await self._jobs.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        if self._client is not None:
            await self._client.close()
        if self._upstream is not None:
            await self._upstream.close()

    @property
    def route_table(self) -> RouteTable:
        """The routes and keys as of the last refresh."""
        return self._table

    def notify_change(self) -> None:
        """Something changed in the store (workloads, replicas, keys): reload now."""
        if self._changed is not None:
            self._changed.set()

    def signals(self) -> dict[WorkloadRef, SignalSnapshot]:
        """Per-workload signals for the controller, keyed ``(project, slug)``."""
        return self._signals.snapshot(now=self._wall_clock())

    async def refresh(self) -> None:
        """Reload routes and keys from the store and serve any request they unblock."""
        async with self._refresh_lock:
            await self._reload()

    async def _reload(self) -> None:
        self._refreshes += 1  # reloads begun; the caller holds the lock
        mono = time.monotonic()
        async with self._sessions() as s:
            now = datetime.fromtimestamp(self._wall_clock(), UTC)
            table = await self._changed_table(s, now=now, mono=mono)
            queues = await jobs.job_queues(s)
        if self._feed.prune_due(mono):
            await self._prune_changes(mono)
        changed = table is not self._table
        depths = {ref: queue.depth for ref, queue in queues.items()}
        self._table = table
        self._queue_depths = depths
        if changed:
            self._dispatcher.update(table.workloads)
            self._signals.set_caps(
                {
                    ref: gateway_cap(
                        replica_cap(route.per_worker, self.settings.replica_concurrency_cap),
                        self.settings.workers,
                    )
                    for ref, route in table.workloads.items()
                }
            )
        self._signals.set_job_queues(
            {ref: (q.depth, q.oldest_at.timestamp()) for ref, q in queues.items()}
        )
        if self._jobs is not None and any(
            r.ready for ref, r in table.workloads.items() if ref in depths
        ):
            self._jobs.poke()

    async def _changed_table(self, s: AsyncSession, *, now: datetime, mono: float) -> RouteTable:
        """The route table as of now: the current one with the workloads the change log
        names read again (O(changed)), or the whole table when a resync is due or the log
        cannot say (``gateway.route_feed``). The current table itself when nothing changed."""
        feed = self._feed
        changes = None if feed.full_due(mono) else await feed.read(s, mono)
        if changes is None:
            await feed.begin_full(s, mono)
            self.full_reloads += 1
            return await load_route_table(s, now=now)
        current = self._table
        # A workload blocked from placement is looked at again until its block goes stale.
        ids = changes.workload_ids | {
            r.workload_id for r in current.workloads.values() if r.blocked
        }
        if not ids and not changes.keys:
            return current
        routes = {ref: r for ref, r in current.workloads.items() if r.workload_id not in ids}
        routes.update(await load_routes(s, now=now, workload_ids=ids))
        data_keys, admin = (
            await load_keys(s) if changes.keys else (current.data_keys, current.admin_hashes)
        )
        return RouteTable(workloads=routes, data_keys=data_keys, admin_hashes=admin)

    async def _prune_changes(self, mono: float) -> None:
        try:
            async with self._sessions() as s:
                await self._feed.prune(s, mono)
                await s.commit()
        except Exception as exc:  # pruning is housekeeping: the next one tries again
            log.warning("pruning the route change log failed: %s", exc)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.router.add_route("*", "/endpoint/{project}/{workload}/v1/{tail:.*}", self._handle)
        app.router.add_get("/internal/signals", self._internal_signals)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        return app

    # -- background ----------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        assert self._changed is not None
        assert self._jobs is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.refresh_interval_sec):
                    await self._changed.wait()
            self._changed.clear()
            try:
                await self.refresh()
                await self._write_last_requests()
                await self._requeue_stale_jobs()
            except Exception:
                log.exception("refreshing gateway routes from the store failed")

    async def _requeue_stale_jobs(self) -> None:
        """Queue again jobs left running by a gateway that died, expire the lines of
        batches past their window and finalize batches left unfinalized; a tenth of the
        job timeout between looks is soon enough and spares the store a write a second."""
        assert self._jobs is not None
        s = self.settings
        now = time.monotonic()
        if now - self._requeued_at >= max(s.refresh_interval_sec, s.job_timeout_sec / 10):
            self._requeued_at = now
            await self._jobs.requeue_stale()
            await batches.sweep(self._sessions, now=_utc_now())

    async def _batch_line_done(self, batch_id: str) -> None:
        await batches.finalize_if_done(self._sessions, batch_id=batch_id, now=_utc_now())

    def _cold_start(self, ref: WorkloadRef) -> None:
        """No ready replica: tell the controller now, and the store for other processes."""
        if self._on_demand is not None:
            self._on_demand(ref)
        self._spawn(self._write_last_request(ref, self._wall_clock()))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_last_requests(self) -> None:
        interval = self.settings.last_request_write_interval_sec
        for ref, last in self._signals.last_requests().items():
            if last - self._written_last_request.get(ref, 0.0) >= interval:
                await self._write_last_request(ref, last)

    async def _write_last_request(self, ref: WorkloadRef, at: float) -> None:
        self._written_last_request[ref] = at
        try:
            async with self._sessions() as s, s.begin():
                await s.execute(
                    update(Workload)
                    .where(
                        Workload.project == ref[0],
                        Workload.slug == ref[1],
                        Workload.deleted_at.is_(None),
                    )
                    .values(last_request_at=datetime.fromtimestamp(at, UTC))
                )
        except Exception:
            log.exception("recording the last request time of %s/%s failed", *ref)

    # -- handlers ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        info = request.match_info
        try:
            route = await self._authorize(
                request.headers.get("Authorization"), project=info["project"], slug=info["workload"]
            )
        except GatewayError as exc:
            return exc.response()
        tail = info["tail"].strip("/")
        status = 500
        try:
            response = await self._dispatch(request, route=route, tail=tail, arrived=arrived)
            status = response.status
            return response
        except GatewayError as exc:
            status = exc.status
            return exc.response()
        except ConnectionResetError:
            status = 499  # the caller went away mid-response
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            children = self._signals.metrics_of(route.ref)
            children.requests(status).inc()
            children.duration.observe(time.perf_counter() - arrived)

    async def _authorize(
        self, authorization: str | None, *, project: str, slug: str
    ) -> WorkloadRoute:
        """``authorize`` against the route table; a key or workload made since the last
        refresh is looked up in the store and, when it is there, the table reloaded at
        once, so a key works on every gateway as soon as its ``create`` has returned."""
        try:
            return authorize(self._table, authorization=authorization, project=project, slug=slug)
        except GatewayError as exc:
            secret = bearer_secret(authorization)
            if secret is None or exc.code not in ("invalid_api_key", "workload_not_found"):
                raise
            key = digest(secret)
            if key in self._table.data_keys and exc.code == "invalid_api_key":
                raise  # a known key of another workload or project
            if key not in self._table.data_keys:
                async with self._sessions() as s:
                    if not await knows_data_key(s, digest=key):
                        raise
            await self._refresh_once()
        return authorize(self._table, authorization=authorization, project=project, slug=slug)

    async def _refresh_once(self) -> None:
        """Reload the table, unless a reload that began after this call has (it finished
        before the lock was ours): requests that miss together share one reload."""
        seen = self._refreshes
        async with self._refresh_lock:
            if self._refreshes == seen:
                await self._reload()

    async def _dispatch(
        self, request: web.Request, *, route: WorkloadRoute, tail: str, arrived: float
    ) -> web.StreamResponse:
        if tail == "models" or tail.startswith("models/"):
            return _models(route, tail)
        if tail == "jobs" or tail.startswith("jobs/"):
            return await self._jobs_route(request, route=route, tail=tail)
        if tail.split("/", 1)[0] in ("files", "batches"):
            return await self._batches_route(request, route=route, tail=tail)
        if tail not in PROXIED_ROUTES:
            raise GatewayError(404, f"unknown route /v1/{tail}", code="unknown_route")
        if request.method != "POST":
            raise GatewayError(405, f"/v1/{tail} takes POST, not {request.method}")
        if route.job_only:
            served = (
                "is an async endpoint (endpoint_type 'async'): it serves"
                if route.endpoint_type is EndpointType.ASYNC
                else f"serves {route.task_type.value}, which is served"
            )
            raise GatewayError(
                400,
                f"workload {route.ref[1]!r} {served} only as async jobs: POST /v1/jobs",
                code="jobs_only",
            )
        self._signals.arrived(route.ref, now=self._wall_clock())
        assert self._forwarder is not None
        return await self._forwarder.forward(request, route=route, path=tail, arrived=arrived)

    async def _jobs_route(
        self, request: web.Request, *, route: WorkloadRoute, tail: str
    ) -> web.StreamResponse:
        if tail == "jobs":
            if request.method != "POST":
                raise GatewayError(405, f"/v1/jobs takes POST, not {request.method}")
            if request.content_length is not None and (
                request.content_length > self.settings.max_body_bytes
            ):
                raise GatewayError(413, "job request body is too large", code="request_too_large")
            submission = jobs.parse_submission(await request.read(), route=route)
            self._signals.arrived(route.ref, now=self._wall_clock())
            async with self._sessions() as s, s.begin():
                job = await jobs.submit_job(s, ref=route.ref, submission=submission, now=_utc_now())
                view = jobs.job_view(job)
            if not route.ready:
                self._cold_start(route.ref)
            self.notify_change()  # queue depth changed; workers look at once
            return web.json_response(view, status=202)
        if request.method != "GET":
            raise GatewayError(405, f"/v1/{tail} takes GET, not {request.method}")
        async with self._sessions() as s:
            job = await jobs.get_job(s, ref=route.ref, job_id=tail.removeprefix("jobs/"))
            return web.json_response(jobs.job_view(job))

    async def _batches_route(
        self, request: web.Request, *, route: WorkloadRoute, tail: str
    ) -> web.StreamResponse:
        done = await batches.handle(
            request, tail=tail, ref=route.ref, sessions=self._sessions, now=_utc_now()
        )
        if done.queued:
            if not route.ready:
                self._cold_start(route.ref)  # a batch on a workload at zero wakes it
            self.notify_change()  # queue depth changed; workers look at once
        return done.response

    async def _internal_signals(self, request: web.Request) -> web.Response:
        if not is_admin(self._table, request.headers.get("Authorization")):
            return error_response(401, "an admin token is required", code="invalid_api_key")
        view = (
            SignalsView(self.signals()) if self._cluster is None else await self._cluster.signals()
        )
        return web.json_response(view.to_json())

    async def _metrics(self, request: web.Request) -> web.Response:
        # Its series name every project and workload: not for data-plane callers.
        if not is_admin(self._table, request.headers.get("Authorization")):
            return error_response(401, "an admin token is required", code="invalid_api_key")
        if self._cluster is None:
            body = generate_latest(self.metrics.registry)
        else:
            body = await self._cluster.metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _models(route: WorkloadRoute, tail: str) -> web.Response:
    """The base model and its LoRA adapters, in OpenAI's list shape; an adapter's card
    names the base model as ``parent`` and its source as ``root``, as vLLM's does."""

    def card(name: str, *, root: str, parent: str | None) -> dict[str, object]:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": route.ref[0],
            "root": root,
            "parent": parent,
        }

    cards = [card(route.model, root=route.model, parent=None)]
    cards += [card(a.name, root=a.source, parent=route.model) for a in route.adapters]
    if tail == "models":
        return web.json_response({"object": "list", "data": cards})
    named = [c for c in cards if c["id"] == tail.removeprefix("models/")]
    if named:
        return web.json_response(named[0])
    raise GatewayError(
        404, f"no model {tail.removeprefix('models/')!r} here", code="model_not_found"
    )


async def serve_gateway(
    *,
    database_url: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: GatewaySettings | None = None,
    workers: int = 1,
) -> None:
    """Run the gateway alone until SIGINT or SIGTERM (``autoscaler gateway``): in this
    process, or as ``workers`` processes sharing the port (``gateway.workers``)."""
    sealed.configure_from_environment(None)  # engine keys: the controller's secret key
    async with open_store(database_url) as engine:  # migrated once, before any worker
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        if workers > 1:
            await _serve_workers(
                database_url=database_url,
                host=host,
                port=port,
                settings=settings,
                workers=workers,
                stopping=stopping,
            )
            return
        gateway = Gateway(sessions=session_factory(engine), settings=settings)
        await gateway.start(host, port)
        print(f"gateway on http://{host}:{gateway.port}", flush=True)
        try:
            await stopping.wait()
        finally:
            await gateway.stop()


async def _serve_workers(
    *,
    database_url: str,
    host: str,
    port: int,
    settings: GatewaySettings | None,
    workers: int,
    stopping: asyncio.Event,
) -> None:
    from gateway.workers import WorkerPool

    pool = WorkerPool(database_url=database_url, workers=workers, settings=settings)
    await pool.start(host, port)
    print(f"gateway on http://{host}:{pool.port} ({workers} worker processes)", flush=True)
    failed = asyncio.ensure_future(pool.run())
    waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([failed, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        failed.cancel()
        await pool.stop()
    if failed.done() and not failed.cancelled() and failed.exception() is not None:
        raise failed.exception()  # type: ignore[misc]


def signals_json(snapshots: Iterable[SignalSnapshot]) -> dict[str, Any]:
    """One process's snapshots as ``GET /internal/signals`` words them (a complete read;
    read back by :func:`signals_from_json`)."""
    return SignalsView({(s.project, s.workload): s for s in snapshots}).to_json()


def signals_from_json(payload: bytes) -> SignalsView:
    """Parse ``GET /internal/signals`` (for a controller running apart) or a worker's
    ``GET /window``."""
    return SignalsView.from_json(json.loads(payload))
