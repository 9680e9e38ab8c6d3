"""What the gateway measures per workload, for Prometheus and for the controller.

TTFT is the time from a request's arrival at the gateway to the first body byte from the
replica (for a non-streamed response, its first byte too), so it includes any queueing
and cold-start wait: what the caller felt. The controller reads
``gateway.window.SignalSnapshot`` values: raw TTFT samples with their wall-clock times
over a window, so it can take its own percentile over its own scale-up and scale-down
windows.

The token mix is measured per answered request (chat and text completions, embeddings):
prompt tokens from the response's ``usage.prompt_tokens``, else estimated from the
request body (characters of ``messages[*].content`` / ``prompt`` ÷ 4); completion tokens
from ``usage.completion_tokens``, else the stream's token events, else ``max_tokens``.
The window keeps each request's pair and running sums, so a snapshot's mean and
spread (``gateway.window.TokenStats``) cost nothing per request.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.routes import WorkloadRef
from gateway.window import SignalSnapshot, WorkloadWindow

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("project", "workload")
        self.ttft = Histogram(
            "autoscaler_gateway_ttft_seconds",
            "Arrival at the gateway to the first body byte from the replica.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "autoscaler_gateway_request_duration_seconds",
            "Arrival at the gateway to the last byte sent to the caller.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "autoscaler_gateway_requests",
            "Requests answered, by HTTP status.",
            (*labels, "status"),
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "autoscaler_gateway_queue_wait_seconds",
            "Time a request waited for a replica with room.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cold_start_wait = Histogram(
            "autoscaler_gateway_cold_start_wait_seconds",
            "Time a request was held because no replica was ready.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.async_queue_depth = Gauge(
            "autoscaler_gateway_async_queue_depth",
            "Async jobs queued and not yet started.",
            labels,
            registry=self.registry,
        )


class WorkloadMetrics:
    """One workload's label children, looked up once: ``labels()`` takes a lock and
    hashes the label values on every call, which the request path need not pay."""

    __slots__ = ("_metrics", "_ref", "_requests", "duration", "ttft")

    def __init__(self, metrics: Metrics, ref: WorkloadRef) -> None:
        self._metrics = metrics
        self._ref = ref
        self.ttft = metrics.ttft.labels(*ref)
        self.duration = metrics.duration.labels(*ref)
        self._requests: dict[int, Counter] = {}

    def requests(self, status: int) -> Counter:
        """The ``requests_total`` child for ``status``."""
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(*self._ref, str(status))
        return child


class _InFlight(Collector):
    """``autoscaler_gateway_in_flight_requests``, from the windows' counts at scrape time."""

    def __init__(self, windows: dict[WorkloadRef, WorkloadWindow]) -> None:
        self._windows = windows

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "autoscaler_gateway_in_flight_requests",
            "Requests being served by a replica.",
            labels=("project", "workload"),
        )
        for ref, window in list(self._windows.items()):
            family.add_metric(ref, window.in_flight)
        yield family


class Signals:
    """Per-workload windows and metrics; the one place requests are recorded."""

    def __init__(
        self, *, window_sec: float, metrics: Metrics, concurrency_cap: int | None = None
    ) -> None:
        self.window_sec = window_sec
        self.metrics = metrics
        self.concurrency_cap = concurrency_cap
        self._caps: dict[WorkloadRef, int] = {}
        self._windows: dict[WorkloadRef, WorkloadWindow] = {}
        self._children: dict[WorkloadRef, WorkloadMetrics] = {}
        # Requests in flight are read off the windows when scraped, not kept in a gauge
        # as well: two fewer locked updates on every request's way.
        metrics.registry.register(_InFlight(self._windows))

    def metrics_of(self, ref: WorkloadRef) -> WorkloadMetrics:
        found = self._children.get(ref)
        if found is None:
            found = self._children[ref] = WorkloadMetrics(self.metrics, ref)
        return found

    def window(self, ref: WorkloadRef) -> WorkloadWindow:
        found = self._windows.get(ref)
        if found is None:
            found = self._windows[ref] = WorkloadWindow()
        return found

    def arrived(self, ref: WorkloadRef, *, now: float) -> WorkloadWindow:
        w = self.window(ref)
        w.arrived(now=now)
        w.trim(now=now, window_sec=self.window_sec)
        return w

    def first_byte(self, ref: WorkloadRef, *, now: float, ttft: float) -> None:
        w = self.window(ref)
        w.ttft.append((now, ttft))
        self.metrics_of(ref).ttft.observe(ttft)

    def unstreamed_answer(self, ref: WorkloadRef, *, now: float, latency: float) -> None:
        """A generation answered in one piece began arriving ``latency`` after its request:
        a request answered, not a first-token time (see :class:`SignalSnapshot`)."""
        self.window(ref).unstreamed.append((now, latency))

    def answered(
        self,
        ref: WorkloadRef,
        *,
        now: float,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        """A request answered in full, with its prompt and completion token counts and
        the prompt tokens its engine found in its prefix cache."""
        self.window(ref).add_tokens(
            now=now,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
        )

    def set_job_queues(self, queues: dict[WorkloadRef, tuple[int, float]]) -> None:
        """Queued async jobs per workload: how many, and when (epoch seconds) the
        oldest was submitted; a workload left out has none."""
        for ref, w in self._windows.items():
            if ref not in queues:
                w.async_queue_depth = 0
                w.async_oldest_at = None
                self.metrics.async_queue_depth.labels(*ref).set(0)
        for ref, (depth, oldest_at) in queues.items():
            w = self.window(ref)
            w.async_queue_depth = depth
            w.async_oldest_at = oldest_at
            self.metrics.async_queue_depth.labels(*ref).set(depth)

    def set_caps(self, caps: dict[WorkloadRef, int]) -> None:
        """Each workload's per-replica cap as the gateway enforces it over all its
        worker processes (``gateway.window.gateway_cap``), reported in its snapshot; a
        workload left out has the gateway's."""
        self._caps = caps

    def last_requests(self) -> dict[WorkloadRef, float]:
        """When each workload last got a request; cheaper than a snapshot, which copies
        every TTFT sample in the window."""
        return {
            ref: w.last_request_at
            for ref, w in self._windows.items()
            if w.last_request_at is not None
        }

    def snapshot(self, *, now: float) -> dict[WorkloadRef, SignalSnapshot]:
        return {
            ref: w.snapshot(
                project=ref[0],
                workload=ref[1],
                now=now,
                window_sec=self.window_sec,
                concurrency_cap=self._caps.get(ref, self.concurrency_cap),
            )
            for ref, w in self._windows.items()
        }
