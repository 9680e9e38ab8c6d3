"""The gateway's measurement of one workload, as the controller and the simulator read it.

One typed contract across the process boundary: the gateway records requests in a
:class:`WorkloadWindow` and answers :class:`SignalSnapshot` values (in process, or as
JSON from ``GET /internal/signals``); the controller maps a snapshot to its decision
inputs (``autoscaler.decide.inputs.measured_of``), and the trace simulator records its
simulated requests in the same window and reads the same snapshot. Pure: no clock, no
I/O, no Prometheus (``gateway.signals`` adds the metrics).

The defaults the gateway runs with, which the controller and the simulator assume when
a measurement does not say, live here too: :data:`REPLICA_CONCURRENCY_CAP`,
:data:`SIGNAL_WINDOW_SEC`, :data:`QUEUE_TIMEOUT_SEC`, :data:`COLD_START_TIMEOUT_SEC`.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

_K = TypeVar("_K")

REPLICA_CONCURRENCY_CAP = 64
"""The most requests the gateway sends one replica at once (``GatewaySettings``), for a
workload that sets no ``per_worker``."""


def replica_cap(per_worker: int | None, default: int = REPLICA_CONCURRENCY_CAP) -> int:
    """The most requests one replica of a workload is sent at once: its spec's
    ``per_worker`` where set, else the gateway's cap (``default``). The one rule the
    gateway, the scaler and the simulator all apply."""
    return default if per_worker is None else per_worker


def worker_share(cap: int, workers: int) -> int:
    """What one of ``workers`` gateway processes serving the same port may send a replica
    at once: an even share of the replica's ``cap``, at least 1.

    Each worker keeps its own count (no shared counter on the request path), so the
    replica never gets more than ``cap`` from the gateway as a whole, at two costs: a
    worker whose share is full queues a request while another worker may have room on
    the same replica (load is spread by connection, not by request), and a cap below
    ``workers`` is exceeded up to ``workers`` requests (the floor of 1 keeps every worker
    able to serve)."""
    return max(1, cap // max(1, workers))


def gateway_cap(cap: int, workers: int) -> int:
    """What ``workers`` gateway processes serving the same port send one replica at most,
    all together: the sum of their shares (:func:`worker_share`), which is what a
    snapshot reports as ``concurrency_cap``. The cap itself where the workers divide it,
    less where they do not (64 over 3 workers: 3 times 21 is 63), more where the cap is below
    the worker count (the floor of 1 each: a cap of 2 over 4 workers is 4)."""
    return worker_share(cap, workers) * max(1, workers)


def batch_reserve(cap: int) -> int:
    """The slots of a replica that batch lines leave to live traffic: a quarter of its
    cap, rounded down (none under a cap of 4, where live requests still go first
    whenever they wait, but may wait for a batch line to finish)."""
    return cap // 4


SIGNAL_WINDOW_SEC = 900.0
"""How far back the gateway's window keeps requests: rates, TTFT samples, token mix."""

QUEUE_TIMEOUT_SEC = 60.0
"""How long a request waits for a replica with room before a 503."""

COLD_START_TIMEOUT_SEC = 300.0
"""How long a request is held while the workload has no ready replica."""

PROMPT_BUCKETS_PER_DOUBLING = 8
"""Resolution of the prompt-length histogram: a bucket's upper bound is 2^(1/8), about
9%, above its lower one. Bucket ``b`` holds prompts of ``2^((b-1)/8)`` (exclusive) to
``2^(b/8)`` tokens (inclusive); bucket 0 holds prompts of at most one token. A prompt of a
million tokens is bucket 160, so a histogram has at most about 160 entries whatever the
traffic."""


def prompt_bucket(tokens: int) -> int:
    """The histogram bucket of a prompt of ``tokens`` tokens
    (:data:`PROMPT_BUCKETS_PER_DOUBLING` to a doubling)."""
    if tokens <= 1:
        return 0
    bucket = math.ceil(PROMPT_BUCKETS_PER_DOUBLING * math.log2(tokens) - 1e-9)
    # Float rounding near a bound: the bucket's upper bound must hold the prompt.
    return bucket if bucket_tokens(bucket) >= tokens else bucket + 1


@functools.lru_cache(maxsize=1024)
def bucket_tokens(bucket: int) -> int:
    """The longest prompt bucket ``bucket`` holds (tokens): computed once per bucket and
    kept (the histogram's readers ask it of every bucket on every read; a histogram of
    prompts up to 2^64 tokens has fewer buckets than the 1024 kept)."""
    bound: float = 2.0 ** (bucket / PROMPT_BUCKETS_PER_DOUBLING)
    return math.floor(bound + 1e-9)


def share_within(histogram: Mapping[int, int], tokens: int) -> float | None:
    """The share of the prompts counted in ``histogram`` (bucket -> prompts) whose bucket
    lies wholly within ``tokens`` tokens: a lower bound on the share no longer than
    ``tokens`` (a prompt is taken at its bucket's upper bound, so at most 9% longer than it
    was). ``None`` for an empty histogram."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    within = sum(n for b, n in histogram.items() if bucket_tokens(b) <= tokens)
    return within / total


@dataclass(frozen=True, slots=True)
class TokenStats:
    """Prompt (input) and completion (output) tokens per request answered in the window:
    how many requests, and the mean and standard deviation of each."""

    requests: int
    input_mean: float
    input_std: float
    output_mean: float
    output_std: float
    cached_mean: float = 0.0
    """Mean prompt tokens per request the engines found in their prefix caches (the
    answer's ``usage.prompt_tokens_details.cached_tokens``; 0 when not reported)."""
    input_histogram: Mapping[int, int] = field(default_factory=dict)
    """Prompts per length bucket (:func:`prompt_bucket`): the measured distribution of
    prompt lengths, its tail included, which a mean and a spread do not give (empty: not
    reported, from a gateway that predates it)."""

    @property
    def cached_share(self) -> float:
        """Share of prompt tokens served from prefix caches: the measured hit rate."""
        if self.input_mean <= 0:
            return 0.0
        return min(max(self.cached_mean / self.input_mean, 0.0), 1.0)

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
            "cached_mean": self.cached_mean,
            "input_histogram": {str(b): n for b, n in sorted(self.input_histogram.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenStats:
        return cls(
            requests=int(data["requests"]),
            input_mean=float(data["input_mean"]),
            input_std=float(data["input_std"]),
            output_mean=float(data["output_mean"]),
            output_std=float(data["output_std"]),
            cached_mean=float(data.get("cached_mean", 0.0)),
            input_histogram={
                int(b): int(n) for b, n in (data.get("input_histogram") or {}).items()
            },
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
    ``async_queue_depth`` counts queued async jobs, ``async_oldest_at`` is when the oldest
    of them was submitted (``None``: none queued).
    ``tokens`` is the token mix of requests answered within the window (``None``: none
    was); ``concurrency_cap`` the most requests the gateway sends one replica at once
    (over all its worker processes: :func:`gateway_cap`).
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
    async_oldest_at: float | None = None
    replica_cache_blocks: Mapping[str, int] = field(default_factory=dict)
    """Prompt blocks the gateway believes each replica's prefix cache holds, by launch id
    (``gateway.prefix.PrefixIndex``): how warm it is. A scale-down drains the coldest."""

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
            "async_oldest_at": self.async_oldest_at,
            "replica_cache_blocks": dict(self.replica_cache_blocks),
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
            async_oldest_at=(
                None if data.get("async_oldest_at") is None else float(data["async_oldest_at"])
            ),
            replica_cache_blocks={
                str(k): int(v) for k, v in (data.get("replica_cache_blocks") or {}).items()
            },
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
        "async_oldest_at",
        "async_queue_depth",
        "cold_start_waiting",
        "in_flight",
        "input_buckets",
        "last_request_at",
        "queued",
        "replica_cache_blocks",
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
        self.tokens: deque[tuple[float, int, int, int]] = deque()
        # Sums of input, output, input², output² and cached over ``tokens``; whole numbers, so
        # adding and removing samples never drifts.
        self.token_sums = [0, 0, 0, 0, 0]
        # Prompts per length bucket over ``tokens`` (``prompt_bucket``), kept as they come
        # and go: at most about 160 entries.
        self.input_buckets: dict[int, int] = {}
        self.in_flight = 0
        self.replica_in_flight: dict[str, int] = {}
        """Requests in flight per replica (its route key: the launch id)."""
        self.replica_cache_blocks: dict[str, int] = {}
        """Blocks the gateway's prefix index holds per replica (its warmth)."""
        self.queued = 0
        self.cold_start_waiting = 0
        self.async_queue_depth = 0
        self.async_oldest_at: float | None = None
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
            _, tokens_in, tokens_out, cached = tokens.popleft()
            bucket = prompt_bucket(tokens_in)
            left = self.input_buckets[bucket] - 1
            if left:
                self.input_buckets[bucket] = left
            else:
                del self.input_buckets[bucket]
            sums[4] -= cached
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

    def add_tokens(
        self, *, now: float, input_tokens: int, output_tokens: int, cached_tokens: int = 0
    ) -> None:
        """A request answered with these token counts; ``cached_tokens`` of its prompt
        came from the engine's prefix cache."""
        self.tokens.append((now, input_tokens, output_tokens, cached_tokens))
        bucket = prompt_bucket(input_tokens)
        self.input_buckets[bucket] = self.input_buckets.get(bucket, 0) + 1
        sums = self.token_sums
        sums[4] += cached_tokens
        sums[0] += input_tokens
        sums[1] += output_tokens
        sums[2] += input_tokens * input_tokens
        sums[3] += output_tokens * output_tokens

    def arrived(self, *, now: float) -> None:
        """A request reached the gateway."""
        self.arrivals.append(now)
        self.last_request_at = now

    def snapshot(
        self,
        *,
        project: str,
        workload: str,
        now: float,
        window_sec: float,
        concurrency_cap: int | None,
    ) -> SignalSnapshot:
        """The window, trimmed to ``window_sec`` before ``now``, as the controller reads it."""
        self.trim(now=now, window_sec=window_sec)
        return SignalSnapshot(
            project=project,
            workload=workload,
            at=now,
            window_sec=window_sec,
            ttft_samples=tuple(self.ttft),
            requests_in_window=len(self.arrivals),
            in_flight=self.in_flight,
            queued=self.queued,
            cold_start_waiting=self.cold_start_waiting,
            async_queue_depth=self.async_queue_depth,
            last_request_at=self.last_request_at,
            tokens=self.token_stats(),
            concurrency_cap=concurrency_cap,
            unstreamed_samples=tuple(self.unstreamed),
            replica_in_flight=dict(self.replica_in_flight),
            async_oldest_at=self.async_oldest_at,
            replica_cache_blocks=dict(self.replica_cache_blocks),
        )

    def token_stats(self) -> TokenStats | None:
        n = len(self.tokens)
        if not n:
            return None
        total_in, total_out, square_in, square_out, cached = self.token_sums
        return TokenStats(
            requests=n,
            input_mean=total_in / n,
            input_std=_std(total_in, square_in, n),
            output_mean=total_out / n,
            output_std=_std(total_out, square_out, n),
            cached_mean=cached / n,
            input_histogram=dict(self.input_buckets),
        )


def _std(total: int, squares: int, n: int) -> float:
    """Population standard deviation from exact integer sums."""
    return math.sqrt(max(squares * n - total * total, 0)) / n


def merge_token_stats(parts: Iterable[TokenStats | None]) -> TokenStats | None:
    """The token mix of the union of the requests ``parts`` describe: the pooled mean
    and population standard deviation, exact up to float rounding."""
    present = [t for t in parts if t is not None and t.requests > 0]
    if not present:
        return None
    n = sum(t.requests for t in present)

    def pooled(
        mean: Callable[[TokenStats], float], std: Callable[[TokenStats], float]
    ) -> tuple[float, float]:
        total = sum(t.requests * mean(t) for t in present) / n
        second = sum(t.requests * (std(t) ** 2 + mean(t) ** 2) for t in present) / n
        return total, math.sqrt(max(second - total * total, 0.0))

    input_mean, input_std = pooled(lambda t: t.input_mean, lambda t: t.input_std)
    output_mean, output_std = pooled(lambda t: t.output_mean, lambda t: t.output_std)
    return TokenStats(
        requests=n,
        input_mean=input_mean,
        input_std=input_std,
        output_mean=output_mean,
        output_std=output_std,
        cached_mean=sum(t.requests * t.cached_mean for t in present) / n,
        input_histogram=_sum_counts(t.input_histogram for t in present),
    )


def _sum_counts(parts: Iterable[Mapping[_K, int] | None]) -> dict[_K, int]:
    out: dict[_K, int] = {}
    for part in parts:
        for key, value in (part or {}).items():
            out[key] = out.get(key, 0) + value
    return out


def merge_snapshots(parts: Sequence[SignalSnapshot]) -> SignalSnapshot:
    """One workload's snapshots from several gateway processes (the workers sharing a
    port, or gateways behind a load balancer) as one gateway that saw all their requests.

    Counts add (requests in the window, in flight, queued, cold-start waits, in flight
    per replica); raw TTFT samples are merged in time order, so any percentile the
    controller takes is the percentile of every request, never an average of
    percentiles; the token mix is pooled (:func:`merge_token_stats`). What every process
    reads from the store rather than counts itself is the same in each and taken once:
    the async queue (its depth, its oldest job), and the per-replica cap, which each
    worker reports for the whole pool (:func:`gateway_cap`). A replica's prefix
    cache warmth is the most blocks any process believes it holds: a lower bound, as
    the processes' blocks overlap (shared system prompts) by an amount none of them
    knows. ``at`` and ``last_request_at`` are the latest."""
    if not parts:
        raise ValueError("merge_snapshots needs at least one snapshot")
    first = parts[0]
    if len(parts) == 1:
        return first
    replica_in_flight = (
        None
        if all(p.replica_in_flight is None for p in parts)
        else _sum_counts(p.replica_in_flight for p in parts)
    )
    warmth: dict[str, int] = {}
    for p in parts:
        for key, blocks in p.replica_cache_blocks.items():
            warmth[key] = max(warmth.get(key, 0), blocks)
    last = [p.last_request_at for p in parts if p.last_request_at is not None]
    oldest = [p.async_oldest_at for p in parts if p.async_oldest_at is not None]
    caps = [p.concurrency_cap for p in parts if p.concurrency_cap is not None]
    return SignalSnapshot(
        project=first.project,
        workload=first.workload,
        at=max(p.at for p in parts),
        window_sec=max(p.window_sec for p in parts),
        ttft_samples=tuple(heapq.merge(*(p.ttft_samples for p in parts))),
        requests_in_window=sum(p.requests_in_window for p in parts),
        in_flight=sum(p.in_flight for p in parts),
        queued=sum(p.queued for p in parts),
        cold_start_waiting=sum(p.cold_start_waiting for p in parts),
        async_queue_depth=max(p.async_queue_depth for p in parts),
        last_request_at=max(last) if last else None,
        tokens=merge_token_stats(p.tokens for p in parts),
        concurrency_cap=max(caps) if caps else None,
        unstreamed_samples=tuple(heapq.merge(*(p.unstreamed_samples for p in parts))),
        replica_in_flight=replica_in_flight,
        async_oldest_at=min(oldest) if oldest else None,
        replica_cache_blocks=warmth,
    )


@dataclass(frozen=True, slots=True)
class SignalsView:
    """One read of a gateway's signals: its snapshots per workload, ``(project,
    workload)``, and, when the read did not reach all of it, what it missed
    (``incomplete``, e.g. "1 of 4 gateway workers did not answer (worker 2)"; ``None``:
    complete). The counts of an incomplete read are lower bounds: a worker's requests in
    flight are in them only when it answered. A gateway in one process, and the trace
    simulator's, always read complete."""

    snapshots: Mapping[tuple[str, str], SignalSnapshot] = field(default_factory=dict)
    incomplete: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The body of ``GET /internal/signals``."""
        return {
            "signals": [snap.to_json() for snap in self.snapshots.values()],
            "incomplete": self.incomplete,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SignalsView:
        snapshots = [SignalSnapshot.from_json(item) for item in data["signals"]]
        # Absent from the answers of gateways that predate it: they read one process.
        incomplete = data.get("incomplete")
        return cls(
            snapshots={(s.project, s.workload): s for s in snapshots},
            incomplete=None if incomplete is None else str(incomplete),
        )


def merge_views(
    views: Iterable[Iterable[SignalSnapshot]],
) -> dict[tuple[str, str], SignalSnapshot]:
    """Every process's snapshots merged per workload (:func:`merge_snapshots`), keyed
    ``(project, workload)``; a workload only some processes have seen is merged from
    those."""
    grouped: dict[tuple[str, str], list[SignalSnapshot]] = {}
    for view in views:
        for snap in view:
            grouped.setdefault((snap.project, snap.workload), []).append(snap)
    return {ref: merge_snapshots(parts) for ref, parts in grouped.items()}
