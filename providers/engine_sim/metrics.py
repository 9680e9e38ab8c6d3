"""vLLM's Prometheus metrics, by vLLM's names and buckets, for one simulated engine.

Names, types and buckets follow vLLM's ``vllm/v1/metrics/loggers.py`` (the ``vllm:``
prefix, a ``model_name`` label), so dashboards and scrapers written for vLLM read
engine-sim unchanged. Times are the performance model's, unscaled by ``--time-scale``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from catalog.engine import RequestTiming

SleepOperation = Literal["sleep", "wake"]
SLEEP_OPERATION_BUCKETS = (0.01, 0.1, 1, 10, 30, 60, 120, 300, 600)
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class EngineMetrics:
    """The metrics of one engine, in a registry of its own (several engines share a process
    in tests)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self._running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self._waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self._prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self._generation = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self._prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self._prefix_hits = counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
        )
        # Exposed at 0 from the start, as vLLM does: a replica never hit still reports.
        self._prefix_queries.labels(model_name)
        self._prefix_hits.labels(model_name)
        self._ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self._tpot = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            TPOT_BUCKETS,
        )
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        # vLLM's sleep-state gauge carries an engine index too (one engine here: "0").
        self._sleep_state = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
            "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            ["model_name", "engine", "sleep_state"],
            registry=self.registry,
        )
        self._sleep_duration = Histogram(
            "vllm:sleep_mode_operation_duration_seconds",
            "Duration of one sleep-mode operation.",
            ["operation"],
            buckets=SLEEP_OPERATION_BUCKETS,
            registry=self.registry,
        )
        self._sleep_in_flight = Gauge(
            "vllm:sleep_mode_operations_in_flight",
            "Sleep-mode operations currently awaited.",
            ["operation"],
            registry=self.registry,
        )
        self._model = model_name
        self.sleep_state(None)

    def sleep_state(self, level: int | None) -> None:
        """Set the sleep-state gauge as vLLM does: ``None`` awake, else the level slept at
        (level 0 shows asleep with neither memory state set)."""
        values = {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
        if level is not None:
            values["awake"] = 0.0
            values["weights_offloaded"] = 1.0 if level == 1 else 0.0
            values["discard_all"] = 1.0 if level == 2 else 0.0
        for state in SLEEP_STATES:
            self._sleep_state.labels(self._model, "0", state).set(values[state])

    @contextmanager
    def sleep_operation(self, operation: SleepOperation) -> Iterator[None]:
        """Count ``operation`` as in flight while the block runs."""
        gauge = self._sleep_in_flight.labels(operation)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def sleep_operation_took(self, operation: SleepOperation, seconds: float) -> None:
        """A sleep-mode operation ended after ``seconds`` of engine time."""
        self._sleep_duration.labels(operation).observe(seconds)

    def first_token(self, ttft_s: float) -> None:
        """A request produced its first token ``ttft_s`` after arriving."""
        self._ttft.labels(self._model).observe(ttft_s)

    def prefix_lookup(self, *, queries: int, hits: int) -> None:
        """A prompt of ``queries`` tokens was looked up in the prefix cache; ``hits`` found."""
        self._prefix_queries.labels(self._model).inc(queries)
        self._prefix_hits.labels(self._model).inc(hits)

    def finished(
        self, timing: RequestTiming, *, finished_reason: str, cached_tokens: int = 0
    ) -> None:
        """A request completed: count its tokens (its prompt's ``cached_tokens``, which
        the engine did not prefill, too) and record its latencies."""
        model = self._model
        self._prompt.labels(model).inc(timing.input_tokens + cached_tokens)
        self._generation.labels(model).inc(timing.output_tokens)
        self._success.labels(model, finished_reason).inc()
        self._e2e.labels(model).observe(timing.e2e_s)
        self._queue.labels(model).observe(timing.queue_s)
        if timing.output_tokens > 1:
            per_token = (timing.finished_s - timing.first_token_s) / (timing.output_tokens - 1)
            self._tpot.labels(model).observe(per_token)

    def render(self, *, running: int, waiting: int) -> bytes:
        """The Prometheus text exposition, with the gauges set to the engine's state now."""
        self._running.labels(self._model).set(running)
        self._waiting.labels(self._model).set(waiting)
        return generate_latest(self.registry)
