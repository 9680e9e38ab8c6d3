"""Spot spares: a spot fleet keeps the replicas that carry the load with the expected
interruptions' replacements still booting (``decide.scaling`` module docstring)."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from autoscaler.decide.inputs import Measured
from autoscaler.decide.plan import ReplicaPhase, ReplicaView
from autoscaler.decide.queueing import ReplicaCapacity
from autoscaler.decide.scaling import (
    Direction,
    FleetCounts,
    ScaleDecision,
    ScaleMemory,
    SpotRisk,
    desired_replicas,
    spot_spares,
)
from autoscaler.decide.signals import Signals
from autoscaler.decide.spot_rate import DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR, SpotRate
from autoscaler.decide.step import ReplicaState, WorkloadView, spot_risk
from autoscaler.decide.warm import StartTimes
from autoscaler.spec import AutoscalingPolicy
from tests.reconcile.world import L4, OFFERS, autoscaling

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)

SIMULATED = SpotRisk(interruptions_per_hour=0.2, replace_s=180.0)
"""The simulated cloud's market: 0.2 interruptions an hour, a three-minute boot."""

L40S_LIKE = ReplicaCapacity(requests_per_s=4.5, max_concurrency=64)


def policy(**overrides: Any) -> AutoscalingPolicy:
    fields: dict[str, Any] = {
        "min_workers": 1,
        "max_workers": 8,
        "max_hourly_cost_usd": 100.0,
        "workers": {"cloud_pool": {"gpu_pool": ["L40S"]}},
        "upper_allowed_latency_sec": 1.0,
        "lower_allowed_latency_sec": 0.2,
        "scale_up_time_window_sec": 60,
        "scale_down_time_window_sec": 300,
        "allow_spot_instances": True,
    }
    fields.update(overrides)
    return AutoscalingPolicy.model_validate(fields)


def steady(rate: float, *, now: datetime = T0, ttft: float = 0.3) -> Signals:
    """``rate`` requests a second, answered at ``ttft``, for the last 400 s."""
    gap = 1.0 / rate
    count = int(400 * rate)
    return Signals(
        ttft_samples=tuple((now - timedelta(seconds=i * gap), ttft) for i in range(count)),
        request_rate=rate,
        in_flight=4,
        last_request_at=now,
    )


def decide(rate: float, *, ready: int, spot: SpotRisk | None) -> ScaleDecision:
    return desired_replicas(
        policy=policy(),
        signals=steady(rate),
        fleet=FleetCounts(ready=ready),
        memory=ScaleMemory(),
        now=T0,
        capacity=L40S_LIKE,
        spot=spot,
    )


def poisson_tail(mean: float, k: int) -> float:
    """P(X > k) for X Poisson with ``mean``, summed directly."""
    return 1.0 - sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(k + 1))


def test_one_spare_once_a_replica_is_down_more_than_one_percent_of_the_time() -> None:
    # One replica: down 0.2/h x 180 s = 1.0 % of the time, within the 1 % allowed.
    assert SIMULATED.down_mean(1) == pytest.approx(0.01)
    assert spot_spares(1, SIMULATED) == 0
    # Two: about 2 %, so one spare; two down at once (0.02 %) is rare enough.
    assert spot_spares(2, SIMULATED) == 1
    assert spot_spares(10, SIMULATED) == 1
    # Twenty: 0.2 down on average, two at once 1.8 % of the time: a second spare.
    assert spot_spares(20, SIMULATED) == 2
    # At the assumed real-world rate (one a machine-week) even 20 replicas need none.
    rare = SpotRisk(interruptions_per_hour=DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR, replace_s=180.0)
    assert spot_spares(20, rare) == 0


@pytest.mark.parametrize(("replicas", "rate", "boot"), [(40, 2.0, 180.0), (8, 0.5, 900.0)])
def test_spares_are_the_fewest_whose_poisson_tail_is_within_the_allowance(
    replicas: int, rate: float, boot: float
) -> None:
    risk = SpotRisk(interruptions_per_hour=rate, replace_s=boot)
    mean = replicas * rate * boot / 3600
    k = spot_spares(replicas, risk)
    assert k >= 2
    assert poisson_tail(mean, k) <= 0.01 < poisson_tail(mean, k - 1)


def test_spares_never_outnumber_the_fleet() -> None:
    # Six of eight down on average: no count of spares makes that rare; as many as the
    # fleet is the most the rule asks.
    assert spot_spares(8, SpotRisk(interruptions_per_hour=3.0, replace_s=900.0)) == 8


def test_a_spot_fleet_buys_a_spare_when_the_survivor_could_not_carry_the_load() -> None:
    # 4.7 req/s: two replicas at 4.5 req/s each carry it; with one interrupted, the
    # other could not until its replacement boots.
    on_demand = decide(4.7, ready=2, spot=None)
    assert on_demand.desired == 2 and on_demand.direction is Direction.HOLD
    spot = decide(4.7, ready=2, spot=SIMULATED)
    assert spot.desired == 3 and spot.direction is Direction.UP
    assert spot.reason.startswith(
        "spot spares: 3 spot replicas interrupted 0.2/h each and replaced in 180s have "
        "0.030 down on average, and more than 1 down at once is no likelier than 1%, so "
        "1 spare(s) on top of the 2 that carry 4.70 req/s"
    )
    assert "(4.50 req/s each): 2 -> 3 (instead of: hold at 2" in spot.reason


def test_no_spare_when_the_survivors_carry_the_load_or_interruptions_are_rare() -> None:
    # 4 req/s: one survivor carries it at 4.5 req/s while the replacement boots.
    calm = decide(4.0, ready=2, spot=SIMULATED)
    assert calm.desired == 2 and "spot" not in calm.reason
    # 4.7 req/s on three replicas: the spare is there already.
    held = decide(4.7, ready=3, spot=SIMULATED)
    assert held.desired == 3 and "spot" not in held.reason
    rare = SpotRisk(interruptions_per_hour=DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR, replace_s=180.0)
    assert decide(4.7, ready=2, spot=rare).desired == 2


def test_scale_down_keeps_the_spare() -> None:
    # A quiet 5 req/s on four replicas: the load rule would consolidate to two, which one
    # interruption would leave short; the spare stays.
    memory = ScaleMemory(calm_since=T0 - timedelta(seconds=600))
    plain = desired_replicas(
        policy=policy(),
        signals=steady(5.0),
        fleet=FleetCounts(ready=4),
        memory=memory,
        now=T0,
        capacity=L40S_LIKE,
    )
    assert plain.direction is Direction.DOWN and plain.desired == 2
    spot = desired_replicas(
        policy=policy(),
        signals=steady(5.0),
        fleet=FleetCounts(ready=4),
        memory=memory,
        now=T0,
        capacity=L40S_LIKE,
        spot=SIMULATED,
    )
    assert spot.direction is Direction.DOWN and spot.desired == 3
    assert "the 2 that carry 5.00 req/s" in spot.reason
    assert ": 4 -> 3 (instead of: TTFT" in spot.reason
    # On three, the same load keeps the three.
    kept = desired_replicas(
        policy=policy(),
        signals=steady(5.0),
        fleet=FleetCounts(ready=3),
        memory=memory,
        now=T0,
        capacity=L40S_LIKE,
        spot=SIMULATED,
    )
    assert kept.direction is Direction.HOLD and kept.desired == 3
    assert ": keep 3 (instead of: TTFT" in kept.reason


def _replica(launch_id: str, *, spot: bool) -> ReplicaState:
    return ReplicaState(
        view=ReplicaView(
            launch_id=launch_id,
            phase=ReplicaPhase.READY,
            generation=1,
            offer_key=L4.key,
            usd_per_hour=L4.on_demand_usd_per_hour,
            intent_at=T0 - timedelta(minutes=30),
            ready_at=T0 - timedelta(minutes=25),
        ),
        zone=L4.zone,
        shape=(L4.gpu, L4.gpu_count),
        spot=spot,
    )


def test_the_reason_states_how_the_rate_was_measured() -> None:
    rate = SpotRate(interruptions=60, hours=41.2)
    risk = SpotRisk(interruptions_per_hour=rate.per_hour, replace_s=180.0, basis=rate.basis())
    spot = decide(4.7, ready=2, spot=risk)
    assert spot.desired == 3
    assert spot.reason.startswith(
        "spot spares: 3 spot replicas interrupted 0.292/h each (60 interruptions in 41.2 "
        "spot machine-hours of the last 7 days (prior 1 per 168 h) = 0.292/h) and "
        "replaced in 180s"
    )


def test_the_step_weighs_spot_risk_only_for_a_fleet_on_spot() -> None:
    view = WorkloadView(
        spec=autoscaling("bot", allow_spot_instances=True),
        generation=1,
        replicas=[_replica("a", spot=True), _replica("b", spot=True)],
        measured=Measured(),
        offers=OFFERS,
        spot_rate=SpotRate(interruptions=3, hours=41.2),
        start_times=StartTimes(fresh_s=240.0, start_s=60.0, wake_s=10.0),
    )
    # The measured rate, with its basis for the reason: (1 + 3) / (168 + 41.2).
    risk = spot_risk(view)
    assert risk is not None
    assert risk.interruptions_per_hour == pytest.approx(4 / 209.2)
    assert risk.replace_s == 240.0
    assert risk.basis == (
        "3 interruptions in 41.2 spot machine-hours of the last 7 days "
        "(prior 1 per 168 h) = 0.0191/h"
    )
    # Nothing measured yet: the prior alone; no measured boot: three minutes.
    assumed = replace(view, spot_rate=SpotRate(), start_times=None)
    prior = spot_risk(assumed)
    assert prior is not None
    assert prior.interruptions_per_hour == DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR
    assert prior.replace_s == 180.0
    # Mostly on demand (spot stocked out), or spot not allowed: no risk weighed.
    mixed = replace(
        view,
        replicas=[_replica("a", spot=True), _replica("b", spot=False), _replica("c", spot=False)],
    )
    assert spot_risk(mixed) is None
    assert spot_risk(replace(view, spec=autoscaling("bot"))) is None


def test_the_spares_kept_are_those_of_the_fleet_they_make() -> None:
    # A contended market (one interruption an hour, five-minute boots). The scale-down
    # window's busiest minute (182 req/s) needs 41 replicas at 4.5 req/s each, the last
    # minute (100 req/s) fewer: the rules hold 42. Spares for 42 (8) make 49, whose own
    # spares (9) make 50, whose own (10) make 51: the floor is where the spares counted
    # are those of the fleet they make, and the reason's figures are that fleet's.
    risk = SpotRisk(interruptions_per_hour=1.0, replace_s=300.0)
    busy = [(T0 - timedelta(seconds=200 + i / 182), 0.3) for i in range(182 * 60)]
    calm = [(T0 - timedelta(seconds=i / 100), 0.3) for i in range(100 * 60)]
    decision = desired_replicas(
        policy=policy(max_workers=80),
        signals=Signals(
            ttft_samples=tuple(sorted(busy + calm)),
            request_rate=100.0,
            in_flight=40,
            last_request_at=T0,
        ),
        fleet=FleetCounts(ready=42),
        memory=ScaleMemory(),
        now=T0,
        capacity=L40S_LIKE,
        spot=risk,
    )
    assert "the 41 that carry 182.00 req/s" in decision.reason
    spares = decision.desired - 41
    assert spot_spares(decision.desired, risk) == spares
    assert all(spot_spares(n, risk) > n - 41 for n in range(41, decision.desired))
    assert poisson_tail(risk.down_mean(decision.desired), spares) <= 0.01
    assert decision.reason.startswith(
        f"spot spares: {decision.desired} spot replicas interrupted 1/h each and replaced "
        f"in 300s have {risk.down_mean(decision.desired):.3f} down on average, and more "
        f"than {spares} down at once is no likelier than 1%"
    )
