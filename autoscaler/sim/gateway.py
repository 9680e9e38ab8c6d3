"""The simulated gateway: a wait queue, least-outstanding-work balancing, and the signals.

Routing uses the gateway's own pure balancer (``gateway.balancing.choose_replica``) over
the same replica view the real gateway builds (outstanding requests and their prompt
tokens, the per-replica concurrency cap, draining). The signals are the gateway's own:
arrivals, first tokens, answers' token counts and requests in flight per replica are
recorded in a ``gateway.window.WorkloadWindow`` (epoch seconds, simulated time 0 at
``epoch_s``), and the controller reads the ``SignalSnapshot`` it answers, mapped by
``decide.inputs.measured_of`` as the controller maps a real gateway's. TTFT is measured
as the gateway measures it: from the request's arrival at the gateway to its first
token, queueing and cold-start waits included; the request rate is arrivals over the
gateway's signal window.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from gateway.balancing import ReplicaLoad, choose_replica
from gateway.window import (
    COLD_START_TIMEOUT_SEC,
    QUEUE_TIMEOUT_SEC,
    REPLICA_CONCURRENCY_CAP,
    SIGNAL_WINDOW_SEC,
    SignalSnapshot,
    WorkloadWindow,
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
    queued: bool = False
    """Waiting in the gateway's queue for a replica."""

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
    """Requests waiting, first to be sent at the left. Requests that expired are left in
    it (``queued`` false) until they reach the front: :meth:`pop` skips them and
    :attr:`waiting` counts only the live ones."""
    waiting: int = 0
    """Requests waiting for a replica (the live entries of ``queue``)."""
    window: WorkloadWindow = field(default_factory=WorkloadWindow)
    """What the gateway records of this workload, in epoch seconds."""
    concurrency: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))
    """Per-second concurrency samples (a metrics scrape, for Knative's KPA)."""
    _next_second: float = 0.0
    _deadlines: list[tuple[float, int, RequestRecord]] = field(default_factory=list)
    """A heap of ``(deadline, order queued, request)``: :meth:`expire` pops only the
    requests whose deadline passed (a day's replay has a million events and a queue that
    can hold thousands in a backlog). An entry whose request left the queue, or whose
    deadline a requeue moved, is dropped when it surfaces."""
    _pushed: int = 0

    @property
    def in_flight(self) -> int:
        """Requests sent to a replica and not yet done."""
        return self.window.in_flight

    def observe_until(self, t: float) -> None:
        """Record concurrency (in flight + queued) once per second up to ``t``, as a
        per-second metrics scrape would; the state is constant between events."""
        while self._next_second <= t:
            self.concurrency.append((self._next_second, self.window.in_flight + self.waiting))
            self._next_second += 1.0

    def seen(self, t: float) -> None:
        """A request reached the gateway at ``t`` (and was queued, or refused)."""
        self.window.arrived(now=self.epoch_s + t)

    def arrive(self, record: RequestRecord, *, t: float, any_ready: bool) -> None:
        self.seen(t)
        record.deadline_s = t + (QUEUE_TIMEOUT_SEC if any_ready else COLD_START_TIMEOUT_SEC)
        self._enqueue(record)
        self.queue.append(record)

    def requeue(self, record: RequestRecord, *, t: float) -> None:
        """A request whose replica vanished before its first token: to the front."""
        record.replica = None
        record.deadline_s = max(record.deadline_s, t + QUEUE_TIMEOUT_SEC)
        self._enqueue(record)
        self.queue.appendleft(record)

    def _enqueue(self, record: RequestRecord) -> None:
        record.queued = True
        self.waiting += 1
        heapq.heappush(self._deadlines, (record.deadline_s, self._pushed, record))
        self._pushed += 1

    def peek(self) -> RequestRecord | None:
        """The request :meth:`pop` would send next, left in the queue."""
        queue = self.queue
        while queue and not queue[0].queued:
            queue.popleft()  # expired while it waited
        return queue[0] if queue else None

    def pop(self) -> RequestRecord | None:
        """The request to send next (the longest waiting; a requeued one first)."""
        queue = self.queue
        while queue:
            record = queue.popleft()
            if record.queued:
                record.queued = False
                self.waiting -= 1
                return record
        return None

    def expire(self, t: float) -> list[RequestRecord]:
        """Requests whose wait passed the deadline, the earliest deadline first: answered
        503. Pops only those from the deadline heap: no rescan of the queue."""
        heap = self._deadlines
        expired: list[RequestRecord] = []
        while heap and heap[0][0] < t:
            deadline, _, record = heapq.heappop(heap)
            if not record.queued or record.deadline_s != deadline:
                continue  # sent since, or requeued with a later deadline
            record.queued = False
            record.outcome = Outcome.REJECTED
            self.waiting -= 1
            expired.append(record)
        if not self.waiting:
            self.queue.clear()
        return expired

    def choose(self, loads: list[ReplicaLoad]) -> ReplicaLoad | None:
        return choose_replica(loads, rng=self.rng)

    def sent(self, record: RequestRecord, replica: str) -> None:
        """``record`` was sent to ``replica``."""
        record.replica = replica
        self.window.enter(replica)

    def left(self, record: RequestRecord) -> None:
        """``record``'s replica is done with it (answered, or the replica went away)."""
        assert record.replica is not None
        self.window.leave(record.replica)

    def first_token(self, record: RequestRecord, *, t: float) -> None:
        self.window.ttft.append((self.epoch_s + t, t - record.arrival_s))

    def finish(self, record: RequestRecord, *, t: float, cached_tokens: int = 0) -> None:
        """A request answered in full: its token counts (the response's ``usage``, with
        the prompt tokens its engine found cached)."""
        self.window.add_tokens(
            now=self.epoch_s + t,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            cached_tokens=cached_tokens,
        )

    def window_sec(self, t: float) -> float:
        """The gateway's signal window at ``t``. Before a full window has passed since
        time 0 the traffic before the trace is unknown: the window is the time elapsed
        (at least a minute), so the rate is as if it had been the same before."""
        return min(SIGNAL_WINDOW_SEC, max(t, 60.0))

    def snapshot(self, t: float) -> SignalSnapshot:
        """What the gateway answers the controller at ``t`` (``gateway.signals``)."""
        self.window.queued = self.waiting
        return self.window.snapshot(
            project="sim",
            workload="sim",
            now=self.epoch_s + t,
            window_sec=self.window_sec(t),
            concurrency_cap=self.cap,
        )

    def rate(self, t: float, *, window_s: float) -> float:
        """Arrivals per second over the last ``window_s`` (at most the signal window)."""
        since = self.epoch_s + t - window_s
        count = 0
        for at in reversed(self.window.arrivals):
            if at < since:
                break
            count += 1
        return count / window_s

    def mean_concurrency(self, t: float, *, window_s: float) -> float:
        """Mean of the per-second concurrency samples over the last ``window_s``."""
        values = [c for at, c in self.concurrency if at > t - window_s]
        return sum(values) / len(values) if values else 0.0

    def ttft_quantile(self, t: float, *, window_s: float, q: float) -> float | None:
        samples = self.window.ttft
        since = self.epoch_s + t - window_s
        # In time order: skip to the first sample after ``since`` from the newest end.
        count = 0
        for at, _ in reversed(samples):
            if at <= since:
                break
            count += 1
        values = sorted(v for _, v in itertools.islice(samples, len(samples) - count, None))
        if not values:
            return None
        return values[max(math.ceil(q * len(values)) - 1, 0)]
