"""One workload, one step: from what is observed to what to do. Pure.

The controller (``autoscaler.reconcile.workload``) and the trace simulator
(``autoscaler.sim.world``) both run their workload through :func:`step` and carry its
plan out the same way, so the simulator measures the controller that ships:

1. **Inputs.** One replica's capacity at the measured token mix, on the GPU shape most of
   the fleet runs (placement's first choice when there is none):
   ``decide.inputs.decision_inputs``. Only autoscaling reads a capacity.
2. **Decide** the desired count: ``decide.desired.desired_count`` with the memory the
   last step returned (0 for a deleted workload), capped at
   :attr:`StepKnobs.max_replicas_per_workload`. The simulator's baselines give their own
   count instead (``count``).
3. **Place** the first new replica, within the budget headroom (:func:`headroom`), when
   the plan may launch: more replicas wanted than are starting or ready, a boot
   past its deadline to replace, or a replica of an older spec generation to roll.
4. **Plan** (``decide.plan.plan_actions``): liveness timeouts, drains, scale up and
   down, spec drift and the budget, with each replica's own requests in flight.

Carrying a plan out, each launch is placed just before it is bought
(:func:`place_next`): the zones and prices of the launches already made in this step
count, so a step that launches several replicas spreads them over zones and never
spends past a ceiling. A launch the provider refuses (no capacity, quota) marks its
market unavailable for :attr:`StepKnobs.unavailable_sec` (:func:`mark_unavailable`)
and ends the step's launches; the next step places elsewhere. ``docs/controller.md``
says why each of these is so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from autoscaler.decide.budget import BudgetLimits, Spend, check_launch, limits_for
from autoscaler.decide.desired import desired_count
from autoscaler.decide.inputs import (
    DecisionInputs,
    GpuShape,
    Measured,
    concurrency_cap_of,
    concurrency_target,
    decision_inputs,
    model_size,
    replica_capacity,
    shape_of,
)
from autoscaler.decide.placement import (
    Placement,
    PlacementMemo,
    place_replica,
    pool_gpu_kinds,
    unavailable_key,
    worker_key,
)
from autoscaler.decide.plan import (
    Launch,
    Plan,
    ReplicaPhase,
    ReplicaView,
    Timeouts,
    in_refill,
    plan_actions,
    refill_wanted,
)
from autoscaler.decide.queueing import fleet_need, fleet_rate
from autoscaler.decide.scaling import (
    Direction,
    FleetCounts,
    Rebalance,
    ScaleDecision,
    ScaleMemory,
    SpotRisk,
)
from autoscaler.decide.spot_rate import PRIOR_SPOT_RATE, SpotRate
from autoscaler.decide.warm import (
    DEFAULT_START_TIMES,
    ParkMode,
    StartTimes,
    WarmPolicy,
    warm_policy_of,
)
from autoscaler.spec import (
    DEFAULT_MAX_REPLICAS,
    SLEEPING_BACKENDS,
    AutoscalingPolicy,
    WorkloadSpec,
)
from catalog.model import Offer
from catalog.query import Market
from catalog.sizing import estimate_model_memory

UNAVAILABLE_SEC = 600.0
"""How long a market (or private worker) is skipped after a launch there was refused."""

MAX_LAUNCHES_PER_STEP = 16
"""Launches one workload may make in one step; the rest follow in the next steps."""

GROUP_PROVIDERS: frozenset[str] = frozenset({"aws", "gcp", "simulated"})
"""The controller's default for the providers whose machines may form replica groups
(``group_providers`` in its configuration): those that place a group's members close
together. AWS runs them into a cluster placement group (``providers.aws``), GCP under a
compact placement policy (``providers.gcp``); the simulated cloud's members are
processes of one machine. A provider left out places no
group: a model no single machine of the pool holds gets "no offer fits" there."""

REBALANCE_MIN_SAVING = 0.20
"""A ready replica is replaced on a cheaper offer only when that offer is at least this
share cheaper per hour: a smaller difference is price noise, and replacing on it would
churn (buy, boot, drain) for little."""

REBALANCE_MIN_AGE_SEC = 600.0
"""A replica ready for less than this is not replaced on a cheaper offer: it was just
bought, most often because the cheaper market was refused or reclaimed, which keeps that
market skipped for :data:`UNAVAILABLE_SEC` (the same 10 minutes)."""

REBALANCE_MAX_PAYBACK_SEC = 1800.0
"""A replacement is launched only when what it saves repays its overlap (the new machine
paid while it boots and the dear one drains) within this time."""

_STAYING = frozenset({ReplicaPhase.PENDING, ReplicaPhase.BOOTING, ReplicaPhase.READY})

_HEADROOM_SLACK_USD = 1e-9  # sums of float prices must not refuse an offer that fits exactly


@dataclass(frozen=True, slots=True)
class StepKnobs:
    """The controller's settings a step reads (``Settings`` in the controller)."""

    fleet_max_hourly_cost_usd: float | None = None
    max_replicas_per_workload: int = DEFAULT_MAX_REPLICAS
    max_launches_per_pass: int = MAX_LAUNCHES_PER_STEP
    unavailable_sec: float = UNAVAILABLE_SEC
    group_providers: frozenset[str] = frozenset()
    """Providers whose machines may form a replica group (a model no machine holds);
    none by default (the simulator forms no groups), :data:`GROUP_PROVIDERS` in the
    controller."""
    schedule_offset_sec: float = 0.0
    """Scheduled workloads are read at the step's time plus this (a rehearsal)."""


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One replica of the workload not confirmed terminated, as the step sees it.

    ``view.in_flight`` is ignored: the step fills it from the gateway's measurement.
    """

    view: ReplicaView
    zone: str | None = None
    worker_id: str | None = None
    shape: GpuShape | None = None
    """The replica's GPUs for the performance model (``None``: a private worker)."""
    spot: bool = False
    """Bought on the spot market (it may be interrupted)."""


@dataclass(frozen=True, slots=True)
class WorkloadView:
    """What is observed of one workload at a step."""

    spec: WorkloadSpec
    generation: int
    replicas: Sequence[ReplicaState]
    measured: Measured
    offers: Sequence[Offer]
    deleted: bool = False
    inherited_usd_per_hour: Sequence[float] = ()
    """Prices of a deleted predecessor's replicas of the same slug not yet gone."""
    fleet_usd_per_hour: float = 0.0
    """The hourly total of every workload's live replicas, this one's included."""
    pool_gpus: Sequence[str] | None = None
    """The GPU kinds the workload may use (``decide.placement.pool_gpu_kinds``; ``None``:
    read from ``offers``)."""
    start_times: StartTimes | None = None
    """Measured median seconds to ready per start path (``None``: the defaults of
    ``decide.warm``)."""
    spot_rate: SpotRate = PRIOR_SPOT_RATE
    """The interruptions and spot machine-hours the workload's spot machines showed
    (``decide.spot_rate.spot_rate``; nothing measured: the prior alone)."""


@dataclass(frozen=True, slots=True)
class Headroom:
    """Dollars per hour left under the tightest ceiling, and that ceiling's name."""

    usd_per_hour: float
    ceiling: str


@dataclass(frozen=True, slots=True)
class Step:
    """What one step decided: the count, the inputs it used, the first launch's
    placement (``None`` when the plan launches nothing) and the plan."""

    decision: ScaleDecision
    inputs: DecisionInputs
    placement: Placement | None
    plan: Plan
    limits: BudgetLimits
    headroom: Headroom | None
    warm: WarmPolicy | None = None
    """The warm pool the plan kept (``None``: none)."""


def autoscaling_policy(spec: WorkloadSpec) -> AutoscalingPolicy | None:
    policy = spec.execution_policy_config
    return policy if isinstance(policy, AutoscalingPolicy) else None


def timeouts_of(spec: WorkloadSpec) -> Timeouts:
    """The liveness timeouts of ``spec`` (the plan's defaults for other policies)."""
    policy = autoscaling_policy(spec)
    if policy is None:
        return Timeouts()
    return Timeouts(
        scaling_up_sec=policy.scaling_up_timeout_sec,
        scaling_down_sec=policy.scaling_down_timeout_sec,
    )


def fleet_counts(
    replicas: Sequence[ReplicaState], *, warm: WarmPolicy | None = None
) -> FleetCounts:
    """Ready, booting and draining replicas; a warm pool refill (``warm``) is none of
    them, since it is parked, not served from, once ready."""
    return phase_counts([r.view for r in replicas], warm=warm)


def phase_counts(views: Sequence[ReplicaView], *, warm: WarmPolicy | None = None) -> FleetCounts:
    """:func:`fleet_counts` of plain replica views (the reconciler's decision log), with
    the draining ones warned of a spot reclaim counted apart too. O(len(views))."""
    counted = [v for v in views if not in_refill(v, warm)]
    return counts_of_phases([v.phase for v in counted], warned=[v.warned for v in counted])


def counts_of_phases(phases: Sequence[ReplicaPhase], *, warned: Sequence[bool] = ()) -> FleetCounts:
    """Ready, booting (pending included) and draining replicas among ``phases``, each a
    replica's counted phase (``decide.plan.counted_phase``), and of the draining those
    ``warned`` of a spot reclaim (``warned[i]`` for ``phases[i]``; none when empty).
    O(len(phases))."""
    return FleetCounts(
        ready=phases.count(ReplicaPhase.READY),
        booting=phases.count(ReplicaPhase.PENDING) + phases.count(ReplicaPhase.BOOTING),
        draining=phases.count(ReplicaPhase.DRAINING),
        warned=sum(
            1
            for phase, w in zip(phases, warned, strict=True)
            if w and phase is ReplicaPhase.DRAINING
        )
        if warned
        else 0,
    )


def spot_risk(view: WorkloadView, *, warm: WarmPolicy | None = None) -> SpotRisk | None:
    """The spot risk the scaling rules weigh (``decide.scaling``'s spot spares), or
    ``None`` where the fleet is not on spot: the policy allows spot and most of the
    replicas serving or booting are spot ones (with none yet, placement's spot price
    comes first). The rate is the one measured (``view.spot_rate``); a replacement
    serves a fresh start after it is bought (the measured median, else
    ``decide.warm``'s default)."""
    policy = autoscaling_policy(view.spec)
    if policy is None or not policy.allow_spot_instances or view.deleted:
        return None
    staying = [r for r in view.replicas if r.view.phase in _STAYING and not in_refill(r.view, warm)]
    if 2 * sum(1 for r in staying if r.spot) < len(staying):
        return None
    times = view.start_times or DEFAULT_START_TIMES
    return SpotRisk(
        interruptions_per_hour=view.spot_rate.per_hour,
        replace_s=times.fresh_s,
        basis=view.spot_rate.basis(),
    )


def in_flight_of(view: WorkloadView, launch_id: str) -> int:
    """Requests in flight on one replica: the gateway's count for it, or, from a gateway
    that does not count per replica, every request of the workload (never cut one).

    From a read that did not reach the whole gateway (``Measured.incomplete``: a worker
    process that did not answer, a failed read) the count is not known: the requests
    the read missed may be on this replica. It is then at least 1, so a drain waits for
    a complete read, or its timeout, rather than end under running requests."""
    measured = view.measured
    per_replica = measured.replica_in_flight
    counted = measured.signals.in_flight if per_replica is None else per_replica.get(launch_id, 0)
    return counted if measured.incomplete is None else max(1, counted)


def headroom(limits: BudgetLimits, *, live: Sequence[float], fleet_usd: float) -> Headroom | None:
    """Dollars per hour left under the tightest of the workload, pool and fleet ceilings,
    never below 0 (``None`` without a ceiling)."""
    room: list[tuple[float, str]] = []
    for ceiling, name in (
        (limits.workload_usd_per_hour, "workload ceiling"),
        (limits.pool_usd_per_hour, "cloud pool ceiling"),
    ):
        if ceiling is not None:
            room.append((ceiling - sum(live), name))
    if limits.fleet_usd_per_hour is not None:
        room.append((limits.fleet_usd_per_hour - fleet_usd, "fleet ceiling"))
    if not room:
        return None
    left, name = min(room)
    return Headroom(max(0.0, left), name)


def step(
    view: WorkloadView,
    *,
    memory: ScaleMemory,
    unavailable: Mapping[str, datetime],
    now: datetime,
    knobs: StepKnobs,
    count: tuple[int, str] | None = None,
    memo: PlacementMemo | None = None,
) -> Step:
    """One step of one workload (see the module docstring). ``count``: a desired count
    and its reason decided elsewhere (the simulator's baselines) instead of the spec's
    policy. ``memo``: placements shared with the other steps of the pass (or tick) whose
    placement inputs are equal (``decide.placement.PlacementMemo``), the catalog's
    offers indexed once; the same plan as without it."""
    policy = autoscaling_policy(view.spec)
    limits = limits_for(policy, fleet_usd_per_hour=knobs.fleet_max_hourly_cost_usd)
    live = [*view.inherited_usd_per_hour, *(r.view.usd_per_hour for r in view.replicas)]
    room = headroom(limits, live=live, fleet_usd=view.fleet_usd_per_hour)
    first: list[Placement] = []

    def placement() -> Placement:
        if not first:
            first.append(
                place_next(
                    view, unavailable=unavailable, now=now, knobs=knobs, launched=(), memo=memo
                )
            )
        return first[0]

    warm = warm_policy_of(view.spec, times=view.start_times, deleted=view.deleted)
    inputs = _inputs(view, policy=policy, placement=placement, memo=memo)
    decision = _decide(
        view, memory=memory, inputs=inputs, now=now, knobs=knobs, count=count, warm=warm
    )
    timeouts = timeouts_of(view.spec)
    decision = _rebalanced(
        view,
        decision,
        prior=memory.rebalance,
        placement=placement,
        unavailable=unavailable,
        now=now,
        knobs=knobs,
        policy=policy,
        warm=warm,
        timeouts=timeouts,
    )
    staying = sum(
        1 for r in view.replicas if r.view.phase in _STAYING and not in_refill(r.view, warm)
    )
    overdue = any(
        r.view.phase in (ReplicaPhase.PENDING, ReplicaPhase.BOOTING)
        and (now - r.view.intent_at).total_seconds() >= timeouts.scaling_up_sec
        for r in view.replicas
    )
    drift = any(r.view.generation != view.generation for r in view.replicas)
    refill = refill_wanted(
        warm,
        [r.view for r in view.replicas],
        generation=view.generation,
        timeouts=timeouts,
        now=now,
    )
    may_launch = decision.desired > staying or overdue or drift or refill
    # A scale-down drains replicas of a shape short of the prompts' tail first.
    misfits = (
        placement().short_of_tail
        if policy is not None and not view.deleted and decision.desired < staying
        else frozenset()
    )
    chosen = (
        placement()
        if not view.deleted and (decision.desired > 0 or refill) and may_launch
        else None
    )
    plan = plan_actions(
        desired=decision.desired,
        replicas=[
            _with_load(
                r.view,
                in_flight=in_flight_of(view, r.view.launch_id),
                in_flight_unknown=view.measured.incomplete,
                cache_blocks=view.measured.replica_cache_blocks.get(r.view.launch_id, 0),
                misfit=r.shape in misfits,
            )
            for r in view.replicas
        ],
        spec_generation=view.generation,
        timeouts=timeouts,
        limits=limits,
        launch_usd_per_hour=chosen.usd_per_hour if chosen is not None and chosen.found else None,
        now=now,
        fleet_live_usd_per_hour=(
            view.fleet_usd_per_hour if limits.fleet_usd_per_hour is not None else None
        ),
        launch_limit=knobs.max_launches_per_pass,
        inherited_usd_per_hour=view.inherited_usd_per_hour,
        launch_machines=chosen.group_size if chosen is not None and chosen.found else 1,
        warm=warm,
        launch_parks=launch_parks(chosen, view.spec, warm),
    )
    started = decision.memory.rebalance
    if started is not None and memory.rebalance is None:
        scale_up = f"scale up {started.count} -> {started.count + 1}"
        plan = replace(
            plan,
            actions=tuple(
                replace(a, reason=a.reason.replace(scale_up, f"replace {started.launch_id}", 1))
                if isinstance(a, Launch)
                else a
                for a in plan.actions
            ),
        )
    if chosen is not None and not chosen.found and plan.refusals:
        reason = unplaced_reason(chosen, room)
        plan = replace(plan, refusals=tuple(replace(r, reason=reason) for r in plan.refusals))
    waiting = _drains_waiting_on_signals(view, plan)
    if waiting:
        waits = (
            f"signals incomplete ({view.measured.incomplete}): drain of {', '.join(waiting)} waits"
        )
        decision = replace(
            decision,
            reason=f"{decision.reason}; {waits}",
            waits=waits if decision.waits is None else f"{decision.waits}; {waits}",
        )
    return Step(
        decision=decision,
        inputs=inputs,
        placement=chosen if plan.launches else None,
        plan=plan,
        limits=limits,
        headroom=room,
        warm=warm,
    )


def _with_load(
    view: ReplicaView,
    *,
    in_flight: int,
    in_flight_unknown: str | None,
    cache_blocks: int,
    misfit: bool,
) -> ReplicaView:
    """``view`` with the load the step measured on it: ``view`` itself when it already
    says so (a replica idle as its view was made: no copy of its fields)."""
    if (
        view.in_flight == in_flight
        and view.in_flight_unknown == in_flight_unknown
        and view.cache_blocks == cache_blocks
        and view.misfit == misfit
    ):
        return view
    return replace(
        view,
        in_flight=in_flight,
        in_flight_unknown=in_flight_unknown,
        cache_blocks=cache_blocks,
        misfit=misfit,
    )


def _rebalanced(
    view: WorkloadView,
    decision: ScaleDecision,
    *,
    prior: Rebalance | None,
    placement: Callable[[], Placement],
    unavailable: Mapping[str, datetime],
    now: datetime,
    knobs: StepKnobs,
    policy: AutoscalingPolicy | None,
    warm: WarmPolicy | None,
    timeouts: Timeouts,
) -> ScaleDecision:
    """``decision`` with a replacement: the count one above for the replacement's boot,
    then back, so the plan drains the replica replaced (make before break). A replica is
    replaced for one of two reasons, the first first:

    * **A misfit shape.** Its GPU shape prefills too few of the measured prompts within
      their SLO bound (placement's tail rule, ``Placement.short_of_tail``) and placement
      now chooses a shape that does not: typically a fleet placed before any prompt was
      measured. Replaced whatever the prices (the reason is the SLO); the dearest misfit
      first.
    * **A cheaper offer.** Placement's offer of the dearest replica's own GPU shape (the
      same capacity: a replica of another GPU carries another load) is at least
      :data:`REBALANCE_MIN_SAVING` cheaper per hour and repays the overlap within
      :data:`REBALANCE_MAX_PAYBACK_SEC`.

    Three states, read from what is observed and ``prior`` (the scaling memory):

    * **Start.** Every replica ready (nothing starting, draining or parked), the count
      decided is the count serving with no scale-up pending, every replica of the current
      spec on one machine, a read of the whole gateway, and one more replica within
      ``max_workers`` and ``max_replicas_per_workload`` (a fleet at its bound is not
      replaced: the overlap would go above it). The replica replaced is ready for
      :data:`REBALANCE_MIN_AGE_SEC`, and placement's offer, no market of its shape
      marked unavailable, is within every ceiling with that replica still paid: one more
      replica is wanted.
    * **Boot.** The replacement starts, the rest ready, the replaced one among them: the
      count stays one above.
    * **Ready.** All ready, one above: the count goes back and the plan drains a misfit
      first, else the most expensive replica (``decide.plan``).

    Anything else (a scale decision, the replacement lost or timed out, the replaced one
    gone) ends the replacement: the decision stands as the rules made it. One replacement
    at a time per workload; a replacement for price never replaces one cheaper than
    itself (the margin).
    """
    if decision.memory.rebalance is None:  # already the decision without one: no copy
        memory, base = decision.memory, decision
    else:
        memory = replace(decision.memory, rebalance=None)
        base = replace(decision, memory=memory)
    if view.deleted or warm is not None:
        return base
    replicas = list(view.replicas)
    ready = [r for r in replicas if r.view.phase is ReplicaPhase.READY]
    starting = [r for r in replicas if r.view.phase in (ReplicaPhase.PENDING, ReplicaPhase.BOOTING)]
    others = len(replicas) - len(ready) - len(starting)
    drift = any(r.view.generation != view.generation for r in replicas)
    if prior is not None:
        n = prior.count
        dear_ready = any(r.view.launch_id == prior.launch_id for r in ready)
        if not (
            dear_ready
            and not others
            and not drift
            and len(ready) + len(starting) == n + 1
            and len(starting) <= 1
            and decision.desired in (n, n + 1)
        ):
            return base
        if starting:
            return replace(
                decision,
                desired=n + 1,
                reason=f"replacement booting: keep {n + 1} (then {n})",
                memory=replace(memory, rebalance=prior),
            )
        replaced = next(r for r in ready if r.view.launch_id == prior.launch_id)
        drained = (
            f"{prior.launch_id}, of a shape short of the prompts' tail, drained"
            if replaced.shape in placement().short_of_tail
            else "the most expensive replica drained"
        )
        return replace(
            decision,
            desired=n,
            reason=f"replacement ready: {n + 1} -> {n}, {drained}",
            memory=memory,
        )
    n = len(ready)
    cap = knobs.max_replicas_per_workload
    if policy is not None:
        cap = min(cap, policy.max_workers)
    if (
        not ready
        or starting
        or others
        or drift
        or decision.desired != n
        or decision.direction is not Direction.HOLD
        or memory.breach_since is not None
        or n + 1 > cap
        or view.measured.incomplete is not None
        or any(r.view.machines != 1 or r.shape is None for r in ready)
    ):
        return base
    aged = [
        r
        for r in ready
        if r.view.ready_at is not None
        and (now - r.view.ready_at).total_seconds() >= REBALANCE_MIN_AGE_SEC
    ]
    if not aged:
        return base
    chosen = placement()
    offer = chosen.offer
    if (
        offer is None
        or chosen.market is None
        or chosen.group_size != 1
        or _shape_marked(shape_of(offer), view.offers, unavailable, now=now)
    ):
        return base
    misfit = sorted(
        (r for r in aged if r.shape in chosen.short_of_tail),
        key=lambda r: (-r.view.usd_per_hour, r.view.launch_id),
    )
    if misfit and shape_of(offer) not in chosen.short_of_tail:
        slow = misfit[0]
        gpus = f"{slow.shape[1]} x {slow.shape[0]}" if slow.shape is not None else "?"
        return _replacing(
            decision,
            memory,
            Rebalance(n, slow.view.launch_id, now),
            f"replace {slow.view.launch_id} ({gpus} prefills too few of the measured "
            f"prompts within the TTFT target) with {offer.gpu_count} x {offer.gpu} "
            f"{chosen.market.value} at ${chosen.usd_per_hour:.2f}/h: {n} -> {n + 1}, "
            f"then it is drained ({decision.reason})",
        )
    dear = max(ready, key=lambda r: r.view.usd_per_hour)
    old = dear.view.usd_per_hour
    if (
        dear not in aged
        or shape_of(offer) != dear.shape
        or chosen.usd_per_hour > (1.0 - REBALANCE_MIN_SAVING) * old
    ):
        return base
    new = chosen.usd_per_hour
    overlap_s = (view.start_times or DEFAULT_START_TIMES).fresh_s + timeouts.scaling_down_sec
    cost = new * overlap_s / 3600.0
    saving = old - new
    payback_s = cost / saving * 3600.0
    if payback_s > REBALANCE_MAX_PAYBACK_SEC:
        return base
    was = "spot" if dear.spot else "on-demand"
    gpu = dear.shape[0] if dear.shape is not None else offer.gpu
    return _replacing(
        decision,
        memory,
        Rebalance(n, dear.view.launch_id, now),
        f"replace 1 x {gpu} {was} at ${old:.2f}/h with {offer.gpu} "
        f"{chosen.market.value} at ${new:.2f}/h: saves ${saving:.2f}/h; overlap "
        f"~{overlap_s:.0f} s costs ${cost:.2f} (repaid in {payback_s / 60:.0f} min); "
        f"{n} -> {n + 1}, then the most expensive drained ({decision.reason})",
    )


def _replacing(
    decision: ScaleDecision, memory: ScaleMemory, started: Rebalance, reason: str
) -> ScaleDecision:
    """``decision`` raised to one replica above ``started.count`` for a replacement,
    remembered in the scaling memory."""
    return replace(
        decision,
        desired=started.count + 1,
        reason=reason,
        memory=replace(memory, rebalance=started),
    )


def _shape_marked(
    shape: GpuShape, offers: Sequence[Offer], unavailable: Mapping[str, datetime], *, now: datetime
) -> bool:
    """Whether a market of any offer of ``shape`` (either market, any zone or provider)
    is marked unavailable now: its capacity was just refused or reclaimed there."""
    for offer in offers:
        if shape_of(offer) != shape:
            continue
        for market in (Market.ON_DEMAND, Market.SPOT):
            until = unavailable.get(unavailable_key(offer, market))
            if until is not None and until > now:
                return True
    return False


def _drains_waiting_on_signals(view: WorkloadView, plan: Plan) -> list[str]:
    """The draining replicas left draining only because the read was incomplete: the
    gateway's count for them is 0, the plan does not end their drain."""
    if view.measured.incomplete is None:
        return []
    acted = {a.launch_id for a in plan.actions if not isinstance(a, Launch)}
    per_replica = view.measured.replica_in_flight
    return [
        r.view.launch_id
        for r in view.replicas
        if r.view.phase is ReplicaPhase.DRAINING
        and r.view.launch_id not in acted
        and (
            view.measured.signals.in_flight
            if per_replica is None
            else per_replica.get(r.view.launch_id, 0)
        )
        == 0
    ]


def launch_parks(
    chosen: Placement | None, spec: WorkloadSpec, warm: WarmPolicy | None
) -> frozenset[ParkMode] | None:
    """How a fresh replica placed at ``chosen`` could be parked (``None``: nothing placed).

    Asleep where its backend sleeps and the pool may sleep (it then boots able to); stopped
    where it is one on-demand cloud machine: a spot machine is never stopped, a private
    worker is the owner's, and a replica group is never parked."""
    if chosen is None or not chosen.found:
        return None
    if chosen.group_size > 1:
        return frozenset()
    modes: set[ParkMode] = set()
    if warm is not None and warm.max_sleeping > 0 and spec.backend in SLEEPING_BACKENDS:
        modes.add(ParkMode.SLEEPING)
    if chosen.offer is not None and chosen.market is not Market.SPOT:
        modes.add(ParkMode.STOPPED)
    return frozenset(modes)


def unplaced_reason(placement: Placement, room: Headroom | None) -> str:
    """Why a launch cannot be placed, with the headroom when the budget is why."""
    if placement.reason.startswith("launch refused"):
        return placement.reason  # the budget's own numbers (place_next)
    if room is not None and "headroom" in placement.reason:
        return (
            f"launch refused: ${room.usd_per_hour:.2f}/h left under the {room.ceiling}; "
            f"{placement.reason}"
        )
    return f"launch not possible: {placement.reason}"


def _inputs(
    view: WorkloadView,
    *,
    policy: AutoscalingPolicy | None,
    placement: Callable[[], Placement],
    memo: PlacementMemo | None,
) -> DecisionInputs:
    mix = view.measured.token_mix
    if view.deleted or policy is None:
        return DecisionInputs(
            capacity=None,
            input_tokens=None if mix is None else mix.input_tokens,
            output_tokens=None if mix is None else mix.output_tokens,
        )
    return decision_inputs(
        mix=mix,
        model=model_size(view.spec),
        fleet=[r.shape for r in view.replicas if r.shape is not None],
        next_shape=lambda: shape_of(placement().offer),
        concurrency_cap=concurrency_cap_of(view.spec, view.measured),
        pool_gpus=(
            pool_gpu_kinds(view.spec, view.offers, memo=memo)
            if view.pool_gpus is None
            else view.pool_gpus
        ),
    )


def _decide(
    view: WorkloadView,
    *,
    memory: ScaleMemory,
    inputs: DecisionInputs,
    now: datetime,
    knobs: StepKnobs,
    count: tuple[int, str] | None,
    warm: WarmPolicy | None,
) -> ScaleDecision:
    if view.deleted:
        return ScaleDecision(
            desired=0,
            reason="workload deleted: drain and terminate every replica",
            direction=Direction.ZERO,
            memory=memory,
        )
    if count is not None:
        return ScaleDecision(
            desired=count[0], reason=count[1], direction=Direction.HOLD, memory=memory
        )
    decision = desired_count(
        spec=view.spec,
        signals=view.measured.signals,
        fleet=fleet_counts(view.replicas, warm=warm),
        memory=memory,
        now=now,
        capacity=inputs.capacity,
        schedule_offset=timedelta(seconds=knobs.schedule_offset_sec),
        concurrency_target=concurrency_target(view.spec, view.measured),
        spot=spot_risk(view, warm=warm),
    )
    decision = _hold_on_partial_read(view, decision, memory=memory, warm=warm)
    cap = knobs.max_replicas_per_workload
    if decision.desired > cap:
        # Apply refuses such a spec; one stored by another route is planned to the cap.
        decision = replace(
            decision,
            desired=cap,
            reason=f"{decision.reason}; capped at {cap} replicas (max_replicas_per_workload)",
        )
    return decision


def _hold_on_partial_read(
    view: WorkloadView,
    decision: ScaleDecision,
    *,
    memory: ScaleMemory,
    warm: WarmPolicy | None,
) -> ScaleDecision:
    """An autoscaling scale-down (or to zero) decided on a read that did not reach the
    whole gateway is held at the replicas serving or booting (within ``max_workers``),
    with the scaling memory as it was: the requests the read missed are in none of the
    counts the rules read, so an idle or calm look may be the part read. The next
    complete read decides again."""
    why = view.measured.incomplete
    if why is None or decision.direction not in (Direction.DOWN, Direction.ZERO):
        return decision
    policy = autoscaling_policy(view.spec)
    current = fleet_counts(view.replicas, warm=warm).serving_or_soon
    if policy is not None:
        current = min(current, policy.max_workers)
    if decision.desired >= current:
        return decision
    waits = f"signals incomplete ({why}): scale-down waits"
    return replace(
        decision,
        desired=current,
        direction=Direction.HOLD,
        reason=f"{waits} (the rules said: {decision.reason})",
        memory=memory,
        waits=waits,
    )


def place_next(
    view: WorkloadView,
    *,
    unavailable: Mapping[str, datetime],
    now: datetime,
    knobs: StepKnobs,
    launched: Sequence[Placement],
    memo: PlacementMemo | None = None,
) -> Placement:
    """Where the next replica goes, with the replicas ``launched`` earlier in this step
    counted as live (their zones, workers and prices): within the budget headroom left,
    and refused (``found`` false, the budget's numbers as the reason) when its price
    would break a ceiling or the pool's instance count. ``memo``: placements shared
    within the pass (``decide.placement.place_replica``). O(replicas + launched) here,
    plus placement's cost."""
    policy = autoscaling_policy(view.spec)
    limits = limits_for(policy, fleet_usd_per_hour=knobs.fleet_max_hourly_cost_usd)
    added = [p.usd_per_hour for p in launched]
    live = [*view.inherited_usd_per_hour, *(r.view.usd_per_hour for r in view.replicas), *added]
    fleet_usd = view.fleet_usd_per_hour + sum(added)
    room = headroom(limits, live=live, fleet_usd=fleet_usd)
    zones = [r.zone for r in view.replicas if r.zone]
    zones += [p.offer.zone for p in launched if p.offer is not None]
    per_worker: dict[str, int] = {}
    for worker in [r.worker_id for r in view.replicas] + [p.worker_id for p in launched]:
        if worker:
            per_worker[worker] = per_worker.get(worker, 0) + 1
    size = model_size(view.spec)
    mix = view.measured.token_mix
    spec = view.spec
    memory_gib = estimate_model_memory(
        spec.model, spec.engine_command, hint_gib=spec.model_memory_gib
    )
    placement = place_replica(
        spec=spec,
        offers=view.offers,
        unavailable=unavailable,
        now=now,
        current_zones=zones,
        replicas_per_worker=per_worker,
        params_b=None if size is None else size.params_b,
        bytes_per_param=2.0 if size is None else size.bytes_per_param,
        model_memory_gib=memory_gib.gib,
        max_usd_per_hour=None if room is None else room.usd_per_hour + _HEADROOM_SLACK_USD,
        input_tokens=None if mix is None else mix.input_tokens,
        output_tokens=None if mix is None else mix.output_tokens,
        input_scv=None if mix is None else mix.input_scv,
        input_histogram=None if mix is None else mix.input_histogram,
        allow_groups=True,
        group_providers=knobs.group_providers,
        concurrency_cap=concurrency_cap_of(spec, view.measured),
        replicas_needed=_replicas_needed(view, policy=policy, now=now),
        memo=memo,
    )
    if not placement.found:
        return placement
    machines = len(view.inherited_usd_per_hour) + sum(r.view.machines for r in view.replicas)
    verdict = check_launch(
        live_usd_per_hour=Spend.of(live, machines=machines + sum(p.group_size for p in launched)),
        new_usd_per_hour=placement.usd_per_hour,
        limits=limits,
        fleet_live_usd_per_hour=fleet_usd if limits.fleet_usd_per_hour is not None else None,
        new_instances=placement.group_size,
    )
    if verdict.allowed:
        return placement
    return replace(placement, offer=None, market=None, worker_id=None, reason=verdict.reason)


def _replicas_needed(
    view: WorkloadView, *, policy: AutoscalingPolicy | None, now: datetime
) -> Callable[[GpuShape], int | None] | None:
    """Per GPU shape, the replicas of it the measured load needs (``queueing.fleet_need``,
    the counts a scale-down keeps), for placement to price a fleet of each shape; ``None``
    for a workload not autoscaled, of a model of unknown size, or with no request
    answered in the gateway's window. The rate the fleets are sized for is the same for
    every shape: read once (O(samples in the window)), then O(samples) per shape for the
    burst floor alone."""
    size = model_size(view.spec)
    signals = view.measured.signals
    if policy is None or size is None or not signals.answered_samples:
        return None
    mix = view.measured.token_mix
    cap = concurrency_cap_of(view.spec, view.measured)
    rate = fleet_rate(signals, now=now, policy=policy)

    def needed(shape: GpuShape) -> int | None:
        capacity = replica_capacity(shape, model=size, mix=mix, concurrency_cap=cap)
        if capacity is None:
            return None
        return fleet_need(capacity, signals, now=now, policy=policy, rate=rate)

    return needed


def mark_unavailable(
    unavailable: MutableMapping[str, datetime],
    *,
    offer: Offer | None,
    spot: bool,
    worker_id: str | None,
    now: datetime,
    knobs: StepKnobs,
) -> None:
    """Skip the market of a refused launch (or its private worker) for
    :attr:`StepKnobs.unavailable_sec`."""
    if worker_id:
        key = worker_key(worker_id)
    elif offer is not None:
        key = unavailable_key(offer, Market.SPOT if spot else Market.ON_DEMAND)
    else:
        return
    unavailable[key] = now + timedelta(seconds=knobs.unavailable_sec)
