"""Shared fixtures: a store on SQLite and on the real PostgreSQL server, and a live API.

PostgreSQL runs at 127.0.0.1:5432 (user postgres, trust auth). Under ``CI=true`` the
tests that need it are required; elsewhere they skip with a message when no server
answers. Each test gets its own freshly created database.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from autoscaler.store.db import open_store, session_factory
from tests.helpers import ApiServer, pg_available, pg_create_database, pg_drop_database

pytest_plugins = ["tests.fakes.aws"]

# Property tests check behaviour, never speed: no per-example deadline, which a loaded
# two-core machine (real vLLM starting beside the suite) would miss at random.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")

PG_HOST = os.environ.get("AUTOSCALER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
ADMIN_TOKEN = "ik_sdk_test-admin-" + "x" * 24


def _require_pg() -> None:
    if asyncio.run(pg_available(PG_HOST)):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI=true but does not answer at {PG_HOST}")
    pytest.skip(f"no PostgreSQL server answers at {PG_HOST}; PostgreSQL tests skipped")


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (its asyncpg URL), dropped afterwards; skips the
    test (fails it under ``CI=true``) when no server answers."""
    _require_pg()
    name = "autoscaler_test_" + secrets.token_hex(6)
    asyncio.run(pg_create_database(PG_HOST, name))
    try:
        yield f"{PG_HOST.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
    finally:
        asyncio.run(pg_drop_database(PG_HOST, name))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
        return
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, for tests that need PostgreSQL alone."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with open_store(database_url) as engine:
        yield engine


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


@pytest.fixture
def api_server(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    """The management API served by uvicorn on 127.0.0.1 in a thread, with an admin token."""
    monkeypatch.setenv("AUTOSCALER_ADMIN_TOKEN", ADMIN_TOKEN)
    with ApiServer(database_url) as server:
        yield server
