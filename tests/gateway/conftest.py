"""A real store (SQLite file), real engine-sims and a real gateway on 127.0.0.1.

``seed`` makes workloads, data keys and ready instance rows through the store's own
functions, as the management API and the controller would.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance
from autoscaler.store.tokens import TokenKind, issue_token
from autoscaler.store.workloads import ensure_workload, get_workload
from gateway.app import Gateway, GatewaySettings
from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.server import EngineSimServer
from tests.conftest import sqlite_store

MODEL = "sim/llama-8b"
ENGINE_KEY = "engine-secret-key"
PROJECT = "acme"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

Sessions = async_sessionmaker[AsyncSession]


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
async def sessions(tmp_path: Path, sqlite_template: Path) -> AsyncIterator[Sessions]:
    async with open_store(sqlite_store(sqlite_template, tmp_path / "state.db")) as engine:
        yield session_factory(engine)


@dataclass
class Seed:
    sessions: Sessions

    async def workload(self, slug: str, **spec: Any) -> str:
        """Ensure the workload; returns a fresh data key for it."""
        values: dict[str, Any] = {"name": slug, "slug": slug, "model": MODEL, **spec}
        async with self.sessions() as s, s.begin():
            await ensure_workload(
                s,
                project=PROJECT,
                spec=WorkloadSpec.model_validate(values),
                on_drift=OnDrift.RECONCILE,
                now=now(),
            )
        return await self.key(slug)

    async def key(self, slug: str, *, project: str = PROJECT) -> str:
        async with self.sessions() as s, s.begin():
            issued = await issue_token(
                s, kind=TokenKind.LIVE, project=project, workload_slug=slug, now=now()
            )
        return issued.secret

    async def replica(
        self,
        slug: str,
        url: str,
        *,
        ready: bool = True,
        engine_key: str | None = ENGINE_KEY,
        engine_command: list[str] | None = None,
    ) -> str:
        """An instance row of ``slug`` at ``url`` (booted with ``engine_command``);
        returns its launch id."""
        launch_id = "lch_" + secrets.token_hex(6)
        async with self.sessions() as s, s.begin():
            workload = await get_workload(s, project=PROJECT, slug=slug)
            assert workload is not None
            s.add(
                Instance(
                    launch_id=launch_id,
                    workload_id=workload.id,
                    project=PROJECT,
                    workload_slug=slug,
                    spec_generation=workload.generation,
                    provider="local",
                    offer_key="local/sim",
                    region="local",
                    zone="local",
                    instance_type="sim",
                    gpu="A100",
                    gpu_count=1,
                    hourly_usd=0.0,
                    url=url,
                    engine_key=engine_key,
                    intent_at=now(),
                    launched_at=now(),
                    ready_at=now() if ready else None,
                    engine_command=engine_command,
                )
            )
        return launch_id

    async def mark(self, launch_id: str, **facts: datetime) -> None:
        async with self.sessions() as s, s.begin():
            await s.execute(update(Instance).where(Instance.launch_id == launch_id).values(**facts))


@pytest.fixture
def seed(sessions: Sessions) -> Seed:
    return Seed(sessions)


StartEngine = Callable[..., Awaitable[EngineSimServer]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    servers: list[EngineSimServer] = []

    async def start(**settings: Any) -> EngineSimServer:
        options: dict[str, Any] = {
            "port": 0,
            "model": MODEL,
            "time_scale": 100.0,
            "api_key": ENGINE_KEY,
        }
        options.update(settings)
        server = EngineSimServer(EngineSimConfig(**options))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(sessions: Sessions) -> AsyncIterator[StartGateway]:
    gateways: list[Gateway] = []

    async def start(
        *, on_demand: Callable[[tuple[str, str]], None] | None = None, **settings: Any
    ) -> Gateway:
        options: dict[str, Any] = {"refresh_interval_sec": 0.2, "job_poll_interval_sec": 0.2}
        options.update(settings)
        gateway = Gateway(
            sessions=sessions, settings=GatewaySettings(**options), on_demand=on_demand
        )
        await gateway.start("127.0.0.1", 0)
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        await gateway.stop()


def base_url(gateway: Gateway, slug: str, *, project: str = PROJECT) -> str:
    return f"http://127.0.0.1:{gateway.port}/endpoint/{project}/{slug}/v1"


def sdk(gateway: Gateway, slug: str, key: str, *, project: str = PROJECT) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url(gateway, slug, project=project), api_key=key, max_retries=0
    )


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, within: float = 20.0) -> None:
    """Wait until ``check`` holds; fail (TimeoutError) if it does not within ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
