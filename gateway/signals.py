"""What the gateway measures per workload, for Prometheus and for the controller.

TTFT is the time from a request's arrival at the gateway to the first body byte from the
replica (for a non-streamed response, its first byte too), so it includes any queueing
and cold-start wait: what the caller felt. The controller reads :class:`SignalSnapshot`
values: raw TTFT samples with their wall-clock times over a window, so it can take its
own percentile over its own scale-up and scale-down windows.

The token mix is measured per answered request (chat and text completions, embeddings):
prompt tokens from the response's ``usage.prompt_tokens``, else estimated from the
request body (characters of ``messages[*].content`` / ``prompt`` ÷ 4); completion tokens
from ``usage.completion_tokens``, else the stream's token events, else ``max_tokens``.
The window keeps each request's pair and running sums, so a snapshot's mean and spread
(:class:`TokenStats`) cost nothing per request.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.routes import WorkloadRef

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


@dataclass(frozen=True, slots=True)
class TokenStats:
    """Prompt (input) and completion (output) tokens per request answered in the window:
    how many requests, and the mean and standard deviation of each."""

    requests: int
    input_mean: float
    input_std: float
    output_mean: float
    output_std: float

    @property
    def input_scv(self) -> float | None:
        """The spread of prompt lengths: variance over squared mean (``None``: mean 0)."""
        if self.input_mean <= 0:
            return None
        return (self.input_std / self.input_mean) ** 2

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "input_mean": self.input_mean,
            "input_std": self.input_std,
            "output_mean": self.output_mean,
            "output_std": self.output_std,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenStats:
        return cls(
            requests=int(data["requests"]),
            input_mean=float(data["input_mean"]),
            input_std=float(data["input_std"]),
            output_mean=float(data["output_mean"]),
            output_std=float(data["output_std"]),
        )


@dataclass(frozen=True, slots=True)
class SignalSnapshot:
    """One workload's signals at ``at`` (wall-clock seconds since the epoch).

    ``ttft_samples`` are ``(finished_at, seconds)`` pairs, oldest first, within
    ``window_sec`` of ``at``: the first body byte of streamed answers and of answers that
    come in one unit (embeddings, pooling, images, audio). ``unstreamed_samples`` are
    the same pairs for generations answered in one piece (``stream: false``), whose
    first byte follows the whole generation: they count as requests (rates, bursts),
    never as TTFT; the engines' histograms time their first tokens. ``queued`` counts
    requests held by the gateway (waiting for a free replica or a cold start);
    ``async_queue_depth`` counts queued async jobs.
    ``tokens`` is the token mix of requests answered within the window (``None``: none
    was); ``concurrency_cap`` the most requests the gateway sends one replica at once.
    """

    project: str
    workload: str
    at: float
    window_sec: float
    ttft_samples: tuple[tuple[float, float], ...]
    requests_in_window: int
    in_flight: int
    queued: int
    cold_start_waiting: int
    async_queue_depth: int
    last_request_at: float | None
    tokens: TokenStats | None = None
    concurrency_cap: int | None = None
    unstreamed_samples: tuple[tuple[float, float], ...] = ()
    replica_in_flight: Mapping[str, int] | None = None
    """Requests in flight per replica, by launch id (``None``: from a gateway that does
    not count them; a replica absent from the mapping has none)."""

    @property
    def request_rate(self) -> float:
        """Requests per second over the window."""
        return self.requests_in_window / self.window_sec

    def ttft_since(self, since: float) -> list[float]:
        return [v for t, v in self.ttft_samples if t >= since]

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "workload": self.workload,
            "at": self.at,
            "window_sec": self.window_sec,
            "ttft_samples": [list(s) for s in self.ttft_samples],
            "requests_in_window": self.requests_in_window,
            "request_rate": self.request_rate,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "cold_start_waiting": self.cold_start_waiting,
            "async_queue_depth": self.async_queue_depth,
            "last_request_at": self.last_request_at,
            "tokens": None if self.tokens is None else self.tokens.to_json(),
            "concurrency_cap": self.concurrency_cap,
            "unstreamed_samples": [list(s) for s in self.unstreamed_samples],
            "replica_in_flight": (
                None if self.replica_in_flight is None else dict(self.replica_in_flight)
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SignalSnapshot:
        return cls(
            project=str(data["project"]),
            workload=str(data["workload"]),
            at=float(data["at"]),
            window_sec=float(data["window_sec"]),
            ttft_samples=tuple((float(t), float(v)) for t, v in data["ttft_samples"]),
            requests_in_window=int(data["requests_in_window"]),
            in_flight=int(data["in_flight"]),
            queued=int(data["queued"]),
            cold_start_waiting=int(data["cold_start_waiting"]),
            async_queue_depth=int(data["async_queue_depth"]),
            last_request_at=(
                None if data["last_request_at"] is None else float(data["last_request_at"])
            ),
            # Absent from the answers of gateways that predate the token mix.
            tokens=None if data.get("tokens") is None else TokenStats.from_json(data["tokens"]),
            concurrency_cap=(
                None if data.get("concurrency_cap") is None else int(data["concurrency_cap"])
            ),
            unstreamed_samples=tuple(
                (float(t), float(v)) for t, v in data.get("unstreamed_samples", ())
            ),
            replica_in_flight=(
                None
                if data.get("replica_in_flight") is None
                else {str(k): int(v) for k, v in data["replica_in_flight"].items()}
            ),
        )

    @property
    def last_request_datetime(self) -> datetime | None:
        if self.last_request_at is None:
            return None
        return datetime.fromtimestamp(self.last_request_at, UTC)


class WorkloadWindow:
    """Sliding window of one workload's requests; trimmed lazily on write and read."""

    __slots__ = (
        "arrivals",
        "async_queue_depth",
        "cold_start_waiting",
        "in_flight",
        "last_request_at",
        "queued",
        "replica_in_flight",
        "token_sums",
        "tokens",
        "ttft",
        "unstreamed",
    )

    def __init__(self) -> None:
        self.ttft: deque[tuple[float, float]] = deque()
        self.unstreamed: deque[tuple[float, float]] = deque()
        self.arrivals: deque[float] = deque()
        self.tokens: deque[tuple[float, int, int]] = deque()
        # Sums of input, output, input² and output² over ``tokens``; whole numbers, so
        # adding and removing samples never drifts.
        self.token_sums = [0, 0, 0, 0]
        self.in_flight = 0
        self.replica_in_flight: dict[str, int] = {}
        """Requests in flight per replica (its route key: the launch id)."""
        self.queued = 0
        self.cold_start_waiting = 0
        self.async_queue_depth = 0
        self.last_request_at: float | None = None

    def trim(self, *, now: float, window_sec: float) -> None:
        horizon = now - window_sec
        while self.ttft and self.ttft[0][0] < horizon:
            self.ttft.popleft()
        while self.unstreamed and self.unstreamed[0][0] < horizon:
            self.unstreamed.popleft()
        while self.arrivals and self.arrivals[0] < horizon:
            self.arrivals.popleft()
        tokens, sums = self.tokens, self.token_sums
        while tokens and tokens[0][0] < horizon:
            _, tokens_in, tokens_out = tokens.popleft()
            sums[0] -= tokens_in
            sums[1] -= tokens_out
            sums[2] -= tokens_in * tokens_in
            sums[3] -= tokens_out * tokens_out

    def enter(self, replica: str) -> None:
        """A request was sent to ``replica``."""
        self.in_flight += 1
        self.replica_in_flight[replica] = self.replica_in_flight.get(replica, 0) + 1

    def leave(self, replica: str) -> None:
        """A request sent to ``replica`` is done."""
        self.in_flight -= 1
        left = self.replica_in_flight.get(replica, 0) - 1
        if left > 0:
            self.replica_in_flight[replica] = left
        else:
            self.replica_in_flight.pop(replica, None)

    def add_tokens(self, *, now: float, input_tokens: int, output_tokens: int) -> None:
        self.tokens.append((now, input_tokens, output_tokens))
        sums = self.token_sums
        sums[0] += input_tokens
        sums[1] += output_tokens
        sums[2] += input_tokens * input_tokens
        sums[3] += output_tokens * output_tokens

    def token_stats(self) -> TokenStats | None:
        n = len(self.tokens)
        if not n:
            return None
        total_in, total_out, square_in, square_out = self.token_sums
        return TokenStats(
            requests=n,
            input_mean=total_in / n,
            input_std=_std(total_in, square_in, n),
            output_mean=total_out / n,
            output_std=_std(total_out, square_out, n),
        )


def _std(total: int, squares: int, n: int) -> float:
    """Population standard deviation from exact integer sums."""
    return math.sqrt(max(squares * n - total * total, 0)) / n


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
        self.in_flight = Gauge(
            "autoscaler_gateway_in_flight_requests",
            "Requests being served by a replica.",
            labels,
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

    __slots__ = ("_metrics", "_ref", "_requests", "duration", "in_flight", "ttft")

    def __init__(self, metrics: Metrics, ref: WorkloadRef) -> None:
        self._metrics = metrics
        self._ref = ref
        self.ttft = metrics.ttft.labels(*ref)
        self.duration = metrics.duration.labels(*ref)
        self.in_flight = metrics.in_flight.labels(*ref)
        self._requests: dict[int, Counter] = {}

    def requests(self, status: int) -> Counter:
        """The ``requests_total`` child for ``status``."""
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(*self._ref, str(status))
        return child


class Signals:
    """Per-workload windows and metrics; the one place requests are recorded."""

    def __init__(
        self, *, window_sec: float, metrics: Metrics, concurrency_cap: int | None = None
    ) -> None:
        self.window_sec = window_sec
        self.metrics = metrics
        self.concurrency_cap = concurrency_cap
        self._windows: dict[WorkloadRef, WorkloadWindow] = {}
        self._children: dict[WorkloadRef, WorkloadMetrics] = {}

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
        w.arrivals.append(now)
        w.last_request_at = now
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
        self, ref: WorkloadRef, *, now: float, input_tokens: int, output_tokens: int
    ) -> None:
        """A request answered in full, with its prompt and completion token counts."""
        self.window(ref).add_tokens(now=now, input_tokens=input_tokens, output_tokens=output_tokens)

    def set_async_depth(self, depths: dict[WorkloadRef, int]) -> None:
        for ref, w in self._windows.items():
            if ref not in depths:
                w.async_queue_depth = 0
                self.metrics.async_queue_depth.labels(*ref).set(0)
        for ref, depth in depths.items():
            self.window(ref).async_queue_depth = depth
            self.metrics.async_queue_depth.labels(*ref).set(depth)

    def last_requests(self) -> dict[WorkloadRef, float]:
        """When each workload last got a request; cheaper than a snapshot, which copies
        every TTFT sample in the window."""
        return {
            ref: w.last_request_at
            for ref, w in self._windows.items()
            if w.last_request_at is not None
        }

    def snapshot(self, *, now: float) -> dict[WorkloadRef, SignalSnapshot]:
        out: dict[WorkloadRef, SignalSnapshot] = {}
        for ref, w in self._windows.items():
            w.trim(now=now, window_sec=self.window_sec)
            out[ref] = SignalSnapshot(
                project=ref[0],
                workload=ref[1],
                at=now,
                window_sec=self.window_sec,
                ttft_samples=tuple(w.ttft),
                requests_in_window=len(w.arrivals),
                in_flight=w.in_flight,
                queued=w.queued,
                cold_start_waiting=w.cold_start_waiting,
                async_queue_depth=w.async_queue_depth,
                last_request_at=w.last_request_at,
                tokens=w.token_stats(),
                concurrency_cap=self.concurrency_cap,
                unstreamed_samples=tuple(w.unstreamed),
                replica_in_flight=dict(w.replica_in_flight),
            )
        return out
