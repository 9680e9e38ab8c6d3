"""Process roles: everything in one process (``autoscaler run``) or apart.

``run_all`` opens the store (migrating it), makes sure an admin token exists, and serves
the management API, the gateway and the controller (with the providers of ``--config``,
or this machine alone) on one event loop. The API's changes wake the controller at once,
and so does a request the gateway holds for a workload with no ready replica.
Shutdown on SIGINT/SIGTERM is graceful: servers stop accepting, loops finish their tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.api.app import create_app
from autoscaler.api.boot import BootSecrets, configure_boot
from autoscaler.api.deps import ApiState
from autoscaler.config import ConfigError, load_config
from autoscaler.controller import GatewaySignals, build_controller, run_controller
from autoscaler.paths import default_data_dir
from autoscaler.store import tokens
from autoscaler.store.db import open_store, session_factory, sqlite_url
from autoscaler.store.tokens import TokenKind
from gateway.app import Gateway

ADMIN_TOKEN_ENV = "AUTOSCALER_ADMIN_TOKEN"


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
        lifespan="off",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # The process owns its signals: stopping every role is run_all's job, not uvicorn's.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server


async def run_all(settings: RunSettings) -> None:
    """Serve every role in this process until SIGINT or SIGTERM."""
    async with open_store(settings.db_url) as engine:
        sessions = session_factory(engine)
        await ensure_admin_token(sessions, announce=lambda text: print(text, flush=True))
        config = load_config(settings.config_path)
        wake = asyncio.Event()
        gateway = Gateway(sessions=sessions, on_demand=lambda _ref: wake.set())

        def changed() -> None:
            gateway.notify_change()
            wake.set()

        controller = build_controller(
            config,
            sessions=sessions,
            data_dir=settings.data_dir,
            signals=GatewaySignals(gateway.signals),
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
        mount_metrics(api, controller.deps.metrics.registry)
        api_server = _uvicorn_server(api, host=settings.host, port=settings.api_port)
        await gateway.start(settings.host, settings.gateway_port)
        print(
            f"management API on http://{settings.host}:{settings.api_port}, "
            f"gateway on http://{settings.host}:{gateway.port} "
            f"(state: {_redact(settings.db_url)}; providers: "
            f"{', '.join(controller.deps.providers.names) or 'none'}"
            f"{'; dry run' if settings.dry_run else ''})\n{config.limits_summary()}",
            flush=True,
        )
        stopping = asyncio.Event()
        loop = run_controller(controller, engine=engine, stopping=stopping, wake=wake)
        try:
            await _serve_until_signal(
                [api_server.serve(), loop], stop=[api_server], stopping=stopping
            )
        finally:
            await gateway.stop()
            await controller.stop_local_replicas()
            await controller.close()


def mount_metrics(api: FastAPI, registry: CollectorRegistry) -> None:
    """Serve ``registry`` at ``GET /metrics`` on the management API (no token: scrapers
    read it; it holds no secret)."""

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


async def _serve_until_signal(
    tasks: list[Awaitable[None]],
    *,
    stop: list[uvicorn.Server],
    stopping: asyncio.Event | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stopping = stopping or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    running = [asyncio.ensure_future(t) for t in tasks]
    waiter = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
    stopping.set()  # one role ending (a port in use…) stops the others
    for server in stop:
        server.should_exit = True
    await asyncio.gather(*running, return_exceptions=True)
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    for task in done:
        if task is not waiter and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
