"""Warm pools: which start path a replica takes, and how long a parked one is kept. Pure.

A replica can start three ways, fastest first:

* **wake** a sleeping engine: the machine runs and the engine holds its weights in host
  memory (vLLM sleep mode level 1) or drops them (level 2); waking takes seconds.
  A sleeping replica costs its machine's full price.
* **start** a stopped machine of ours: its disk already holds the image and weights, so
  only the machine's start and the engine's load remain (about a minute). A stopped
  machine costs its disks (``catalog.storage``).
* **launch** a fresh machine: buy, boot, pull the image, download the weights (minutes).

Scale-up takes the fastest path available (``decide.plan``: sleeping replicas first,
then stopped ones, then fresh launches). Scale-down parks a drained replica before it
terminates it, and keeps it parked only while that is cheaper than buying it again:

**The hold rule (ski rental).** Keeping a parked replica costs its holding price per
second (the machine's price asleep, its disks' price stopped). Buying again instead costs
the seconds of lead time the parked path saves, each valued at
:data:`WAIT_VALUE` machine-seconds (the machine is paid while it boots, and the capacity
it would bring is missing meanwhile). So a parked replica is kept for

    hold = saved_seconds * WAIT_VALUE * running_price / holding_price

and then moves down a path: a sleeping engine is stopped (when its machine can stop and
the stopped pool has room), a stopped machine is terminated. Holding for exactly the
re-buy cost is the deterministic ski-rental rule: whatever the next burst's timing, it
never pays more than twice what the best choice in hindsight would have paid. A sleeping
replica of a fleet scaled to zero is held about ``2 * (fresh - wake)`` seconds (six to
eight minutes for a three- to four-minute boot): every request waits through the lead
time there, so the wake is priced against a fresh machine, not against the stopped
machine it becomes next (``docs/decisions.md``: pricing it against the start lost the
scale-from-zero scenario). A stopped one is held for hours, because disks cost about a
hundredth of the machine: it covers the night between two diurnal peaks.

**A replica leaving a fleet that keeps serving** (another replica ready or starting) was
already held ready, at its full price and past the load that needed it, for the
scale-down window (``scale_down_time_window_sec``, :attr:`WarmPolicy.held_ready_s`)
before it drained: that is rent already paid towards the same re-buy. Its sleep is
priced against the path it takes next (the stopped machine's start where it can stop,
else a fresh machine), less that window:

    hold = max(0, (next_s - wake_s) * WAIT_VALUE * running_price / sleeping_price - window)

With a 300 s window that is zero for the simulator's paths (a 75 s start, a 0.74 s wake)
and for :data:`DEFAULT_START_TIMES` (60 s, 10 s): the replica is stopped at once instead
of sleeping at its full price. A spot machine, which cannot stop, sleeps
``2 * (fresh - wake) - window`` seconds (about three minutes for a four-minute boot). The
sleep buys only time: the controller scales up reactively, so a replica is billed from
the ask whatever path it takes, and a faster path brings capacity sooner but saves no
dollars (``docs/decisions.md`` has the measurement).

The spec bounds the pools (``warm_pool: {stopped: N, sleeping: M}``): at most N stopped
machines and M sleeping engines, each kept without expiry, and refilled up to N and M
(a fresh replica is launched, made ready, then parked) so the pool is there before the
first burst; a refill is launched only where placement gives a replica that can park
that way (a spot machine or a replica group is never stopped). ``warm_pool: auto``
keeps what scale-downs leave, up to ``max_workers`` of each kind, for the hold time
above, and refills nothing. Unset: no warm pool (every replica leaving is terminated, as
before warm pools).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from autoscaler.spec import SLEEPING_BACKENDS, AutoscalingPolicy, WarmPoolSpec, WorkloadSpec

WAIT_VALUE = 2.0
"""Machine-seconds one second of lead time is worth: the second paid while a fresh
machine boots, and the second of capacity missing while it does."""

MAX_HOLD_SEC = 7 * 24 * 3600.0
"""The longest an automatic pool keeps a parked replica, whatever the prices say."""


class ParkMode(StrEnum):
    """How a parked replica waits: its machine stopped, or its engine asleep."""

    STOPPED = "stopped"
    SLEEPING = "sleeping"


@dataclass(frozen=True, slots=True)
class StartTimes:
    """Median seconds from asking to ready, per start path, for the workload's offers.

    The controller measures them (launch to ready, start to ready, wake to ready) and
    falls back to :data:`DEFAULT_START_TIMES` until it has a measurement."""

    fresh_s: float
    start_s: float
    wake_s: float

    def __post_init__(self) -> None:
        for name in ("fresh_s", "start_s", "wake_s"):
            value = getattr(self, name)
            if not value >= 0:  # NaN too
                raise ValueError(f"{name} must be >= 0, got {value}")


DEFAULT_START_TIMES = StartTimes(fresh_s=180.0, start_s=60.0, wake_s=10.0)
"""Before anything is measured: a fresh GPU machine ready in three minutes (the
simulator's median boot), a stopped one in one (the machine's start and the engine's
load from the local disk), a sleeping vLLM engine in ten seconds (the upper end of
vLLM's published 0.1-6 s wake times, with the readiness check on top)."""


@dataclass(frozen=True, slots=True)
class WarmPolicy:
    """What the plan enforces for one workload's warm pool."""

    max_stopped: int
    max_sleeping: int
    fill_stopped: int = 0
    """Stopped machines to keep even without a scale-down to leave them (a refill)."""
    fill_sleeping: int = 0
    expire: bool = True
    """Whether parked replicas leave after their hold time (automatic pools); an explicit
    pool keeps its replicas until it shrinks."""
    times: StartTimes = DEFAULT_START_TIMES
    sleep_level: int = 1
    held_ready_s: float = 0.0
    """Seconds a replica leaving a fleet that keeps serving was held ready before it
    drained (an automatic pool: the scale-down window); rent already paid against its
    sleep's hold."""

    def __post_init__(self) -> None:
        for name in ("max_stopped", "max_sleeping", "fill_stopped", "fill_sleeping"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.held_ready_s >= 0:  # NaN too
            raise ValueError(f"held_ready_s must be >= 0, got {self.held_ready_s}")
        if self.fill_stopped > self.max_stopped or self.fill_sleeping > self.max_sleeping:
            raise ValueError("a pool's refill cannot exceed its bound")

    def bound(self, mode: ParkMode) -> int:
        return self.max_stopped if mode is ParkMode.STOPPED else self.max_sleeping

    def fill(self, mode: ParkMode) -> int:
        return self.fill_stopped if mode is ParkMode.STOPPED else self.fill_sleeping

    def saved_seconds(self, mode: ParkMode) -> float:
        """Lead time a replica parked this way saves against a fresh launch."""
        faster = self.times.start_s if mode is ParkMode.STOPPED else self.times.wake_s
        return max(0.0, self.times.fresh_s - faster)

    def hold(
        self,
        mode: ParkMode,
        *,
        running_usd_per_hour: float,
        holding_usd_per_hour: float,
        serving: bool = False,
        can_stop: bool = False,
    ) -> Hold | None:
        """How long a replica parked this way is kept, and why (``None``: until the pool
        shrinks). ``serving``: another replica of the fleet is ready or starting;
        ``can_stop``: a sleeping replica would be stopped next (its machine can stop and
        the stopped pool has room), not terminated. Constant time; the module docstring
        has the rule."""
        if not self.expire:
            return None
        window = 0.0
        if mode is ParkMode.SLEEPING and serving:
            next_s = self.times.start_s if can_stop else self.times.fresh_s
            saved = max(0.0, next_s - self.times.wake_s)
            path = "a stopped machine's start" if can_stop else "a fresh machine"
            window = self.held_ready_s
        else:
            saved = self.saved_seconds(mode)
            path = "a fresh machine"
        text = (
            f"{saved:.0f}s faster than {path} x {WAIT_VALUE:g} x ${running_usd_per_hour:.4g}/h "
            f"running / ${holding_usd_per_hour:.4g}/h parked"
        )
        if holding_usd_per_hour <= 0:
            return Hold(MAX_HOLD_SEC, text)
        budget = min(MAX_HOLD_SEC, saved * WAIT_VALUE * running_usd_per_hour / holding_usd_per_hour)
        if window > 0:
            text += f", less the {window:.0f}s the scale-down window held it ready"
        return Hold(max(0.0, budget - window), text)

    def hold_seconds(
        self,
        mode: ParkMode,
        *,
        running_usd_per_hour: float,
        holding_usd_per_hour: float,
        serving: bool = False,
        can_stop: bool = False,
    ) -> float | None:
        """:meth:`hold`'s seconds."""
        found = self.hold(
            mode,
            running_usd_per_hour=running_usd_per_hour,
            holding_usd_per_hour=holding_usd_per_hour,
            serving=serving,
            can_stop=can_stop,
        )
        return None if found is None else found.seconds


@dataclass(frozen=True, slots=True)
class Hold:
    """How long a parked replica is kept, and the arithmetic behind it."""

    seconds: float
    text: str


def warm_policy_of(
    spec: WorkloadSpec, *, times: StartTimes | None = None, deleted: bool = False
) -> WarmPolicy | None:
    """The warm pool ``spec`` asks for (``None``: none, or the workload is deleted)."""
    if deleted:
        return None
    policy = spec.execution_policy_config
    if not isinstance(policy, AutoscalingPolicy) or policy.warm_pool is None:
        return None
    measured = times or DEFAULT_START_TIMES
    pool = policy.warm_pool
    if isinstance(pool, WarmPoolSpec):
        return WarmPolicy(
            max_stopped=pool.stopped,
            max_sleeping=pool.sleeping,
            fill_stopped=pool.stopped,
            fill_sleeping=pool.sleeping,
            expire=False,
            times=measured,
            sleep_level=pool.sleep_level,
        )
    return WarmPolicy(
        max_stopped=policy.max_workers,
        max_sleeping=policy.max_workers if spec.backend in SLEEPING_BACKENDS else 0,
        expire=True,
        times=measured,
        held_ready_s=policy.scale_down_time_window_sec,
    )


class StartPath(StrEnum):
    """The way a replica became ready: bought fresh, its stopped machine started, or its
    sleeping engine woken."""

    LAUNCH = "launch"
    START = "start"
    WAKE = "wake"


@dataclass(frozen=True, slots=True)
class StartSample:
    """One replica's measured seconds from asking to ready, by path and offer."""

    offer_key: str
    path: StartPath
    seconds: float


def start_sample(
    *,
    offer_key: str,
    intent_at: datetime,
    ready_at: datetime | None,
    resumed_at: datetime | None,
    resumed_from: str | None,
) -> StartSample | None:
    """The sample a replica's stored facts give (``None``: not ready since it was last
    launched or resumed). ``resumed_from``: the park mode it was resumed from (``None``
    where unknown: a replica parked again since keeps no trace of its last path)."""
    if ready_at is None:
        return None
    if resumed_at is None:
        return StartSample(offer_key, StartPath.LAUNCH, (ready_at - intent_at).total_seconds())
    if resumed_from is None:
        return None
    path = StartPath.WAKE if resumed_from == ParkMode.SLEEPING.value else StartPath.START
    return StartSample(offer_key, path, max(0.0, (ready_at - resumed_at).total_seconds()))


def start_medians(samples: Sequence[StartSample]) -> dict[tuple[str, StartPath], tuple[float, int]]:
    """Median seconds and sample count per (offer, path). Sorting: O(n log n)."""
    grouped: dict[tuple[str, StartPath], list[float]] = {}
    for sample in samples:
        grouped.setdefault((sample.offer_key, sample.path), []).append(sample.seconds)
    return {key: (statistics.median(values), len(values)) for key, values in grouped.items()}


def start_times_from(
    samples: Sequence[StartSample], *, fallback: StartTimes = DEFAULT_START_TIMES
) -> StartTimes | None:
    """The workload's start times: per path, the median over its offers' samples, the
    fallback's where a path has none (``None``: no sample at all)."""
    if not samples:
        return None
    by_path: dict[StartPath, list[float]] = {}
    for sample in samples:
        by_path.setdefault(sample.path, []).append(sample.seconds)

    def median(path: StartPath, default: float) -> float:
        found = by_path.get(path)
        return max(0.0, statistics.median(found)) if found else default

    return StartTimes(
        fresh_s=median(StartPath.LAUNCH, fallback.fresh_s),
        start_s=median(StartPath.START, fallback.start_s),
        wake_s=median(StartPath.WAKE, fallback.wake_s),
    )
