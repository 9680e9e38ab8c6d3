"""One scenario (a workload, a trace, a rate scale, a seed, spot or not) run under our
policy, the baselines and the oracle."""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from autoscaler.decide.queueing import SAFE_UTILIZATION, ReplicaCapacity, burst_floor, load_need
from autoscaler.decide.signals import Signals
from autoscaler.sim.gateway import Outcome, as_datetime
from autoscaler.sim.gcpause import paused_gc
from autoscaler.sim.oracle import OraclePlan, Replayed, WarmCosts, oracle, with_warm_pools
from autoscaler.sim.policies import (
    ConcurrencyPolicy,
    ControllerPolicy,
    Policy,
    RequestRatePolicy,
    ScheduledFleetPolicy,
    static_policy,
)
from autoscaler.sim.prefix import DEFAULT_ROUTING, Routing
from autoscaler.sim.report import RunReport, build_report
from autoscaler.sim.trace import (
    TraceRequest,
    TraceStats,
    overlay_rate,
    scale_rate,
    trace_stats,
)
from autoscaler.sim.warm import stopped_usd_per_hour
from autoscaler.sim.workload import (
    SimWorkload,
    SloRule,
    fastest_single_gpu,
    feasible_offers,
)
from autoscaler.sim.world import EPOCH_S, CloudSettings, Outcomes, World, with_spot
from autoscaler.spec import AutoscalingPolicy, FixedPolicy, WorkloadSpec
from catalog.model import Offer
from catalog.perf import ServingProfile
from gateway.window import replica_cap

ATTAINMENT_TARGET = 0.99
"""The share of requests the SLO asks to be within the TTFT target."""

KNATIVE_TARGET_UTILIZATION = 0.7
"""Knative's ``container-concurrency-target-percentage`` default."""

POLICY_NAMES = ("ours", "static-peak", "static-mean", "skyserve-qps", "knative-kpa")

WARM_POOLS: dict[str, object] = {
    "ours-warm": "auto",
    "ours-pool": {"stopped": 2, "sleeping": 1},
    "ours-sleep1": {"sleeping": 1},
    "ours-stop1": {"stopped": 1},
}
"""Our controller with a warm pool (``execution_policy_config.warm_pool``): automatic,
an explicit pool of two stopped machines and one sleeping engine, and one of a single
sleeping engine or stopped machine (the scale-from-zero rows). Measured against
the oracle with warm pools (:attr:`Prepared.warm_plan`)."""


class RateMode(StrEnum):
    """How ``rate_scale`` raises the request rate."""

    COMPRESS = "compress"
    """Arrival times divided by the scale: the trace runs that much faster and shorter."""
    OVERLAY = "overlay"
    """The trace laid over itself, shifted: more callers, the same time axis."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """What to simulate. ``ttft_slo_s`` ``None`` takes the workload's upper bound."""

    workload: SimWorkload
    offers: Sequence[Offer]
    requests: Sequence[TraceRequest]
    trace_name: str
    rate_scale: float = 1.0
    rate_mode: RateMode = RateMode.COMPRESS
    ttft_slo_s: float | None = None
    seed: int = 0
    allow_spot: bool = False
    cloud: CloudSettings = field(default_factory=CloudSettings)
    routing: Routing = DEFAULT_ROUTING
    """The gateway's balancing for the policies' runs (the oracle's plan is replayed
    with the gateway's default, :data:`~autoscaler.sim.prefix.DEFAULT_ROUTING`)."""


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
    plan: OraclePlan | None
    """The oracle; ``None`` when prepared without it (:func:`compare_forked`)."""
    warm_plan: OraclePlan | None = None
    """The oracle that may also stop machines through gaps (``oracle.with_warm_pools``):
    what a policy with a warm pool is measured against."""

    def oracle_for(self, policy: Policy) -> OraclePlan | None:
        """The oracle ``policy`` is measured against: with warm pools when its spec keeps
        one (and the warm oracle was planned), else the fresh-machine oracle."""
        if self.warm_plan is not None and uses_warm_pool(policy):
            return self.warm_plan
        return self.plan

    @property
    def oracle(self) -> OraclePlan:
        """The oracle's plan (``ValueError`` when prepared without it)."""
        if self.plan is None:
            raise ValueError(f"{self.scenario.trace_name}: prepared without its oracle")
        return self.plan


def prepare(
    scenario: Scenario, *, with_oracle: bool = True, with_warm: bool | None = None
) -> Prepared:
    """Scale the trace, fix the SLO, find placement's first offer, and compute the oracle
    (unless ``with_oracle`` is false) and, from it, the oracle with warm pools
    (``with_warm``; by default when the scenario's workload keeps a warm pool)."""
    if with_warm is None:
        with_warm = _wants_warm(scenario)
    workload = _with_target(with_spot(scenario.workload, scenario.allow_spot), scenario.ttft_slo_s)
    auto = workload.autoscaling
    target = auto.upper_allowed_latency_sec if auto else (scenario.ttft_slo_s or 1.0)
    offers = feasible_offers(workload, scenario.offers)
    if not offers:
        raise ValueError(f"workload {workload.spec.slug}: no catalog offer can serve the model")
    scale = overlay_rate if scenario.rate_mode is RateMode.OVERLAY else scale_rate
    requests = scale(scenario.requests, scenario.rate_scale)
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
        initial_mix=first_minute_mix(requests),
    )
    placement = probe.first_placement()
    if placement is None:
        raise ValueError(f"workload {workload.spec.slug}: placement finds no offer")
    offer = placement
    profile = workload.profile(offer)
    # The gateway's per-replica cap (the workload's ``per_worker`` where set) bounds the
    # batch a replica ever runs.
    profile = replace(
        profile, max_batch=min(profile.max_batch, replica_cap(workload.spec.per_worker))
    )
    capacity = profile.capacity_rps(
        input_tokens=stats.mean_input_tokens, output_tokens=stats.mean_output_tokens
    )
    replay = _PlanReplay(
        workload=workload,
        offers=offers,
        requests=requests,
        slo=slo,
        seed=scenario.seed,
        cloud=scenario.cloud,
    )
    plan = (
        None
        if not with_oracle
        else oracle(
            workload=workload,
            offers=offers,
            requests=requests,
            slo=slo,
            attainment=ATTAINMENT_TARGET,
            boot_s=scenario.cloud.boot_median_s,
            allow_spot=scenario.allow_spot,
            seed=scenario.seed,
            replay=replay,
        )
    )
    warm_plan = (
        None
        if plan is None or not with_warm
        else with_warm_pools(plan, warm=warm_costs(plan.offer, scenario.cloud), replay=replay)
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
        plan=plan,
        warm_plan=warm_plan,
    )


def with_warm_pool(spec: WorkloadSpec, pool: object) -> WorkloadSpec:
    """``spec`` (autoscaling) keeping the warm pool ``pool`` (as the spec field reads it)."""
    config = spec.execution_policy_config
    if not isinstance(config, AutoscalingPolicy):
        raise ValueError(f"workload {spec.slug}: a warm pool needs an autoscaling policy")
    data = config.model_dump(mode="json", exclude_unset=True)
    data["warm_pool"] = pool
    return spec.model_copy(
        update={"execution_policy_config": AutoscalingPolicy.model_validate(data)}
    )


def warm_costs(offer: Offer, cloud: CloudSettings) -> WarmCosts:
    """A stopped machine of ``offer`` as the simulator models it (``autoscaler.sim.warm``):
    the oracle knows a start's median as it knows a boot's."""
    return WarmCosts(
        stop_s=cloud.stop_s,
        start_s=cloud.start_median_s,
        stopped_usd_per_hour=stopped_usd_per_hour(offer),
    )


def uses_warm_pool(policy: Policy) -> bool:
    """Whether ``policy`` is our controller on a spec that keeps a warm pool."""
    if not isinstance(policy, ControllerPolicy):
        return False
    config = policy.spec.execution_policy_config
    return isinstance(config, AutoscalingPolicy) and config.warm_pool is not None


def first_minute_mix(requests: Sequence[TraceRequest]) -> tuple[float, float] | None:
    """Mean prompt and completion tokens over the first minute: what the gateway had
    measured when the warm fleet was placed, before time 0."""
    first = [r for r in requests if r.arrival_s < requests[0].arrival_s + 60.0] if requests else []
    if not first:
        return None
    n = len(first)
    return sum(r.input_tokens for r in first) / n, sum(r.output_tokens for r in first) / n


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
    known = (*POLICY_NAMES, *WARM_POOLS)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; known: {', '.join(known)}")
    low, high = _bounds(prepared)
    per_replica = prepared.capacity_rps * SAFE_UTILIZATION
    stats = prepared.stats
    made: dict[str, Policy] = {}
    for name in names:
        if name == "ours":
            # No fixed capacity: the simulated controller computes it every tick from the
            # measured token mix on the fleet's offer (``World._capacity``).
            made[name] = ControllerPolicy(spec=prepared.workload.spec)
        elif name in WARM_POOLS:
            made[name] = ControllerPolicy(
                spec=with_warm_pool(prepared.workload.spec, WARM_POOLS[name]), name=name
            )
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
            # Knative's defaults: the target is containerConcurrency (the replica's cap:
            # the workload's per_worker, else the gateway's) times
            # container-concurrency-target-percentage (70 %).
            cap = replica_cap(prepared.workload.spec.per_worker)
            made[name] = ConcurrencyPolicy(
                target_concurrency=cap * KNATIVE_TARGET_UTILIZATION,
                min_replicas=max(low, 1),
                max_replicas=high,
            )
    return [made[name] for name in names]


def initial_replicas(prepared: Prepared, policy: Policy) -> int:
    """The warm fleet at time 0: a static policy's count; for our controller, what its
    own load and burst rules ask for the first minute's traffic; for the other
    autoscalers, the first minute's rate at :data:`SAFE_UTILIZATION` of a replica."""
    config = policy.spec.execution_policy_config if isinstance(policy, ControllerPolicy) else None
    if isinstance(config, FixedPolicy):
        low, _ = policy.bounds()
        return low
    low, high = _bounds(prepared)
    first = [r for r in prepared.requests if r.arrival_s < 60.0]
    if isinstance(config, AutoscalingPolicy):
        return min(max(_controller_warm_count(prepared, config, first), low, 1), high)
    per_replica = prepared.capacity_rps * SAFE_UTILIZATION
    return min(max(math.ceil(len(first) / 60.0 / per_replica), low, 1), high)


def _controller_warm_count(
    prepared: Prepared, policy: AutoscalingPolicy, first: Sequence[TraceRequest]
) -> int:
    """What ``decide.scaling``'s load and burst rules ask for had the first minute's
    requests arrived in the minute before time 0 (answered at once), at their mix."""
    if not first:
        return 0
    n = len(first)
    mean_in = sum(r.input_tokens for r in first) / n
    mean_out = sum(r.output_tokens for r in first) / n
    square = sum(r.input_tokens * r.input_tokens for r in first) / n
    capacity = ReplicaCapacity(
        requests_per_s=prepared.profile.capacity_rps(input_tokens=mean_in, output_tokens=mean_out),
        max_concurrency=prepared.profile.max_batch,
        prefill_s=prepared.profile.prefill_seconds(round(mean_in)),
        prefill_scv=max(square / (mean_in * mean_in) - 1.0, 0.0),
    )
    zero = EPOCH_S
    signals = Signals.from_epoch(
        ttft_samples=[(zero + r.arrival_s - 60.0, 0.0) for r in first],
        request_rate=n / 60.0,
        in_flight=0,
        queue_depth=0,
        last_request_at=zero,
    )
    now = as_datetime(zero)
    need, _ = load_need(capacity, signals, now=now, upper_s=policy.upper_allowed_latency_sec)
    burst, _ = burst_floor(capacity, signals, now=now, policy=policy)
    return max(need, burst)


def run_policy(prepared: Prepared, policy: Policy) -> RunReport:
    """Replay the scenario's trace under ``policy``."""
    scenario = prepared.scenario
    workload = prepared.workload
    if isinstance(policy, ControllerPolicy) and uses_warm_pool(policy):
        # The world runs the controller on the workload's spec: this one keeps a pool.
        workload = replace(workload, spec=policy.spec)
    world = World(
        workload=workload,
        offers=prepared.offers,
        policy=policy,
        requests=prepared.requests,
        seed=scenario.seed,
        cloud=scenario.cloud,
        allow_spot=scenario.allow_spot,
        initial_replicas=initial_replicas(prepared, policy),
        initial_mix=first_minute_mix(prepared.requests),
        routing=scenario.routing,
    )
    outcomes = world.run()
    measured = prepared.oracle_for(policy)
    return build_report(
        outcomes=outcomes,
        slo=prepared.slo,
        policy=policy.name,
        trace=scenario.trace_name,
        rate_scale=scenario.rate_scale,
        seed=scenario.seed,
        spot=scenario.allow_spot,
        oracle_cost_usd=None if measured is None else measured.cost_usd,
        rate_mode=scenario.rate_mode.value,
        routing=scenario.routing.value,
    )


def compare_forked(
    scenario: Scenario, names: Sequence[str] = POLICY_NAMES
) -> tuple[Prepared, list[RunReport]]:
    """:func:`compare`, with the oracle planned in a forked process while the policies
    replay in this one: the same plan and reports, in about the longer of the two times
    instead of their sum where two cores are free (the oracle is about half of a day's
    replay of one policy and its oracle). Where processes cannot be forked, one after
    the other."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return compare(scenario, names)
    with paused_gc():  # ``autoscaler.sim.gcpause``: the same reports, sooner
        return _compare_forked(scenario, names)


def _compare_forked(scenario: Scenario, names: Sequence[str]) -> tuple[Prepared, list[RunReport]]:
    context = multiprocessing.get_context("fork")
    # The child inherits the scenario by the fork (a day holds half a million requests,
    # slow to pickle); only the plan comes back.
    with ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=_hold, initargs=(scenario,)
    ) as pool:
        planned = pool.submit(_held_oracle)
        draft = prepare(scenario, with_oracle=False)
        made = policies(draft, names)
        reports = [run_policy(draft, p) for p in made]
        plan, warm_plan = planned.result()
    prepared = replace(draft, plan=plan, warm_plan=warm_plan)
    return prepared, [
        replace(r, oracle_cost_usd=_cost(prepared.oracle_for(p)))
        for r, p in zip(reports, made, strict=True)
    ]


def _cost(plan: OraclePlan | None) -> float | None:
    return None if plan is None else plan.cost_usd


_held: list[Scenario] = []
"""The scenario a forked oracle process plans for (:func:`compare_forked`)."""


def _hold(scenario: Scenario) -> None:
    _held[:] = [scenario]


def _held_oracle() -> tuple[OraclePlan, OraclePlan | None]:
    prepared = prepare(_held[0])
    return prepared.oracle, prepared.warm_plan


def _wants_warm(scenario: Scenario) -> bool:
    auto = scenario.workload.autoscaling
    return auto is not None and auto.warm_pool is not None


def compare(
    scenario: Scenario, names: Sequence[str] = POLICY_NAMES
) -> tuple[Prepared, list[RunReport]]:
    """Every named policy on the scenario, and the oracle it is measured against."""
    with paused_gc():  # ``autoscaler.sim.gcpause``: the same reports, sooner
        prepared = prepare(scenario)
        return prepared, [run_policy(prepared, p) for p in policies(prepared, names)]


def trace_name(path: Path) -> str:
    return path.name


def replay_oracle(prepared: Prepared) -> RunReport:
    """The oracle's fleet plan replayed through the simulator on its own terms (its offer
    only, every boot exactly the median, no stock-outs, no interruptions): whether the
    plan it prices meets the SLO where every policy is measured. ``prepare`` already
    replayed it (``prepared.oracle.replayed``); this is the full report of that run."""
    plan = prepared.oracle
    scenario = prepared.scenario
    world = plan_world(
        workload=prepared.workload,
        offers=prepared.offers,
        requests=prepared.requests,
        seed=scenario.seed,
        cloud=scenario.cloud,
        plan=plan,
    )
    return build_report(
        outcomes=world.run(),
        slo=prepared.slo,
        policy=world.policy.name,
        trace=scenario.trace_name,
        rate_scale=scenario.rate_scale,
        seed=scenario.seed,
        spot=plan.spot,
        oracle_cost_usd=plan.cost_usd,
        rate_mode=scenario.rate_mode.value,
    )


def plan_world(
    *,
    workload: SimWorkload,
    offers: Sequence[Offer],
    requests: Sequence[TraceRequest],
    seed: int,
    cloud: CloudSettings,
    plan: OraclePlan,
) -> World:
    """A simulation of ``plan`` on the oracle's own terms: its offer only, every boot
    exactly the median and bought that far ahead of its slot, no stock-outs, no
    interruptions; the replicas the first slots need are ready at time 0."""
    exact = replace(
        cloud,
        boot_median_s=plan.boot_s,
        boot_sigma=1e-9,
        stockout_probability=0.0,
        spot_interruptions_per_hour=0.0,
    )
    policy = ScheduledFleetPolicy(fleet=plan.fleet, slot_s=plan.slot_s, lead_s=plan.boot_s)
    return World(
        workload=workload,
        offers=[o for o in offers if o.key == plan.offer.key],
        policy=policy,
        requests=requests,
        seed=seed,
        cloud=exact,
        allow_spot=plan.spot,
        # Replicas booting at time 0 for the first slots were bought before it, as the
        # warm fleet was: they are ready at time 0.
        initial_replicas=policy.count_at(0.0),
        initial_mix=first_minute_mix(requests),
    )


def replayed(outcomes: Outcomes, *, slo: SloRule, slot_s: float, slots: int) -> Replayed:
    """Requests and SLO misses per slot of arrival (refused requests not counted)."""
    counted = [0] * slots
    missed = [0] * slots
    bounds = slo.bounds()
    for r in outcomes.records:
        if r.outcome is Outcome.REFUSED:
            continue
        k = min(int(r.arrival_s // slot_s), slots - 1)
        counted[k] += 1
        if r.ttft_s is None or r.ttft_s > bounds[r.input_tokens]:
            missed[k] += 1
    return Replayed(requests=tuple(counted), misses=tuple(missed), billed_usd=outcomes.cost_usd)


_REPLAYS: dict[tuple[object, ...], Replayed] = {}
"""Replays already run, by trace, model, SLO, seed, boot time, GPU shape and fleet: the
runs with and without spot of one trace share them (the oracle's replay has no
interruptions, so the market does not change what happens). Billed at $1 per replica-hour;
:meth:`_PlanReplay.__call__` prices it."""

_REPLAYS_KEPT = 256


@dataclass(frozen=True, slots=True)
class _PlanReplay:
    """:data:`autoscaler.sim.oracle.Replay` for one scenario."""

    workload: SimWorkload
    offers: Sequence[Offer]
    requests: Sequence[TraceRequest]
    slo: SloRule
    seed: int
    cloud: CloudSettings
    fingerprint: int = 0

    def __post_init__(self) -> None:
        trace = hash(tuple(self.requests))
        model = (self.workload.params_b, self.workload.bytes_per_param)
        key = hash((trace, model, self.workload.max_context_tokens, self.slo, self.seed))
        object.__setattr__(self, "fingerprint", key)

    def __call__(self, plan: OraclePlan) -> Replayed:
        key = (
            self.fingerprint,
            self.cloud.boot_median_s,
            plan.offer.gpu,
            plan.offer.gpu_count,
            plan.slot_s,
            plan.fleet,
        )
        if key not in _REPLAYS:
            world = plan_world(
                workload=self.workload,
                offers=self.offers,
                requests=self.requests,
                seed=self.seed,
                cloud=self.cloud,
                plan=plan,
            )
            if len(_REPLAYS) >= _REPLAYS_KEPT:
                _REPLAYS.pop(next(iter(_REPLAYS)))
            run = replayed(
                world.run(), slo=self.slo, slot_s=plan.slot_s, slots=max(len(plan.fleet), 1)
            )
            _REPLAYS[key] = replace(run, billed_usd=run.billed_usd / plan.usd_per_hour)
        per_hour = _REPLAYS[key]
        return replace(per_hour, billed_usd=per_hour.billed_usd * plan.usd_per_hour)
