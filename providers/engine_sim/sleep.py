"""vLLM's sleep mode, simulated: pause, free the GPU, wake, each as slow as ``catalog.wake``.

What it mirrors (vLLM 0.32's engine core, ``vllm/v1/engine/core.py``):

* ``sleep(level, mode)`` pauses the scheduler first. Mode ``abort`` (the default) ends the
  requests in flight at once with ``finish_reason`` ``abort``; ``wait`` lets them finish.
  Level 1 then copies the weights to host memory, level 2 drops them, both free the KV
  cache (the prefix cache is forgotten); level 0 only pauses.
* While paused, new requests are accepted and queued, not refused: they count as waiting
  and run once the engine is fully awake again.
* ``wake_up(tags)`` brings back ``weights`` and/or ``kv_cache`` (all when no tags); the
  scheduler resumes only when nothing is asleep any more. After level 2, woken weights
  hold nothing until ``reload_weights`` reads them from disk again.
* Operations run one at a time, as the engine core's utility calls do.

Each operation lasts the modelled seconds divided by the time scale, and its length is
measured on the engine's clock (what ``vllm:sleep_mode_operation_duration_seconds``
reports), so it reads in the model's seconds like every other engine-sim metric.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from catalog.wake import (
    SleepLevel,
    reload_weights_seconds,
    sleep_seconds,
    wake_up_seconds,
    weights_bytes,
)
from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.live import LiveEngine
from providers.engine_sim.metrics import EngineMetrics, SleepOperation

PauseMode = Literal["abort", "wait"]
_MEMORY_TAGS = frozenset({"weights", "kv_cache"})


@dataclass(frozen=True, slots=True)
class WakeResult:
    """What one ``wake_up`` did: whether the engine serves again."""

    fully_awake: bool


@dataclass(slots=True)
class SleepMode:
    """One engine's sleep state and the operations that change it."""

    config: EngineSimConfig
    engine: LiveEngine
    metrics: EngineMetrics
    on_caches_dropped: Callable[[], None]
    """Called when a sleep at level 1 or 2 frees the KV cache (the prefix cache goes)."""
    level: SleepLevel | None = None
    """The level slept at, ``None`` while awake."""
    asleep_tags: set[str] = field(default_factory=set)
    weights_stale: bool = False
    """Level-2 weights woken but not reloaded: the engine would compute nonsense."""
    held: int = 0
    """Requests queued while the scheduler is paused."""
    _resumed: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _running: set[asyncio.Future[None]] = field(default_factory=set)
    """Sleeps under way (kept referenced until they end, whoever still awaits them)."""

    def __post_init__(self) -> None:
        self._resumed.set()

    @property
    def sleeping(self) -> bool:
        """vLLM's ``is_sleeping``: the scheduler is paused or some memory is asleep."""
        return not self._resumed.is_set() or bool(self.asleep_tags)

    async def until_awake(self) -> bool:
        """Return once the scheduler runs (a request waits here while the engine sleeps);
        whether it had to wait."""
        if self._resumed.is_set():
            return False
        self.held += 1
        try:
            await self._resumed.wait()
        finally:
            self.held -= 1
        return True

    async def sleep(self, level: SleepLevel, mode: PauseMode) -> None:
        """Pause, deal with the requests in flight by ``mode``, then free memory.

        The sleep runs to its end even when its caller goes away (a client that times out
        or disconnects cancels its request's handler): vLLM's engine core finishes a sleep
        its HTTP client gave up on, and a sleep cut short would leave the scheduler paused
        with no level for ``wake_up`` to wake from."""
        task = asyncio.ensure_future(self._sleep(level, mode))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        await asyncio.shield(task)

    async def _sleep(self, level: SleepLevel, mode: PauseMode) -> None:
        async with self._lock, self._operation("sleep"):
            if self.level is not None:
                return  # vLLM logs "Executor is already sleeping." and does nothing
            self._resumed.clear()
            if mode == "abort":
                self.engine.abort_all()
            else:
                await self.engine.drained()
            await self._take(
                sleep_seconds(
                    weights_bytes=self._bytes(), gpu=self._gpu(), level=level, gpu_count=self._n()
                )
            )
            self.level = level
            self.metrics.sleep_state(level)
            if level >= 1:
                self.asleep_tags = set(_MEMORY_TAGS)
                self.on_caches_dropped()

    async def wake_up(self, tags: Sequence[str] | None) -> WakeResult:
        """Wake ``tags`` (all when ``None``); resume when nothing is asleep any more."""
        async with self._lock, self._operation("wake"):
            level = self.level
            if level is None:
                return WakeResult(fully_awake=True)
            wanted = [t for t in tags if t != "scheduling"] if tags is not None else None
            memory = set(self.asleep_tags) if wanted is None else set(wanted)
            if self.asleep_tags and memory <= self.asleep_tags:
                await self._take(
                    wake_up_seconds(
                        weights_bytes=self._bytes(),
                        gpu=self._gpu(),
                        level=level,
                        tags=memory,
                        gpu_count=self._n(),
                    )
                )
                self.asleep_tags -= memory
                if level == 2 and "weights" in memory:
                    self.weights_stale = True
            if not self.asleep_tags:
                self.level = None
                self.metrics.sleep_state(None)
                self._resumed.set()
            return WakeResult(fully_awake=self.level is None)

    async def reload_weights(self) -> None:
        """Read the weights from disk onto the GPUs again (after a level-2 sleep)."""
        async with self._lock:
            await self._take(
                reload_weights_seconds(
                    weights_bytes=self._bytes(), gpu=self._gpu(), gpu_count=self._n()
                )
            )
            self.weights_stale = False

    def _bytes(self) -> float:
        return weights_bytes(self.config.params_b, self.config.bytes_per_param)

    def _gpu(self) -> str:
        return self.config.gpu

    def _n(self) -> int:
        return self.config.gpu_count

    async def _take(self, model_seconds: float) -> None:
        await asyncio.sleep(model_seconds / self.config.time_scale)

    @contextlib.asynccontextmanager
    async def _operation(self, operation: SleepOperation) -> AsyncIterator[None]:
        started = self.engine.now_s()
        with self.metrics.sleep_operation(operation):
            try:
                yield
            finally:
                self.metrics.sleep_operation_took(operation, self.engine.now_s() - started)
