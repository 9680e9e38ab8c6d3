"""The spot interruption rate the controller measures. Pure.

The spot spares (``decide.scaling.spot_spares``) weigh how often a spot machine is
interrupted. The controller does not know its markets' rates; it measures them from its
own record, and the trace simulator builds the same record from its own machines
(``autoscaler.sim.world``), so both feed the step the same estimate:

* **Record.** One :class:`SpotLife` per spot machine the workload bought: when it was
  launched, when its exposure ended (the controller began to drain or terminate it, or
  the provider ended it; ``None``: still running) and whether it ended by a provider
  interruption (a spot notice, or the provider showing it interrupted). The reconciler
  reads the workload's ledger rows (``autoscaler.reconcile.liveness.spot_life``).
* **Window.** Only the last :data:`SPOT_RATE_WINDOW_SEC` (7 days) count: the machine-hours
  inside it and the interruptions whose machine ended inside it. Markets change; a week
  is the span of the prior's own assumption.
* **Prior.** A Gamma-Poisson posterior mean: ``(PRIOR_INTERRUPTIONS + interruptions) /
  (PRIOR_HOURS + spot machine-hours)``, the prior one interruption in 168 machine-hours
  (:data:`DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR`, one a machine-week). Its weight is that of
  one machine-week observed with one interruption in it: shape 1, an exponential prior
  whose spread equals its mean. A smaller shape would be vaguer but would also pull the
  estimate towards zero after any quiet run (as the shape goes to zero, no interruption
  yet reads as a rate of zero, and no spare is kept until the first one), a larger one
  would hold an unmeasured assumption longer. Shape 1 is a choice between the two, not
  a fit. Once
  the workload's spot machines have run a machine-week, what they showed weighs as much
  as the assumption; after ten, ten times as much.

Scope: the workload's own spot machines, all its markets together. A fleet-wide rate per
market (provider, region, GPU) would learn faster and is what a real rate depends on,
but it reads every workload's rows at each step; one workload's rows are one query by
its index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

SPOT_PRIOR_INTERRUPTIONS = 1.0
"""The prior's interruptions (its Gamma shape)."""

SPOT_PRIOR_HOURS = 168.0
"""The prior's spot machine-hours (its Gamma rate): one machine-week."""

DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR = SPOT_PRIOR_INTERRUPTIONS / SPOT_PRIOR_HOURS
"""Interruptions per spot machine-hour assumed before any is measured: one a
machine-week. The simulated cloud interrupts at its own rate
(``autoscaler.sim.world.CloudSettings``: 0.2 an hour), which the controller learns."""

SPOT_RATE_WINDOW_SEC = 7 * 86400.0
"""How far back the record counts."""


@dataclass(frozen=True, slots=True)
class SpotLife:
    """One spot machine as the record keeps it."""

    started_at: datetime
    """When it was launched."""
    ended_at: datetime | None
    """When its exposure ended: the controller began to drain or terminate it, or the
    provider ended it (``None``: still running)."""
    interrupted: bool
    """Ended by a provider interruption (a spot notice, or shown interrupted)."""


@dataclass(frozen=True, slots=True)
class SpotRate:
    """Interruptions and spot machine-hours measured within the window, and the rate
    they give with the prior."""

    interruptions: int = 0
    hours: float = 0.0

    def __post_init__(self) -> None:
        if self.interruptions < 0 or not self.hours >= 0:  # NaN too
            raise ValueError(f"a spot record cannot be negative: {self}")

    @property
    def per_hour(self) -> float:
        """The posterior mean: interruptions per spot machine-hour."""
        return (SPOT_PRIOR_INTERRUPTIONS + self.interruptions) / (SPOT_PRIOR_HOURS + self.hours)

    def basis(self) -> str:
        """How the rate was measured, for a decision's reason."""
        plural = "" if self.interruptions == 1 else "s"
        return (
            f"{self.interruptions} interruption{plural} in {self.hours:.1f} spot "
            f"machine-hours of the last {SPOT_RATE_WINDOW_SEC / 86400:g} days (prior "
            f"{SPOT_PRIOR_INTERRUPTIONS:g} per {SPOT_PRIOR_HOURS:g} h) = {self.per_hour:.3g}/h"
        )


PRIOR_SPOT_RATE = SpotRate()
"""Nothing measured yet: the prior alone."""


def spot_rate(
    lives: Iterable[SpotLife], *, now: datetime, window_s: float = SPOT_RATE_WINDOW_SEC
) -> SpotRate:
    """The record of ``lives`` within ``window_s`` before ``now``: the machine-hours each
    ran inside the window, and the interruptions that ended one inside it. O(n)."""
    since = now - timedelta(seconds=window_s)
    hours = 0.0
    interruptions = 0
    for life in lives:
        end = now if life.ended_at is None else min(life.ended_at, now)
        start = max(life.started_at, since)
        if end > start:
            hours += (end - start).total_seconds() / 3600.0
        if life.interrupted and life.ended_at is not None and since < life.ended_at <= now:
            interruptions += 1
    return SpotRate(interruptions=interruptions, hours=hours)
