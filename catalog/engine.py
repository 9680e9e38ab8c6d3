"""A continuous-batching engine on a ``catalog.perf.ServingProfile``.

The engine (:class:`BatchEngine`) is continuous batching on a serving profile: requests are
admitted while fewer than ``max_batch`` sequences run, and wait in FIFO order beyond it;
admitted prompts are prefilled one at a time, first come first served, and prefill takes
priority over decoding (decode steps pause while a prompt is prefilled, as in vLLM's
default scheduler before chunked prefill). The first token appears when a request's
prefill ends; the rest come one per decode step. Between events every running sequence
advances at the same rate, so the engine jumps from event to event instead of stepping
token by token: a one-hour trace of twenty thousand requests simulates in well under a
second.

Pure: no clock, no I/O; time is whatever its caller says.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from catalog.perf import ServingProfile


class EventKind(StrEnum):
    """What happened to a request inside the engine."""

    FIRST_TOKEN = "first_token"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """When a request arrived, started prefill, produced its first token and finished."""

    request_id: int
    arrival_s: float
    admitted_s: float
    first_token_s: float
    finished_s: float
    input_tokens: int
    output_tokens: int

    @property
    def queue_s(self) -> float:
        """Time spent waiting for a batch slot."""
        return self.admitted_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        """Time to first token."""
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        """Arrival to last token."""
        return self.finished_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """A first token or a finish, at engine time ``at_s``; ``timing`` is set on FINISHED
    (unless the engine keeps no timings: ``BatchEngine.timings``)."""

    kind: EventKind
    request_id: int
    at_s: float
    timing: RequestTiming | None = None


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request for :func:`simulate`: when it arrives and how many tokens in and out."""

    arrival_s: float
    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class _Sequence:
    request_id: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    admitted_s: float = math.nan
    first_token_s: float = math.nan
    finish_progress: float = math.nan
    start_progress: float = math.nan

    def timing(self, finished_s: float) -> RequestTiming:
        return RequestTiming(
            request_id=self.request_id,
            arrival_s=self.arrival_s,
            admitted_s=self.admitted_s,
            first_token_s=self.first_token_s,
            finished_s=finished_s,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )


# Float slack when comparing decode progress: a sequence due at step k finishes at step k.
_EPS = 1e-9


@dataclass(slots=True)
class BatchEngine:
    """A continuous-batching engine on a :class:`ServingProfile`, advanced by its caller.

    Time is whatever the caller says it is (seconds, from ``start_s``): the trace
    simulator passes simulated time, engine-sim the scaled wall clock. Call
    :meth:`advance` up to a moment before :meth:`submit` at that moment; each call
    returns the events that happened on the way, in time order.
    """

    profile: ServingProfile
    start_s: float = 0.0
    timings: bool = True
    """Whether a finish carries its :class:`RequestTiming` (``False``: ``None``; the
    trace simulator reads only the events' kinds and times)."""
    _now: float = field(init=False)
    _progress: float = field(init=False, default=0.0)
    _next_id: int = field(init=False, default=0)
    _waiting: deque[_Sequence] = field(init=False, default_factory=deque)
    _prefilling: deque[_Sequence] = field(init=False, default_factory=deque)
    _prefill_left_s: float = field(init=False, default=0.0)
    _decode_heap: list[tuple[float, int]] = field(init=False, default_factory=list)
    _decoding: dict[int, _Sequence] = field(init=False, default_factory=dict)
    _step_s: dict[int, float] = field(init=False, default_factory=dict)
    """``profile.decode_step_seconds(batch)`` by batch, as asked: the engine asks at every
    event (a day's replay runs millions), and the answer depends on the batch alone."""
    _prefill_s: dict[int, float] = field(init=False, default_factory=dict)
    """``profile.prefill_seconds(tokens)`` by prompt length, as asked."""

    def __post_init__(self) -> None:
        self._now = self.start_s

    @property
    def now_s(self) -> float:
        """The engine's time: the last moment it was advanced to."""
        return self._now

    @property
    def running(self) -> int:
        """Sequences holding a batch slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._decoding)

    @property
    def waiting(self) -> int:
        """Requests queued for a batch slot."""
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing running, nothing waiting."""
        return not (self._waiting or self._prefilling or self._decoding)

    def submit(self, *, input_tokens: int, output_tokens: int) -> int:
        """Add a request arriving now; returns its id. Admitted at once if a slot is free."""
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got input {input_tokens}, output {output_tokens}"
            )
        request_id = self._next_id
        self._next_id += 1
        self._waiting.append(
            _Sequence(request_id, self._now, input_tokens=input_tokens, output_tokens=output_tokens)
        )
        self._admit()
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Drop a request wherever it is (the client went away); ``False`` if unknown."""
        if self._decoding.pop(request_id, None) is not None:
            self._admit()
            return True  # its heap entry is skipped when it surfaces
        for queue in (self._waiting, self._prefilling):
            for index, seq in enumerate(queue):
                if seq.request_id == request_id:
                    del queue[index]
                    if queue is self._prefilling and index == 0:
                        self._start_prefill()
                    self._admit()
                    return True
        return False

    def generated_tokens(self, request_id: int) -> int:
        """Output tokens produced so far by a running request (0 while waiting or prefilling)."""
        seq = self._decoding.get(request_id)
        if seq is None:
            return 0
        return min(1 + int(self._progress - seq.start_progress + _EPS), seq.output_tokens)

    def next_event_s(self) -> float | None:
        """When the next first token or finish happens if nothing else arrives; None if idle."""
        if self._prefilling:
            return self._now + self._prefill_left_s
        heap = self._decode_heap
        decoding = self._decoding
        while heap and heap[0][1] not in decoding:
            heapq.heappop(heap)  # cancelled
        if heap:
            steps = heap[0][0] - self._progress
            if steps < 0.0:  # max(steps, 0.0)
                steps = 0.0
            return self._now + steps * self._decode_step_s()
        return None

    def advance(self, until_s: float) -> list[EngineEvent]:
        """Run the engine up to ``until_s``; the events that happened, in time order."""
        now = self._now
        if until_s < now:
            raise ValueError(f"cannot advance back in time from {now} to {until_s}")
        events: list[EngineEvent] = []
        prefilling = self._prefilling
        heap = self._decode_heap
        decoding = self._decoding
        # :meth:`next_event_s` and :meth:`_run_for` inlined, the same arithmetic: a day's
        # replay advances engines millions of times.
        while True:
            if prefilling:
                due = now + self._prefill_left_s
                if due > until_s:
                    break
                # Land exactly on the event, whatever the float arithmetic rounded to.
                self._now = now = due
                self._prefill_left_s = 0.0
                self._finish_prefill(events)
            else:
                while heap and heap[0][1] not in decoding:
                    heapq.heappop(heap)  # cancelled
                if not heap:
                    break
                step_s = self._decode_step_s()
                top = heap[0][0]
                steps = top - self._progress
                if steps < 0.0:  # max(steps, 0.0)
                    steps = 0.0
                due = now + steps * step_s
                if due > until_s:
                    break
                seconds = due - now
                if seconds > 0:
                    self._progress += seconds / step_s
                self._now = now = due
                if top > self._progress:  # max(progress, top)
                    self._progress = top
                self._finish_decodes(events)
            if self._waiting:
                self._admit()
        self._run_for(until_s - now)
        self._now = until_s
        return events

    def drain(self) -> list[EngineEvent]:
        """Run until every submitted request has finished."""
        events: list[EngineEvent] = []
        while (due := self.next_event_s()) is not None:
            events.extend(self.advance(due))
        return events

    # Internals: time passes for prefill (if any) or else decode.

    def _decode_step_s(self) -> float:
        batch = len(self._decoding)
        seconds = self._step_s.get(batch)
        if seconds is None:
            seconds = self._step_s[batch] = self.profile.decode_step_seconds(batch)
        return seconds

    def _run_for(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._prefilling:
            self._prefill_left_s = max(self._prefill_left_s - seconds, 0.0)
        elif self._decoding:
            self._progress += seconds / self._decode_step_s()

    def _admit(self) -> None:
        waiting = self._waiting
        if not waiting:
            return
        prefilling, decoding = self._prefilling, self._decoding
        most = self.profile.max_batch
        while waiting and len(prefilling) + len(decoding) < most:
            seq = waiting.popleft()
            seq.admitted_s = self._now
            prefilling.append(seq)
            if len(prefilling) == 1:
                self._start_prefill()

    def _start_prefill(self) -> None:
        if self._prefilling:
            tokens = self._prefilling[0].input_tokens
            seconds = self._prefill_s.get(tokens)
            if seconds is None:
                seconds = self._prefill_s[tokens] = self.profile.prefill_seconds(tokens)
            self._prefill_left_s = seconds

    def _finish_prefill(self, events: list[EngineEvent]) -> None:
        seq = self._prefilling.popleft()
        seq.first_token_s = self._now
        events.append(EngineEvent(EventKind.FIRST_TOKEN, seq.request_id, self._now))
        if seq.output_tokens <= 1:
            events.append(self._finished(seq))
        else:
            seq.start_progress = self._progress
            seq.finish_progress = self._progress + seq.output_tokens - 1
            self._decoding[seq.request_id] = seq
            heapq.heappush(self._decode_heap, (seq.finish_progress, seq.request_id))
        self._start_prefill()

    def _finish_decodes(self, events: list[EngineEvent]) -> None:
        heap = self._decode_heap
        while heap and heap[0][0] <= self._progress + _EPS:
            _, request_id = heapq.heappop(heap)
            seq = self._decoding.pop(request_id, None)
            if seq is not None:
                events.append(self._finished(seq))

    def _finished(self, seq: _Sequence) -> EngineEvent:
        timing = seq.timing(self._now) if self.timings else None
        return EngineEvent(EventKind.FINISHED, seq.request_id, self._now, timing)


def simulate(profile: ServingProfile, requests: Iterable[EngineRequest]) -> list[RequestTiming]:
    """Replay ``requests`` through one engine; their timings, in the order given.

    Arrivals need not be sorted. Deterministic: the same input gives the same output.
    """
    given: Sequence[EngineRequest] = list(requests)
    order = sorted(range(len(given)), key=lambda index: given[index].arrival_s)
    start = given[order[0]].arrival_s if order else 0.0
    engine = BatchEngine(profile, start_s=start)
    position_of: dict[int, int] = {}
    timings: list[RequestTiming | None] = [None] * len(given)
    for index in order:
        request = given[index]
        _collect(engine.advance(request.arrival_s), position_of, timings)
        request_id = engine.submit(
            input_tokens=request.input_tokens, output_tokens=request.output_tokens
        )
        position_of[request_id] = index
    _collect(engine.drain(), position_of, timings)
    return [timing for timing in timings if timing is not None]


def _collect(
    events: list[EngineEvent],
    position_of: dict[int, int],
    timings: list[RequestTiming | None],
) -> None:
    for event in events:
        if event.timing is not None:
            timings[position_of.pop(event.request_id)] = event.timing
