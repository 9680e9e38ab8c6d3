"""Start engine-sims on 127.0.0.1 ephemeral ports, in this process; always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.server import EngineSimServer

MODEL = "sim/llama-8b"
StartEngine = Callable[..., Awaitable[EngineSimServer]]


class FailureRecorder:
    """Stands in for the process exit that ``fail_after`` triggers."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def failures() -> FailureRecorder:
    return FailureRecorder()


@pytest.fixture
async def start_engine(failures: FailureRecorder) -> AsyncIterator[StartEngine]:
    servers: list[EngineSimServer] = []

    async def start(**settings: Any) -> EngineSimServer:
        options: dict[str, Any] = {"port": 0, "model": MODEL, "time_scale": 100.0}
        options.update(settings)
        server = EngineSimServer(EngineSimConfig(**options), on_fail=failures)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Samples of the metric family ``name`` by sample name (``_count``, ``_sum``, ...)."""
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {
                sample.name: sample.value for sample in family.samples if "le" not in sample.labels
            }
    raise AssertionError(f"metric {name} not exposed")
