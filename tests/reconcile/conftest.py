"""Reconciler tests run on SQLite (the PostgreSQL store is covered by tests/store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autoscaler.store.db import open_store, session_factory
from tests.conftest import sqlite_store
from tests.reconcile.world import World


@pytest.fixture
async def world(tmp_path: Path, sqlite_template: Path) -> AsyncIterator[World]:
    async with open_store(sqlite_store(sqlite_template, tmp_path / "state.db")) as engine:
        yield World(session_factory(engine))
