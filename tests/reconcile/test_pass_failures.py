"""A pass that keeps failing logs its traceback once, then one line per pass."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from autoscaler.controller import Controller, run_controller
from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile.deps import Settings
from autoscaler.store.db import open_store


class FailingController:
    """A controller whose every pass raises the same error (a store that went away…)."""

    def __init__(self, stopping: asyncio.Event, wake: asyncio.Event, passes: int) -> None:
        self.deps = type("D", (), {})()
        self.deps.metrics = ControllerMetrics()
        self.deps.settings = Settings(cluster_id="test")
        self.leading = False
        self.calls = 0
        self._stopping, self._wake, self._passes = stopping, wake, passes

    def schedule_jobs(self, scheduler: Any) -> None:
        pass

    async def step(self) -> float:
        self.calls += 1
        if self.calls == self._passes:
            self._stopping.set()
        self._wake.set()  # the next pass at once
        raise RuntimeError("database is locked")


async def test_a_pass_failing_the_same_way_logs_one_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stopping, wake = asyncio.Event(), asyncio.Event()
    stub = FailingController(stopping, wake, passes=4)
    caplog.set_level(logging.INFO, logger="autoscaler.controller")
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        await run_controller(cast(Controller, stub), engine=engine, stopping=stopping, wake=wake)
    failures = [r for r in caplog.records if "reconcile pass failed" in r.getMessage()]
    assert stub.calls == 4
    assert len(failures) == 4
    assert sum(1 for r in failures if r.exc_info) == 1
    assert failures[-1].getMessage() == (
        "reconcile pass failed again: RuntimeError: database is locked"
    )
