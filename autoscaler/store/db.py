"""Engines, sessions and schema migrations.

``database_url`` is an SQLAlchemy async URL: ``sqlite+aiosqlite:///path/state.db`` (the
default, in the data dir) or ``postgresql+asyncpg://user@host/db`` when several processes
share state. Migrations are Alembic's, run at start-up under a lock on PostgreSQL so
that controllers starting together do not race. A SQLite file and the data dir made for
it are owner-only (0600, 0700).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

# An arbitrary constant: the advisory lock id that serialises migrations on PostgreSQL.
_MIGRATION_LOCK_ID = 7_264_001


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'state.db'}"


def create_engine(database_url: str) -> AsyncEngine:
    """An engine with the settings each backend needs to be safe under concurrency."""
    if database_url.startswith("sqlite"):
        engine = create_async_engine(database_url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(database_url, pool_pre_ping=True, pool_size=10)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "autoscaler.store:migrations")
    return config


def _upgrade(connection: Connection) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})"))
        await conn.run_sync(_upgrade)


def _owner_only_file(path: Path) -> None:
    """Create the SQLite file (and its directory) readable by its owner alone: it holds
    token hashes and engine keys. SQLite gives its WAL and shared-memory files the
    database file's mode. A file from an older version is tightened the same way."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


@asynccontextmanager
async def open_store(database_url: str) -> AsyncIterator[AsyncEngine]:
    """Create the engine, migrate, and dispose of it on exit."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            _owner_only_file(Path(path))
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()
