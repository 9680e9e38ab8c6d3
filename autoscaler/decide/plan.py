"""From a desired replica count and the replicas observed, to actions.

Level-based: the plan depends only on what is observed now, so running it again after a
crash or a missed event gives the same actions. The rules:

* **Liveness.** A pending or booting replica older than ``scaling_up_timeout_sec``
  (counted from its intent) is terminated: it will not become ready.
* **Drain, then terminate.** A draining replica is terminated once nothing is in flight
  on it, or once ``scaling_down_timeout_sec`` has passed since the drain was asked.
  While the gateway's signals are read in part its requests in flight are not known
  (``ReplicaView.in_flight_unknown``): it waits, up to that timeout.
* **Scale down.** Surplus replicas that are not serving yet (pending, booting) are
  terminated first, newest first: they carry no requests. Then ready replicas are
  drained, **most expensive first, then the coldest prefix cache first, newest first
  among equals** (the most expensive saves the most; the prompt blocks a replica's
  cache holds, as the gateway's prefix index counts them, are prefill the fleet would
  redo elsewhere; the newest has the fewest warm caches and long requests on it).
* **Replace on spec drift.** Replicas of an older spec generation are replaced with a
  surge of one: a new-generation replica is launched first, and an old one is drained
  only once the ready replicas exceed the desired count. Old-generation replicas still
  booting are terminated at once. Where the budget refuses the surge, one old replica is
  drained first and its replacement launched once its price has left the ledger; while
  any replica drains, none more is drained in place.
* **Warm pools** (``decide.warm``, when the spec asks for one). A drained replica of the
  current generation is parked instead of terminated while its pool has room: its
  engine put to sleep first (when it can sleep and its sleep would be held at all: an
  automatic pool stops at once a replica leaving a fleet that keeps serving, whose
  scale-down window already spent what the sleep is worth), else its machine stopped. A
  parked replica past its hold time moves down a path (asleep, then stopped, then
  terminated);
  one of an older generation, or beyond its pool's bound, is terminated. Scale-up resumes
  parked replicas before it launches fresh ones, sleeping first, then stopped, newest
  parked first; a resume is checked against the budget at its running price, and a
  parked replica whose running price does not fit is passed over for a fresh machine
  that does (a parked machine never makes a scale-up smaller than none would). An
  explicit pool is refilled: a replica is launched, made ready, drained and parked; one
  still booting when a scale-down has filled the pool is terminated.
* **Spot notices.** A replica whose provider warned it will reclaim the machine
  (:func:`heed_spot_notice`, which the reconciler and the simulator both ask before the
  step and the plan asks again) is terminated while pending or booting (it would not
  serve before the reclaim), and so is one parking or parked in a warm pool (resumed, it
  would be reclaimed: it leaves the pool, refilled elsewhere). A warned replica
  (``ReplicaView.warned``, whether or not its notice gave a time) leaving service is
  never parked. A ready one keeps serving: its view is ``DRAINING``, warned, with no
  ``drain_requested_at`` (:func:`counted_phase`; the gateway still routes to it), so
  the plan, which counts no draining replica, launches its replacement in the same step.
  Its drain starts once the replicas ready besides the warned ones reach the desired
  count (the replacement serves), or at :data:`SPOT_DRAIN_MARGIN_S` before the reclaim,
  whichever comes first; a reclaim closer than the margin, or at a time not known,
  drains it at once.
* **Budget per launch.** Each launch is checked with :func:`budget.check_launch` against
  every replica not confirmed terminated, the launches of this plan included; a refused
  launch becomes a :class:`Refusal` with the numbers.

``requeue_after`` is the time until the nearest timeout (a booting replica's liveness
limit or a drain's deadline), so the reconciler wakes exactly when something is due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from autoscaler.decide.budget import BudgetLimits, Spend, check_launch
from autoscaler.decide.warm import ParkMode, WarmPolicy

SURGE = 1
"""Extra replicas a spec-drift rollout may run above the desired count."""


class ReplicaPhase(StrEnum):
    """A replica's phase; the same values as ``autoscaler.store.phase.Phase``."""

    PENDING = "pending"
    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    PARKING = "parking"
    """Asked to sleep or stop; the engine or the provider has not confirmed it."""
    PARKED = "parked"
    """Asleep or stopped (``ReplicaView.park_mode``), kept for a fast scale-up."""


_STARTING = frozenset({ReplicaPhase.PENDING, ReplicaPhase.BOOTING})
_PARKED = frozenset({ReplicaPhase.PARKING, ReplicaPhase.PARKED})


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the plan needs to know of one replica (a launch in the ledger)."""

    launch_id: str
    phase: ReplicaPhase
    generation: int
    offer_key: str
    usd_per_hour: float
    intent_at: datetime
    ready_at: datetime | None = None
    drain_requested_at: datetime | None = None
    in_flight: int = 0
    in_flight_unknown: str | None = None
    """Why its requests in flight are not known (the gateway's signals were read in
    part: ``decide.inputs.Measured.incomplete``); ``in_flight`` is then at least 1, so
    its drain waits for a complete read or its timeout."""
    machines: int = 1
    """The machines this replica holds: a replica group's open members, else one."""
    cache_blocks: int = 0
    """Prompt blocks its prefix cache holds, as the gateway's index counts them."""
    park_mode: ParkMode | None = None
    """How a parking or parked replica waits."""
    parked_at: datetime | None = None
    """When its park was confirmed (the engine asleep, the machine stopped)."""
    resumed_at: datetime | None = None
    """When it was last resumed; its liveness timeout counts from then."""
    running_usd_per_hour: float | None = None
    """Its price while running, when ``usd_per_hour`` is a stopped machine's (its
    disks); ``None``: ``usd_per_hour``."""
    stopped_usd_per_hour: float | None = None
    """What it would cost stopped (its disks); ``None``: its machine cannot be stopped
    (a spot machine, a private worker)."""
    can_sleep: bool = False
    """Whether its engine was started able to sleep."""
    prefill: bool = False
    """Launched to refill a warm pool: parked once ready, not counted as serving."""
    misfit: bool = False
    """Its GPU shape prefills too few of the measured prompts within the SLO (placement's
    tail rule): drained before any other on a scale-down."""
    warned: bool = False
    """Its provider warned it will reclaim the machine (a spot notice is recorded), with
    or without a time (``reclaim_at``). A warned replica is never parked; with phase
    ``DRAINING`` and no ``drain_requested_at`` it is one still serving
    (:func:`counted_phase`, :func:`heed_spot_notice`)."""
    reclaim_at: datetime | None = None
    """When its provider will reclaim the machine, as its spot notice says (``None``: no
    notice, or a notice without a time: a warned one is then drained at once)."""

    @property
    def still_serving(self) -> bool:
        """Warned of a spot reclaim, counted as draining, its drain not started: the
        gateway still routes to it."""
        return (
            self.phase is ReplicaPhase.DRAINING and self.drain_requested_at is None and self.warned
        )

    @property
    def running_price(self) -> float:
        return self.usd_per_hour if self.running_usd_per_hour is None else self.running_usd_per_hour

    def can_park(self, mode: ParkMode) -> bool:
        if mode is ParkMode.SLEEPING:
            return self.can_sleep
        return self.stopped_usd_per_hour is not None


def counted_phase(phase: ReplicaPhase, *, warned: bool) -> ReplicaPhase:
    """The phase the plan counts a replica in (``ReplicaView.phase``): a ready replica
    warned of its spot reclaim is draining, its drain not started while it may serve on
    (``ReplicaView.still_serving``), so the plan replaces it at the warning. The
    reconciler and the simulator build their views with it alike."""
    if phase is ReplicaPhase.READY and warned:
        return ReplicaPhase.DRAINING
    return phase


@dataclass(frozen=True, slots=True)
class Launch:
    reason: str
    replaces: str | None = None
    """The launch id of the old-generation replica this one replaces, if any."""
    prefill: bool = False
    """A warm pool refill: the replica is parked once ready."""


@dataclass(frozen=True, slots=True)
class Drain:
    launch_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Terminate:
    launch_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Park:
    """Put a drained (or parked) replica's engine to sleep, or stop its machine."""

    launch_id: str
    mode: ParkMode
    reason: str


@dataclass(frozen=True, slots=True)
class Resume:
    """Wake a sleeping replica or start a stopped one: it boots again, then serves."""

    launch_id: str
    reason: str
    replaces: str | None = None


Action = Launch | Drain | Terminate | Park | Resume


@dataclass(frozen=True, slots=True)
class Refusal:
    """A launch the budget refused; ``reason`` carries the numbers."""

    reason: str


@dataclass(frozen=True, slots=True)
class Timeouts:
    scaling_up_sec: float = 1200.0
    scaling_down_sec: float = 120.0


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    refusals: tuple[Refusal, ...] = ()
    requeue_after: float | None = None
    """Seconds until the plan should run again because a timeout falls due (``None``: no
    timeout pending; run on the usual tick)."""

    @property
    def launches(self) -> tuple[Launch, ...]:
        return tuple(a for a in self.actions if isinstance(a, Launch))

    @property
    def resumes(self) -> tuple[Resume, ...]:
        return tuple(a for a in self.actions if isinstance(a, Resume))


@dataclass
class _Ledger:
    """The hourly prices not confirmed terminated, growing with this plan's launches."""

    live: Spend
    limits: BudgetLimits
    fleet: float | None
    launch_usd_per_hour: float | None
    launch_machines: int = 1
    refusals: list[Refusal] = field(default_factory=list)
    launched: int = 0
    more_wanted: bool = False

    def try_launch(self) -> bool:
        if self.launch_usd_per_hour is None:
            self.refusals.append(Refusal("launch not possible: no offer fits (see placement)"))
            return False
        verdict = check_launch(
            live_usd_per_hour=self.live,
            new_usd_per_hour=self.launch_usd_per_hour,
            limits=self.limits,
            fleet_live_usd_per_hour=self.fleet,
            new_instances=self.launch_machines,
        )
        if not verdict.allowed:
            self.refusals.append(Refusal(verdict.reason))
            return False
        self.live = self.live.plus(self.launch_usd_per_hour, machines=self.launch_machines)
        self.launched += 1
        if self.fleet is not None:
            self.fleet += self.launch_usd_per_hour
        return True

    def try_resume(self, r: ReplicaView) -> Refusal | None:
        """Resume ``r`` in the ledger if it fits: its parked price leaves the ledger, its
        running price comes in (same machines). ``None`` when it fits, else the refusal
        (not recorded: the caller may buy a cheaper fresh machine instead)."""
        running = r.running_price
        without = Spend(
            count=max(0, self.live.count - 1),
            total=self.live.total - r.usd_per_hour,
            uniform=None,
            machines=max(0, self.live.machines - r.machines),
        )
        fleet = None if self.fleet is None else self.fleet - r.usd_per_hour
        verdict = check_launch(
            live_usd_per_hour=without,
            new_usd_per_hour=running,
            limits=self.limits,
            fleet_live_usd_per_hour=fleet,
            new_instances=r.machines,
        )
        # A resume that adds nothing (a sleeping engine's machine is paid already) is never
        # refused: a ceiling lowered below the spend must not keep a paid machine asleep.
        if not verdict.allowed and running > r.usd_per_hour:
            reason = verdict.reason.replace("launch refused", f"resume of {r.launch_id} refused", 1)
            return Refusal(reason)
        self.live = without.plus(running, machines=r.machines)
        self.launched += 1
        if self.fleet is not None and fleet is not None:
            self.fleet = fleet + running
        return None


@dataclass
class _Pool:
    """The warm pool as this plan leaves it: parked and parking replicas per mode."""

    policy: WarmPolicy | None
    generation: int
    held: dict[ParkMode, int] = field(default_factory=lambda: dict.fromkeys(ParkMode, 0))

    def mode_for(self, r: ReplicaView, *, serving: bool) -> tuple[ParkMode | None, str]:
        """Where a replica leaving service goes: asleep while that pool has room (and its
        engine can sleep) and its sleep would be held at all, else stopped, else nowhere
        (``None``: terminate it); and why not asleep when its sleep's hold was zero.
        ``serving``: another replica stays ready or starting (a partial scale-down;
        ``WarmPolicy.hold``). A replica warned of its spot reclaim is never parked: it
        would be no start path (:func:`heed_spot_notice`)."""
        if self.policy is None or r.generation < self.generation:
            return None, ""
        if r.warned:
            return None, f"; not parked: its machine is reclaimed {_reclaim_text(r.reclaim_at)}"
        note = ""
        for mode in (ParkMode.SLEEPING, ParkMode.STOPPED):
            if self.held[mode] < self.policy.bound(mode) and r.can_park(mode):
                if mode is ParkMode.SLEEPING:
                    hold = self.policy.hold(
                        ParkMode.SLEEPING,
                        running_usd_per_hour=r.running_price,
                        holding_usd_per_hour=r.running_price,
                        serving=serving,
                        can_stop=self.can_stop(r),
                    )
                    if hold is not None and hold.seconds <= 0:
                        # The scale-down window already spent what sleeping is worth.
                        note = f"; not asleep: its sleep would be held 0s ({hold.text})"
                        continue
                return mode, note
        return None, note

    def can_stop(self, r: ReplicaView) -> bool:
        """Whether ``r`` could be stopped now: its machine can, and the pool has room."""
        return (
            self.policy is not None
            and r.can_park(ParkMode.STOPPED)
            and self.held[ParkMode.STOPPED] < self.policy.bound(ParkMode.STOPPED)
        )

    def text(self, mode: ParkMode) -> str:
        bound = 0 if self.policy is None else self.policy.bound(mode)
        return f"{self.held[mode]}/{bound} {mode.value}"


SPOT_DRAIN_MARGIN_S = 30.0
"""How long before a spot reclaim a warned replica that still serves starts its drain:
time for the requests in flight on it to finish (a chat answer of a few hundred tokens
streams in 5-20 s at 20-50 ms a token; the drain's own ``scaling_down_timeout_sec``
defaults to 120 s for the longest). Of EC2's 120 s warning it leaves 90 s of serving;
GCE's 30 s leaves none, so a GCE replica drains at the warning."""


def _reclaim_text(reclaim_at: datetime | None) -> str:
    return "at a time not known" if reclaim_at is None else f"at {reclaim_at:%H:%M:%S}"


def spot_drain_at(
    reclaim_at: datetime | None, *, margin_s: float = SPOT_DRAIN_MARGIN_S
) -> datetime | None:
    """When a warned replica must start its drain at the latest: ``margin_s`` before its
    reclaim (``None``: the reclaim's time is not known; drain at once)."""
    if reclaim_at is None:
        return None
    return reclaim_at - timedelta(seconds=margin_s)


def heed_spot_notice(
    launch_id: str,
    phase: ReplicaPhase,
    *,
    reason: str,
    now: datetime,
    reclaim_at: datetime | None,
    replaced: bool = False,
    margin_s: float = SPOT_DRAIN_MARGIN_S,
) -> Drain | Terminate | None:
    """What a spot interruption notice asks of a replica in ``phase`` at ``now``:

    * pending or booting: terminate it (it would not serve before the reclaim);
    * ready (or warned and still serving): ``None`` while it may keep serving, that is
      before ``margin_s`` ahead of ``reclaim_at`` and while not ``replaced`` (the replicas
      ready besides the warned ones do not reach the desired count yet); else drain it.
      A reclaim whose time is not known drains it at once;
    * parking or parked (a warm pool's member: its engine asleep, kept as warm
      capacity): terminate it. It is no start path any more (resumed, it would be
      reclaimed); released, it leaves its pool, which the plan refills elsewhere (its
      spot market is skipped for ``unavailable_sec`` by both callers);
    * draining or ending: left as it is (``None``).

    The step counts a warned replica as draining whether or not its drain has started
    (``ReplicaView.still_serving``), so it launches the replacement at the warning, not
    once the machine is gone, while the warned machine serves what the gateway sends it."""
    if phase in _STARTING:
        return Terminate(launch_id, reason)
    if phase in _PARKED:
        return Terminate(launch_id, f"{reason}; parked in the warm pool: released, not resumed")
    if phase is not ReplicaPhase.READY:
        return None
    drain_at = spot_drain_at(reclaim_at, margin_s=margin_s)
    if drain_at is None:
        return Drain(launch_id, f"{reason}; reclaim time not known: drained at once")
    if now >= drain_at:
        return Drain(
            launch_id,
            f"{reason}; {margin_s:g}s or less before the reclaim: drained so its "
            "requests in flight finish",
        )
    if replaced:
        return Drain(launch_id, f"{reason}; its replacement serves: drained")
    return None


def _heed_warned(
    live: Sequence[ReplicaView],
    *,
    ready: int,
    desired: int,
    now: datetime,
    actions: list[Action],
    due: list[float],
) -> None:
    """Start the drain of warned replicas still serving once ``ready`` replicas (ready,
    not warned) reach ``desired``, or at the margin before their reclaim, soonest
    reclaim first; until then wake when the next one is due."""
    warned = sorted(
        (r for r in live if r.still_serving),
        key=lambda r: (r.reclaim_at is not None, r.reclaim_at or now, r.launch_id),
    )
    for r in warned:
        action = heed_spot_notice(
            r.launch_id,
            ReplicaPhase.READY,
            reason=f"spot notice: reclaim {_reclaim_text(r.reclaim_at)}",
            now=now,
            reclaim_at=r.reclaim_at,
            replaced=ready >= desired,
        )
        if action is not None:
            actions.append(action)
            continue
        drain_at = spot_drain_at(r.reclaim_at)
        assert drain_at is not None
        due.append((drain_at - now).total_seconds())


def plan_actions(
    *,
    desired: int,
    replicas: Sequence[ReplicaView],
    spec_generation: int,
    timeouts: Timeouts,
    limits: BudgetLimits,
    launch_usd_per_hour: float | None,
    now: datetime,
    fleet_live_usd_per_hour: float | None = None,
    inherited_usd_per_hour: Sequence[float] = (),
    launch_limit: int | None = None,
    launch_machines: int = 1,
    warm: WarmPolicy | None = None,
    launch_parks: frozenset[ParkMode] | None = None,
) -> Plan:
    """The actions that move ``replicas`` toward ``desired`` replicas of ``spec_generation``.

    ``launch_usd_per_hour`` is the price of the offer placement chose for new replicas
    (``None`` when nothing fits), a replica group of ``launch_machines`` machines when
    above one (each counts against ``max_instances``); the provisioner checks the budget
    again with the price it actually pays. ``fleet_live_usd_per_hour`` is the hourly total
    of every workload's live instances, this one's included (needed when ``limits`` has a
    fleet ceiling).
    ``inherited_usd_per_hour``: instances of a deleted workload of the same slug not yet
    confirmed terminated; they count against this workload's ceilings until they are
    gone. ``launch_limit``: at most this many launches in one plan (the rest come in the
    next, which is then due at once: ``requeue_after`` 0), so one workload's scale-up
    never makes a pass take more than its share. ``warm``: the workload's warm pool
    (``None``: none; every replica leaving is terminated). ``launch_parks``: how a fresh
    launch of the chosen placement could be parked (a spot machine is never stopped, a
    replica group never parked); a refill is launched only for a pool mode it can fill
    (``None``: not known, any).

    Linear in the number of replicas and launches (plus sorting for drains and parked
    replicas).
    """
    if desired < 0:
        raise ValueError(f"desired must be >= 0, got {desired}")
    live = [r for r in replicas if r.phase is not ReplicaPhase.TERMINATED]
    ledger = _Ledger(
        live=Spend.of(
            [*inherited_usd_per_hour, *(r.usd_per_hour for r in live)],
            machines=len(inherited_usd_per_hour) + sum(r.machines for r in live),
        ),
        limits=limits,
        fleet=fleet_live_usd_per_hour,
        launch_usd_per_hour=launch_usd_per_hour,
        launch_machines=launch_machines,
    )
    actions: list[Action] = []
    due: list[float] = []
    pool = _Pool(warm, spec_generation)
    for r in live:
        if r.phase in (ReplicaPhase.PARKING, ReplicaPhase.PARKED) and r.park_mode is not None:
            pool.held[r.park_mode] += 1
    timed_out = _liveness(live, timeouts=timeouts, now=now, actions=actions, due=due)
    active = [
        r
        for r in live
        if (r.phase in _STARTING or r.phase is ReplicaPhase.READY)
        and r.launch_id not in timed_out
        and not in_refill(r, warm)
    ]
    serving = bool(active)
    _heed_warned(
        live,
        ready=sum(r.phase is ReplicaPhase.READY for r in active if r.generation >= spec_generation),
        desired=desired,
        now=now,
        actions=actions,
        due=due,
    )
    _finish_drains(
        live, timeouts=timeouts, now=now, actions=actions, due=due, pool=pool, serving=serving
    )
    resumable = _tend_parked(live, pool=pool, now=now, actions=actions, due=due, serving=serving)
    refilling = [r for r in live if in_refill(r, warm)]
    _converge(
        active,
        desired=desired,
        generation=spec_generation,
        ledger=ledger,
        actions=actions,
        launch_limit=launch_limit,
        draining=sum(r.phase is ReplicaPhase.DRAINING for r in live),
        resumable=resumable,
    )
    _refill(
        refilling,
        pool=pool,
        ledger=ledger,
        actions=actions,
        timed_out=timed_out,
        launch_parks=launch_parks,
    )
    if ledger.more_wanted and ledger.launched == launch_limit:
        due.append(0.0)  # more launches are wanted: the next plan continues at once
    return Plan(
        actions=tuple(actions),
        refusals=tuple(ledger.refusals),
        requeue_after=min(due) if due else None,
    )


def _liveness(
    live: Sequence[ReplicaView],
    *,
    timeouts: Timeouts,
    now: datetime,
    actions: list[Action],
    due: list[float],
) -> set[str]:
    timed_out: set[str] = set()
    for r in live:
        if r.phase not in _STARTING:
            continue
        started = r.resumed_at or r.intent_at
        age = (now - started).total_seconds()
        left = timeouts.scaling_up_sec - age
        if left <= 0:
            timed_out.add(r.launch_id)
            since = "resume" if r.resumed_at else "launch"
            actions.append(
                Terminate(
                    r.launch_id,
                    f"not ready {age:.0f}s after {since} (scaling_up_timeout_sec "
                    f"{timeouts.scaling_up_sec:g}): {r.phase.value} replica given up",
                )
            )
        else:
            due.append(left)
    return timed_out


def _finish_drains(
    live: Sequence[ReplicaView],
    *,
    timeouts: Timeouts,
    now: datetime,
    actions: list[Action],
    due: list[float],
    pool: _Pool,
    serving: bool,
) -> None:
    for r in live:
        if r.phase is not ReplicaPhase.DRAINING or r.still_serving:
            continue
        since = r.drain_requested_at or now
        waited = (now - since).total_seconds()
        left = timeouts.scaling_down_sec - waited
        if r.in_flight == 0:
            reason = f"drained: no request in flight after {waited:.0f}s"
        elif left <= 0 and r.in_flight_unknown is not None:
            reason = (
                f"drain timeout: requests in flight not known after {waited:.0f}s "
                f"(signals incomplete: {r.in_flight_unknown}; scaling_down_timeout_sec "
                f"{timeouts.scaling_down_sec:g})"
            )
        elif left <= 0:
            reason = (
                f"drain timeout: {r.in_flight} request(s) still in flight after "
                f"{waited:.0f}s (scaling_down_timeout_sec {timeouts.scaling_down_sec:g})"
            )
        else:
            due.append(left)
            continue
        mode, note = pool.mode_for(r, serving=serving)
        if mode is None:
            actions.append(Terminate(r.launch_id, reason + note))
            continue
        pool.held[mode] += 1
        actions.append(
            Park(
                r.launch_id,
                mode,
                f"{reason}; park it {_parked_text(r, mode)} (warm pool {pool.text(mode)})" + note,
            )
        )


def _parked_text(r: ReplicaView, mode: ParkMode) -> str:
    if mode is ParkMode.SLEEPING:
        return f"asleep at ${r.running_price:.4g}/h"
    return f"stopped at ${r.stopped_usd_per_hour or 0.0:.4g}/h instead of ${r.running_price:.4g}/h"


def _tend_parked(
    live: Sequence[ReplicaView],
    *,
    pool: _Pool,
    now: datetime,
    actions: list[Action],
    due: list[float],
    serving: bool,
) -> list[ReplicaView]:
    """Terminate parked replicas warned of their spot reclaim, of an older generation,
    beyond their pool's bound or (an automatic pool) past their hold time, stopping a
    sleeping one instead where the stopped pool has room; the rest can be resumed:
    sleeping first, then stopped, newest first.
    ``serving``: another replica is ready or starting (``WarmPolicy.hold``)."""
    parked = sorted(
        (r for r in live if r.phase is ReplicaPhase.PARKED and r.park_mode is not None),
        key=lambda r: ((r.parked_at or now).timestamp(), r.launch_id),
    )
    policy = pool.policy
    kept: list[ReplicaView] = []
    for r in parked:
        mode = r.park_mode
        assert mode is not None
        age = (now - (r.parked_at or now)).total_seconds()
        if r.warned:  # as heed_spot_notice says: no start path, released
            reason = "warned of its spot reclaim: released, not resumed"
        elif policy is None:
            reason = "no warm pool (unset, or the workload is deleted)"
        elif r.generation < pool.generation:
            reason = (
                f"parked replica of generation {r.generation}; the spec is at {pool.generation}"
            )
        elif pool.held[mode] > policy.bound(mode):
            reason = f"warm pool holds {pool.held[mode]} {mode.value}, at most {policy.bound(mode)}"
        else:
            hold = policy.hold(
                mode,
                running_usd_per_hour=r.running_price,
                holding_usd_per_hour=r.usd_per_hour,
                serving=serving,
                can_stop=pool.can_stop(r),
            )
            if hold is None or age < hold.seconds:
                if hold is not None:
                    due.append(hold.seconds - age)
                kept.append(r)
                continue
            reason = f"{mode.value} {age:.0f}s >= hold {hold.seconds:.0f}s ({hold.text})"
            if mode is ParkMode.SLEEPING and pool.can_stop(r):
                pool.held[mode] -= 1
                pool.held[ParkMode.STOPPED] += 1
                actions.append(
                    Park(
                        r.launch_id,
                        ParkMode.STOPPED,
                        f"{reason}: stop it, {_parked_text(r, ParkMode.STOPPED)} "
                        f"(warm pool {pool.text(ParkMode.STOPPED)})",
                    )
                )
                continue
        pool.held[mode] -= 1
        actions.append(Terminate(r.launch_id, f"{reason}: terminate the {mode.value} replica"))
    order = {ParkMode.SLEEPING: 0, ParkMode.STOPPED: 1}
    return sorted(
        kept,
        key=lambda r: (
            order[r.park_mode or ParkMode.STOPPED],
            -(r.parked_at or now).timestamp(),
            r.launch_id,
        ),
    )


def _refilling(r: ReplicaView) -> bool:
    """A refill replica on its way to its first park (after it, it is like any other)."""
    return r.prefill and r.resumed_at is None and r.phase in _REFILL_PHASES


_REFILL_PHASES = frozenset(
    {ReplicaPhase.PENDING, ReplicaPhase.BOOTING, ReplicaPhase.READY, ReplicaPhase.DRAINING}
)


def in_refill(r: ReplicaView, warm: WarmPolicy | None) -> bool:
    """Whether ``r`` is a warm pool refill on its way to its first park: it serves no
    request and counts as no serving replica (without a warm pool any more, it serves
    like the others)."""
    return warm is not None and _refilling(r)


def refill_wanted(
    warm: WarmPolicy | None,
    replicas: Sequence[ReplicaView],
    *,
    generation: int,
    timeouts: Timeouts,
    now: datetime,
) -> bool:
    """Whether an explicit pool is below its refill count with no refill on its way (the
    plan may then launch one, so its placement is needed).

    Counted as :func:`plan_actions` counts them: a refill given up this plan (not ready
    in time, or of an older generation still starting) is not on its way, and a parked
    replica of an older generation (terminated this plan) is not in the pool."""
    if warm is None or not (warm.fill_stopped or warm.fill_sleeping):
        return False
    if any(_refill_on_way(r, generation, timeouts=timeouts, now=now) for r in replicas):
        return False
    held = dict.fromkeys(ParkMode, 0)
    for r in replicas:
        if r.park_mode is None:
            continue
        if r.phase is ReplicaPhase.PARKING or (
            r.phase is ReplicaPhase.PARKED and r.generation >= generation
        ):
            held[r.park_mode] += 1
    return any(held[mode] < warm.fill(mode) for mode in ParkMode)


def _refill_on_way(r: ReplicaView, generation: int, *, timeouts: Timeouts, now: datetime) -> bool:
    """A refill that will be parked: not given up for its boot's time or its generation."""
    if not _refilling(r):
        return False
    if r.phase not in _STARTING:
        return True  # ready or draining: it is parked (or, of an old spec, ended) soon
    age = (now - (r.resumed_at or r.intent_at)).total_seconds()
    return r.generation >= generation and age < timeouts.scaling_up_sec


def _refill(
    refilling: Sequence[ReplicaView],
    *,
    pool: _Pool,
    ledger: _Ledger,
    actions: list[Action],
    timed_out: set[str],
    launch_parks: frozenset[ParkMode] | None,
) -> None:
    """An explicit pool below its refill count: drain refill replicas once ready (they are
    parked once drained; one of an older spec still starting is terminated: it would only
    be terminated once ready, and so is one still starting beyond the room the pool has
    left, the youngest first), and launch one more when none is on its way, for a mode
    the launch can be parked in (``launch_parks``; ``None``: any)."""
    policy = pool.policy
    if policy is None:
        return
    acted = {a.launch_id for a in actions if not isinstance(a, Launch)}
    # Room the pool still has for refills: what it lacks, less the refills ready or
    # draining (parked soonest); one still starting beyond that room (a scale-down filled
    # the pool while it booted) would be bought, booted and terminated at its park.
    room = sum(max(0, policy.fill(mode) - pool.held[mode]) for mode in ParkMode)
    room -= sum(
        1
        for r in refilling
        if r.phase not in _STARTING and r.launch_id not in acted and r.launch_id not in timed_out
    )
    on_way = 0
    for r in sorted(refilling, key=lambda r: (r.intent_at, r.launch_id)):  # oldest kept
        if r.launch_id in timed_out:
            continue
        if r.generation < pool.generation and r.phase in _STARTING:
            actions.append(
                Terminate(
                    r.launch_id,
                    f"warm pool refill of generation {r.generation} while it booted; the "
                    f"spec is at {pool.generation}",
                )
            )
            continue
        if r.phase in _STARTING:
            if room <= 0:
                actions.append(
                    Terminate(
                        r.launch_id,
                        f"warm pool refill no longer needed while it booted: "
                        f"{pool.text(ParkMode.SLEEPING)}, {pool.text(ParkMode.STOPPED)} "
                        f"(keep {policy.fill_sleeping} sleeping, {policy.fill_stopped} stopped)",
                    )
                )
                continue
            room -= 1
        on_way += 1
        if r.phase is ReplicaPhase.READY:
            actions.append(Drain(r.launch_id, "warm pool refill ready: drain it, then park it"))
    if on_way or ledger.launched or ledger.more_wanted:
        return
    for mode in (ParkMode.SLEEPING, ParkMode.STOPPED):
        if pool.held[mode] < policy.fill(mode):
            if launch_parks is not None and mode not in launch_parks:
                continue  # bought, booted, then terminated for want of a way to park it
            if ledger.try_launch():
                actions.append(
                    Launch(
                        f"warm pool refill: {pool.text(mode)}, keep {policy.fill(mode)}",
                        prefill=True,
                    )
                )
            return


def _converge(
    active: Sequence[ReplicaView],
    *,
    desired: int,
    generation: int,
    ledger: _Ledger,
    actions: list[Action],
    launch_limit: int | None,
    draining: int = 0,
    resumable: Sequence[ReplicaView] = (),
) -> None:
    current = [r for r in active if r.generation >= generation]
    old = [r for r in active if r.generation < generation]
    old_ready = [r for r in old if r.phase is ReplicaPhase.READY]
    for r in old:
        if r.phase in _STARTING:
            actions.append(
                Terminate(r.launch_id, f"spec changed to generation {generation} while it booted")
            )
    surplus = len(current) - desired
    if surplus > 0:
        _shed(current, count=surplus, desired=desired, actions=actions)
        current_count = desired
    else:
        current_count = len(current)
    current_ready = sum(1 for r in current if r.phase is ReplicaPhase.READY)
    # Keep ``desired`` replicas ready: drain old ones only as new ones are ready to serve.
    retire = min(len(old_ready), max(0, min(current_ready, desired) + len(old_ready) - desired))
    by_cost = sorted(old_ready, key=_drain_order)
    for r in by_cost[:retire]:
        actions.append(Drain(r.launch_id, f"replaced: generation {r.generation} -> {generation}"))
    old_left = by_cost[retire:]
    want = max(0, desired - current_count)
    room = desired + (SURGE if old_left else 0) - current_count - len(old_left)
    launches = min(want, max(0, room))
    if launch_limit is not None and launches > launch_limit:
        launches = launch_limit
        ledger.more_wanted = True
    parked = list(resumable)
    for index in range(launches):
        replaces = old_left[index].launch_id if index < len(old_left) else None
        reason = _launch_reason(desired, current_count, replaces)
        resumed, skipped = _resume_one(parked, ledger)
        if resumed is not None:
            mode = resumed.park_mode.value if resumed.park_mode else "parked"
            actions.append(
                Resume(resumed.launch_id, f"{reason}: resume the {mode} replica", replaces=replaces)
            )
            continue
        mark = len(ledger.refusals)
        if not ledger.try_launch():
            ledger.refusals[mark:mark] = skipped  # the parked ones did not fit either
            break
        if skipped:
            reason += f" ({'; '.join(f.reason for f in skipped)}: a fresh machine fits)"
        actions.append(Launch(reason, replaces=replaces))
    else:
        return
    starting_new = any(r.phase in _STARTING for r in current)
    at_desired = current_count + len(old_left) >= desired
    launched = ledger.launched > 0
    if old_left and at_desired and not (starting_new or launched or retire or draining):
        # The surge does not fit the budget: replace in place, one at a time (while a
        # replica drains, its price leaves the ledger soon: launch then, drain no more).
        r = old_left[0]
        actions.append(
            Drain(
                r.launch_id,
                f"replaced in place (generation {r.generation} -> {generation}): "
                f"{ledger.refusals[-1].reason}",
            )
        )


def _resume_one(
    parked: list[ReplicaView], ledger: _Ledger
) -> tuple[ReplicaView | None, list[Refusal]]:
    """Resume the first parked replica whose running price fits the budget, taking it and
    those that did not fit off ``parked`` (the ledger only grows within a plan, so one
    that does not fit now fits no later launch of it either)."""
    skipped: list[Refusal] = []
    while parked:
        r = parked.pop(0)
        refusal = ledger.try_resume(r)
        if refusal is None:
            return r, skipped
        skipped.append(refusal)
    return None, skipped


def _shed(
    current: Sequence[ReplicaView], *, count: int, desired: int, actions: list[Action]
) -> None:
    starting = sorted(
        (r for r in current if r.phase in _STARTING), key=lambda r: r.intent_at, reverse=True
    )
    ready = sorted((r for r in current if r.phase is ReplicaPhase.READY), key=_drain_order)
    total = len(current)
    for r in [*starting, *ready][:count]:
        if r.phase in _STARTING:
            actions.append(
                Terminate(r.launch_id, f"scale down {total} -> {desired}: not serving yet")
            )
        else:
            actions.append(
                Drain(
                    r.launch_id,
                    f"scale down {total} -> {desired}: ${r.usd_per_hour:.4g}/h, "
                    f"{r.cache_blocks} cached prefix blocks; most expensive, coldest "
                    "cache and newest first",
                )
            )


def _drain_order(r: ReplicaView) -> tuple[bool, float, int, float, str]:
    """A misfit shape first, then most expensive, then the coldest prefix cache, then
    newest (latest ready) first, then by launch id."""
    ready = r.ready_at.timestamp() if r.ready_at else r.intent_at.timestamp()
    return (not r.misfit, -r.usd_per_hour, r.cache_blocks, -ready, r.launch_id)


def _launch_reason(desired: int, current: int, replaces: str | None) -> str:
    if replaces is not None:
        return f"replace {replaces} (spec drift) with a surge replica"
    return f"scale up {current} -> {desired}"
