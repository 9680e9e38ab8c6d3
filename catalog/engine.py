"""A continuous-batching engine on a ``catalog.perf.ServingProfile``, scheduled as vLLM V1 does.

The engine (:class:`BatchEngine`) is continuous batching with chunked prefill, the only
scheduler vLLM V1 has; the simulator and engine-sim model every backend with it.
Requests are admitted while fewer than ``max_batch`` sequences run, and wait in FIFO
order beyond it. The engine runs in steps, each one forward pass with a token budget
(``ServingProfile.max_batched_tokens``, vLLM's ``max_num_batched_tokens``): every
decoding sequence is scheduled first, one token each, and the rest of the budget goes to
the prompts still being prefilled, first come first served, the oldest taking as much as
it has left (so a prompt longer than the budget is prefilled in chunks over several
steps, and several short ones may share a step). A step lasts
``ServingProfile.step_seconds``: one forward pass over the batch's decodes and the
chunk, so a long prompt slows the decoding sequences' tokens by its chunk's share of
each step instead of stopping them for its whole prefill. A prompt's first token appears
at the end of the step that prefills its last token; the rest come one per step. A
request admitted while a step runs joins the next one (one admitted the moment a step
starts joins that one); with nothing to prefill, decode steps follow one another and a
new prompt starts a step at once.

Between events (a first token, a finish) every rate is constant: while prompts are
prefilled, every step but the last decodes the same batch and prefills a full chunk; with
none, decode steps are all alike. So the engine jumps from event to event instead of
stepping token by token, and from step to step only while a prompt is being prefilled: a
one-hour trace of twenty thousand requests simulates in well under a second.

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
    prefill_left: int = 0
    """Prompt tokens not yet prefilled (those the running step prefills included)."""
    cancelled: bool = False

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

    Decode progress is counted in steps (``_progress``): a decoding sequence gains a
    token per unit, and finishes when the count reaches its ``finish_progress``. While a
    step with a prompt chunk runs (``_stepping``), the count rises by one over that step;
    otherwise at one per decode step of the running batch.
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
    _pending: int = field(init=False, default=0)
    """Prompt tokens the prefilling sequences have left, in all."""
    _stepping: bool = field(init=False, default=False)
    """Whether a step with prompt tokens in it is running (until ``_step_end``)."""
    _step_start: float = field(init=False, default=0.0)
    _step_end: float = field(init=False, default=0.0)
    _step_len: float = field(init=False, default=1.0)
    _plan: list[tuple[_Sequence, int]] = field(init=False, default_factory=list)
    """The running step's prompt chunks: each sequence and the tokens it prefills."""
    _decode_heap: list[tuple[float, int]] = field(init=False, default_factory=list)
    _decoding: dict[int, _Sequence] = field(init=False, default_factory=dict)
    _decode_s: dict[int, float] = field(init=False, default_factory=dict)
    """``profile.decode_step_seconds(batch)`` by batch, as asked: the engine asks at every
    event (a day's replay runs millions), and the answer depends on the batch alone."""

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
                    if queue is self._prefilling:
                        # The running step still runs; its chunk for this one is wasted.
                        seq.cancelled = True
                        self._pending -= seq.prefill_left
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
        heap = self._decode_heap
        decoding = self._decoding
        while heap and heap[0][1] not in decoding:
            heapq.heappop(heap)  # cancelled
        top = heap[0][0] if heap else None
        if not self._stepping:
            if top is None:
                return None
            return self._now + max(top - self._progress, 0.0) * self._decode_step_s()
        # Within the running step, progress rises at one per step (as :meth:`advance`
        # reckons it, comparisons included).
        end, length = self._step_end, self._step_len
        if top is not None:
            due = self._now + max(top - self._progress, 0.0) * length
            if due < end:
                return due
        # Steps a finish lies beyond this one; never below 0, whatever the float rounding
        # (a finish due a hair before ``end`` is met at ``end``, as advance() meets it).
        beyond = (
            None if top is None else max(top - self._progress - (end - self._now) / length, 0.0)
        )
        if any(not seq.cancelled and tokens == seq.prefill_left for seq, tokens in self._plan):
            return end  # a first token at the end of this step
        if not self._prefilling:  # the chunks were cancelled: decode steps follow
            return None if beyond is None else end + beyond * self._decode_step_s()
        return self._after_step(end, beyond)

    def advance(self, until_s: float) -> list[EngineEvent]:
        """Run the engine up to ``until_s``; the events that happened, in time order."""
        now = self._now
        if until_s < now:
            raise ValueError(f"cannot advance back in time from {now} to {until_s}")
        events: list[EngineEvent] = []
        heap = self._decode_heap
        decoding = self._decoding
        # :meth:`next_event_s` and :meth:`_run_for` inlined, the same arithmetic: a day's
        # replay advances engines millions of times.
        while True:
            while heap and heap[0][1] not in decoding:
                heapq.heappop(heap)  # cancelled
            if self._stepping:
                end, step_s = self._step_end, self._step_len
                if heap:
                    top = heap[0][0]
                    steps = top - self._progress
                    if steps < 0.0:  # max(steps, 0.0)
                        steps = 0.0
                    due = now + steps * step_s
                    if due < end:  # a sequence finishes within this step
                        if due > until_s:
                            break
                        self._progress += (due - now) / step_s
                        self._now = now = due
                        if top > self._progress:  # max(progress, top)
                            self._progress = top
                        self._finish_decodes(events)
                        if self._waiting:
                            self._admit()
                        continue
                if end > until_s:
                    break
                self._progress += (end - now) / step_s
                # Land exactly on the event, whatever the float arithmetic rounded to.
                self._now = now = end
                self._end_step(events)
                if heap and heap[0][0] <= self._progress + _EPS:
                    self._finish_decodes(events)
                self._admit()  # and the next step, if anything is left to prefill
            else:
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

    # Internals: steps with prompt chunks, and decode steps between them.

    def _decode_step_s(self) -> float:
        batch = len(self._decoding)
        seconds = self._decode_s.get(batch)
        if seconds is None:
            seconds = self._decode_s[batch] = self.profile.decode_step_seconds(batch)
        return seconds

    def _run_for(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._stepping:
            self._progress += seconds / self._step_len
        elif self._decoding:
            self._progress += seconds / self._decode_step_s()

    def _after_step(self, end: float, steps_to_finish: float | None) -> float:
        """The next event after the running step ends at ``end`` with no first token in
        it: the oldest prompt's first token, or a finish ``steps_to_finish`` steps on."""
        head = self._prefilling[0]
        scheduled = 0
        if self._plan:
            last, tokens = self._plan[-1]
            if last is head:
                scheduled = tokens
        left = head.prefill_left - scheduled
        pending = self._pending - scheduled
        decodes = len(self._decoding)
        chunk = self.profile.max_batched_tokens - decodes
        full = max(-(-left // chunk) - 1, 0)  # steps with a full chunk before the last
        full_s = self.profile.step_seconds(decodes=decodes, prefill_tokens=chunk)
        last_s = self.profile.step_seconds(
            decodes=decodes, prefill_tokens=min(chunk, pending - full * chunk)
        )
        first_token = end
        for _ in range(full):  # the sum advance() makes, step by step, to the float
            first_token += full_s
        first_token += last_s
        if steps_to_finish is None:
            return first_token
        if steps_to_finish <= full:
            finish = end + steps_to_finish * full_s
        else:
            finish = end + full * full_s + (steps_to_finish - full) * last_s
        return min(first_token, finish)

    def _admit(self) -> None:
        waiting = self._waiting
        prefilling = self._prefilling
        if waiting:
            decoding = self._decoding
            most = self.profile.max_batch
            while waiting and len(prefilling) + len(decoding) < most:
                seq = waiting.popleft()
                seq.admitted_s = self._now
                seq.prefill_left = seq.input_tokens
                self._pending += seq.input_tokens
                prefilling.append(seq)
        if not prefilling:
            return
        if not self._stepping:
            self._start_step()
        elif self._now == self._step_start:
            # Admitted the moment the step began, before any of it ran: it joins that step.
            self._plan.clear()
            self._start_step()

    def _start_step(self) -> None:
        """Schedule a step now: a token for every decoding sequence, then prompt chunks,
        oldest first, up to the budget."""
        decodes = len(self._decoding)
        room = self.profile.max_batched_tokens - decodes
        plan = self._plan
        chunk = 0
        for seq in self._prefilling:
            if room <= 0:
                break
            tokens = seq.prefill_left if seq.prefill_left < room else room
            plan.append((seq, tokens))
            chunk += tokens
            room -= tokens
        self._step_len = self.profile.step_seconds(decodes=decodes, prefill_tokens=chunk)
        self._step_start = self._now
        self._step_end = self._now + self._step_len
        self._stepping = True

    def _end_step(self, events: list[EngineEvent]) -> None:
        prefilling = self._prefilling
        for seq, tokens in self._plan:
            if seq.cancelled:
                continue
            seq.prefill_left -= tokens
            self._pending -= tokens
            if seq.prefill_left == 0:
                prefilling.popleft()  # the plan is the front of the queue, in order
                self._finish_prefill(seq, events)
        self._plan.clear()
        self._stepping = False

    def _finish_prefill(self, seq: _Sequence, events: list[EngineEvent]) -> None:
        seq.first_token_s = self._now
        events.append(EngineEvent(EventKind.FIRST_TOKEN, seq.request_id, self._now))
        if seq.output_tokens <= 1:
            events.append(self._finished(seq))
        else:
            seq.start_progress = self._progress
            seq.finish_progress = self._progress + seq.output_tokens - 1
            self._decoding[seq.request_id] = seq
            heapq.heappush(self._decode_heap, (seq.finish_progress, seq.request_id))

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
