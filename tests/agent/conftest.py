"""A live management API with the workers router, on a clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.api import workers
from autoscaler.api.app import create_app
from autoscaler.api.deps import ApiState
from autoscaler.service import ensure_admin_token
from autoscaler.store.db import open_store, session_factory
from tests.conftest import ADMIN_TOKEN, sqlite_store
from tests.helpers import ApiServer


class SteppedNow:
    """Wall-clock time plus an offset the test can push forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


class WorkersApiServer(ApiServer):
    """The management API with the workers router included, as the service serves it."""

    def __init__(self, database_url: str, now: SteppedNow) -> None:
        super().__init__(database_url)
        self.now = now

    async def _serve(self) -> None:
        async with open_store(self.database_url) as engine:
            sessions = session_factory(engine)
            await ensure_admin_token(sessions, announce=lambda _text: None)
            app = create_app(ApiState(sessions=sessions, now=self.now))
            if not any(getattr(r, "path", "").endswith("/heartbeat") for r in app.routes):
                app.include_router(workers.router)
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
            self._server = uvicorn.Server(config)
            await self._server.serve()


@pytest.fixture
def clock() -> SteppedNow:
    return SteppedNow()


@pytest.fixture
def database_url(tmp_path: Path, sqlite_template: Path) -> str:
    return sqlite_store(sqlite_template, tmp_path / "state.db")


@pytest.fixture
def api(
    database_url: str, clock: SteppedNow, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WorkersApiServer]:
    monkeypatch.setenv("AUTOSCALER_ADMIN_TOKEN", ADMIN_TOKEN)
    server = WorkersApiServer(database_url, clock)
    with server:
        yield server


@pytest.fixture
async def store(
    api: WorkersApiServer, database_url: str
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The server's database, opened from the test (as the controller would)."""
    async with open_store(database_url) as engine:
        yield session_factory(engine)
