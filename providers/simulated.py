"""A simulated cloud: prices, boot times, stock-outs and spot interruptions on a clock.

It drives ``autoscaler simulate`` and the benchmarks, and keeps the same provider
contract as AWS and GCP. All randomness is drawn from one seeded generator at launch time
(stock-out, boot time, spot lifetime, in that order), and every later state is a function
of the clock, so a run is reproducible for a seed however often it is observed.

Billing runs from launch to termination (or interruption) at the offer's price for the
market bought, except while a machine is stopped, when only its disk is billed
(``disk_gb`` at :func:`catalog.storage.stopped_usd_per_hour`; the offer's price is taken
as the running machine's whole bill). Terminated and interrupted instances stay listed
for ``gone_visible_seconds``, as EC2 keeps showing terminated instances for a while.

Stop and start. A stop takes ``stop_seconds`` (``STOPPING``, billed as running, then
``STOPPED``); as on EC2, a spot machine cannot be stopped and a pending one not yet. A
start takes a draw of ``start_time`` (``PENDING``, then ``RUNNING``, which here means
serving, as after a launch), from a generator of its own so that stops and starts do not
change the launches' draws; a start finds a stocked-out offer stocked out, since a
stopped machine is tied to its zone. The default start time, lognormal with a median of
75 s (sigma 0.35: p95 about 130 s), against 180 s for a fresh machine, is an assumption
built from published parts, not a measurement of a GPU machine:

* the machine itself: EC2 takes 5-17 s from ``pending`` to ``running`` and another
  20-25 s until the OS answers on the network (Colin Percival, "EC2 boot time
  benchmarking", https://www.daemonology.net/blog/2021-08-12-EC2-boot-time-benchmarking.html:
  4.9 s and 22.8 s on c5.xlarge; brevdev/ec2-coldboot-research: 25.8 s launch to SSH,
  16.5 s of it pending), and a restarted volume is already hydrated, unlike a fresh one
  restored from its snapshot (the "boot once, stop, start later" approach discussed at
  https://hndistilled.com/story/40455208/);
* what a stopped machine skips: the image pull and the weights' download, which is what
  makes a fresh GPU machine take minutes;
* what it does not skip: the engine loads the weights from its disk into the GPU again,
  30-100 s for vLLM (the reload that vLLM's sleep mode avoids; vLLM blog, 2025-10).

So about 30 s of machine and 30-100 s of engine: 75 s at the median. ``start_time``
replaces it for a scenario that measured its own.

Spot interruptions come with the warning the real clouds give (:data:`SPOT_NOTICE_LEAD_S`,
by the provider of the machine's offer): a machine's notice comes that long before its
reclaim, never before its launch. :meth:`SimulatedProvider.spot_notices` reports each
warning once, from its notice until the reclaim, as the EC2 provider reads its
interruption queue; :meth:`SimulatedProvider.interruptions` reports the reclaim itself.
"""

from __future__ import annotations

import builtins
import itertools
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from catalog.model import ProviderName
from catalog.storage import LAUNCH_DISK_GIB, stopped_usd_per_hour
from providers.base import (
    CLUSTER_TAG,
    SPOT_NOTICE_LEAD_S,
    Clock,
    Instance,
    InstanceState,
    InsufficientCapacity,
    LaunchRequest,
    NotFound,
    ProviderError,
    QuotaExceeded,
    SpotInterruption,
    Terminal,
    Transient,
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


START_TIME = LogNormalBootTime(median_seconds=75.0, sigma=0.35)
"""Seconds from the start of a stopped machine until it serves again (see the module
docstring for where the figure comes from)."""


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
    hazard rate of each spot instance. ``gpu_quota`` caps the GPUs of live instances
    that are not stopped. ``start_time`` is how long a stopped machine takes to serve
    again after a start, ``stop_seconds`` how long a stop takes, ``disk_gb`` the disk a
    stopped machine keeps and is billed for (see the module docstring for the sources).
    """

    seed: int = 0
    boot_time: BootTimeDistribution = field(default_factory=LogNormalBootTime)
    stockout_probability: float = 0.0
    stockout_seconds: float = 900.0
    spot_interruptions_per_hour: float = 0.0
    gpu_quota: int | None = None
    gone_visible_seconds: float = 3600.0
    start_time: BootTimeDistribution = START_TIME
    stop_seconds: float = 30.0
    disk_gb: float = LAUNCH_DISK_GIB

    def __post_init__(self) -> None:
        if not 0.0 <= self.stockout_probability <= 1.0:
            raise ValueError(
                f"SimulationConfig.stockout_probability must be in [0, 1], "
                f"got {self.stockout_probability}"
            )
        if self.spot_interruptions_per_hour < 0:
            raise ValueError("SimulationConfig.spot_interruptions_per_hour must be >= 0")
        if self.stop_seconds < 0 or self.disk_gb < 0:
            raise ValueError("SimulationConfig.stop_seconds and disk_gb must be >= 0")


@dataclass(slots=True)
class _Machine:
    request: LaunchRequest
    instance_id: str
    launched_at: float
    running_at: float
    price_per_hour: float
    interrupt_at: float | None
    notice_at: float | None = None
    """When its provider warns of the reclaim at ``interrupt_at`` (``None``: no warning)."""
    disk_usd_per_hour: float = 0.0
    ended_at: float | None = None
    ended_by: InstanceState | None = None
    stopping_since: float | None = None
    """When the current stop was asked; ``None`` unless stopping or stopped."""
    stopped_since: float | None = None
    """When the current stop completes (``stopping_since`` + the stop's duration)."""
    rests: list[tuple[float, float]] = field(default_factory=list)
    """Past stopped spells, (stopped from, started at): billed for the disk only."""

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
        if self.stopped_since is not None:
            return InstanceState.STOPPED if now >= self.stopped_since else InstanceState.STOPPING
        return InstanceState.RUNNING if now >= self.running_at else InstanceState.PENDING

    def stopped_seconds(self, *, until: float) -> float:
        """Seconds spent stopped (not stopping) before ``until``."""
        spells = [*self.rests]
        if self.stopped_since is not None:
            spells.append((self.stopped_since, math.inf))
        return sum(max(0.0, min(b, until) - a) for a, b in spells)

    def cost_usd(self, *, now: float) -> float:
        end = self.end(now=now)
        stop = min(now, end[0]) if end else now
        resting = self.stopped_seconds(until=stop)
        running = max(0.0, stop - self.launched_at - resting)
        return (running * self.price_per_hour + resting * self.disk_usd_per_hour) / 3600.0

    def hourly_usd(self, *, now: float) -> float:
        """What the machine costs an hour at ``now``: 0 once gone, its disk when stopped."""
        state = self.state(now=now)
        if state.is_gone:
            return 0.0
        return self.disk_usd_per_hour if state is InstanceState.STOPPED else self.price_per_hour

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
        self._start_rng = random.Random(f"start:{self.config.seed}")
        self._machines: dict[str, _Machine] = {}
        self._by_token: dict[str, str] = {}
        self._stocked_out_until: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._warned: set[str] = set()
        """Machines whose warning a provider view has reported (each is reported once)."""
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
        """Reclaim a spot instance now, with no warning."""
        self.reclaim_at(instance_id, self.clock.now())

    def reclaim_at(self, instance_id: str, at: float) -> None:
        """Reclaim a spot instance at ``at`` (the clock's time, not before now), warned
        :data:`SPOT_NOTICE_LEAD_S` before as its provider warns (none when ``at`` is now)."""
        machine = self._machine(instance_id)
        if not machine.request.spot:
            raise ValueError(f"{instance_id} is on-demand; only spot instances are interrupted")
        now = self.clock.now()
        if machine.end(now=now) is None:
            machine.interrupt_at = max(now, at)
            machine.notice_at = _notice_at(
                machine.request, since=now, interrupt_at=machine.interrupt_at
            )

    # Accounting.

    def cost_usd(self) -> float:
        """Dollars spent on every instance up to now."""
        now = self.clock.now()
        return sum(machine.cost_usd(now=now) for machine in self._machines.values())

    def hourly_spend_usd(self) -> float:
        """The hourly price of the instances that are not gone (a stopped one's disk)."""
        now = self.clock.now()
        return sum(m.hourly_usd(now=now) for m in self._machines.values())

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
        interrupt_at = self._interrupt_at(request, now=now, draw=lifetime_draw)
        machine = _Machine(
            request=request,
            instance_id=instance_id,
            launched_at=now,
            running_at=now + boot_seconds,
            price_per_hour=request.offer.price(spot=request.spot),
            interrupt_at=interrupt_at,
            notice_at=_notice_at(request, since=now, interrupt_at=interrupt_at),
            disk_usd_per_hour=stopped_usd_per_hour(request.offer, self.config.disk_gb),
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

    def stop(self, instance_id: str) -> None:
        """Stop a machine (``NotFound`` when unknown or gone; see the module docstring)."""
        action = f"stopping {instance_id}"
        machine = self._live(instance_id, action)
        now = self.clock.now()
        state = machine.state(now=now)
        if state.is_stopped:
            return
        if machine.request.spot:
            raise Terminal(action, "a spot machine cannot be stopped (as on EC2)")
        if state is InstanceState.PENDING:
            raise Transient(action, "the machine is still booting", retry_after=5.0)
        machine.stopping_since = now
        machine.stopped_since = now + self.config.stop_seconds

    def start(self, instance_id: str) -> Instance:
        """Start a stopped machine: ``PENDING`` for a draw of ``start_time``."""
        action = f"starting {instance_id}"
        machine = self._live(instance_id, action)
        now = self.clock.now()
        state = machine.state(now=now)
        if state is InstanceState.STOPPING:
            raise Transient(action, "the machine is still stopping", retry_after=5.0)
        if state is InstanceState.STOPPED and machine.stopped_since is not None:
            key = machine.request.offer.key
            if self._stocked_out_until.get(key, -math.inf) > now:
                raise InsufficientCapacity(action, f"{key} is stocked out")
            self._check_quota(machine.request, now=now)
            machine.rests.append((machine.stopped_since, now))
            machine.stopping_since = machine.stopped_since = None
            machine.running_at = now + self.config.start_time.sample(self._start_rng)
        return machine.snapshot(now=now)

    def _live(self, instance_id: str, action: str) -> _Machine:
        machine = self._machines.get(instance_id)
        if machine is None or machine.end(now=self.clock.now()) is not None:
            raise NotFound(action, "no such simulated instance (or it is gone)")
        return machine

    def visible(self) -> builtins.list[_Machine]:
        now = self.clock.now()
        horizon = self.config.gone_visible_seconds
        return [
            m
            for m in self._machines.values()
            if (end := m.end(now=now)) is None or now - end[0] <= horizon
        ]

    def warnings(self, cluster_id: str) -> builtins.list[_Machine]:
        """The cluster's machines warned of a reclaim and not yet reported, each once:
        those past their notice and not gone (a warning read after the reclaim is
        dropped, as the EC2 provider drops one for an instance already gone)."""
        now = self.clock.now()
        warned = []
        for machine in self._machines.values():
            if (
                machine.notice_at is None
                or machine.notice_at > now
                or machine.instance_id in self._warned
                or machine.request.tags[CLUSTER_TAG] != cluster_id
            ):
                continue
            self._warned.add(machine.instance_id)
            if machine.end(now=now) is None:
                warned.append(machine)
        return warned

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
            m.request.offer.gpu_count
            for m in self._machines.values()
            if m.end(now=now) is None and m.stopped_since is None
        )
        if in_use + request.offer.gpu_count > quota:
            raise QuotaExceeded(request.action, f"GPU quota {quota} reached ({in_use} in use)")

    def _interrupt_at(self, request: LaunchRequest, *, now: float, draw: float) -> float | None:
        rate = self.config.spot_interruptions_per_hour
        if not request.spot or rate <= 0:
            return None
        # Exponential lifetime by inverse transform of a draw already taken.
        return now + -math.log(1.0 - draw) / rate * 3600.0


def _notice_at(request: LaunchRequest, *, since: float, interrupt_at: float | None) -> float | None:
    """When the reclaim at ``interrupt_at`` is warned of: its provider's lead before it,
    not before ``since`` (the launch, or the moment the reclaim was set); ``None``: no
    reclaim, a reclaim at once, or a provider that gives no warning."""
    lead = SPOT_NOTICE_LEAD_S.get(request.offer.provider, 0.0)
    if interrupt_at is None or lead <= 0 or interrupt_at <= since:
        return None
    return max(since, interrupt_at - lead)


def _interruption(
    machine: _Machine,
    *,
    noticed_at: float,
    reclaim_at: datetime | None = None,
    reason: str | None = None,
) -> SpotInterruption:
    """A reclaim (or its warning) of ``machine`` as the provider reports it, noticed at
    ``noticed_at`` (epoch seconds); ``reason``: the default's where not given."""
    offer = machine.request.offer
    interruption = SpotInterruption(
        instance_id=machine.instance_id,
        launch_id=machine.request.launch_id,
        zone=offer.zone,
        instance_type=offer.instance_type,
        noticed_at=utc(noticed_at),
        reclaim_at=reclaim_at,
    )
    return interruption if reason is None else replace(interruption, reason=reason)


class SimulatedProvider:
    """A :class:`providers.base.Provider` view of a :class:`SimulatedCloud`."""

    def __init__(self, cloud: SimulatedCloud, *, name: str = "simulated") -> None:
        self.name = name
        self.cloud = cloud

    async def launch(self, request: LaunchRequest) -> Instance:
        return self.cloud.launch(request)

    async def terminate(self, instance_id: str) -> None:
        self.cloud.terminate(instance_id)

    async def stop(self, instance_id: str) -> None:
        self.cloud.stop(instance_id)

    async def start(self, instance_id: str) -> Instance:
        return self.cloud.start(instance_id)

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
                reported.append(_interruption(machine, noticed_at=end[0]))
        return reported

    async def spot_notices(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        """The cluster's machines warned of a reclaim since the last call, each once
        (:meth:`SimulatedCloud.warnings`), with the reclaim's time in the reason."""
        reported = []
        for machine in self.cloud.warnings(cluster_id):
            assert machine.notice_at is not None and machine.interrupt_at is not None
            lead = machine.interrupt_at - machine.notice_at
            reclaim_at = utc(machine.interrupt_at)
            reported.append(
                _interruption(
                    machine,
                    noticed_at=machine.notice_at,
                    reclaim_at=reclaim_at,
                    reason=(
                        f"simulated {machine.request.offer.provider.value} spot interruption "
                        f"warning: reclaimed at {reclaim_at.isoformat()} (in {lead:.0f} s)"
                    ),
                )
            )
        return reported
