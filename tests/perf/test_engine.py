"""The continuous-batching engine: queueing, batching and the timings it reports."""

from __future__ import annotations

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
