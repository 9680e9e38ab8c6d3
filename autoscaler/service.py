"""Process roles: everything in one process (``autoscaler run``) or apart.

``run_all`` opens the store (migrating it), makes sure an admin token exists, and serves
the management API, the gateway and the controller (with the providers of ``--config``,
or this machine alone) on one event loop; with ``gateway_workers`` above 1 the gateway
runs instead in that many worker processes sharing its port (``gateway.workers``), which
this process starts, restarts and stops, and whose signals the controller reads merged.
The API's changes wake the controller at once, and so does a request the gateway holds
for a workload with no ready replica.
Shutdown on SIGINT/SIGTERM is graceful and bounded: servers stop accepting, the pass in
flight gets :data:`STOP_GRACE_SEC` to finish and is then cancelled (as a crash would
leave it: intents are resolved by launch id), each cleanup step gets
:data:`STOP_STEP_SEC`, and a watchdog ends the process :data:`STOP_BOUND_SEC` after the
signal whatever it is doing. A port already taken is found before any state is touched
(:func:`port_in_use`).

``/metrics`` on the management port serves the controller's and the gateway's metrics;
the gateway's own port serves its metrics only to an admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.api.app import create_app
from autoscaler.api.boot import BootSecrets, configure_boot
from autoscaler.api.deps import ApiState
from autoscaler.config import ConfigError, ControllerConfig, load_config
from autoscaler.controller import (
    GatewaySignals,
    build_controller,
    check_sharding,
    run_controller,
)
from autoscaler.paths import default_data_dir
from autoscaler.store import sealed, tokens
from autoscaler.store.db import open_store, session_factory, sqlite_url
from autoscaler.store.tokens import TokenKind
from gateway.app import Gateway
from gateway.window import SignalsView
from gateway.workers import WorkerPool, Workers, resolve_workers

ADMIN_TOKEN_ENV = "AUTOSCALER_ADMIN_TOKEN"


STOP_GRACE_SEC = 10.0
"""On SIGTERM, how long the servers and the pass in flight get to finish before the
work still running is cancelled."""
STOP_STEP_SEC = 8.0
"""The longest each cleanup step (gateway, this machine's engines, clients) may take."""
STOP_BOUND_SEC = 40.0
"""The stated bound: a process not gone this long after SIGTERM exits regardless."""

log = logging.getLogger("autoscaler.service")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Where ``autoscaler run`` listens and keeps its state."""

    host: str = "127.0.0.1"
    api_port: int = 8001
    gateway_port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None
    config_path: Path | None = None
    dry_run: bool = False
    engine: Literal["auto", "sim", "vllm"] | None = None
    """Overrides the config's ``providers.local.engine`` (``autoscaler run --engine``)."""
    schedule_offset_sec: float | None = None
    """Overrides the config's ``schedule_offset_sec`` (``autoscaler run --schedule-offset``)."""
    gateway_workers: Workers | None = None
    """Overrides the config's ``gateway_workers`` (``autoscaler run --gateway-workers``)."""

    @property
    def db_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)


async def ensure_admin_token(
    sessions: async_sessionmaker[AsyncSession], *, announce: Callable[[str], None]
) -> None:
    """Adopt ``$AUTOSCALER_ADMIN_TOKEN``, or on first start make one and announce it once."""
    given = os.environ.get(ADMIN_TOKEN_ENV)
    async with sessions() as s, s.begin():
        if given:
            if not given.startswith("ik_sdk_") or len(given) < 24:
                raise SystemExit(
                    f"{ADMIN_TOKEN_ENV} must look like ik_sdk_ followed by at least 17 characters"
                )
            if await tokens.verify_secret(s, given) is None:
                await tokens.issue_token(
                    s, kind=TokenKind.ADMIN, name="admin (env)", secret=given, now=utc_now()
                )
            return
        if await tokens.has_admin_token(s):
            return
        issued = await tokens.issue_token(s, kind=TokenKind.ADMIN, name="admin", now=utc_now())
    announce(
        "Admin token (shown once; only its hash is stored):\n"
        f"  export AUTOSCALER_SDK_TOKEN={issued.secret}\n"
    )


def _uvicorn_server(app: object, *, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level="warning",
        log_config=None,  # the process's logging (autoscaler.logs), not uvicorn's own
        lifespan="off",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # The process owns its signals: stopping every role is run_all's job, not uvicorn's.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server


async def run_all(settings: RunSettings) -> None:
    """Serve every role in this process until SIGINT or SIGTERM."""
    # A key file in the data dir serves one machine's SQLite store; processes sharing
    # PostgreSQL must share a key, so they take it from the environment only.
    local_store = settings.db_url.startswith("sqlite")
    sealed.configure_from_environment(settings.data_dir if local_store else None)
    async with open_store(settings.db_url) as engine:
        sessions = session_factory(engine)
        await ensure_admin_token(sessions, announce=lambda text: print(text, flush=True))
        config = load_config(settings.config_path)
        if settings.engine is not None:
            config = config.with_local_engine(settings.engine)
        if settings.schedule_offset_sec is not None:
            config = config.with_schedule_offset(settings.schedule_offset_sec)
        check_sharding(config, engine)
        wake = asyncio.Event()
        workers = resolve_workers(
            config.gateway_workers if settings.gateway_workers is None else settings.gateway_workers
        )
        gateway: Gateway | WorkerPool
        if workers > 1:
            gateway = WorkerPool(
                database_url=settings.db_url,
                workers=workers,
                data_dir=settings.data_dir if local_store else None,
                on_demand=lambda _ref: wake.set(),
            )
        else:
            gateway = Gateway(sessions=sessions, on_demand=lambda _ref: wake.set())

        def changed() -> None:
            gateway.notify_change()
            wake.set()

        controller = build_controller(
            config,
            sessions=sessions,
            data_dir=settings.data_dir,
            signals=GatewaySignals(_snapshots_of(gateway)),
            notify_change=gateway.notify_change,
            dry_run=settings.dry_run,
        )
        try:
            await controller.preflight()  # before serving: a refused start says what to fix
        except ConfigError:
            await controller.close()
            raise
        gateway_url = (
            f"http://{settings.host}:{settings.gateway_port}" if settings.gateway_port else None
        )
        api = create_app(
            ApiState(
                sessions=sessions,
                now=utc_now,
                on_change=changed,
                gateway_url=gateway_url,
                max_replicas=config.max_replicas_per_workload,
            )
        )
        configure_boot(api, BootSecrets(hf_token_file=config.hf_token_file))
        if isinstance(gateway, WorkerPool):
            mount_metrics(api, controller.deps.metrics.registry, more=gateway.metrics)
        else:
            mount_metrics(api, controller.deps.metrics.registry, gateway.metrics.registry)
        api_server = _uvicorn_server(api, host=settings.host, port=settings.api_port)
        await gateway.start(settings.host, settings.gateway_port)
        print(
            f"management API on http://{settings.host}:{settings.api_port}, "
            f"gateway on http://{settings.host}:{gateway.port}"
            f"{f' ({workers} worker processes)' if workers > 1 else ''} "
            f"(state: {_redact(settings.db_url)}; providers: "
            f"{', '.join(controller.deps.providers.names) or 'none'}"
            f"{'; dry run' if settings.dry_run else ''})\n{config.limits_summary()}",
            flush=True,
        )
        announce_schedule_clock(config)
        stopping = asyncio.Event()
        loop = run_controller(
            controller,
            engine=engine,
            stopping=stopping,
            wake=wake,
            sharding=config.sharding.leases(),
        )
        try:
            roles: list[Awaitable[None]] = [api_server.serve(), loop]
            if isinstance(gateway, WorkerPool):
                # A worker that cannot stay up stops the service; a stop ends the role.
                roles.append(until_stopping(gateway.run(), stopping))
            await _serve_until_signal(roles, stop=[api_server], stopping=stopping)
        finally:
            for step in (gateway.stop, controller.stop_local_replicas, controller.close):
                await _bounded(step(), what=step.__qualname__)
            log.info("stopped")


async def until_stopping(role: Awaitable[None], stopping: asyncio.Event) -> None:
    """Run ``role`` until it ends or ``stopping`` is set: a role that ends only when it
    fails (``WorkerPool.run``) would otherwise hold a stop for ``STOP_GRACE_SEC`` and be
    cancelled as work stuck. Its failure is raised."""
    task = asyncio.ensure_future(role)
    waiter = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def _snapshots_of(gateway: Gateway | WorkerPool) -> Callable[[], Awaitable[SignalsView]]:
    """What the controller reads of the gateway: its window (always complete), or its
    workers' merged (incomplete when one does not answer)."""
    if isinstance(gateway, WorkerPool):
        return gateway.signals
    in_process = gateway

    async def snapshots() -> SignalsView:
        return SignalsView(in_process.signals())

    return snapshots


def announce_schedule_clock(config: ControllerConfig) -> None:
    """Print the shifted schedule clock, when there is one, so that a rehearsal setting
    left in a production config is seen at every start."""
    line = config.schedule_clock_summary(now=utc_now())
    if line is not None:
        print(line, flush=True)


async def _bounded(step: Awaitable[None], *, what: str) -> None:
    """Run one shutdown step for at most :data:`STOP_STEP_SEC`; a failure is logged."""
    try:
        await asyncio.wait_for(step, timeout=STOP_STEP_SEC)
    except TimeoutError:
        log.warning("shutdown: %s did not finish within %gs; going on", what, STOP_STEP_SEC)
    except Exception as exc:
        log.warning("shutdown: %s failed: %s", what, exc)


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound (what the servers would find at start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def mount_metrics(
    api: FastAPI,
    *registries: CollectorRegistry,
    more: Callable[[], Awaitable[bytes]] | None = None,
) -> None:
    """Serve ``registries`` (and what ``more`` answers: the gateway workers' metrics) at
    ``GET /metrics`` on the management API (no token: scrapers read it on the management
    port, which callers of the data plane do not reach)."""

    async def metrics() -> Response:
        body = b"".join(generate_latest(registry) for registry in registries)
        if more is not None:
            body += await more()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    api.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


async def _serve_until_signal(
    tasks: list[Awaitable[None]],
    *,
    stop: list[uvicorn.Server],
    stopping: asyncio.Event | None = None,
) -> None:
    stopping = stopping or asyncio.Event()
    install_stop_signals(stopping)
    running = [asyncio.ensure_future(t) for t in tasks]
    waiter = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
    stopping.set()  # one role ending (a port in use…) stops the others
    for server in stop:
        server.should_exit = True
    _, late = await asyncio.wait(running, timeout=STOP_GRACE_SEC)
    for stuck in late:  # a pass stuck in a call: cancelled, as a crash would leave it
        log.warning("shutdown: cancelling work still running after %gs", STOP_GRACE_SEC)
        stuck.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    for task in done:
        if task is not waiter and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def install_stop_signals(stopping: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stopping``, and arm a watchdog that ends the process
    :data:`STOP_BOUND_SEC` later whatever it is doing; a second signal ends it at once.

    Python-level handlers (not the loop's) so that a signal is heard even while the loop
    is busy: the handler runs in the main thread and hands the event to the loop."""
    loop = asyncio.get_running_loop()
    state = {"signals": 0}

    def handle(signum: int, _frame: object) -> None:
        state["signals"] += 1
        if state["signals"] > 1:
            _say(b"autoscaler: second signal: stopping now\n")
            os._exit(128 + signum)
        _say(f"autoscaler: stopping (within {STOP_BOUND_SEC:g}s)\n".encode())
        watchdog = threading.Timer(STOP_BOUND_SEC, _force_exit)
        watchdog.daemon = True
        watchdog.start()
        loop.call_soon_threadsafe(stopping.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


def _say(line: bytes) -> None:
    """Write to stderr from a signal handler. A stderr nobody reads any more (the pipe of
    a parent that is gone) must not stop the shutdown: the error would end the handler
    before it sets ``stopping``, and the process would never stop."""
    with contextlib.suppress(OSError):
        os.write(2, line)


def _force_exit() -> None:
    _say(f"autoscaler: not stopped within {STOP_BOUND_SEC:g}s; exiting\n".encode())
    os._exit(1)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
