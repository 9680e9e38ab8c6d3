"""The continuous-batching engine: queueing, batching and the timings it reports."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.engine import BatchEngine, EngineRequest, EventKind, simulate
from catalog.perf import serving_profile

PROFILE = serving_profile("NVIDIA A100-SXM4-80GB", 1, 8.0, max_batch=4)


def test_a_lone_request_takes_prefill_then_one_step_per_token() -> None:
    [timing] = simulate(
        PROFILE, [EngineRequest(arrival_s=5.0, input_tokens=2000, output_tokens=100)]
    )
    assert timing.ttft_s == pytest.approx(PROFILE.prefill_seconds(2000))
    assert timing.e2e_s == pytest.approx(
        PROFILE.prefill_seconds(2000) + 99 * PROFILE.decode_step_seconds(1)
    )
    assert timing.queue_s == 0


def test_requests_beyond_the_batch_wait_and_their_ttft_rises() -> None:
    burst = [EngineRequest(arrival_s=0.0, input_tokens=500, output_tokens=400)] * 12
    timings = simulate(PROFILE, burst)
    waited = [timing for timing in timings if timing.queue_s > 0]
    assert len(waited) == 8  # the batch holds four
    lone = simulate(PROFILE, burst[:1])[0]
    # The last request waits for two whole waves of 400-token decodes.
    assert timings[-1].ttft_s > 2 * 399 * PROFILE.decode_step_seconds(4)
    assert timings[-1].ttft_s > 50 * lone.ttft_s
    # First tokens come out in arrival order.
    firsts = [timing.first_token_s for timing in timings]
    assert firsts == sorted(firsts)


def test_a_bigger_batch_decodes_each_sequence_slower() -> None:
    two = simulate(PROFILE, [EngineRequest(0.0, 100, 300)] * 2)
    four = simulate(PROFILE, [EngineRequest(0.0, 100, 300)] * 4)
    assert max(t.e2e_s for t in four) > max(t.e2e_s for t in two)


def test_cancelling_a_running_request_admits_the_next() -> None:
    engine = BatchEngine(PROFILE)
    ids = [engine.submit(input_tokens=100, output_tokens=10_000) for _ in range(5)]
    assert (engine.running, engine.waiting) == (4, 1)
    engine.advance(1.0)
    assert engine.generated_tokens(ids[0]) > 1
    assert engine.cancel(ids[0])
    assert not engine.cancel(ids[0])
    assert (engine.running, engine.waiting) == (4, 0)
    events = engine.advance(2.0)
    assert [(e.kind, e.request_id) for e in events] == [(EventKind.FIRST_TOKEN, ids[4])]
    assert {e.request_id for e in engine.drain()} == set(ids[1:])
    assert engine.idle


def _token_times(engine: BatchEngine, request_id: int, until_s: float) -> list[float]:
    """When each of a decoding request's tokens appeared, sampled every millisecond."""
    times, seen, t = [], engine.generated_tokens(request_id), engine.now_s
    while t < until_s:
        t = min(t + 0.001, until_s)
        engine.advance(t)
        now = engine.generated_tokens(request_id)
        times += [t] * (now - seen)
        seen = now
    return times


def test_a_long_prompt_slows_the_running_decodes_by_its_chunks_instead_of_stalling_them() -> None:
    # Chunked prefill (vLLM V1): each step decodes the running sequence and prefills
    # what is left of the token budget, so a long prompt costs each of the running
    # sequence's tokens one chunk's prefill, not the whole prompt's.
    engine = BatchEngine(PROFILE)
    talker = engine.submit(input_tokens=100, output_tokens=5_000)
    engine.advance(1.0)
    before = _token_times(engine, talker, 1.5)
    reader = engine.submit(input_tokens=16_000, output_tokens=10)
    # Sampled for as long as the prompt alone would take: every step of it a chunk's.
    during = _token_times(engine, talker, 1.5 + PROFILE.prefill_seconds(16_000))
    chunk = PROFILE.max_batched_tokens - 1
    chunk_step = PROFILE.step_seconds(decodes=1, prefill_tokens=chunk)
    gaps = [later - earlier for earlier, later in itertools.pairwise(during)]
    assert max(gaps) <= chunk_step + 0.002  # sampling slack
    assert max(gaps) < PROFILE.prefill_seconds(16_000) / 5
    # Slower than plain decoding by the chunk's share, and tokens kept coming.
    assert (
        max(b - a for a, b in itertools.pairwise(before)) < PROFILE.decode_step_seconds(1) + 0.002
    )
    assert min(gaps) > PROFILE.decode_step_seconds(1) + chunk / PROFILE.prefill_tokens_per_s / 2
    assert len(during) >= math.ceil(16_000 / chunk) - 1
    assert engine.generated_tokens(reader) == 0  # still prefilling: the decodes shared it


def test_a_prompt_longer_than_the_budget_is_prefilled_over_several_steps() -> None:
    engine = BatchEngine(PROFILE)
    talker = engine.submit(input_tokens=100, output_tokens=5_000)
    engine.advance(1.0)
    tokens_before = engine.generated_tokens(talker)
    long_prompt = 2 * PROFILE.max_batched_tokens + 500
    reader = engine.submit(input_tokens=long_prompt, output_tokens=10)
    events = engine.advance(10.0)
    [first] = [e for e in events if e.request_id == reader and e.kind is EventKind.FIRST_TOKEN]
    # Three steps, each one token for the running sequence and a chunk of the prompt:
    # the budget less that token, twice, then the rest.
    chunk = PROFILE.max_batched_tokens - 1
    chunks = [chunk, chunk, long_prompt - 2 * chunk]
    steps = [PROFILE.step_seconds(decodes=1, prefill_tokens=c) for c in chunks]
    assert first.at_s - 1.0 == pytest.approx(sum(steps))
    assert first.at_s - 1.0 > PROFILE.prefill_seconds(long_prompt)  # the decodes share the steps
    # The running sequence gained one token per step while the prompt was prefilled.
    probe = BatchEngine(PROFILE)
    probe_talker = probe.submit(input_tokens=100, output_tokens=5_000)
    probe.advance(1.0)
    probe.submit(input_tokens=long_prompt, output_tokens=10)
    probe.advance(first.at_s)
    assert probe.generated_tokens(probe_talker) - tokens_before == len(chunks)


def test_short_prompts_arriving_together_share_a_step() -> None:
    # The budget holds both prompts: one step prefills them, and both first tokens come
    # at its end (before chunked prefill the second waited for the first's prefill).
    timings = simulate(PROFILE, [EngineRequest(0.0, 600, 5), EngineRequest(0.0, 700, 5)])
    assert [t.ttft_s for t in timings] == [pytest.approx(PROFILE.prefill_seconds(1300))] * 2


def test_chunked_prefill_neither_loses_nor_invents_work() -> None:
    # Prompts of one token's output only prefill: the last first token comes when all
    # their tokens have been prefilled, in full chunks of the budget and the remainder.
    budget = PROFILE.max_batched_tokens
    sizes = [3_000, 1_200, 5_500, 40, 2_600]
    timings = simulate(PROFILE, [EngineRequest(0.0, size, 1) for size in sizes])
    total = sum(sizes)
    chunks = [budget] * (total // budget) + [total % budget]
    assert max(t.first_token_s for t in timings) == pytest.approx(
        sum(PROFILE.prefill_seconds(c) for c in chunks)
    )
    # A running request's output tokens all come, one per step; each step that also
    # carried a chunk of another prompt is longer by that chunk's share, no more.
    engine = BatchEngine(PROFILE)
    talker = engine.submit(input_tokens=100, output_tokens=300)
    engine.advance(0.5)
    engine.submit(input_tokens=9_000, output_tokens=1)
    events = engine.drain()
    [finish] = [e for e in events if e.request_id == talker and e.kind is EventKind.FINISHED]
    assert finish.timing is not None
    assert finish.timing.output_tokens == 300
    decode = PROFILE.decode_step_seconds(1)
    shares = [
        PROFILE.step_seconds(decodes=1, prefill_tokens=min(budget - 1, 9_000 - k * (budget - 1)))
        - decode
        for k in range(math.ceil(9_000 / (budget - 1)))
    ]
    assert finish.at_s == pytest.approx(PROFILE.prefill_seconds(100) + 299 * decode + sum(shares))


def test_cancelling_a_prompt_halfway_through_its_prefill_frees_its_steps() -> None:
    engine = BatchEngine(PROFILE)
    talker = engine.submit(input_tokens=100, output_tokens=5_000)
    engine.advance(1.0)
    reader = engine.submit(input_tokens=20_000, output_tokens=10)
    engine.advance(1.5)  # a few chunks in
    assert engine.cancel(reader)
    assert engine.running == 1
    # The step already running ends; then plain decode steps again.
    engine.advance(2.0)
    tokens = engine.generated_tokens(talker)
    engine.advance(3.0)
    assert engine.generated_tokens(talker) - tokens == pytest.approx(
        1.0 / PROFILE.decode_step_seconds(1), abs=1
    )
    assert [e.request_id for e in engine.drain()] == [talker]


def test_the_engine_refuses_to_go_back_in_time() -> None:
    engine = BatchEngine(PROFILE, start_s=10.0)
    with pytest.raises(ValueError, match="back in time"):
        engine.advance(9.0)


def test_an_hour_of_twenty_thousand_requests_simulates() -> None:
    rng = random.Random(7)
    profile = serving_profile("NVIDIA H100 80GB HBM3", 1, 8.0)
    clock = 0.0
    requests = []
    for _ in range(20_000):
        clock += rng.expovariate(20_000 / 3600)
        requests.append(EngineRequest(clock, rng.randint(50, 2000), rng.randint(10, 400)))
    timings = simulate(profile, requests)
    assert len(timings) == 20_000
    assert all(t.finished_s >= t.first_token_s >= t.admitted_s >= t.arrival_s for t in timings)


arrivals = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=60, allow_nan=False),
        st.integers(min_value=0, max_value=4000),
        st.integers(min_value=0, max_value=500),
    ),
    max_size=40,
)


@settings(max_examples=80)
@given(rows=arrivals)
def test_every_request_finishes_in_order_of_its_phases(rows: list[tuple[float, int, int]]) -> None:
    requests = [EngineRequest(*row) for row in rows]
    timings = simulate(PROFILE, requests)
    assert len(timings) == len(requests)
    for request, timing in zip(requests, timings, strict=True):
        assert timing.arrival_s == request.arrival_s
        assert timing.ttft_s >= PROFILE.prefill_seconds(request.input_tokens) - 1e-9
        assert timing.finished_s >= timing.first_token_s >= timing.admitted_s >= timing.arrival_s
    assert simulate(PROFILE, requests) == timings  # deterministic


@settings(max_examples=80)
@given(rows=arrivals, extra=arrivals)
def test_more_load_never_makes_a_request_faster(
    rows: list[tuple[float, int, int]], extra: list[tuple[float, int, int]]
) -> None:
    base = [EngineRequest(*row) for row in rows]
    latest = max((r.arrival_s for r in base), default=0.0)
    later = [EngineRequest(latest + 1 + r[0], r[1], r[2]) for r in extra]
    alone = simulate(PROFILE, base)
    loaded = simulate(PROFILE, base + later)[: len(base)]
    for quiet, busy in zip(alone, loaded, strict=True):
        assert busy.first_token_s >= quiet.first_token_s - 1e-9


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 20.0), st.integers(1, 4000), st.integers(1, 300)),
        min_size=1,
        max_size=40,
    )
)
def test_an_engine_without_timings_reports_the_same_events(
    rows: list[tuple[float, int, int]],
) -> None:
    # The trace simulator runs engines that keep no RequestTiming: the same first tokens
    # and finishes at the same moments, a finish only without its timing.
    def run(timings: bool) -> list[tuple[EventKind, int, float, bool]]:
        engine = BatchEngine(PROFILE, timings=timings)
        seen = []
        for arrival, tokens_in, tokens_out in sorted(rows):
            seen += engine.advance(max(arrival, engine.now_s))
            engine.submit(input_tokens=tokens_in, output_tokens=tokens_out)
        seen += engine.drain()
        return [(e.kind, e.request_id, e.at_s, e.timing is None) for e in seen]

    with_timings, without = run(True), run(False)
    assert [e[:3] for e in without] == [e[:3] for e in with_timings]
    assert all(none for *_, none in without)
    assert [e[3] for e in with_timings] == [e[0] is EventKind.FIRST_TOKEN for e in with_timings]


@settings(max_examples=60, deadline=None)
@given(rows=arrivals)
def test_next_event_s_never_skips_an_event(rows: list[tuple[float, int, int]]) -> None:
    # The simulator and engine-sim sleep until next_event_s(): nothing may happen before
    # it, and chunks spanning several steps included, it is when something does happen.
    engine = BatchEngine(PROFILE)
    for arrival, tokens_in, tokens_out in sorted(rows):
        while (due := engine.next_event_s()) is not None and due <= arrival:
            events = engine.advance(max(due, engine.now_s))
            assert all(event.at_s >= due - 1e-9 for event in events)
        before = engine.next_event_s()
        events = engine.advance(max(arrival, engine.now_s))
        assert not events or (before is not None and before <= arrival)
        engine.submit(input_tokens=tokens_in, output_tokens=tokens_out)
    while (due := engine.next_event_s()) is not None:
        events = engine.advance(due)
        assert all(event.at_s == pytest.approx(due, abs=1e-9) for event in events)
    assert engine.idle


def test_a_busy_engine_always_reaches_the_event_it_announced() -> None:
    # A replica kept busy with long prompts on an H100: decodes that joined at a step's
    # end finish on later steps' ends, where float rounding once put next_event_s() a
    # hair before the end advance() waits for, and the simulator's event loop spun on it.
    profile = serving_profile("NVIDIA H100 80GB HBM3", 1, 8.0)
    rng = random.Random(2)
    engine = BatchEngine(profile)
    clock = 0.0
    for _ in range(300):
        clock += rng.expovariate(3.0)
        while (due := engine.next_event_s()) is not None and due <= clock:
            if not engine.advance(max(due, engine.now_s)):
                # Nothing at ``due``: then the engine must have moved on past it.
                assert engine.next_event_s() != due or engine.advance(due)
        engine.advance(clock)
        engine.submit(input_tokens=rng.randint(1000, 30_000), output_tokens=rng.randint(1, 300))
    events = engine.drain()
    assert engine.idle
    assert events
