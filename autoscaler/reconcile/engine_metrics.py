"""The engines' own measurement: each ready replica's ``/metrics``, scraped on an interval.

The gateway measures what a caller sees, but only up to the first body byte: for a
request answered in one piece (``stream: false``) that byte comes after the whole
generation, so the gateway leaves such requests out of its TTFT window. The engine
knows their first token. Every ``interval_sec`` the controller reads each ready
replica's Prometheus text and keeps, per workload:

* **TTFT**: the engine's histogram (vLLM ``vllm:time_to_first_token_seconds``, SGLang
  ``sglang:time_to_first_token_seconds``; engine-sim exports vLLM's names). The increase
  of each bucket since the previous scrape becomes that many samples at the bucket's
  upper bound (at twice the largest finite bound for the ``+Inf`` bucket), the same
  conservative reading ``histogram_quantile`` makes. A counter that went down (the
  engine restarted) counts from zero.
* **Load**: requests waiting and running (``vllm:num_requests_waiting`` /
  ``…_running``; SGLang ``sglang:num_queue_reqs`` / ``sglang:num_running_reqs``), summed
  over the replicas; KV-cache use (``vllm:kv_cache_usage_perc``, older
  ``vllm:gpu_cache_usage_perc``, SGLang ``sglang:token_usage``), the highest replica's.

A replica that does not answer within ``timeout_sec`` is skipped for that scrape; its
history stays. Work per scrape: one GET per ready replica, run concurrently.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from autoscaler.decide.signals import EngineLoad
from autoscaler.reconcile.deps import ReplicaTarget, WorkloadRef

__all__ = ["EngineReading", "EngineScraper", "new_samples", "parse_engine_metrics"]

_TTFT = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One replica's ``/metrics`` at one moment: cumulative TTFT buckets and gauges."""

    buckets: tuple[tuple[float, float], ...] = ()
    """(upper bound, cumulative count), ascending, ``+Inf`` last."""
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float | None = None


def parse_engine_metrics(text: str) -> EngineReading:
    """The parts of an engine's Prometheus text the controller uses (see module doc)."""
    buckets: dict[float, float] = {}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.endswith("_bucket") and name[: -len("_bucket")] in _TTFT:
                bound = float(sample.labels.get("le", "inf"))
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif name in _WAITING or name in _RUNNING or name in _KV:
                gauges[name] = gauges.get(name, 0.0) + sample.value
    return EngineReading(
        buckets=tuple(sorted(buckets.items())),
        waiting=_first(gauges, _WAITING) or 0.0,
        running=_first(gauges, _RUNNING) or 0.0,
        kv_cache_usage=_first(gauges, _KV),
    )


def _first(values: Mapping[str, float], names: Sequence[str]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def new_samples(
    before: EngineReading | None, after: EngineReading, *, at: float
) -> list[tuple[float, float]]:
    """``(at, ttft)`` samples for the requests that reached a first token between two
    readings of one replica (see the module docstring for the bucket rule)."""
    if not after.buckets:
        return []
    previous = dict(before.buckets) if before is not None else {}
    if previous and previous.get(math.inf, 0.0) > dict(after.buckets).get(math.inf, 0.0):
        previous = {}  # the engine restarted: its counters began again
    finite = [bound for bound, _ in after.buckets if math.isfinite(bound)]
    overflow = 2 * max(finite) if finite else 60.0
    samples: list[tuple[float, float]] = []
    below_now = below_before = 0.0
    for bound, cumulative in after.buckets:
        in_bucket = (cumulative - below_now) - (previous.get(bound, 0.0) - below_before)
        below_now, below_before = cumulative, previous.get(bound, 0.0)
        value = bound if math.isfinite(bound) else overflow
        samples.extend((at, value) for _ in range(max(0, round(in_bucket))))
    return samples


@dataclass
class _WorkloadEngines:
    ttft: deque[tuple[float, float]] = field(default_factory=deque)
    load: EngineLoad = field(default_factory=EngineLoad)


class EngineScraper:
    """Scrapes the replicas it is given and keeps each workload's window (module doc)."""

    def __init__(
        self, *, interval_sec: float = 10.0, window_sec: float = 600.0, timeout_sec: float = 2.0
    ) -> None:
        self.interval_sec = interval_sec
        self.window_sec = window_sec
        self._client = httpx.AsyncClient(timeout=timeout_sec, trust_env=False)
        self._last: dict[str, EngineReading] = {}
        self._workloads: dict[WorkloadRef, _WorkloadEngines] = {}
        self._scraped_at: float | None = None

    def due(self, now: float) -> bool:
        return self._scraped_at is None or now - self._scraped_at >= self.interval_sec

    async def scrape(self, targets: Iterable[ReplicaTarget], *, now: float) -> None:
        """Read every target once (concurrently) and fold the readings in."""
        chosen = list(targets)
        readings = await asyncio.gather(*(self._read(t) for t in chosen))
        self._scraped_at = now
        load: dict[WorkloadRef, list[EngineReading]] = {}
        for target, reading in zip(chosen, readings, strict=True):
            if reading is None:
                continue
            window = self._workloads.setdefault(target.workload, _WorkloadEngines())
            window.ttft.extend(new_samples(self._last.get(target.launch_id), reading, at=now))
            self._last[target.launch_id] = reading
            load.setdefault(target.workload, []).append(reading)
        live = {t.launch_id for t in chosen}
        for launch_id in [k for k in self._last if k not in live]:
            del self._last[launch_id]
        for ref, window in self._workloads.items():
            while window.ttft and window.ttft[0][0] < now - self.window_sec:
                window.ttft.popleft()
            window.load = _summed(load.get(ref, []))

    def refs(self) -> list[WorkloadRef]:
        return list(self._workloads)

    def ttft_samples(self, ref: WorkloadRef) -> tuple[tuple[float, float], ...]:
        found = self._workloads.get(ref)
        return () if found is None else tuple(found.ttft)

    def load(self, ref: WorkloadRef) -> EngineLoad | None:
        found = self._workloads.get(ref)
        return None if found is None or found.load.replicas == 0 else found.load

    async def _read(self, target: ReplicaTarget) -> EngineReading | None:
        headers = {"Authorization": f"Bearer {target.engine_key}"} if target.engine_key else {}
        try:
            response = await self._client.get(target.url.rstrip("/") + "/metrics", headers=headers)
            if not response.is_success:
                return None
            return parse_engine_metrics(response.text)
        except (httpx.HTTPError, ValueError):
            return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _summed(readings: Sequence[EngineReading]) -> EngineLoad:
    usages = [r.kv_cache_usage for r in readings if r.kv_cache_usage is not None]
    return EngineLoad(
        replicas=len(readings),
        waiting=int(sum(r.waiting for r in readings)),
        running=int(sum(r.running for r in readings)),
        kv_cache_usage=max(usages) if usages else None,
    )
