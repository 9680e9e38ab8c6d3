"""Desired replicas from TTFT, load and fleet state."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autoscaler.decide.desired import desired_count
from autoscaler.decide.queueing import (
    BURST_HEADROOM,
    ReplicaCapacity,
    arrival_curve,
    burst_floor,
    erlang_c,
    load_need,
    queue_need,
    slot_need,
)
from autoscaler.decide.scaling import (
    Direction,
    FleetCounts,
    ScaleMemory,
    breach_bound,
    desired_replicas,
    ttft_percentile,
)
from autoscaler.decide.signals import Signals
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def policy(**overrides: Any) -> AutoscalingPolicy:
    fields: dict[str, Any] = {
        "min_workers": 1,
        "max_workers": 8,
        "max_hourly_cost_usd": 100.0,
        "workers": {"cloud_pool": {"gpu_pool": ["L4"]}},
        "upper_allowed_latency_sec": 1.0,
        "lower_allowed_latency_sec": 0.2,
        "scale_up_time_window_sec": 60,
        "scale_down_time_window_sec": 300,
    }
    fields.update(overrides)
    return AutoscalingPolicy.model_validate(fields)


def samples(ttft: float, *, now: datetime, seconds: int, every: int = 1) -> tuple[Any, ...]:
    return tuple((now - timedelta(seconds=s), ttft) for s in range(0, seconds, every))


def busy(ttft: float, now: datetime, **kw: Any) -> Signals:
    return Signals(
        ttft_samples=samples(ttft, now=now, seconds=400),
        request_rate=kw.get("rate", 10.0),
        in_flight=kw.get("in_flight", 4),
        last_request_at=now,
        queue_depth=kw.get("queue", 0),
    )


def run(
    p: AutoscalingPolicy,
    *,
    fleet: FleetCounts,
    ttft: float,
    start: datetime,
    seconds: int,
    **kw: Any,
) -> Any:
    """Tick every 5 s for ``seconds`` with steady TTFT; the last decision."""
    memory = ScaleMemory()
    decision = None
    for step in range(0, seconds + 1, 5):
        now = start + timedelta(seconds=step)
        decision = desired_replicas(
            policy=p, signals=busy(ttft, now, **kw), fleet=fleet, memory=memory, now=now
        )
        memory = decision.memory
    return decision


def test_percentile_is_nearest_rank_over_the_window() -> None:
    data = [(T0 - timedelta(seconds=i), float(i)) for i in range(1, 101)]  # 1..100
    assert ttft_percentile(data, q=0.95, since=T0 - timedelta(seconds=1000)) == 95.0
    assert ttft_percentile(data, q=0.5, since=T0 - timedelta(seconds=10.5)) == 5.0
    assert ttft_percentile(data, q=0.95, since=T0) is None


def test_breach_must_hold_for_the_whole_window_before_scaling_up() -> None:
    p = policy()
    fleet = FleetCounts(ready=2)
    early = run(p, fleet=fleet, ttft=1.5, start=T0, seconds=55)
    assert early.desired == 2
    assert early.direction is Direction.HOLD
    late = run(p, fleet=fleet, ttft=1.5, start=T0, seconds=60)
    assert late.direction is Direction.UP
    assert late.desired == 3  # 1.5x over target on 2 replicas: 3
    assert "> upper 1s" in late.reason


def test_step_grows_with_how_far_ttft_is_off_target_but_at_most_doubles() -> None:
    p = policy()
    assert run(p, fleet=FleetCounts(ready=2), ttft=1.9, start=T0, seconds=60).desired == 4
    assert run(p, fleet=FleetCounts(ready=2), ttft=9.0, start=T0, seconds=60).desired == 4
    fast = policy(enable_fast_autoscaling=True)
    assert run(fast, fleet=FleetCounts(ready=2), ttft=9.0, start=T0, seconds=10).desired == 6


def test_replicas_booting_count_toward_relief() -> None:
    p = policy()
    decision = run(p, fleet=FleetCounts(ready=2, booting=1), ttft=1.5, start=T0, seconds=120)
    assert decision.desired == 3
    assert decision.direction is Direction.HOLD
    assert "booting already cover" in decision.reason


def test_hold_restarts_after_a_scale_up() -> None:
    p = policy()
    memory = ScaleMemory()
    fleet = FleetCounts(ready=2)
    ups = 0
    for step in range(0, 91, 5):
        now = T0 + timedelta(seconds=step)
        d = desired_replicas(policy=p, signals=busy(1.5, now), fleet=fleet, memory=memory, now=now)
        memory = d.memory
        ups += d.direction is Direction.UP
    assert ups == 1


def test_scale_down_needs_calm_for_the_scale_down_window() -> None:
    p = policy()
    fleet = FleetCounts(ready=3)
    assert run(p, fleet=fleet, ttft=0.05, start=T0, seconds=295).desired == 3
    down = run(p, fleet=fleet, ttft=0.05, start=T0, seconds=300)
    assert down.direction is Direction.DOWN
    assert down.desired == 2


def test_consolidation_keeps_a_replica_the_rest_could_not_carry() -> None:
    p = policy()
    memory = ScaleMemory(calm_since=T0 - timedelta(seconds=600))
    signals = busy(0.15, T0, rate=30.0, in_flight=40)
    capacity = ReplicaCapacity(requests_per_s=12.0, max_concurrency=64)
    decision = desired_replicas(
        policy=p,
        signals=signals,
        fleet=FleetCounts(ready=4),
        memory=memory,
        now=T0,
        capacity=capacity,
    )
    assert decision.desired == 4  # 30 req/s at 75 % of 12 needs 4
    assert "keep 4" in decision.reason
    light = busy(0.15, T0, rate=5.0, in_flight=4)
    decision = desired_replicas(
        policy=p,
        signals=light,
        fleet=FleetCounts(ready=4),
        memory=memory,
        now=T0,
        capacity=capacity,
    )
    assert decision.desired == 2  # at most half at once


def test_consolidation_without_capacity_projects_ttft() -> None:
    p = policy(lower_allowed_latency_sec=0.7)
    memory = ScaleMemory(calm_since=T0 - timedelta(seconds=600))
    decision = desired_replicas(
        policy=p, signals=busy(0.6, T0), fleet=FleetCounts(ready=2), memory=memory, now=T0
    )
    assert decision.desired == 2  # 0.6 s on two replicas projects 1.2 s on one
    assert "projects TTFT 1.200s" in decision.reason


def test_idle_past_timeout_scales_to_zero_and_a_request_wakes_it_at_once() -> None:
    p = policy(min_workers=0, scale_to_zero_timeout_sec=900)
    fleet = FleetCounts(ready=1)
    last = T0 - timedelta(seconds=901)
    idle = Signals(last_request_at=last)
    zero = desired_replicas(policy=p, signals=idle, fleet=fleet, memory=ScaleMemory(), now=T0)
    assert zero.desired == 0
    assert zero.direction is Direction.ZERO
    assert "idle 901s" in zero.reason
    waiting = Signals(queue_depth=1, last_request_at=T0)
    woken = desired_replicas(
        policy=p, signals=waiting, fleet=FleetCounts(), memory=ScaleMemory(), now=T0
    )
    assert woken.desired == 1
    assert woken.direction is Direction.WAKE


def test_scale_to_zero_off_keeps_one_replica() -> None:
    p = policy(min_workers=0, scale_to_zero=False)
    idle = Signals(last_request_at=T0 - timedelta(hours=5))
    decision = desired_replicas(
        policy=p, signals=idle, fleet=FleetCounts(ready=1), memory=ScaleMemory(), now=T0
    )
    assert decision.desired == 1


def test_max_workers_caps_scale_up() -> None:
    p = policy(max_workers=3)
    decision = run(p, fleet=FleetCounts(ready=3), ttft=5.0, start=T0, seconds=60)
    assert decision.desired == 3
    assert "max_workers 3" in decision.reason


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[AutoscalingPolicy, list[tuple[float, int, int, int, int]]]:
    lo = draw(st.integers(0, 3))
    hi = draw(st.integers(max(lo, 1), 10))
    p = policy(
        min_workers=lo,
        max_workers=hi,
        scale_to_zero=draw(st.booleans()),
        enable_fast_autoscaling=draw(st.booleans()),
        scale_to_zero_timeout_sec=draw(st.sampled_from([30, 900])),
    )
    ticks = draw(
        st.lists(
            st.tuples(
                st.floats(0.0, 5.0),  # ttft
                st.integers(0, 12),  # ready
                st.integers(0, 3),  # booting
                st.one_of(st.just(0), st.integers(0, 20)),  # in flight
                st.integers(0, 60),  # seconds since last request
            ),
            min_size=1,
            max_size=40,
        )
    )
    return p, ticks


def assert_bounded_and_never_shedding_while_slow(
    p: AutoscalingPolicy,
    ticks: list[tuple[float, int, int, int, int]],
    *,
    capacity: ReplicaCapacity | None = None,
    queued: int = 0,
) -> None:
    """Step the scaler every 15 s through ``ticks``; after each step desired stays within
    [floor, max] (or 0 only where scaling to zero is allowed) and never drops below the
    fleet while TTFT is above the upper bound."""
    memory = ScaleMemory()
    now = T0
    floor = p.min_workers if (p.min_workers or p.scale_to_zero) else 1
    for ttft, ready, booting, in_flight, idle in ticks:
        now += timedelta(seconds=15)
        signals = Signals(
            ttft_samples=samples(ttft, now=now, seconds=60, every=3) if ready else (),
            request_rate=float(in_flight),
            in_flight=in_flight,
            queue_depth=queued if in_flight else 0,
            last_request_at=now - timedelta(seconds=idle),
        )
        fleet = FleetCounts(ready=ready, booting=booting)
        d = desired_replicas(
            policy=p, signals=signals, fleet=fleet, memory=memory, now=now, capacity=capacity
        )
        memory = d.memory
        assert d.desired == 0 or floor <= d.desired <= p.max_workers, d.reason
        if d.desired == 0:
            assert p.min_workers == 0
            assert p.scale_to_zero
        if d.ttft_up_s is not None and d.ttft_up_s > p.upper_allowed_latency_sec:
            assert d.desired >= min(ready + booting, p.max_workers), d.reason
        assert d.reason


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_desired_stays_within_bounds_and_never_sheds_while_slow(
    scenario: tuple[AutoscalingPolicy, list[tuple[float, int, int, int, int]]],
) -> None:
    p, ticks = scenario
    assert_bounded_and_never_shedding_while_slow(p, ticks)


def test_every_policy_gives_a_desired_count_with_its_reason() -> None:
    def make(policy: str, config: dict[str, Any]) -> WorkloadSpec:
        return WorkloadSpec.model_validate(
            {
                "name": "w",
                "slug": "w",
                "model": "m",
                "execution_policy": policy,
                "execution_policy_config": config,
            }
        )

    kw: dict[str, Any] = {"signals": Signals(), "fleet": FleetCounts(), "memory": ScaleMemory()}
    fixed = desired_count(spec=make("fixed", {"replicas": 2}), now=T0, **kw)
    assert (fixed.desired, fixed.reason) == (2, "fixed: 2 replicas")
    night = make("scheduled", {"window": "Daily 22:00-06:00 UTC", "replicas": 3})
    closed = desired_count(spec=night, now=T0, **kw)
    assert closed.desired == 0
    assert closed.recheck_at == T0.replace(hour=22)
    assert closed.reason.startswith("scheduled: window")
    auto = make("autoscaling", {"min_workers": 1, "max_workers": 2, "max_hourly_cost_usd": 5})
    assert desired_count(spec=auto, now=T0, **kw).desired == 1


def test_a_schedule_offset_reads_the_schedule_later_and_rechecks_on_the_real_clock() -> None:
    night = WorkloadSpec.model_validate(
        {
            "name": "w",
            "slug": "w",
            "model": "m",
            "execution_policy": "scheduled",
            "execution_policy_config": {"window": "Daily 22:00-06:00 UTC", "replicas": 3},
        }
    )
    kw: dict[str, Any] = {"signals": Signals(), "fleet": FleetCounts(), "memory": ScaleMemory()}
    # 12:00 on the real clock, read 11 hours ahead: 23:00, inside the night window.
    shifted = desired_count(spec=night, now=T0, schedule_offset=timedelta(hours=11), **kw)
    assert shifted.desired == 3
    assert shifted.reason.startswith("scheduled (schedule clock +11h00m00s): window")
    # The window closes at 06:00 schedule time: 19:00 on the real clock.
    assert shifted.recheck_at == T0.replace(hour=19)
    behind = desired_count(spec=night, now=T0, schedule_offset=timedelta(hours=-13), **kw)
    assert behind.desired == 3  # 23:00 the day before
    assert behind.recheck_at == T0.replace(hour=19)


def test_signals_from_epoch_seconds() -> None:
    s = Signals.from_epoch(
        ttft_samples=[(T0.timestamp(), 0.5)],
        request_rate=2.0,
        in_flight=1,
        queue_depth=0,
        last_request_at=T0.timestamp(),
    )
    assert s.ttft_samples == ((T0, 0.5),)
    assert s.last_request_at == T0


def test_measured_load_scales_up_at_once_without_a_ttft_breach() -> None:
    p = policy()
    capacity = ReplicaCapacity(requests_per_s=4.0, max_concurrency=64)
    # 60 answered in the last minute at TTFT 0.3 s: 1 req/s needs the one replica.
    now = T0
    quiet = Signals(ttft_samples=samples(0.3, now=now, seconds=60), last_request_at=now)
    held = desired_replicas(
        policy=p,
        signals=quiet,
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(),
        now=now,
        capacity=capacity,
    )
    assert held.desired == 1
    rush = Signals(
        ttft_samples=samples(0.3, now=now, seconds=60, every=1) * 10,
        queue_depth=30,
        last_request_at=now,
    )
    up = desired_replicas(
        policy=p,
        signals=rush,
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(),
        now=now,
        capacity=capacity,
    )
    assert up.direction is Direction.UP
    # 600 answered + 30 queued over a minute (10.5 req/s), plus the queue cleared within a
    # minute (0.5 req/s), at 75 % of 4 req/s each: 11 / 3 -> 4 replicas.
    assert up.desired == 4
    assert "30 queued" in up.reason
    # Replicas already booting count: nothing more is bought.
    covered = desired_replicas(
        policy=p,
        signals=rush,
        fleet=FleetCounts(ready=1, booting=4),
        memory=ScaleMemory(),
        now=now,
        capacity=capacity,
    )
    assert covered.desired == 5 and covered.direction is not Direction.UP
    assert covered.desired >= up.desired


def test_with_a_capacity_figure_ttft_well_inside_the_bounds_lets_the_fleet_consolidate() -> None:
    p = policy()
    capacity = ReplicaCapacity(requests_per_s=10.0, max_concurrency=64)
    memory = ScaleMemory()
    now = T0
    decision = None
    for _ in range(40):  # 400 s of TTFT at 0.4 s: above the 0.2 s lower bound
        now += timedelta(seconds=10)
        signals = Signals(
            ttft_samples=samples(0.4, now=now, seconds=400, every=10),
            request_rate=4.0,
            in_flight=8,
            last_request_at=now,
        )
        decision = desired_replicas(
            policy=p,
            signals=signals,
            fleet=FleetCounts(ready=4),
            memory=memory,
            now=now,
            capacity=capacity,
        )
        memory = decision.memory
        if decision.direction is Direction.DOWN:
            break
    assert decision is not None and decision.direction is Direction.DOWN
    assert decision.desired == 2  # 4 req/s at 75 % of 10 each needs 1; at most half go
    # Without a capacity figure the user's lower bound rules: no scale-down at 0.4 s.
    plain = run(p, fleet=FleetCounts(ready=4), ttft=0.4, start=T0, seconds=400)
    assert plain.direction is not Direction.DOWN


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.floats(0.5, 30.0), st.integers(0, 40))
def test_with_capacity_desired_stays_within_bounds_and_never_sheds_while_slow(
    scenario: tuple[AutoscalingPolicy, list[tuple[float, int, int, int, int]]],
    rps: float,
    queued: int,
) -> None:
    p, ticks = scenario
    capacity = ReplicaCapacity(requests_per_s=rps, max_concurrency=64)
    assert_bounded_and_never_shedding_while_slow(p, ticks, capacity=capacity, queued=queued)


def test_queue_need_matches_erlang_c_and_grows_with_prompt_spread() -> None:
    # M/M/1 at 50 % load: an arrival waits with probability 0.5.
    assert erlang_c(1, 0.5) == pytest.approx(0.5)
    # Two servers, offered load 1: C = 1/3 (textbook M/M/2 at rho 0.5).
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.0) == 1.0  # saturated: everyone waits
    steady = queue_need(rate=20.0, service_s=0.2, service_scv=1.0, wait_s=0.8, quantile=0.99)
    # Offered load 4: never fewer than 5 servers; the p99 wait within 0.8 s needs a margin.
    assert steady >= 5
    spread = queue_need(rate=20.0, service_s=0.2, service_scv=4.0, wait_s=0.8, quantile=0.99)
    assert spread > steady  # heavy-tailed prompts need more headroom at the same mean
    looser = queue_need(rate=20.0, service_s=0.2, service_scv=1.0, wait_s=5.0, quantile=0.99)
    assert looser < steady  # a longer allowed wait needs fewer replicas
    assert queue_need(rate=0.0, service_s=0.2, service_scv=1.0, wait_s=0.8, quantile=0.99) == 0


def test_with_a_prefill_time_the_fleet_is_sized_by_queueing_not_flat_utilisation() -> None:
    p = policy(max_workers=64)
    now = T0
    # 20 req/s, evenly spaced, answered over the last minute at TTFT 0.4 s; a replica
    # completes 40 req/s, so 75 % utilisation alone would keep one replica.
    steady = tuple((now - timedelta(seconds=k / 20), 0.4) for k in range(60 * 20))
    load = Signals(ttft_samples=steady, last_request_at=now)
    flat = ReplicaCapacity(requests_per_s=40.0, max_concurrency=64)
    queued = ReplicaCapacity(
        requests_per_s=40.0, max_concurrency=64, prefill_s=0.2, prefill_scv=1.0
    )
    by_rate = desired_replicas(
        policy=p, signals=load, fleet=FleetCounts(ready=1), memory=ScaleMemory(), now=now,
        capacity=flat,
    )  # fmt: skip
    by_queue = desired_replicas(
        policy=p, signals=load, fleet=FleetCounts(ready=1), memory=ScaleMemory(), now=now,
        capacity=queued,
    )  # fmt: skip
    assert by_rate.desired == 1
    want = queue_need(rate=20.0, service_s=0.2, service_scv=1.0, wait_s=0.8, quantile=0.99)
    assert by_queue.desired == want and by_queue.direction is Direction.UP
    assert "p99 wait" in by_queue.reason


def test_a_burst_is_held_for_the_scale_down_window_then_released() -> None:
    p = policy(max_workers=64, scale_down_time_window_sec=300)
    capacity = ReplicaCapacity(
        requests_per_s=40.0, max_concurrency=64, prefill_s=0.2, prefill_scv=1.0
    )
    burst_at = T0
    # 60 requests arrived within one second (answered 0.5 s later), then a trickle.
    burst = tuple((burst_at + timedelta(seconds=0.5), 0.5) for _ in range(60))

    def decide(now: datetime, ready: int) -> Any:
        trickle = samples(0.3, now=now, seconds=60, every=5)
        kept = tuple(s for s in burst if s[0] > now - timedelta(seconds=400))
        signals = Signals(ttft_samples=kept + trickle, last_request_at=now)
        return desired_replicas(
            policy=p, signals=signals, fleet=FleetCounts(ready=ready), memory=ScaleMemory(),
            now=now, capacity=capacity,
        )  # fmt: skip

    after = decide(burst_at + timedelta(seconds=60), ready=1)
    assert after.direction is Direction.UP and "burst" in after.reason
    held = after.desired
    assert held > 3
    # Within the window the floor stands: no consolidation below it.
    assert decide(burst_at + timedelta(seconds=250), ready=held).desired == held
    # Past the window the floor is gone and the trickle needs one replica.
    assert (
        burst_floor(
            capacity,
            Signals(ttft_samples=samples(0.3, now=burst_at + timedelta(seconds=400), seconds=60)),
            now=burst_at + timedelta(seconds=400),
            policy=p,
        )[0]
        <= 1
    )


def arrived(now: datetime, ages: list[float], ttft: float = 0.3) -> tuple[Any, ...]:
    """TTFT samples of requests that arrived ``ages`` seconds before ``now``."""
    return tuple((now - timedelta(seconds=age) + timedelta(seconds=ttft), ttft) for age in ages)


def test_the_arrival_curve_counts_the_densest_window_of_each_length() -> None:
    now = T0
    cluster = [5.0 - k * 0.05 for k in range(10)]  # 10 requests within half a second
    old = [400.0] * 50  # a bigger burst, but older than the window
    trickle = [60.0 + k * 5.0 for k in range(20)]  # one every 5 s
    signals = Signals(ttft_samples=arrived(now, cluster + old + trickle), queue_depth=40)
    curve = arrival_curve(signals, now=now, over_s=300, windows=(1.0, 8.0))
    # Within one second, or eight: the cluster. The 40 queued requests arrived at times
    # unknown: a backlog, not a burst, so they are not counted as one.
    assert curve == {1.0: 10, 8.0: 10}
    assert arrival_curve(signals, now=now, over_s=300, windows=(20.0,)) == {20.0: 10}
    assert arrival_curve(Signals(ttft_samples=arrived(now, trickle)), now=now, over_s=300) == {
        1.0: 1,
        2.0: 1,
        4.0: 1,
        8.0: 2,
    }


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.0, 299.0, allow_nan=False), max_size=80),
    st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0, 60.0]),
)
def test_the_arrival_curve_is_the_most_requests_within_any_window(
    ages: list[float], window: float
) -> None:
    signals = Signals(ttft_samples=arrived(T0, ages, ttft=0.0))
    counted = arrival_curve(signals, now=T0, over_s=300, windows=(window,))[window]
    # By hand: the requests in [age, age + window) for each request's own age.
    got = sorted((T0 - at).total_seconds() for at, _ in signals.ttft_samples)
    expected = max(
        (sum(1 for other in got if start <= other < start + window - 1e-9) for start in got),
        default=0,
    )
    assert counted == expected


def test_the_burst_floor_carries_headroom_over_the_largest_burst_within_the_target() -> None:
    p = policy(max_workers=64)
    capacity = ReplicaCapacity(
        requests_per_s=40.0, max_concurrency=64, prefill_s=0.2, prefill_scv=1.0
    )
    now = T0

    def floor(ages: list[float]) -> int:
        signals = Signals(ttft_samples=arrived(now, ages))
        return burst_floor(capacity, signals, now=now, policy=p)[0]

    sharp = floor([30.0 + k * 0.01 for k in range(60)])  # 60 requests within 0.6 s
    # c replicas clear n prefills of 0.2 s arriving within w seconds with no wait past
    # the budget (1 s target - 0.2 s prefill) when c >= n * 0.2 / (w + 0.8); the floor
    # provides that for a burst BURST_HEADROOM times as large, and no more.
    exact = BURST_HEADROOM * 60 * 0.2 / (1.0 + 0.8)
    assert sharp - 1 < exact <= sharp
    assert floor([30.0 + k * 0.01 for k in range(120)]) > sharp  # a bigger burst, more
    assert floor([30.0 + k * 0.125 for k in range(60)]) < sharp  # the same, spread over 8 s
    assert floor([]) == 0


def test_ttft_that_long_prompts_explain_does_not_scale_up() -> None:
    p = policy(max_workers=64)
    # Prompts averaging 0.5 s of prefill with a wide spread: p95 prefill alone is ~1.5 s.
    capacity = ReplicaCapacity(
        requests_per_s=40.0, max_concurrency=64, prefill_s=0.5, prefill_scv=1.5
    )
    assert breach_bound(p, capacity) > p.upper_allowed_latency_sec
    assert breach_bound(p, None) == p.upper_allowed_latency_sec
    now = T0
    memory = ScaleMemory()
    decision = None
    for step in range(0, 121, 10):
        at = now + timedelta(seconds=step)
        signals = Signals(
            ttft_samples=samples(1.3, now=at, seconds=120, every=2), last_request_at=at
        )
        decision = desired_replicas(
            policy=p, signals=signals, fleet=FleetCounts(ready=2), memory=memory, now=at,
            capacity=capacity,
        )  # fmt: skip
        memory = decision.memory
    assert decision is not None and decision.direction is not Direction.UP


@settings(max_examples=60)
@given(
    rate=st.floats(min_value=0.1, max_value=200.0),
    rps=st.floats(min_value=0.5, max_value=50.0),
    slots=st.integers(min_value=1, max_value=256),
)
def test_batch_slots_never_run_a_fleet_past_its_throughput(
    rate: float, rps: float, slots: int
) -> None:
    capacity = ReplicaCapacity(
        requests_per_s=rps, max_concurrency=slots, prefill_s=0.1, prefill_scv=1.0
    )
    need = slot_need(capacity, rate, 1.0)
    assert need is not None
    assert need * rps > rate  # the fleet's throughput always exceeds the load
    # More load never needs fewer replicas.
    more = slot_need(capacity, rate * 1.5, 1.0)
    assert more is not None and more >= need


def test_slots_shared_by_several_replicas_need_less_headroom_than_a_flat_share() -> None:
    """11.3 req/s on replicas of 64 slots completing 4.49 req/s each (the conversation
    mix on an L40S): three replicas at 84 % of their throughput start 99 % of requests
    within the wait budget, where a flat 75 % asks for four; one replica's slots alone
    still get no more than the flat share."""
    now = T0
    capacity = ReplicaCapacity(
        requests_per_s=4.49, max_concurrency=64, prefill_s=0.05, prefill_scv=1.0
    )
    load = Signals(request_rate=11.3, last_request_at=now)
    need, _ = load_need(capacity, load, now=now, upper_s=1.0)
    assert need == 3
    flat, _ = load_need(replace(capacity, prefill_s=None), load, now=now, upper_s=1.0)
    assert flat == 4
    alone = slot_need(capacity, 0.8 * 4.49, 1.0)
    assert alone == 2  # 80 % of one replica's throughput is over a single batch's share
    # Without a budget left after the prefill, the flat share applies.
    assert slot_need(replace(capacity, prefill_s=1.5), 11.3, 1.0) is None


def test_long_prompts_a_faster_gpu_would_answer_in_time_are_no_excuse() -> None:
    """The code-day failure: two L4s prefill the mean code prompt (2,048 tokens) in
    0.36 s, so by their own prefill a TTFT p95 of 1.3 s looked "explained by long
    prompts" and never scaled up. One H100 (the fastest GPU of the pool) prefills it in
    0.066 s: judged against it, as the SLO is, the same TTFT is a breach of the upper
    bound, and the reason says so with the bound it compared."""
    p = policy(max_workers=64)
    own = ReplicaCapacity(
        requests_per_s=2.56, max_concurrency=64, prefill_s=0.361, prefill_scv=0.93
    )
    judged = replace(own, fastest_prefill_s=0.066)
    assert breach_bound(p, own) > 1.3  # the excuse
    assert breach_bound(p, judged) == p.upper_allowed_latency_sec

    def last(capacity: ReplicaCapacity) -> Any:
        memory, decision = ScaleMemory(), None
        for step in range(0, 121, 10):
            at = T0 + timedelta(seconds=step)
            signals = Signals(
                ttft_samples=samples(1.3, now=at, seconds=120, every=2), last_request_at=at
            )
            decision = desired_replicas(
                policy=p, signals=signals, fleet=FleetCounts(ready=4), memory=memory,
                now=at, capacity=capacity,
            )  # fmt: skip
            memory = decision.memory
        return decision

    assert last(own).direction is not Direction.UP
    up = last(judged)
    assert up.direction is Direction.UP
    assert "TTFT p95 1.300s > upper 1s" in up.reason


# "TTFT p95 X s < [words] Y s" and the same with ">": whatever names the bound.
_BELOW = re.compile(r"TTFT p[\d.]+ ([\d.]+)s < (?:[a-z ]+ )?([\d.e+-]+)s")
_ABOVE = re.compile(r"TTFT p[\d.]+ ([\d.]+)s > (?:[a-z ]+ )?([\d.e+-]+)s")


@settings(max_examples=120, deadline=None)
@example(0.4, 10.0, None, 4, None)  # calm under half the upper bound, above the lower bound
@example(1.3, 2.56, 0.361, 4, 0.066)  # a slow GPU's prefill judged against the fastest
@example(1.869, 10.72, 0.659, 4, 0.4476)  # a bound just below 1.869s once printed "1.87s"
@given(
    st.floats(0.01, 3.0),
    st.one_of(st.none(), st.floats(0.5, 30.0)),
    st.one_of(st.none(), st.floats(0.01, 0.8)),
    st.integers(1, 8),
    st.one_of(st.none(), st.floats(0.005, 0.8)),
)
def test_every_ttft_comparison_a_reason_states_holds_for_the_numbers_it_states(
    ttft: float, rps: float | None, prefill: float | None, ready: int, fastest: float | None
) -> None:
    """A reason that says "X < Y" or "X > Y" is true of the X and Y it prints (a scale-down
    once read "TTFT p95 0.886s < lower 0.2s": the bound compared was another)."""
    p = policy()
    capacity = (
        None
        if rps is None
        else ReplicaCapacity(
            requests_per_s=rps,
            max_concurrency=64,
            prefill_s=prefill,
            fastest_prefill_s=fastest if prefill is not None else None,
        )
    )
    memory = ScaleMemory()
    now = T0
    for _ in range(45):
        now += timedelta(seconds=10)
        signals = Signals(
            ttft_samples=samples(ttft, now=now, seconds=400, every=10),
            request_rate=1.0,
            in_flight=1,
            last_request_at=now,
        )
        decision = desired_replicas(
            policy=p,
            signals=signals,
            fleet=FleetCounts(ready=ready),
            memory=memory,
            now=now,
            capacity=capacity,
        )
        memory = decision.memory
        for below, bound in _BELOW.findall(decision.reason):
            assert float(below) <= float(bound), decision.reason
        for above, bound in _ABOVE.findall(decision.reason):
            assert float(above) >= float(bound), decision.reason


def _need_at(capacity: ReplicaCapacity, rate: float) -> int:
    return load_need(capacity, Signals(), now=T0, upper_s=1.0, rate=rate)[0]


def test_a_quiet_minute_amid_busy_ones_sheds_no_replica_the_next_busy_minute_buys_back() -> None:
    p = policy(scale_down_time_window_sec=300)
    capacity = ReplicaCapacity(
        requests_per_s=4.0, max_concurrency=64, prefill_s=0.05, prefill_scv=1.0
    )
    quiet, busy_rate = 6.0, 7.0
    assert _need_at(capacity, quiet) == 2 and _need_at(capacity, busy_rate) == 3

    def decide(now: datetime, busy_until_s: float) -> Any:
        """Three replicas, calm for the whole window; arrivals at the busy rate from
        300 s ago until ``busy_until_s`` ago, at the quiet rate since."""
        busy_ages = [
            busy_until_s + 0.2 + k / busy_rate for k in range(int((300 - busy_until_s) * 7))
        ]
        quiet_ages = [0.2 + k / quiet for k in range(int(busy_until_s * quiet))]
        signals = Signals(
            ttft_samples=tuple(sorted(arrived(now, quiet_ages + busy_ages, ttft=0.1))),
            request_rate=quiet,
            in_flight=4,
            last_request_at=now,
        )
        return desired_replicas(
            policy=p,
            signals=signals,
            fleet=FleetCounts(ready=3),
            memory=ScaleMemory(calm_since=now - timedelta(seconds=400)),
            now=now,
            capacity=capacity,
        )

    # The last minute alone (6 req/s) fits two replicas; the busier minutes before it in
    # the scale-down window (7 req/s) do not: three are kept, and the reason says why.
    held = decide(T0, busy_until_s=60.0)
    assert held.direction is Direction.HOLD and held.desired == 3
    assert "6.00 req/s over the last 60s, 7.00 req/s in the busiest 60s of the last 300s" in (
        held.reason
    )
    assert "need 3" in held.reason and "keep 3" in held.reason
    # Once the whole window was quiet, the third replica goes.
    shed = decide(T0, busy_until_s=300.0)
    assert shed.direction is Direction.DOWN and shed.desired == 2
    assert "6.00 req/s over the last 60s, 6.00 req/s in the busiest 60s of the last 300s" in (
        shed.reason
    )
    assert "need 2" in shed.reason and "3 -> 2" in shed.reason


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(0.01, 50.0),
    service_s=st.floats(0.01, 5.0),
    service_scv=st.floats(0.0, 8.0),
    wait_s=st.floats(0.0, 5.0),
    quantile=st.sampled_from([0.5, 0.9, 0.99, 0.999]),
)
def test_queue_need_is_the_fewest_servers_whose_wait_quantile_fits(
    rate: float, service_s: float, service_scv: float, wait_s: float, quantile: float
) -> None:
    # By hand, from erlang_c for each count: the first count past the offered load whose
    # P(wait > wait_s) is within 1 - quantile.
    offered = rate * service_s
    spread = (1.0 + service_scv) / 2.0
    servers = math.floor(offered) + 1
    while servers < 4096:
        decay = (servers - offered) / (service_s * spread)
        if erlang_c(servers, offered) * math.exp(-decay * wait_s) <= 1.0 - quantile:
            break
        servers += 1
    need = queue_need(
        rate=rate, service_s=service_s, service_scv=service_scv, wait_s=wait_s, quantile=quantile
    )
    assert need == servers


def test_a_hold_keeps_the_replicas_a_spot_warning_takes() -> None:
    """Three replicas held with TTFT within bounds; the provider warns one of them of its
    reclaim. The hold keeps three, so the plan replaces it, and no more than that: not
    while its replacement boots, nor once it serves beside the warned one still draining."""
    p = policy(min_workers=1)
    signals = busy(0.5, T0)
    first = desired_replicas(
        policy=p, signals=signals, fleet=FleetCounts(ready=3), memory=ScaleMemory(), now=T0
    )
    assert (first.desired, first.direction) == (3, Direction.HOLD)
    assert first.memory.held == 3
    later = T0 + timedelta(seconds=5)
    warned = desired_replicas(
        policy=p,
        signals=signals,
        fleet=FleetCounts(ready=2, draining=1, warned=1),
        memory=first.memory,
        now=later,
    )
    assert (warned.desired, warned.direction) == (3, Direction.HOLD)
    assert "1 of 1 replica(s) warned of a spot reclaim replaced (the fleet held 3)" in (
        warned.reason
    )
    for fleet in (
        FleetCounts(ready=2, booting=1, draining=1, warned=1),  # its replacement boots
        FleetCounts(ready=3, draining=1, warned=1),  # its replacement serves
    ):
        again = desired_replicas(
            policy=p, signals=signals, fleet=fleet, memory=warned.memory, now=later
        )
        assert again.desired == 3, fleet


def test_a_hold_without_a_decision_before_keeps_what_it_finds_when_warned() -> None:
    """A controller just started has no count held: a warned replica is not replaced by
    the hold (only by a rule that asks for it), and the floor still applies."""
    p = policy(min_workers=1)
    decision = desired_replicas(
        policy=p,
        signals=busy(0.5, T0),
        fleet=FleetCounts(ready=2, draining=1, warned=1),
        memory=ScaleMemory(),
        now=T0,
    )
    assert decision.desired == 2
    assert "warned" not in decision.reason
