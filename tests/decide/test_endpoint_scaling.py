"""per_worker as the replica's concurrency target, async endpoints scaled on their job
queue, and min_throughput_rate as a floor: through the shipped step and the pure rules."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from autoscaler.decide.inputs import Measured
from autoscaler.decide.plan import ReplicaPhase, ReplicaView
from autoscaler.decide.queueing import ReplicaCapacity
from autoscaler.decide.scaling import (
    Direction,
    FleetCounts,
    ScaleMemory,
    desired_replicas,
    throughput_need,
)
from autoscaler.decide.signals import Signals
from autoscaler.decide.step import ReplicaState, StepKnobs, WorkloadView, place_next, step
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec
from tests.reconcile.world import L4, OFFERS, autoscaling

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def _spec(**fields: Any) -> WorkloadSpec:
    policy = fields.pop("policy", {})
    base = autoscaling("bot", max_workers=8, **policy).model_dump(mode="json")
    return WorkloadSpec.model_validate({**base, **fields})


def _ready(n: int) -> list[ReplicaState]:
    return [
        ReplicaState(
            view=ReplicaView(
                launch_id=f"r{i}",
                phase=ReplicaPhase.READY,
                generation=1,
                offer_key=L4.key,
                usd_per_hour=L4.on_demand_usd_per_hour,
                intent_at=NOW - timedelta(minutes=30),
                ready_at=NOW - timedelta(minutes=25),
                drain_requested_at=None,
                in_flight=0,
            ),
            zone=L4.zone,
            shape=(L4.gpu, L4.gpu_count),
        )
        for i in range(n)
    ]


def _step(spec: WorkloadSpec, signals: Signals, *, ready: int = 1) -> Any:
    view = WorkloadView(
        spec=spec,
        generation=1,
        replicas=_ready(ready),
        measured=Measured(signals=signals),
        offers=OFFERS,
    )
    return step(view, memory=ScaleMemory(), unavailable={}, now=NOW, knobs=StepKnobs())


def _policy(**overrides: Any) -> AutoscalingPolicy:
    fields: dict[str, Any] = {
        "min_workers": 0,
        "max_workers": 8,
        "max_hourly_cost_usd": 100.0,
        "scale_up_time_window_sec": 30,
        "scale_down_time_window_sec": 60,
        **overrides,
    }
    return AutoscalingPolicy.model_validate(fields)


# --- per_worker ---------------------------------------------------------------------


def test_per_worker_is_the_replicas_concurrency_target_in_the_step() -> None:
    signals = Signals(in_flight=2, queue_depth=5, last_request_at=NOW)
    capped = _step(_spec(per_worker=2), signals)
    assert capped.decision.desired == math.ceil(7 / 2)
    assert capped.decision.direction is Direction.UP
    assert "2 in flight and 5 queued at 2 per replica (per_worker) need 4" in (
        capped.decision.reason
    )
    # The capacity figure the other rules read is capped there too.
    assert capped.inputs.capacity.max_concurrency == 2
    # Without per_worker the same seven requests fit the one replica (64 at once).
    uncapped = _step(_spec(), signals)
    assert uncapped.decision.desired == 1
    assert uncapped.inputs.capacity.max_concurrency > 2


def test_placement_weighs_a_replica_at_its_per_worker() -> None:
    # A GPU whose large batch makes it cheapest per request/s loses that edge when the
    # gateway sends each replica one request at a time.
    def chosen(spec: WorkloadSpec) -> str:
        view = WorkloadView(
            spec=spec, generation=1, replicas=[], measured=Measured(), offers=OFFERS
        )
        placement = place_next(view, unavailable={}, now=NOW, knobs=StepKnobs(), launched=())
        assert placement.offer is not None
        return placement.offer.gpu

    assert chosen(_spec()) == "NVIDIA L40S"
    assert chosen(_spec(per_worker=1)) == "NVIDIA A10G"


def test_scale_down_keeps_what_the_concurrency_target_needs() -> None:
    p = _policy(min_workers=1)
    fast = tuple((NOW - timedelta(seconds=s), 0.05) for s in range(100))
    signals = Signals(ttft_samples=fast, in_flight=5, last_request_at=NOW)
    memory = ScaleMemory(calm_since=NOW - timedelta(seconds=120))
    kept = desired_replicas(
        policy=p,
        signals=signals,
        fleet=FleetCounts(ready=3),
        memory=memory,
        now=NOW,
        concurrency_target=2,
    )
    assert kept.desired == 3
    assert "need 3: keep 3" in kept.reason
    shed = desired_replicas(
        policy=p,
        signals=Signals(ttft_samples=fast, in_flight=3, last_request_at=NOW),
        fleet=FleetCounts(ready=3),
        memory=memory,
        now=NOW,
        concurrency_target=2,
    )
    assert shed.desired == 2 and shed.direction is Direction.DOWN


# --- async endpoints ----------------------------------------------------------------


def test_an_async_endpoint_wakes_with_what_its_queue_needs() -> None:
    spec = _spec(endpoint_type="async", per_worker=3, policy={"min_workers": 0})
    woken = _step(spec, Signals(queue_depth=10, last_request_at=NOW), ready=0)
    assert woken.decision.direction is Direction.WAKE
    assert woken.decision.desired == math.ceil(10 / 3)


def test_an_async_endpoint_without_per_worker_targets_the_gateways_cap() -> None:
    spec = _spec(endpoint_type="async", policy={"min_workers": 0})
    grown = _step(spec, Signals(in_flight=64, queue_depth=100, last_request_at=NOW), ready=1)
    assert grown.decision.desired == math.ceil(164 / 64)


def test_an_async_endpoint_adds_a_replica_when_its_oldest_job_waits_too_long() -> None:
    p = _policy()
    old = Signals(
        in_flight=1, queue_depth=1, last_request_at=NOW, oldest_queued_at=NOW - timedelta(minutes=2)
    )
    up = desired_replicas(
        policy=p,
        signals=old,
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(),
        now=NOW,
        concurrency_target=4,
        jobs_only=True,
    )
    assert (up.desired, up.direction) == (2, Direction.UP)
    assert "oldest queued job has waited 120s > scale-up window 30s" in up.reason
    booting = desired_replicas(
        policy=p,
        signals=old,
        fleet=FleetCounts(ready=1, booting=1),
        memory=ScaleMemory(),
        now=NOW,
        concurrency_target=4,
        jobs_only=True,
    )
    assert booting.desired == 2 and booting.direction is not Direction.UP
    fresh = desired_replicas(
        policy=p,
        signals=Signals(in_flight=1, queue_depth=1, last_request_at=NOW, oldest_queued_at=NOW),
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(),
        now=NOW,
        concurrency_target=4,
        jobs_only=True,
    )
    assert fresh.desired == 1


def test_an_async_endpoint_ignores_slow_first_tokens_and_scales_to_zero_when_idle() -> None:
    p = _policy(scale_to_zero_timeout_sec=60)
    slow = tuple((NOW - timedelta(seconds=s), 30.0) for s in range(60))
    busy = Signals(engine_ttft_samples=slow, in_flight=1, last_request_at=NOW)
    kept = desired_replicas(
        policy=p,
        signals=busy,
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(breach_since=NOW - timedelta(minutes=5)),
        now=NOW,
        concurrency_target=4,
        jobs_only=True,
    )
    assert kept.desired == 1
    live = desired_replicas(
        policy=p,
        signals=busy,
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(breach_since=NOW - timedelta(minutes=5)),
        now=NOW,
    )
    assert live.desired > 1  # the same TTFT scales a live endpoint up
    idle = desired_replicas(
        policy=p,
        signals=Signals(last_request_at=NOW - timedelta(minutes=5)),
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(),
        now=NOW,
        concurrency_target=4,
        jobs_only=True,
    )
    assert (idle.desired, idle.direction) == (0, Direction.ZERO)


# --- min_throughput_rate --------------------------------------------------------------

CAPACITY = ReplicaCapacity(requests_per_s=2.0, max_concurrency=32, output_tokens_per_s=600.0)


def test_the_throughput_floor_raises_the_count_and_says_the_numbers() -> None:
    p = _policy(min_workers=1, min_throughput_rate=2000)
    decision = desired_replicas(
        policy=p,
        signals=Signals(last_request_at=NOW),
        fleet=FleetCounts(ready=1),
        memory=ScaleMemory(),
        now=NOW,
        capacity=CAPACITY,
    )
    assert (decision.desired, decision.direction) == (math.ceil(2000 / 600), Direction.UP)
    assert "min_throughput_rate 2000 tokens/s needs 4 replica(s) at 600 tokens/s each" in (
        decision.reason
    )


def test_the_throughput_floor_holds_against_scale_to_zero_and_stops_at_max_workers() -> None:
    p = _policy(min_throughput_rate=100_000, max_workers=5, scale_to_zero_timeout_sec=60)
    idle = desired_replicas(
        policy=p,
        signals=Signals(last_request_at=NOW - timedelta(hours=1)),
        fleet=FleetCounts(ready=2),
        memory=ScaleMemory(),
        now=NOW,
        capacity=CAPACITY,
    )
    assert idle.desired == 5
    assert "capped at max_workers 5" in idle.reason


def test_the_throughput_floor_without_a_figure_keeps_one_replica() -> None:
    assert throughput_need(_policy(), CAPACITY) is None
    need, why = throughput_need(_policy(min_throughput_rate=10), None) or (0, "")
    assert need == 1 and "no per-replica throughput figure" in why
    assert throughput_need(_policy(min_throughput_rate=1200), CAPACITY) == (
        2,
        "min_throughput_rate 1200 tokens/s needs 2 replica(s) at 600 tokens/s each "
        "(performance model at the measured mix)",
    )


def test_the_step_figures_the_floor_with_the_performance_model() -> None:
    spec = _spec(policy={"min_throughput_rate": 5000})
    result = _step(spec, Signals(last_request_at=NOW))
    per = result.inputs.capacity.output_tokens_per_s
    assert per is not None and per > 0
    assert result.decision.desired == min(math.ceil(5000 / per), 8)
    assert f"at {per:.0f} tokens/s each" in result.decision.reason
