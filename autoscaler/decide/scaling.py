"""How many replicas an autoscaling workload wants, from measured TTFT and load.

The rules, in the order they are tried (the first that applies decides):

1. **Scale to zero.** ``min_workers: 0`` with ``scale_to_zero``, nothing in flight or
   queued, and no request for ``scale_to_zero_timeout_sec``: zero replicas.
2. **Wake from zero.** No replica ready or booting and a request waiting (or seen within
   the idle timeout): ``max(1, min_workers)`` at once, without waiting for a window.
3. **Scale up on load.** With a capacity figure (``ReplicaCapacity``), when the load need
   (``decide.queueing.load_need``: batch slots and the prefill queue at the recent rate)
   or the burst floor (``decide.queueing.burst_floor``: headroom over the largest recent
   burst) exceeds the replicas ready or booting: that many at once, no window (a boot
   takes minutes).
4. **Scale up on TTFT.** The ``ttft_percentile`` of TTFT over the scale-up window has
   been above the breach bound (:func:`breach_bound`) for the whole scale-up window (the
   breach start is kept in :class:`ScaleMemory`, which the caller stores and passes
   back). The step grows with how far TTFT is off target, and replicas already booting
   count toward it, so a breach that persists while machines boot does not buy more.
5. **Scale down.** The percentile over the scale-down window has been calm for the whole
   scale-down window, TTFT is not above the upper bound, nothing is queued, and the
   replicas left could carry the measured load and the burst floor (consolidation
   check). Then one replica goes (several when a per-replica capacity is known and the
   load is far below it, never more than half at once). With a capacity figure the load
   the smaller fleet must carry is the busiest minute of the scale-down window
   (``decide.queueing.peak_rate``), not the last minute's rate that rule 3 scales up
   on: that gap is the hysteresis between the two rules, so a quiet minute amid busy
   ones does not shed a replica that the next busy minute buys back a boot later.
6. Otherwise hold.

Beside them, three rules take the workload's concurrency and throughput:

* **Concurrency target.** With ``per_worker`` (or on an async endpoint, the gateway's
  per-replica cap), at least ``ceil((in flight + queued) / target)`` replicas, at once
  (before rule 3), and waking from zero starts that many; scale-down keeps them.
* **Async endpoints** (``jobs_only``) scale on their job queue, not on TTFT: rules 3 and
  4 do not apply; a queued job older than the scale-up window with no replica booting
  adds one replica; the fleet is calm when the queue and jobs in flight fit one replica
  fewer at the target.
* **Throughput floor.** ``min_throughput_rate`` (generated tokens/s): at least
  ``ceil(rate / one replica's tokens/s)`` replicas (the performance model's figure at
  the measured mix), whatever the rules above say, scale to zero included; one when no
  figure is known.

And one for spot fleets:

* **Spot spares.** On spot (:class:`SpotRisk`: the market's interruptions per replica-hour
  and the seconds a replacement takes to serve), the replicas down at once are about
  Poisson with mean ``n x rate x replace_s / 3600`` for ``n`` replicas (each
  interruption leaves one missing for a replacement's boot). The load rule lets
  ``1 - WAIT_QUANTILE`` (1 %) of arrivals wait past the budget, so the fleet keeps the
  fewest ``k`` spares for which more than ``k`` of its ``carry + k`` down at once is no
  likelier than that (:func:`spot_floor`), on top of the replicas that carry the
  busiest minute of the scale-down window at full throughput
  (``ReplicaCapacity.requests_per_s``: losing ``k`` then slows the fleet but its queue
  does not grow through the boot). The spares are added to whatever the
  rules above decided only where that count falls short of the floor, so a fleet the
  hysteresis already holds above the load's need buys none
  (:func:`spot_spares`; the decision's reason gives the numbers).

Hysteresis is time, never ticks: a breach must hold for the window measured in seconds
from ``breach_since``. With ``enable_fast_autoscaling`` the scale-up window is cut to
:data:`FAST_SCALE_UP_WINDOW_SEC` and the step may triple capacity instead of doubling
it; scale-down keeps its full window (removing capacity is the risky direction).

The result always lies in ``[floor, max_workers]`` where the floor is ``min_workers``
(one when ``min_workers`` is 0 and ``scale_to_zero`` is off), or is 0 by rule 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from itertools import compress
from operator import itemgetter, lt

from autoscaler.decide.queueing import (
    BACKLOG_CLEAR_SEC,
    BURST_HEADROOM,
    PREFILL_TTFT_FACTOR,
    RECENT_LOAD_WINDOW_SEC,
    SAFE_UTILIZATION,
    WAIT_QUANTILE,
    ReplicaCapacity,
    burst_floor,
    capacity_text,
    load_need,
    peak_rate,
    prefill_quantile,
    recent_rate,
)
from autoscaler.decide.signals import Signals
from autoscaler.spec import AutoscalingPolicy

FAST_SCALE_UP_WINDOW_SEC = 10.0
"""The scale-up window (and hold) when ``enable_fast_autoscaling`` is on."""

CALM_SHARE_OF_UPPER = 0.5
"""With a capacity figure, TTFT below this share of the upper bound counts as calm."""


@dataclass(frozen=True, slots=True)
class SpotRisk:
    """What spot interruptions put at risk: the fleet runs on spot, each replica is
    interrupted ``interruptions_per_hour`` on average, and a replacement serves
    ``replace_s`` seconds after it is bought (a fresh start's median)."""

    interruptions_per_hour: float
    replace_s: float
    basis: str | None = None
    """How the rate was measured (``decide.spot_rate.SpotRate.basis``), for the reason."""

    def __post_init__(self) -> None:
        for name in ("interruptions_per_hour", "replace_s"):
            value = getattr(self, name)
            if not value >= 0:  # NaN too
                raise ValueError(f"{name} must be >= 0, got {value}")

    def down_mean(self, replicas: int) -> float:
        """Replicas of ``replicas`` missing at once on average (interruptions within one
        replacement's boot)."""
        return replicas * self.interruptions_per_hour * self.replace_s / 3600.0


def spot_floor(carry: int, risk: SpotRisk, *, at_least: int, most: int) -> tuple[int, int]:
    """The spot fleet that keeps its spares on top of the ``carry`` replicas that carry
    its load, and those spares: the fewest ``n`` from ``at_least`` up whose
    :func:`spot_spares` fit in ``n - carry`` (the spares are spot too: their risk
    counts), and ``spot_spares(n)``; the search stops once ``n`` reaches ``most`` (the
    spares then counted are those of that ``n``). ``n`` grows at each of at most
    ``most`` rounds of ``spot_spares``."""
    fleet = at_least
    spares = spot_spares(fleet, risk)
    while carry + spares > fleet and fleet < most:
        fleet = carry + spares
        spares = spot_spares(fleet, risk)
    return fleet, spares


def spot_spares(replicas: int, risk: SpotRisk, *, allowed: float = 1.0 - WAIT_QUANTILE) -> int:
    """The fewest spares ``k`` for which more than ``k`` of ``replicas`` spot replicas
    down at once (Poisson with mean :meth:`SpotRisk.down_mean`) is no likelier than
    ``allowed``."""
    mean = risk.down_mean(replicas)
    term = math.exp(-mean)  # P(X = 0)
    below = term
    k = 0
    while 1.0 - below > allowed and k < replicas:
        k += 1
        term *= mean / k
        below += term
    return k


@dataclass(frozen=True, slots=True)
class FleetCounts:
    """Replicas by phase. ``booting`` includes pending intents (bought, not serving yet)."""

    ready: int = 0
    booting: int = 0
    draining: int = 0
    warned: int = 0
    """Of the draining, those drained because their provider warned it will reclaim the
    machine (``decide.plan.counted_phase``): lost to the provider, not dropped by a rule."""

    @property
    def serving_or_soon(self) -> int:
        return self.ready + self.booting


@dataclass(frozen=True, slots=True)
class ScaleMemory:
    """What the scaler remembers between calls; store it and pass it back next time.

    ``breach_since``: since when TTFT has been above the upper bound (the scale-up
    condition); ``calm_since``: since when below the lower bound (scale-down).
    """

    breach_since: datetime | None = None
    calm_since: datetime | None = None
    rebalance: Rebalance | None = None
    """A replacement under way (``decide.step``: of a misfit shape, or on a cheaper
    offer); ``None``: none."""
    held: int | None = None
    """The replicas the last decision left the fleet at (its desired count): a hold keeps
    them when the provider takes some (a spot warning), rather than the fewer left;
    ``None``: no decision yet (a controller just started holds what it finds)."""


@dataclass(frozen=True, slots=True)
class Rebalance:
    """A replacement on a cheaper market in flight: the fleet was ``count`` replicas
    when one more was launched (``since``) to replace ``launch_id``, its dearest."""

    count: int
    launch_id: str
    since: datetime


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"
    ZERO = "zero"
    WAKE = "wake"


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """The number of replicas wanted (ready + booting), why, and the memory to keep."""

    desired: int
    reason: str
    direction: Direction
    memory: ScaleMemory
    ttft_up_s: float | None = None
    """The TTFT percentile over the scale-up window (``None``: no samples)."""
    ttft_down_s: float | None = None
    """The TTFT percentile over the scale-down window."""
    recheck_at: datetime | None = None
    """When the decision changes by itself (a schedule opening or closing), if known."""
    waits: str | None = None
    """What waits on a read of the gateway's signals that did not reach all of it
    (``decide.step``: a scale-down held, a drain kept), as the reason words it;
    ``None``: nothing does."""


def ttft_percentile(
    samples: Iterable[tuple[datetime, float]], *, q: float, since: datetime
) -> float | None:
    """The ``q`` quantile (0 < q <= 1, nearest rank) of the TTFTs measured after ``since``."""
    if not 0 < q <= 1:
        raise ValueError(f"percentile q must be in (0, 1], got {q}")
    pairs = samples if isinstance(samples, tuple | list) else tuple(samples)
    # ``ttft for at, ttft in pairs if at > since``, in C: a tick reads thousands.
    values: list[float] = sorted(
        compress(map(itemgetter(1), pairs), map(partial(lt, since), map(itemgetter(0), pairs)))
    )
    if not values:
        return None
    return values[max(math.ceil(q * len(values)) - 1, 0)]


def measured_ttft(signals: Signals, *, q: float, since: datetime) -> float | None:
    """The worse of the gateway's and the engines' ``q`` quantile of TTFT after ``since``
    (each over its own samples; ``None`` when neither has any)."""
    found = [
        p
        for p in (
            ttft_percentile(signals.ttft_samples, q=q, since=since),
            ttft_percentile(signals.engine_ttft_samples, q=q, since=since),
        )
        if p is not None
    ]
    return max(found) if found else None


def floor_of(policy: AutoscalingPolicy) -> int:
    """The fewest replicas the policy keeps while it is not scaled to zero."""
    if policy.min_workers == 0 and not policy.scale_to_zero:
        return 1
    return policy.min_workers


def scale_up_window_sec(policy: AutoscalingPolicy) -> float:
    if policy.enable_fast_autoscaling:
        return min(policy.scale_up_time_window_sec, FAST_SCALE_UP_WINDOW_SEC)
    return policy.scale_up_time_window_sec


def desired_replicas(
    *,
    policy: AutoscalingPolicy,
    signals: Signals,
    fleet: FleetCounts,
    memory: ScaleMemory,
    now: datetime,
    capacity: ReplicaCapacity | None = None,
    concurrency_target: int | None = None,
    jobs_only: bool = False,
    spot: SpotRisk | None = None,
) -> ScaleDecision:
    """How many replicas (ready + booting) the workload should have at ``now``.

    ``concurrency_target``: requests one replica serves at once, to scale to (``None``:
    none); ``jobs_only``: an async endpoint, scaled on its job queue; ``spot``: the fleet
    runs on spot, at this risk (spot spares; module docstring).
    """
    up_window = scale_up_window_sec(policy)
    down_window = policy.scale_down_time_window_sec
    q = policy.ttft_percentile
    ttft_up = measured_ttft(signals, q=q, since=now - timedelta(seconds=up_window))
    ttft_down = measured_ttft(signals, q=q, since=now - timedelta(seconds=down_window))
    if jobs_only:  # jobs are not timed to a first token; the queue says how they fare
        ttft_up = ttft_down = None
    ctx = _Context(
        policy,
        signals,
        fleet,
        memory,
        now,
        capacity,
        ttft_up,
        ttft_down,
        concurrency_target,
        jobs_only,
        spot,
    )
    ctx = replace(ctx, memory=_remember(ctx))
    decision = (
        _to_zero(ctx)
        or _wake(ctx)
        or _concurrency_up(ctx)
        or _age_up(ctx, up_window)
        or (None if jobs_only else _load_up(ctx))
        or _up(ctx, up_window)
        or _down(ctx, down_window)
    )
    decided = _throughput_floor(ctx, _spot_spare(ctx, decision or ctx.hold()))
    if decided.memory.held == decided.desired:
        return decided
    return replace(decided, memory=replace(decided.memory, held=decided.desired))


@dataclass(frozen=True, slots=True)
class _Context:
    policy: AutoscalingPolicy
    signals: Signals
    fleet: FleetCounts
    memory: ScaleMemory
    now: datetime
    capacity: ReplicaCapacity | None
    ttft_up: float | None
    ttft_down: float | None
    concurrency_target: int | None = None
    jobs_only: bool = False
    spot: SpotRisk | None = None

    @property
    def current(self) -> int:
        return self.fleet.serving_or_soon

    @property
    def concurrency_need(self) -> int:
        """Replicas the requests in flight and queued need at the concurrency target
        (0 without a target)."""
        target = self.concurrency_target
        if target is None:
            return 0
        return math.ceil((self.signals.in_flight + self.signals.queue_depth) / target)

    def concurrency_text(self) -> str:
        s = self.signals
        return (
            f"{s.in_flight} in flight and {s.queue_depth} queued at {self.concurrency_target} "
            f"per replica (per_worker) need {self.concurrency_need}"
        )

    def job_age(self) -> float | None:
        """Seconds the oldest queued job has waited (``None``: none queued)."""
        oldest = self.signals.oldest_queued_at
        return None if oldest is None else (self.now - oldest).total_seconds()

    def clamp(self, count: int) -> int:
        return min(max(count, floor_of(self.policy)), self.policy.max_workers)

    def decide(
        self, desired: int, direction: Direction, reason: str, memory: ScaleMemory | None = None
    ) -> ScaleDecision:
        return ScaleDecision(
            desired=desired,
            reason=reason,
            direction=direction,
            memory=self.memory if memory is None else memory,
            ttft_up_s=self.ttft_up,
            ttft_down_s=self.ttft_down,
        )

    def hold(self) -> ScaleDecision:
        """Keep the fleet as the last decision left it: the replicas serving or booting,
        and those of them the provider has since warned it will reclaim, whose
        replacements the plan then launches (at most as many as the last decision held;
        none once a replacement serves or boots). Within the policy's bounds."""
        kept, replaced = self.current, ""
        held, warned = self.memory.held, self.fleet.warned
        if warned and held is not None and held > kept:
            kept = min(held, kept + warned)
            replaced = (
                f"; {kept - self.current} of {warned} replica(s) warned of a spot reclaim "
                f"replaced (the fleet held {held})"
            )
        desired = self.clamp(kept)
        if desired != kept:
            bound = "min_workers floor" if desired > kept else "max_workers"
            return self.decide(
                desired, Direction.HOLD, f"{kept} replicas -> {desired}: the {bound}{replaced}"
            )
        return self.decide(
            desired, Direction.HOLD, f"hold at {desired}: {self.latency_text()}{replaced}"
        )

    def latency_text(self) -> str:
        p = self.policy
        pct = f"p{p.ttft_percentile * 100:g}"
        if self.ttft_up is None:
            return f"no TTFT samples in the last {scale_up_window_sec(p):g}s"
        return (
            f"TTFT {pct} {self.ttft_up:.3f}s over {scale_up_window_sec(p):g}s is within "
            f"[{p.lower_allowed_latency_sec:g}s, {p.upper_allowed_latency_sec:g}s] or has "
            "not held long enough"
        )

    def held_for(self, since: datetime | None, window_sec: float) -> float | None:
        """Seconds the condition has held, if it has held for the whole window."""
        if since is None:
            return None
        held = (self.now - since).total_seconds()
        return held if held >= window_sec else None


def _remember(ctx: _Context) -> ScaleMemory:
    policy, memory, signals, now = ctx.policy, ctx.memory, ctx.signals, ctx.now
    up, down, capacity = ctx.ttft_up, ctx.ttft_down, ctx.capacity
    breach = up is not None and up > breach_bound(policy, capacity)
    idle = down is None and signals.in_flight == 0 and signals.queue_depth == 0
    lower, _ = calm_bound(policy, capacity)
    calm = idle or (down is not None and down < lower)
    if ctx.jobs_only:
        age = ctx.job_age()
        calm = ctx.concurrency_need < ctx.current and (
            age is None or age <= scale_up_window_sec(policy)
        )
    calm = calm and not breach
    return ScaleMemory(
        breach_since=(memory.breach_since or now) if breach else None,
        calm_since=(memory.calm_since or now) if calm else None,
        held=memory.held,
    )


def calm_bound(policy: AutoscalingPolicy, capacity: ReplicaCapacity | None) -> tuple[float, str]:
    """The TTFT percentile below which the fleet counts as calm (scale-down may follow),
    and what set it, in words for the decision's reason.

    The policy's lower bound; with a capacity figure the consolidation check can tell
    what the load needs, so TTFT comfortably inside the bounds (under half the upper
    bound), or no more than the prompt mix's own prefill explains, is calm enough.
    """
    lower = policy.lower_allowed_latency_sec
    why = "the lower bound"
    if capacity is None:
        return lower, why
    half_upper = CALM_SHARE_OF_UPPER * policy.upper_allowed_latency_sec
    if half_upper > lower:
        lower, why = half_upper, f"{CALM_SHARE_OF_UPPER:g} x the upper bound"
    prefill = prefill_quantile(capacity, policy.ttft_percentile)
    if prefill is not None:
        explained = min(PREFILL_TTFT_FACTOR * prefill, policy.upper_allowed_latency_sec)
        if explained > lower:
            lower, why = explained, "what the prompt mix's prefill explains"
    return lower, why


def breach_bound(policy: AutoscalingPolicy, capacity: ReplicaCapacity | None) -> float:
    """The TTFT percentile above which the TTFT rule scales up: the upper bound, or, when
    the measured prompt mix alone puts that percentile of prefill higher,
    :data:`PREFILL_TTFT_FACTOR` times it (more replicas do not prefill a prompt faster).

    The prefill is the fastest GPU's the workload may use (``fastest_prefill_s``) when
    known, as the SLO judges it: long prompts that only this fleet's slower GPU fails
    are a reason to scale (placement then picks a shape that serves them), not an
    excuse."""
    upper = policy.upper_allowed_latency_sec
    prefill = (
        None if capacity is None else prefill_quantile(_reference(capacity), policy.ttft_percentile)
    )
    if prefill is None:
        return upper
    return max(upper, PREFILL_TTFT_FACTOR * prefill)


def _reference(capacity: ReplicaCapacity) -> ReplicaCapacity:
    """``capacity`` with the fastest GPU's prefill, where known (the SLO's reference)."""
    if capacity.fastest_prefill_s is None:
        return capacity
    return replace(capacity, prefill_s=capacity.fastest_prefill_s)


def _to_zero(ctx: _Context) -> ScaleDecision | None:
    p, s = ctx.policy, ctx.signals
    if p.min_workers != 0 or not p.scale_to_zero or s.in_flight or s.queue_depth:
        return None
    if ctx.ttft_up is not None and ctx.ttft_up > p.upper_allowed_latency_sec:
        return None  # requests were slow just now: not idle, whatever the clock says
    if s.last_request_at is None:
        idle = "no request seen"
    else:
        idle_sec = (ctx.now - s.last_request_at).total_seconds()
        if idle_sec < p.scale_to_zero_timeout_sec:
            return None
        idle = f"idle {idle_sec:.0f}s >= scale_to_zero_timeout_sec {p.scale_to_zero_timeout_sec:g}"
    return ctx.decide(0, Direction.ZERO, f"scale to zero: {idle}", ScaleMemory())


def _wake(ctx: _Context) -> ScaleDecision | None:
    s = ctx.signals
    if ctx.current > 0:
        return None
    if not (s.queue_depth or s.in_flight or s.last_request_at is not None):
        return None
    desired = ctx.clamp(max(1, ctx.concurrency_need))
    waiting = s.queue_depth + s.in_flight
    per = f" ({ctx.concurrency_text()})" if ctx.concurrency_need > 1 else ""
    return ctx.decide(
        desired,
        Direction.WAKE,
        f"wake from zero: {waiting} request(s) waiting and no replica ready or booting{per}; "
        f"{desired} at once",
        ScaleMemory(),
    )


def _concurrency_up(ctx: _Context) -> ScaleDecision | None:
    """Scale up at once to the replicas the concurrency target needs."""
    need = ctx.concurrency_need
    if ctx.current == 0 or need <= ctx.current:
        return None
    desired = ctx.clamp(need)
    if desired <= ctx.current:
        return None
    return ctx.decide(
        desired,
        Direction.UP,
        f"{ctx.concurrency_text()}: {ctx.current} -> {desired} ({ctx.fleet.ready} ready, "
        f"{ctx.fleet.booting} booting)",
        replace(ctx.memory, calm_since=None),
    )


def _age_up(ctx: _Context, window_sec: float) -> ScaleDecision | None:
    """An async endpoint whose oldest queued job has waited past the scale-up window,
    with no replica booting to take it: one more replica."""
    age = ctx.job_age()
    if not ctx.jobs_only or age is None or age <= window_sec or ctx.fleet.booting:
        return None
    if ctx.current == 0:
        return None
    desired = ctx.clamp(ctx.current + 1)
    why = (
        f"the oldest queued job has waited {age:.0f}s > scale-up window {window_sec:g}s "
        f"with {ctx.signals.queue_depth} queued and no replica booting"
    )
    if desired <= ctx.current:
        return ctx.decide(desired, Direction.HOLD, f"{why}; already at max_workers")
    return ctx.decide(
        desired,
        Direction.UP,
        f"{why}: {ctx.current} -> {desired}",
        replace(ctx.memory, calm_since=None),
    )


def throughput_need(
    policy: AutoscalingPolicy, capacity: ReplicaCapacity | None
) -> tuple[int, str] | None:
    """Replicas ``min_throughput_rate`` needs, and why in numbers (``None``: no floor).
    Without a per-replica figure (the model's size or the GPU unknown) one replica."""
    rate = policy.min_throughput_rate
    if rate is None:
        return None
    per = None if capacity is None else capacity.output_tokens_per_s
    if per is None or per <= 0:
        return 1, (
            f"min_throughput_rate {rate:g} tokens/s: no per-replica throughput figure "
            "(model size or GPU unknown), so at least 1 replica"
        )
    need = math.ceil(rate / per)
    return need, (
        f"min_throughput_rate {rate:g} tokens/s needs {need} replica(s) at {per:.0f} "
        "tokens/s each (performance model at the measured mix)"
    )


def _throughput_floor(ctx: _Context, decision: ScaleDecision) -> ScaleDecision:
    """``decision`` raised to the replicas ``min_throughput_rate`` needs."""
    found = throughput_need(ctx.policy, ctx.capacity)
    if found is None or decision.desired >= found[0]:
        return decision
    need, why = found
    desired = min(need, ctx.policy.max_workers)
    if desired <= decision.desired:
        return decision
    capped = f", capped at max_workers {ctx.policy.max_workers}" if desired < need else ""
    direction = Direction.UP if desired > ctx.current else Direction.HOLD
    return replace(
        decision,
        desired=desired,
        direction=direction,
        reason=f"{why}{capped}: {ctx.current} -> {desired} (instead of: {decision.reason})",
    )


def _spot_spare(ctx: _Context, decision: ScaleDecision) -> ScaleDecision:
    """``decision`` raised to the spot spares' floor (module docstring), where it falls
    short of it."""
    risk, cap, s = ctx.spot, ctx.capacity, ctx.signals
    if risk is None or cap is None or ctx.jobs_only or decision.desired == 0:
        return decision
    if cap.requests_per_s <= 0:
        return decision
    window = ctx.policy.scale_down_time_window_sec
    rate = max(recent_rate(s, now=ctx.now), peak_rate(s, now=ctx.now, over_s=window))
    load = rate + s.queue_depth / BACKLOG_CLEAR_SEC
    carry = max(math.ceil(load / cap.requests_per_s - 1e-9), 1)
    fleet, spares = spot_floor(carry, risk, at_least=decision.desired, most=ctx.policy.max_workers)
    floor = carry + spares
    if spares == 0 or decision.desired >= floor:
        return decision
    desired = ctx.clamp(floor)
    if desired <= decision.desired:
        return decision
    allowed = 1.0 - WAIT_QUANTILE
    queued = f" and {s.queue_depth} queued" if s.queue_depth else ""
    measured = "" if risk.basis is None else f" ({risk.basis})"
    why = (
        f"spot spares: {fleet} spot replicas interrupted {risk.interruptions_per_hour:.3g}/h "
        f"each{measured} and replaced in {risk.replace_s:.0f}s have "
        f"{risk.down_mean(fleet):.3f} down on average, and more than {spares} down at once "
        f"is no likelier than {allowed:.0%}, "
        f"so {spares} spare(s) on top of the {carry} that carry {rate:.2f} req/s{queued} "
        f"(the busiest {RECENT_LOAD_WINDOW_SEC:g}s of the last {window:g}s) at full "
        f"throughput ({cap.requests_per_s:.2f} req/s each): "
        + (f"keep {desired}" if desired == ctx.current else f"{ctx.current} -> {desired}")
    )
    direction, memory = decision.direction, decision.memory
    if desired > ctx.current:
        direction, memory = Direction.UP, replace(memory, calm_since=None)
    elif desired == ctx.current:
        direction = Direction.HOLD
    return replace(
        decision,
        desired=desired,
        direction=direction,
        memory=memory,
        reason=f"{why} (instead of: {decision.reason})",
    )


def _load_up(ctx: _Context) -> ScaleDecision | None:
    """Scale up at once, without a window, when a capacity figure is known and the
    measured request rate needs more replicas than are ready or booting: three-minute
    boots cannot wait for TTFT to breach first."""
    cap = ctx.capacity
    if cap is None or ctx.current == 0:
        return None
    upper = ctx.policy.upper_allowed_latency_sec
    need, rate = load_need(cap, ctx.signals, now=ctx.now, upper_s=upper)
    burst, worst = burst_floor(cap, ctx.signals, now=ctx.now, policy=ctx.policy)
    if max(need, burst) <= ctx.current:
        return None
    desired = ctx.clamp(max(need, burst))
    if desired <= ctx.current:
        return None
    why = (
        f"load {rate:.2f} req/s and {ctx.signals.queue_depth} queued need {need} "
        f"({capacity_text(cap)})"
    )
    if burst > need and worst is not None:
        window = ctx.policy.scale_down_time_window_sec
        why = (
            f"{worst.text(window)} needs {burst} ({BURST_HEADROOM:g}x its prefill work "
            f"within the wait budget; {capacity_text(cap)})"
        )
    return ctx.decide(
        desired,
        Direction.UP,
        f"{why}: {ctx.current} -> {desired} ({ctx.fleet.ready} ready, {ctx.fleet.booting} booting)",
        replace(ctx.memory, calm_since=None),
    )


def _up(ctx: _Context, window_sec: float) -> ScaleDecision | None:
    held = ctx.held_for(ctx.memory.breach_since, window_sec)
    if held is None or ctx.ttft_up is None:
        return None
    p, fleet = ctx.policy, ctx.fleet
    serving = max(fleet.ready, 1)
    bound = breach_bound(p, ctx.capacity)
    off_by = ctx.ttft_up / bound  # > 1
    growth = 3.0 if p.enable_fast_autoscaling else 2.0
    # TTFT grows at least in proportion to load per replica near saturation, so the
    # capacity that brings it back to target is about ``ready x off_by``.
    wanted = math.ceil(serving * min(off_by, growth))
    wanted = max(wanted, fleet.ready + 1)
    pct = f"p{p.ttft_percentile * 100:g}"
    over = (
        f"upper {p.upper_allowed_latency_sec:g}s"
        if bound == p.upper_allowed_latency_sec
        else f"{bound:.3f}s ({PREFILL_TTFT_FACTOR:g}x the {pct} prefill alone"
        + (" on the fastest GPU)" if ctx.capacity and ctx.capacity.fastest_prefill_s else ")")
    )
    breach = f"TTFT {pct} {ctx.ttft_up:.3f}s > {over} for {held:.0f}s (window {window_sec:g}s)"
    if wanted <= ctx.current:
        return ctx.decide(
            ctx.clamp(ctx.current),
            Direction.HOLD,
            f"{breach}; {fleet.booting} replica(s) booting already cover the {wanted} needed",
        )
    desired = ctx.clamp(wanted)
    if desired <= ctx.current:
        return ctx.decide(
            desired, Direction.HOLD, f"{breach}; already at max_workers {p.max_workers}"
        )
    # Restart the hold: the new replicas get a full window to take effect before more.
    restarted = replace(ctx.memory, breach_since=ctx.now)
    return ctx.decide(
        desired,
        Direction.UP,
        f"{breach}: {ctx.current} -> {desired} ({fleet.ready} ready, {fleet.booting} booting; "
        f"{off_by:.1f}x over target)",
        restarted,
    )


def _down(ctx: _Context, window_sec: float) -> ScaleDecision | None:
    held = ctx.held_for(ctx.memory.calm_since, window_sec)
    p, fleet, s = ctx.policy, ctx.fleet, ctx.signals
    floor = floor_of(p)
    if held is None or fleet.booting or ctx.current <= floor:
        return None
    if ctx.ttft_up is not None and ctx.ttft_up > p.upper_allowed_latency_sec:
        return None  # never shed capacity while latency is over the bound
    if s.queue_depth:
        return ctx.decide(
            ctx.clamp(ctx.current),
            Direction.HOLD,
            f"TTFT is low but {s.queue_depth} request(s) are queued: keep {ctx.current}",
        )
    target, why = _consolidated(ctx)
    if target >= ctx.current:
        return ctx.decide(ctx.clamp(ctx.current), Direction.HOLD, why)
    desired = max(target, floor)
    pct = f"p{p.ttft_percentile * 100:g}"
    bound, set_by = calm_bound(p, ctx.capacity)
    latency = (
        ("the job queue is calm" if ctx.jobs_only else "no traffic")
        if ctx.ttft_down is None
        else f"TTFT {pct} {ctx.ttft_down:.3f}s < calm bound {bound:.3f}s ({set_by})"
    )
    return ctx.decide(
        desired,
        Direction.DOWN,
        f"{latency} for {held:.0f}s (window {window_sec:g}s): {ctx.current} -> {desired}; {why}",
        replace(ctx.memory, calm_since=ctx.now),
    )


def _consolidated(ctx: _Context) -> tuple[int, str]:
    """How many replicas the measured load needs, with the reason; at most one fewer
    without a capacity figure, at most half fewer with one."""
    s, cap, ready = ctx.signals, ctx.capacity, ctx.fleet.ready
    one_less = ready - 1
    if one_less < 1:
        return 0, "no load to carry"
    if ctx.concurrency_need > one_less:
        return ready, f"{ctx.concurrency_text()}: keep {ready}"
    if ctx.jobs_only:
        return max(ctx.concurrency_need, math.ceil(ready / 2), 1), ctx.concurrency_text()
    if cap is None:
        # Without a capacity figure, project TTFT as growing with load per replica (an
        # underestimate near saturation, so keep a margin below the upper bound).
        ttft = ctx.ttft_down or 0.0
        projected = ttft * ready / one_less
        limit = ctx.policy.upper_allowed_latency_sec * SAFE_UTILIZATION
        load = (
            f"{s.request_rate:.2f} req/s, {s.in_flight} in flight on {one_less} replicas "
            f"projects TTFT {projected:.3f}s"
        )
        if projected > limit:
            return ready, f"TTFT is low but {load} > {limit:.3f}s: keep {ready}"
        return one_less, load
    upper = ctx.policy.upper_allowed_latency_sec
    window = ctx.policy.scale_down_time_window_sec
    recent = recent_rate(s, now=ctx.now)
    peak = peak_rate(s, now=ctx.now, over_s=window)
    by_rate, _ = load_need(cap, s, now=ctx.now, upper_s=upper, rate=max(recent, peak))
    by_burst, worst = burst_floor(cap, s, now=ctx.now, policy=ctx.policy)
    by_concurrency = (
        math.ceil(s.in_flight / (cap.max_concurrency * SAFE_UTILIZATION))
        if cap.max_concurrency
        else 0
    )
    needed = max(by_rate, by_burst, by_concurrency, math.ceil(ready / 2), 1)
    burst = "" if worst is None else f", {worst.text(window)}"
    load = (
        f"{recent:.2f} req/s over the last {RECENT_LOAD_WINDOW_SEC:g}s, {peak:.2f} req/s in "
        f"the busiest {RECENT_LOAD_WINDOW_SEC:g}s of the last {window:g}s{burst} and "
        f"{s.in_flight} in flight need {needed} ({capacity_text(cap)})"
    )
    if needed >= ready:
        return ready, f"TTFT is low but {load}: keep {ready}"
    return needed, load
