"""The simulated gateway: a wait queue, least-outstanding-work balancing, and the signals.

Routing uses the gateway's own pure balancer (``gateway.balancing.choose_replica``) over
the same replica view the real gateway builds (outstanding requests and their prompt
tokens, the per-replica concurrency cap, draining). TTFT is measured as the gateway
measures it: from the request's arrival at the gateway to its first token, queueing and
cold-start waits included; the request rate is arrivals over the gateway's signal
window.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from autoscaler.decide.signals import Signals
from gateway.balancing import ReplicaLoad, choose_replica
from gateway.window import (
    COLD_START_TIMEOUT_SEC,
    QUEUE_TIMEOUT_SEC,
    REPLICA_CONCURRENCY_CAP,
    SIGNAL_WINDOW_SEC,
)


class Outcome(StrEnum):
    PENDING = "pending"
    SERVED = "served"
    REFUSED = "refused"
    """Longer than the model's context: refused by the gateway at once."""
    REJECTED = "rejected"
    """Waited past the gateway's deadline for a replica: 503."""
    CUT = "cut"
    """Its replica went away (spot interruption, drain timeout) after the first token."""


@dataclass(slots=True)
class RequestRecord:
    """One request's life in the simulation (times in simulated seconds)."""

    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    deadline_s: float = math.inf
    first_token_s: float | None = None
    finished_s: float | None = None
    outcome: Outcome = Outcome.PENDING
    replica: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s


def as_datetime(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=UTC)


@dataclass(slots=True)
class SimGateway:
    """Queue, balancing and signals for one workload. ``epoch_s`` is simulated time 0."""

    rng: random.Random
    epoch_s: float
    cap: int = REPLICA_CONCURRENCY_CAP
    queue: deque[RequestRecord] = field(default_factory=deque)
    arrivals: deque[float] = field(default_factory=deque)
    ttft: deque[tuple[float, datetime, float]] = field(default_factory=deque)
    in_flight: int = 0
    last_request_s: float | None = None
    concurrency: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))
    finished: deque[tuple[float, int, int]] = field(default_factory=deque)
    """``(time, prompt tokens, completion tokens)`` of requests answered, for the mix."""
    _mix_sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Prompt tokens, completion tokens and squared prompt tokens of ``finished``."""
    _next_second: float = 0.0
    _earliest_deadline: float = math.inf
    """No queued request's deadline is before this: :meth:`expire` scans the queue only
    when one may have passed (a day's replay has a million events and a queue that can
    hold thousands in a backlog)."""

    def observe_until(self, t: float) -> None:
        """Record concurrency (in flight + queued) once per second up to ``t``, as a
        per-second metrics scrape would; the state is constant between events."""
        while self._next_second <= t:
            self.concurrency.append((self._next_second, self.in_flight + len(self.queue)))
            self._next_second += 1.0

    def arrive(self, record: RequestRecord, *, t: float, any_ready: bool) -> None:
        self.arrivals.append(t)
        self.last_request_s = t
        record.deadline_s = t + (QUEUE_TIMEOUT_SEC if any_ready else COLD_START_TIMEOUT_SEC)
        self._earliest_deadline = min(self._earliest_deadline, record.deadline_s)
        self.queue.append(record)

    def requeue(self, record: RequestRecord, *, t: float) -> None:
        """A request whose replica vanished before its first token: to the front."""
        record.replica = None
        record.deadline_s = max(record.deadline_s, t + QUEUE_TIMEOUT_SEC)
        self._earliest_deadline = min(self._earliest_deadline, record.deadline_s)
        self.queue.appendleft(record)

    def expire(self, t: float) -> list[RequestRecord]:
        """Requests whose wait passed the deadline: answered 503."""
        if t <= self._earliest_deadline or not self.queue:
            return []
        expired = [r for r in self.queue if r.deadline_s < t]
        if expired:
            self.queue = deque(r for r in self.queue if r.deadline_s >= t)
            for r in expired:
                r.outcome = Outcome.REJECTED
        self._earliest_deadline = min((r.deadline_s for r in self.queue), default=math.inf)
        return expired

    def choose(self, loads: list[ReplicaLoad]) -> ReplicaLoad | None:
        return choose_replica(loads, rng=self.rng)

    def first_token(self, record: RequestRecord, *, t: float) -> None:
        ttft = t - record.arrival_s
        self.ttft.append((t, as_datetime(self.epoch_s + t), ttft))

    def finish(self, record: RequestRecord, *, t: float) -> None:
        """A request answered in full: its token counts (the response's ``usage``)."""
        self.finished.append((t, record.input_tokens, record.output_tokens))
        self._mix_sums[0] += record.input_tokens
        self._mix_sums[1] += record.output_tokens
        self._mix_sums[2] += record.input_tokens * record.input_tokens

    def token_mix(self, t: float) -> tuple[float, float] | None:
        """Mean prompt and completion tokens of requests answered over the signal window.

        The real gateway does not report this yet; it would read ``usage`` from responses.
        """
        while self.finished and self.finished[0][0] < t - SIGNAL_WINDOW_SEC:
            _, tokens_in, tokens_out = self.finished.popleft()
            self._mix_sums[0] -= tokens_in
            self._mix_sums[1] -= tokens_out
            self._mix_sums[2] -= tokens_in * tokens_in
        if not self.finished:
            return None
        n = len(self.finished)
        return self._mix_sums[0] / n, self._mix_sums[1] / n

    def prompt_scv(self, t: float) -> float | None:
        """The spread of prompt lengths over the signal window (variance over the squared
        mean), measured like :meth:`token_mix`; ``None`` before any answer."""
        mix = self.token_mix(t)
        if mix is None or mix[0] <= 0:
            return None
        mean_square = self._mix_sums[2] / len(self.finished)
        return max(mean_square / (mix[0] * mix[0]) - 1.0, 0.0)

    def trim(self, t: float, *, keep_s: float) -> None:
        horizon = t - keep_s
        while self.ttft and self.ttft[0][0] < horizon:
            self.ttft.popleft()
        arrivals_horizon = t - max(SIGNAL_WINDOW_SEC, keep_s)
        while self.arrivals and self.arrivals[0] < arrivals_horizon:
            self.arrivals.popleft()

    def rate(self, t: float, *, window_s: float) -> float:
        """Arrivals per second over the last ``window_s``."""
        since = t - window_s
        count = 0
        for at in reversed(self.arrivals):
            if at < since:
                break
            count += 1
        return count / window_s

    def mean_concurrency(self, t: float, *, window_s: float) -> float:
        """Mean of the per-second concurrency samples over the last ``window_s``."""
        values = [c for at, c in self.concurrency if at > t - window_s]
        return sum(values) / len(values) if values else 0.0

    def ttft_quantile(self, t: float, *, window_s: float, q: float) -> float | None:
        values = sorted(v for at, _, v in self.ttft if at > t - window_s)
        if not values:
            return None
        return values[max(math.ceil(q * len(values)) - 1, 0)]

    def signals(self, t: float, *, keep_s: float) -> Signals:
        """The controller's view: what ``gateway.signals`` reports, as ``decide`` takes it."""
        self.trim(t, keep_s=keep_s)
        last = self.last_request_s
        return Signals(
            ttft_samples=tuple((at, v) for _, at, v in self.ttft),
            # Before a full window has passed since time 0, the traffic before the trace
            # is unknown: the rate is over the time elapsed, as if it had been the same.
            request_rate=self.rate(t, window_s=min(SIGNAL_WINDOW_SEC, max(t, 60.0))),
            in_flight=self.in_flight,
            queue_depth=len(self.queue),
            last_request_at=None if last is None else as_datetime(self.epoch_s + last),
        )
