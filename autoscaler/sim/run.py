"""One scenario (a workload, a trace, a rate scale, a seed, spot or not) run under our
policy, the baselines and the oracle."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from autoscaler.decide.scaling import SAFE_UTILIZATION, ReplicaCapacity
from autoscaler.sim.oracle import OraclePlan, oracle
from autoscaler.sim.policies import (
    ConcurrencyPolicy,
    ControllerPolicy,
    Policy,
    RequestRatePolicy,
    static_policy,
)
from autoscaler.sim.report import RunReport, build_report
from autoscaler.sim.trace import TraceRequest, TraceStats, scale_rate, trace_stats
from autoscaler.sim.workload import (
    SimWorkload,
    SloRule,
    fastest_single_gpu,
    feasible_offers,
)
from autoscaler.sim.world import CloudSettings, World, with_spot
from autoscaler.spec import FixedPolicy
from catalog.model import Offer
from catalog.perf import EngineRequest, ServingProfile, simulate

ATTAINMENT_TARGET = 0.99
"""The share of requests the SLO asks to be within the TTFT target."""

POLICY_NAMES = ("ours", "static-peak", "static-mean", "skyserve-qps", "knative-kpa")


@dataclass(frozen=True, slots=True)
class Scenario:
    """What to simulate. ``ttft_slo_s`` ``None`` takes the workload's upper bound."""

    workload: SimWorkload
    offers: Sequence[Offer]
    requests: Sequence[TraceRequest]
    trace_name: str
    rate_scale: float = 1.0
    ttft_slo_s: float | None = None
    seed: int = 0
    allow_spot: bool = False
    cloud: CloudSettings = field(default_factory=CloudSettings)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A scenario with what every policy's run shares."""

    scenario: Scenario
    workload: SimWorkload
    offers: list[Offer]
    requests: list[TraceRequest]
    stats: TraceStats
    slo: SloRule
    offer: Offer
    profile: ServingProfile
    capacity_rps: float
    """One replica on ``offer`` (placement's first choice) at this trace's mean token mix."""
    oracle: OraclePlan


def prepare(scenario: Scenario) -> Prepared:
    """Scale the trace, fix the SLO, find placement's first offer, and compute the oracle."""
    workload = _with_target(with_spot(scenario.workload, scenario.allow_spot), scenario.ttft_slo_s)
    auto = workload.autoscaling
    target = auto.upper_allowed_latency_sec if auto else (scenario.ttft_slo_s or 1.0)
    offers = feasible_offers(workload, scenario.offers)
    if not offers:
        raise ValueError(f"workload {workload.spec.slug}: no catalog offer can serve the model")
    requests = scale_rate(scenario.requests, scenario.rate_scale)
    stats = trace_stats(requests)
    slo = SloRule(target_s=target, fastest=fastest_single_gpu(workload, offers))
    probe = World(
        workload=workload,
        offers=offers,
        policy=static_policy(workload.spec, replicas=0, name="probe"),
        requests=[],
        seed=scenario.seed,
        cloud=scenario.cloud,
        allow_spot=scenario.allow_spot,
        initial_replicas=0,
    )
    placement = probe.first_placement()
    if placement is None:
        raise ValueError(f"workload {workload.spec.slug}: placement finds no offer")
    offer = placement
    profile = workload.profile(offer)
    capacity = profile.capacity_rps(
        input_tokens=stats.mean_input_tokens, output_tokens=stats.mean_output_tokens
    )
    plan = oracle(
        workload=workload,
        offers=offers,
        requests=requests,
        slo=slo,
        attainment=ATTAINMENT_TARGET,
        boot_s=scenario.cloud.boot_median_s,
        allow_spot=scenario.allow_spot,
        seed=scenario.seed,
    )
    return Prepared(
        scenario=scenario,
        workload=workload,
        offers=offers,
        requests=requests,
        stats=stats,
        slo=slo,
        offer=offer,
        profile=profile,
        capacity_rps=capacity,
        oracle=plan,
    )


def _with_target(workload: SimWorkload, target: float | None) -> SimWorkload:
    """The workload with the SLO target as its TTFT upper bound (lower kept below it)."""
    auto = workload.autoscaling
    if target is None or auto is None:
        return workload
    lower = auto.lower_allowed_latency_sec
    if lower >= target:
        lower = target * lower / auto.upper_allowed_latency_sec
    config = auto.model_copy(
        update={"upper_allowed_latency_sec": target, "lower_allowed_latency_sec": lower}
    )
    spec = workload.spec.model_copy(update={"execution_policy_config": config})
    return replace(workload, spec=spec)


def _bounds(prepared: Prepared) -> tuple[int, int]:
    auto = prepared.workload.autoscaling
    if auto is None:
        return 1, 64
    floor = auto.min_workers if auto.min_workers or auto.scale_to_zero else 1
    return floor, auto.max_workers


def policies(prepared: Prepared, names: Sequence[str] = POLICY_NAMES) -> list[Policy]:
    """Our policy and the baselines, each tuned to this trace as the docs describe."""
    unknown = sorted(set(names) - set(POLICY_NAMES))
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICY_NAMES)}")
    low, high = _bounds(prepared)
    per_replica = prepared.capacity_rps * SAFE_UTILIZATION
    stats = prepared.stats
    made: dict[str, Policy] = {}
    for name in names:
        if name == "ours":
            made[name] = ControllerPolicy(spec=prepared.workload.spec, capacity=_capacity(prepared))
        elif name == "static-peak":
            count = min(max(math.ceil(stats.peak_rps / per_replica), 1), high)
            made[name] = static_policy(prepared.workload.spec, replicas=count, name=name)
        elif name == "static-mean":
            count = min(max(math.ceil(stats.mean_rps / per_replica), 1), high)
            made[name] = static_policy(prepared.workload.spec, replicas=count, name=name)
        elif name == "skyserve-qps":
            made[name] = RequestRatePolicy(
                target_qps_per_replica=per_replica, min_replicas=max(low, 1), max_replicas=high
            )
        elif name == "knative-kpa":
            made[name] = ConcurrencyPolicy(
                target_concurrency=max(_concurrency_at(prepared, per_replica), 1.0),
                min_replicas=max(low, 1),
                max_replicas=high,
            )
    return [made[name] for name in names]


def _capacity(prepared: Prepared) -> ReplicaCapacity:
    """What the controller is told one replica carries: placement's capacity figure."""
    return ReplicaCapacity(
        requests_per_s=prepared.profile.capacity_rps(input_tokens=1024.0, output_tokens=256.0),
        max_concurrency=prepared.profile.max_batch,
    )


def _concurrency_at(prepared: Prepared, rate: float) -> float:
    """Mean requests in flight on one replica serving ``rate`` requests/s of this trace's
    mix (Little's law over a replay of the trace's first requests at that rate)."""
    sample = prepared.requests[:2000]
    if not sample or rate <= 0:
        return 1.0
    replay = [
        EngineRequest(k / rate, r.input_tokens, r.output_tokens) for k, r in enumerate(sample)
    ]
    timings = simulate(prepared.profile, replay)
    span = max(t.finished_s for t in timings) - replay[0].arrival_s
    return sum(t.e2e_s for t in timings) / span if span > 0 else 1.0


def initial_replicas(prepared: Prepared, policy: Policy) -> int:
    """The warm fleet at time 0: a static policy's count, else the first minute's load."""
    fixed = isinstance(policy, ControllerPolicy) and isinstance(
        policy.spec.execution_policy_config, FixedPolicy
    )
    if fixed:
        low, _ = policy.bounds()
        return low
    first_minute = sum(1 for r in prepared.requests if r.arrival_s < 60.0) / 60.0
    low, high = _bounds(prepared)
    per_replica = prepared.capacity_rps * SAFE_UTILIZATION
    return min(max(math.ceil(first_minute / per_replica), low, 1), high)


def run_policy(prepared: Prepared, policy: Policy) -> RunReport:
    """Replay the scenario's trace under ``policy``."""
    scenario = prepared.scenario
    world = World(
        workload=prepared.workload,
        offers=prepared.offers,
        policy=policy,
        requests=prepared.requests,
        seed=scenario.seed,
        cloud=scenario.cloud,
        allow_spot=scenario.allow_spot,
        initial_replicas=initial_replicas(prepared, policy),
    )
    outcomes = world.run()
    return build_report(
        outcomes=outcomes,
        slo=prepared.slo,
        policy=policy.name,
        trace=scenario.trace_name,
        rate_scale=scenario.rate_scale,
        seed=scenario.seed,
        spot=scenario.allow_spot,
        oracle_cost_usd=prepared.oracle.cost_usd,
    )


def compare(
    scenario: Scenario, names: Sequence[str] = POLICY_NAMES
) -> tuple[Prepared, list[RunReport]]:
    """Every named policy on the scenario, and the oracle it is measured against."""
    prepared = prepare(scenario)
    return prepared, [run_policy(prepared, p) for p in policies(prepared, names)]


def trace_name(path: Path) -> str:
    return path.name
