"""The state one engine-sim application shares between its handlers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from aiohttp import web

from catalog.engine import RequestTiming
from catalog.perf import ServingProfile
from catalog.prefix import PrefixCache, capacity_blocks
from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.live import LiveEngine, Ticket
from providers.engine_sim.metrics import EngineMetrics
from providers.engine_sim.parsing import ApiError
from providers.engine_sim.sleep import SleepMode

# Long enough for the last response's bytes to leave the process before it exits.
_EXIT_GRACE_S = 0.05


def exit_abruptly() -> None:
    """End the process at once, as a crashed engine would: no cleanup, no goodbye."""
    os._exit(3)


@dataclass(slots=True)
class EngineState:
    """Config, profile, engine and metrics of one application, and its readiness."""

    config: EngineSimConfig
    profile: ServingProfile
    engine: LiveEngine
    metrics: EngineMetrics
    ready_at: float
    on_fail: Callable[[], None] = exit_abruptly
    served: int = field(default=0)
    prefix_cache: PrefixCache = field(init=False)
    """The engine's prefix cache: full prompt blocks kept in the KV memory the profile
    leaves (``catalog.prefix``); a prompt's cached tokens skip prefill."""
    sleep: SleepMode = field(init=False)
    """vLLM's sleep mode: whether the engine sleeps, and requests held until it wakes."""

    def __post_init__(self) -> None:
        self.prefix_cache = self._empty_prefix_cache()
        self.sleep = SleepMode(
            config=self.config,
            engine=self.engine,
            metrics=self.metrics,
            on_caches_dropped=self._drop_prefix_cache,
        )

    def _empty_prefix_cache(self) -> PrefixCache:
        return PrefixCache(capacity_blocks(self.profile.kv_capacity_tokens))

    def _drop_prefix_cache(self) -> None:
        self.prefix_cache = self._empty_prefix_cache()

    @property
    def ready(self) -> bool:
        """Whether the simulated weights have loaded."""
        return time.monotonic() >= self.ready_at

    def require_ready(self) -> None:
        """Refuse work with a 503 while loading, as vLLM's server is simply not up yet."""
        if not self.ready:
            wait = max(self.ready_at - time.monotonic(), 0.0)
            raise ApiError(
                503,
                f"model {self.config.model} is still loading",
                kind="service_unavailable",
                headers={"Retry-After": str(max(1, round(wait)))},
            )

    async def submit(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        finished_reason: str,
        cached_tokens: int = 0,
    ) -> Ticket:
        """Start a request on the engine, which prefills only the ``input_tokens`` not
        among the ``cached_tokens`` found in its prefix cache; its metrics are recorded
        as its moments arrive.

        While the engine sleeps the request waits here, queued as vLLM's paused scheduler
        queues it, and its latencies count from its arrival, the wait included. A request
        aborted by a sleep is left out of the latency metrics.
        """
        arrived_s = self.engine.now_s()
        waited = await self.sleep.until_awake()
        ticket = self.engine.submit(
            input_tokens=input_tokens - cached_tokens, output_tokens=output_tokens
        )
        if not waited:
            arrived_s = ticket.arrival_s
        metrics = self.metrics
        metrics.prefix_lookup(queries=input_tokens, hits=cached_tokens)

        def on_first_token(future: asyncio.Future[float]) -> None:
            if not future.cancelled() and not ticket.aborted:
                metrics.first_token(future.result() - arrived_s)

        def on_finished(future: asyncio.Future[RequestTiming]) -> None:
            if not future.cancelled() and not ticket.aborted:
                timing = replace(future.result(), arrival_s=arrived_s)
                metrics.finished(
                    timing, finished_reason=finished_reason, cached_tokens=cached_tokens
                )

        ticket.first_token.add_done_callback(on_first_token)
        ticket.finished.add_done_callback(on_finished)
        return ticket

    def count_served(self) -> None:
        """One more inference response sent in full; past ``fail_after``, die."""
        self.served += 1
        limit = self.config.fail_after
        if limit is not None and self.served == limit:
            asyncio.get_running_loop().call_later(_EXIT_GRACE_S, self.on_fail)


STATE: web.AppKey[EngineState] = web.AppKey("engine_sim_state", EngineState)
