"""A simulated cloud: prices, boot times, stock-outs and spot interruptions on a clock.

It drives ``autoscaler simulate`` and the benchmarks, and keeps the same provider
contract as AWS and GCP. All randomness is drawn from one seeded generator at launch time
(stock-out, boot time, spot lifetime, in that order), and every later state is a function
of the clock, so a run is reproducible for a seed however often it is observed.

Billing runs from launch to termination (or interruption) at the offer's price for the
market bought; terminated and interrupted instances stay listed for
``gone_visible_seconds``, as EC2 keeps showing terminated instances for a while.
"""

from __future__ import annotations

import builtins
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from catalog.model import ProviderName
from providers.base import (
    CLUSTER_TAG,
    Clock,
    Instance,
    InstanceState,
    InsufficientCapacity,
    LaunchRequest,
    NotFound,
    ProviderError,
    QuotaExceeded,
    SpotInterruption,
    pick_for_launch,
    utc,
)


class BootTimeDistribution(Protocol):
    """Seconds from launch until an instance is running."""

    def sample(self, rng: random.Random) -> float: ...


@dataclass(frozen=True, slots=True)
class LogNormalBootTime:
    """Boot times with a long right tail: most near the median, a few much slower."""

    median_seconds: float = 180.0
    sigma: float = 0.35

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median_seconds), self.sigma)


@dataclass(frozen=True, slots=True)
class FixedBootTime:
    seconds: float

    def sample(self, rng: random.Random) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """The simulated cloud's behaviour.

    ``stockout_probability`` is the chance that a launch finds its offer stocked out; the
    offer then stays out for ``stockout_seconds``. ``spot_interruptions_per_hour`` is the
    hazard rate of each spot instance. ``gpu_quota`` caps the GPUs of live instances.
    """

    seed: int = 0
    boot_time: BootTimeDistribution = field(default_factory=LogNormalBootTime)
    stockout_probability: float = 0.0
    stockout_seconds: float = 900.0
    spot_interruptions_per_hour: float = 0.0
    gpu_quota: int | None = None
    gone_visible_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.stockout_probability <= 1.0:
            raise ValueError(
                f"SimulationConfig.stockout_probability must be in [0, 1], "
                f"got {self.stockout_probability}"
            )
        if self.spot_interruptions_per_hour < 0:
            raise ValueError("SimulationConfig.spot_interruptions_per_hour must be >= 0")


@dataclass(slots=True)
class _Machine:
    request: LaunchRequest
    instance_id: str
    launched_at: float
    running_at: float
    price_per_hour: float
    interrupt_at: float | None
    ended_at: float | None = None
    ended_by: InstanceState | None = None

    def end(self, *, now: float) -> tuple[float, InstanceState] | None:
        """When and how the machine ended by ``now``, or ``None`` while it lives."""
        ends: list[tuple[float, InstanceState]] = []
        if self.ended_at is not None and self.ended_by is not None:
            ends.append((self.ended_at, self.ended_by))
        if self.interrupt_at is not None and self.interrupt_at <= now:
            ends.append((self.interrupt_at, InstanceState.INTERRUPTED))
        return min(ends, key=lambda end: end[0]) if ends else None

    def state(self, *, now: float) -> InstanceState:
        end = self.end(now=now)
        if end is not None:
            return end[1]
        return InstanceState.RUNNING if now >= self.running_at else InstanceState.PENDING

    def cost_usd(self, *, now: float) -> float:
        end = self.end(now=now)
        stop = min(now, end[0]) if end else now
        return max(0.0, stop - self.launched_at) / 3600.0 * self.price_per_hour

    def snapshot(self, *, now: float) -> Instance:
        offer = self.request.offer
        return Instance(
            provider=ProviderName.SIMULATED,
            instance_id=self.instance_id,
            launch_id=self.request.launch_id,
            zone=offer.zone,
            instance_type=offer.instance_type,
            state=self.state(now=now),
            spot=self.request.spot,
            launched_at=utc(self.launched_at),
            tags=self.request.tags,
            private_address=f"10.200.{int(self.instance_id[-6:]) // 250}."
            f"{int(self.instance_id[-6:]) % 250 + 2}",
        )


class SimulatedCloud:
    """The simulated world. Providers are views on it: :meth:`provider` makes one."""

    def __init__(self, *, clock: Clock, config: SimulationConfig | None = None) -> None:
        self.clock = clock
        self.config = config or SimulationConfig()
        self._rng = random.Random(self.config.seed)
        self._machines: dict[str, _Machine] = {}
        self._by_token: dict[str, str] = {}
        self._stocked_out_until: dict[str, float] = {}
        self._ids = itertools.count(1)
        self.launch_error: type[ProviderError] | None = None
        """While set, every launch fails with this error (e.g. ``Transient`` throttling)."""

    def provider(self, name: str = "simulated") -> SimulatedProvider:
        return SimulatedProvider(self, name=name)

    # Levers for tests and scenarios.

    def stock_out(self, offer_key: str, *, for_seconds: float = math.inf) -> None:
        """The offer (``Offer.key``) has no capacity for ``for_seconds`` from now."""
        self._stocked_out_until[offer_key] = self.clock.now() + for_seconds

    def restock(self, offer_key: str) -> None:
        self._stocked_out_until.pop(offer_key, None)

    def interrupt(self, instance_id: str) -> None:
        """Reclaim a spot instance now."""
        machine = self._machine(instance_id)
        if not machine.request.spot:
            raise ValueError(f"{instance_id} is on-demand; only spot instances are interrupted")
        now = self.clock.now()
        if machine.end(now=now) is None:
            machine.interrupt_at = now

    # Accounting.

    def cost_usd(self) -> float:
        """Dollars spent on every instance up to now."""
        now = self.clock.now()
        return sum(machine.cost_usd(now=now) for machine in self._machines.values())

    def hourly_spend_usd(self) -> float:
        """The hourly price of the instances that are not gone."""
        now = self.clock.now()
        return sum(m.price_per_hour for m in self._machines.values() if m.end(now=now) is None)

    # What providers call.

    def launch(self, request: LaunchRequest) -> Instance:
        existing = self._by_token.get(request.client_token)
        if existing is not None:
            return self._machine(existing).snapshot(now=self.clock.now())
        if self.launch_error is not None:
            raise self.launch_error(request.action, "the simulated cloud refuses launches")
        now = self.clock.now()
        stockout_draw = self._rng.random()
        boot_seconds = self.config.boot_time.sample(self._rng)
        lifetime_draw = self._rng.random()
        self._check_capacity(request, now=now, draw=stockout_draw)
        self._check_quota(request, now=now)
        instance_id = f"sim-{next(self._ids):06d}"
        machine = _Machine(
            request=request,
            instance_id=instance_id,
            launched_at=now,
            running_at=now + boot_seconds,
            price_per_hour=request.offer.price(spot=request.spot),
            interrupt_at=self._interrupt_at(request, now=now, draw=lifetime_draw),
        )
        self._machines[instance_id] = machine
        self._by_token[request.client_token] = instance_id
        return machine.snapshot(now=now)

    def terminate(self, instance_id: str) -> None:
        machine = self._machines.get(instance_id)
        now = self.clock.now()
        if machine is not None and machine.end(now=now) is None:
            machine.ended_at = now
            machine.ended_by = InstanceState.TERMINATED

    def visible(self) -> builtins.list[_Machine]:
        now = self.clock.now()
        horizon = self.config.gone_visible_seconds
        return [
            m
            for m in self._machines.values()
            if (end := m.end(now=now)) is None or now - end[0] <= horizon
        ]

    def _machine(self, instance_id: str) -> _Machine:
        machine = self._machines.get(instance_id)
        if machine is None:
            raise KeyError(instance_id)
        return machine

    def _check_capacity(self, request: LaunchRequest, *, now: float, draw: float) -> None:
        key = request.offer.key
        if self._stocked_out_until.get(key, -math.inf) > now:
            raise InsufficientCapacity(request.action, f"{key} is stocked out")
        if draw < self.config.stockout_probability:
            self._stocked_out_until[key] = now + self.config.stockout_seconds
            raise InsufficientCapacity(request.action, f"{key} ran out of capacity")

    def _check_quota(self, request: LaunchRequest, *, now: float) -> None:
        quota = self.config.gpu_quota
        if quota is None:
            return
        in_use = sum(
            m.request.offer.gpu_count for m in self._machines.values() if m.end(now=now) is None
        )
        if in_use + request.offer.gpu_count > quota:
            raise QuotaExceeded(request.action, f"GPU quota {quota} reached ({in_use} in use)")

    def _interrupt_at(self, request: LaunchRequest, *, now: float, draw: float) -> float | None:
        rate = self.config.spot_interruptions_per_hour
        if not request.spot or rate <= 0:
            return None
        # Exponential lifetime by inverse transform of a draw already taken.
        return now + -math.log(1.0 - draw) / rate * 3600.0


class SimulatedProvider:
    """A :class:`providers.base.Provider` view of a :class:`SimulatedCloud`."""

    def __init__(self, cloud: SimulatedCloud, *, name: str = "simulated") -> None:
        self.name = name
        self.cloud = cloud

    async def launch(self, request: LaunchRequest) -> Instance:
        return self.cloud.launch(request)

    async def terminate(self, instance_id: str) -> None:
        self.cloud.terminate(instance_id)

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        now = self.cloud.clock.now()
        return [
            m.snapshot(now=now)
            for m in self.cloud.visible()
            if m.request.tags[CLUSTER_TAG] == cluster_id
        ]

    async def describe(self, instance_id: str) -> Instance:
        for machine in self.cloud.visible():
            if machine.instance_id == instance_id:
                return machine.snapshot(now=self.cloud.clock.now())
        raise NotFound(f"describing {instance_id}", "no such simulated instance")

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        return pick_for_launch([i for i in await self.list(cluster_id) if i.launch_id == launch_id])

    async def interruptions(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        now = self.cloud.clock.now()
        reported = []
        for machine in self.cloud.visible():
            end = machine.end(now=now)
            if machine.request.tags[CLUSTER_TAG] != cluster_id or end is None:
                continue
            if end[1] is InstanceState.INTERRUPTED:
                offer = machine.request.offer
                reported.append(
                    SpotInterruption(
                        instance_id=machine.instance_id,
                        launch_id=machine.request.launch_id,
                        zone=offer.zone,
                        instance_type=offer.instance_type,
                        noticed_at=utc(end[0]),
                    )
                )
        return reported
