"""From a desired replica count and the replicas observed, to actions.

Level-based: the plan depends only on what is observed now, so running it again after a
crash or a missed event gives the same actions. The rules:

* **Liveness.** A pending or booting replica older than ``scaling_up_timeout_sec``
  (counted from its intent) is terminated: it will not become ready.
* **Drain, then terminate.** A draining replica is terminated once nothing is in flight
  on it, or once ``scaling_down_timeout_sec`` has passed since the drain was asked.
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
* **Budget per launch.** Each launch is checked with :func:`budget.check_launch` against
  every replica not confirmed terminated, the launches of this plan included; a refused
  launch becomes a :class:`Refusal` with the numbers.

``requeue_after`` is the time until the nearest timeout (a booting replica's liveness
limit or a drain's deadline), so the reconciler wakes exactly when something is due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from autoscaler.decide.budget import BudgetLimits, Spend, check_launch

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


_STARTING = frozenset({ReplicaPhase.PENDING, ReplicaPhase.BOOTING})


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
    machines: int = 1
    """The machines this replica holds: a replica group's open members, else one."""
    cache_blocks: int = 0
    """Prompt blocks its prefix cache holds, as the gateway's index counts them."""


@dataclass(frozen=True, slots=True)
class Launch:
    reason: str
    replaces: str | None = None
    """The launch id of the old-generation replica this one replaces, if any."""


@dataclass(frozen=True, slots=True)
class Drain:
    launch_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Terminate:
    launch_id: str
    reason: str


Action = Launch | Drain | Terminate


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
    never makes a pass take more than its share.

    Linear in the number of replicas and launches (plus sorting for drains).
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
    timed_out = _liveness(live, timeouts=timeouts, now=now, actions=actions, due=due)
    _finish_drains(live, timeouts=timeouts, now=now, actions=actions, due=due)
    active = [
        r
        for r in live
        if (r.phase in _STARTING or r.phase is ReplicaPhase.READY) and r.launch_id not in timed_out
    ]
    _converge(
        active,
        desired=desired,
        generation=spec_generation,
        ledger=ledger,
        actions=actions,
        launch_limit=launch_limit,
        draining=sum(r.phase is ReplicaPhase.DRAINING for r in live),
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
        age = (now - r.intent_at).total_seconds()
        left = timeouts.scaling_up_sec - age
        if left <= 0:
            timed_out.add(r.launch_id)
            actions.append(
                Terminate(
                    r.launch_id,
                    f"not ready {age:.0f}s after launch (scaling_up_timeout_sec "
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
) -> None:
    for r in live:
        if r.phase is not ReplicaPhase.DRAINING:
            continue
        since = r.drain_requested_at or now
        waited = (now - since).total_seconds()
        left = timeouts.scaling_down_sec - waited
        if r.in_flight == 0:
            actions.append(
                Terminate(r.launch_id, f"drained: no request in flight after {waited:.0f}s")
            )
        elif left <= 0:
            actions.append(
                Terminate(
                    r.launch_id,
                    f"drain timeout: {r.in_flight} request(s) still in flight after "
                    f"{waited:.0f}s (scaling_down_timeout_sec {timeouts.scaling_down_sec:g})",
                )
            )
        else:
            due.append(left)


def _converge(
    active: Sequence[ReplicaView],
    *,
    desired: int,
    generation: int,
    ledger: _Ledger,
    actions: list[Action],
    launch_limit: int | None,
    draining: int = 0,
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
    for index in range(launches):
        replaces = old_left[index].launch_id if index < len(old_left) else None
        if not ledger.try_launch():
            break
        actions.append(Launch(_launch_reason(desired, current_count, replaces), replaces=replaces))
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


def _drain_order(r: ReplicaView) -> tuple[float, int, float, str]:
    """Most expensive first, then the coldest prefix cache, then newest (latest ready)
    first, then by launch id."""
    ready = r.ready_at.timestamp() if r.ready_at else r.intent_at.timestamp()
    return (-r.usd_per_hour, r.cache_blocks, -ready, r.launch_id)


def _launch_reason(desired: int, current: int, replaces: str | None) -> str:
    if replaces is not None:
        return f"replace {replaces} (spec drift) with a surge replica"
    return f"scale up {current} -> {desired}"
