"""Shared fixtures: a store on SQLite and on the real PostgreSQL server, and a live API.

PostgreSQL runs at 127.0.0.1:5432 (user postgres, trust auth). Under ``CI=true`` the
tests that need it are required; elsewhere they skip with a message when no server
answers. Each test gets its own freshly created database.

A store's migrations run once per test session and backend, on a template: a test's new
database is a copy of it (``CREATE DATABASE ... TEMPLATE`` on PostgreSQL, a file copy on
SQLite), already at the newest schema, so it does not run every migration again.
``open_store`` on it still migrates, finding nothing to do.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
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


_pg_answers = False
_pg_template: str | None = None


def _require_pg() -> None:
    global _pg_answers
    if _pg_answers or asyncio.run(pg_available(PG_HOST)):
        _pg_answers = True
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required under CI=true but does not answer at {PG_HOST}")
    pytest.skip(f"no PostgreSQL server answers at {PG_HOST}; PostgreSQL tests skipped")


def _asyncpg_url(name: str) -> str:
    return f"{PG_HOST.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"


async def _migrated(database_url: str) -> None:
    async with open_store(database_url):
        pass


def _template_database() -> str:
    """This session's migrated PostgreSQL template (made at first use, dropped at the end)."""
    global _pg_template
    if _pg_template is None:
        name = "autoscaler_template_" + secrets.token_hex(6)
        asyncio.run(pg_create_database(PG_HOST, name))
        _pg_template = name  # dropped at the session's end even if migrating fails
        asyncio.run(_migrated(_asyncpg_url(name)))
    return _pg_template


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-engine modules first, the rest in their order: with the tests spread over
    processes by file (``scripts/check``), the longest file starts at once instead of
    running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("real_engine") is None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _pg_template is not None:
        asyncio.run(pg_drop_database(PG_HOST, _pg_template))


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new PostgreSQL database at the newest schema (its asyncpg URL), dropped
    afterwards; skips the test (fails it under ``CI=true``) when no server answers."""
    _require_pg()
    template = _template_database()
    name = "autoscaler_test_" + secrets.token_hex(6)
    asyncio.run(pg_create_database(PG_HOST, name, template=template))
    try:
        yield _asyncpg_url(name)
    finally:
        asyncio.run(pg_drop_database(PG_HOST, name))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store migrated once for the session, for tests to copy (``sqlite_store``)."""
    path = tmp_path_factory.mktemp("store-template") / "state.db"
    asyncio.run(_migrated(f"sqlite+aiosqlite:///{path}"))
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert not leftovers, f"the closed template store left {leftovers}"
    return path


def sqlite_store(template: Path, path: Path) -> str:
    """A new SQLite store at ``path`` (a copy of ``template``, owner-only), its URL."""
    shutil.copyfile(template, path)
    path.chmod(0o600)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path
) -> Iterator[str]:
    """A fresh database at the newest schema: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield sqlite_store(sqlite_template, tmp_path / "state.db")
        return
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database at the newest schema, for tests that need PostgreSQL
    alone."""
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
