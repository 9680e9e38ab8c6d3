"""May this launch happen? The hard dollar ceiling, checked before every purchase.

A launch is allowed when, counting every instance of the workload that is not confirmed
terminated (pending intents, booting, ready, draining and terminating alike) plus the new
one:

* the workload's hourly total stays within its ``max_hourly_cost_usd``;
* that total stays within the cloud pool's ``max_hourly_cost_usd`` (the pool belongs to
  the workload, so it is the same sum against a second ceiling);
* the instance count stays within the pool's ``max_instances``: machines, so a replica
  group counts each of its members, and a new group all of its own;
* the fleet's hourly total (every workload the controller runs) stays within the
  fleet-wide ceiling of the controller's configuration.

A refusal names the numbers: "launch refused: 3 x $4.10/h + $4.10/h = $16.40/h would
exceed the workload ceiling $15.00/h".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.spec import AutoscalingPolicy

_EPSILON_USD = 1e-9  # sums of float prices must not refuse a launch that fits exactly


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """The ceilings a launch must stay within; ``None`` means no such ceiling."""

    workload_usd_per_hour: float | None = None
    pool_usd_per_hour: float | None = None
    max_instances: int | None = None
    fleet_usd_per_hour: float | None = None


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """Whether a launch may happen, why, and the hourly totals it would make."""

    allowed: bool
    reason: str
    workload_usd_per_hour: float
    """The workload's total with the launch."""
    fleet_usd_per_hour: float | None
    """The fleet's total with the launch (``None`` when the fleet total was not given)."""


def limits_for(
    policy: AutoscalingPolicy | None, *, fleet_usd_per_hour: float | None = None
) -> BudgetLimits:
    """The ceilings an autoscaling policy sets (none for fixed or scheduled workloads,
    which the fleet ceiling alone bounds)."""
    if policy is None:
        return BudgetLimits(fleet_usd_per_hour=fleet_usd_per_hour)
    pool = policy.cloud_pool
    return BudgetLimits(
        workload_usd_per_hour=policy.max_hourly_cost_usd,
        pool_usd_per_hour=None if pool is None else pool.max_hourly_cost_usd,
        max_instances=None if pool is None else pool.max_instances,
        fleet_usd_per_hour=fleet_usd_per_hour,
    )


@dataclass(frozen=True, slots=True)
class Spend:
    """A workload's replicas not confirmed terminated, summed: their count, their hourly
    total, their one price when they all cost the same (for the refusal's text), and the
    machines they hold (a replica group holds one per member).

    A plan adds its launches one at a time with :meth:`plus`, in constant time, so that
    checking n launches costs O(n), not O(n²)."""

    count: int = 0
    total: float = 0.0
    uniform: float | None = None
    machines: int = 0

    @classmethod
    def of(cls, prices: Sequence[float], *, machines: int | None = None) -> Spend:
        """``machines``: the machines the replicas hold (default: one each)."""
        distinct = set(prices)
        return cls(
            count=len(prices),
            total=sum(prices),
            uniform=next(iter(distinct)) if len(distinct) == 1 else None,
            machines=len(prices) if machines is None else machines,
        )

    def plus(self, price: float, *, machines: int = 1) -> Spend:
        same = self.count == 0 or self.uniform == price
        return Spend(
            count=self.count + 1,
            total=self.total + price,
            uniform=price if same else None,
            machines=self.machines + machines,
        )


def check_launch(
    *,
    live_usd_per_hour: Sequence[float] | Spend,
    new_usd_per_hour: float,
    limits: BudgetLimits,
    fleet_live_usd_per_hour: float | None = None,
    new_instances: int = 1,
) -> BudgetVerdict:
    """Whether one more replica at ``new_usd_per_hour`` fits: one machine, or a replica
    group of ``new_instances`` machines priced whole.

    ``live_usd_per_hour``: the hourly price of each of the workload's instances not
    confirmed terminated, pending intents included (or their :class:`Spend`).
    ``fleet_live_usd_per_hour``: the same sum over every workload (this one included);
    needed when ``limits`` has a fleet ceiling.
    """
    if new_usd_per_hour < 0:
        raise ValueError(f"new_usd_per_hour must be >= 0, got {new_usd_per_hour}")
    live = (
        live_usd_per_hour if isinstance(live_usd_per_hour, Spend) else Spend.of(live_usd_per_hour)
    )
    workload_total = live.total + new_usd_per_hour
    fleet_total = (
        None if fleet_live_usd_per_hour is None else fleet_live_usd_per_hour + new_usd_per_hour
    )
    sum_text = f"{_terms(live, new_usd_per_hour)} = {_usd(workload_total)}/h"

    def verdict(allowed: bool, reason: str) -> BudgetVerdict:
        return BudgetVerdict(
            allowed=allowed,
            reason=reason,
            workload_usd_per_hour=workload_total,
            fleet_usd_per_hour=fleet_total,
        )

    if new_instances < 1:
        raise ValueError(f"new_instances must be >= 1, got {new_instances}")
    count = live.machines + new_instances
    if limits.max_instances is not None and count > limits.max_instances:
        added = "1" if new_instances == 1 else f"a group of {new_instances}"
        return verdict(
            False,
            f"launch refused: {live.machines} instance(s) + {added} = {count} would exceed "
            f"max_instances {limits.max_instances}",
        )
    for name, ceiling in (
        ("workload", limits.workload_usd_per_hour),
        ("cloud pool", limits.pool_usd_per_hour),
    ):
        if ceiling is not None and workload_total > ceiling + _EPSILON_USD:
            return verdict(
                False,
                f"launch refused: {sum_text} would exceed the {name} ceiling {_usd(ceiling)}/h",
            )
    if limits.fleet_usd_per_hour is not None:
        if fleet_total is None:
            raise ValueError("a fleet ceiling needs fleet_live_usd_per_hour")
        if fleet_total > limits.fleet_usd_per_hour + _EPSILON_USD:
            return verdict(
                False,
                f"launch refused: fleet {_usd(fleet_total - new_usd_per_hour)}/h + "
                f"{_usd(new_usd_per_hour)}/h = {_usd(fleet_total)}/h would exceed the fleet "
                f"ceiling {_usd(limits.fleet_usd_per_hour)}/h",
            )
    return verdict(True, f"launch allowed: {sum_text}{_headroom(limits, workload_total)}")


def _terms(live: Spend, new: float) -> str:
    if not live.count:
        return f"{_usd(new)}/h"
    if live.uniform is not None:
        held = f"{live.count} x {_usd(live.uniform)}/h"
    else:
        held = f"{_usd(live.total)}/h ({live.count} instances)"
    return f"{held} + {_usd(new)}/h"


def _headroom(limits: BudgetLimits, total: float) -> str:
    ceilings = [c for c in (limits.workload_usd_per_hour, limits.pool_usd_per_hour) if c]
    if not ceilings:
        return ""
    return f" within the ceiling {_usd(min(ceilings))}/h"


def _usd(amount: float) -> str:
    """Dollars with cents, and up to two more digits where a spot price has them."""
    text = f"{amount:,.4f}"
    whole, cents = text.split(".")
    return f"${whole}.{cents[:2]}{cents[2:].rstrip('0')}"
