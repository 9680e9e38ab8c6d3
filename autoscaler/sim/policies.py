"""Who decides the replica count: our controller's ``decide``, or a baseline.

Every policy answers one question at each of its ticks — how many replicas (ready plus
booting) now? — and everything else is shared: the same placement
(``decide.placement.place_replica``), plan (``decide.plan.plan_actions``) and budget
(``decide.budget.check_launch``) carry the answer out on the same simulated cloud, so
policies differ only in the count they ask for.

* :class:`ControllerPolicy` calls ``autoscaler.decide.desired.desired_count`` with the
  workload's own spec, ``Signals`` built the way the gateway builds them, the fleet by
  phase and the ``ScaleMemory`` it returned last time: the controller's own code.
* :class:`StaticPolicy`: a fixed count (``desired_count`` of a ``fixed`` spec).
* :class:`RequestRatePolicy`: SkyServe's request-rate autoscaler with its defaults:
  ``ceil(qps / target_qps_per_replica)`` over a 60 s window, decided every 20 s, acted on
  only after the same direction held for 300 s (up) or 1200 s (down).
* :class:`ConcurrencyPolicy`: Knative's KPA: desired = ceil(mean concurrency / target)
  over a 60 s stable window, every 2 s; when the 6 s panic window asks for at least
  twice the current count, panic mode scales on the panic window and never down, until
  the stable window has not asked for panic for 60 s; a step down keeps at least half
  the ready replicas (``max-scale-down-rate`` 2). The target is Knative's default: the
  per-replica cap (``containerConcurrency``) x 70 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from autoscaler.decide.desired import desired_count
from autoscaler.decide.queueing import ReplicaCapacity
from autoscaler.decide.scaling import FleetCounts, ScaleMemory
from autoscaler.decide.signals import Signals
from autoscaler.sim.gateway import SimGateway
from autoscaler.spec import AutoscalingPolicy, ExecutionPolicy, FixedPolicy, WorkloadSpec

CONTROLLER_INTERVAL_S = 10.0
"""How often the simulated controller runs ``decide`` (the reconciler's tick)."""


@dataclass(frozen=True, slots=True)
class ControlView:
    """What a policy sees at a tick."""

    now_s: float
    now: datetime
    signals: Signals
    fleet: FleetCounts
    gateway: SimGateway
    capacity: ReplicaCapacity | None = None
    """One replica's capacity at the measured token mix (``catalog.perf``)."""


@dataclass(frozen=True, slots=True)
class Want:
    count: int
    reason: str


class Policy(Protocol):
    name: str
    interval_s: float

    def bounds(self) -> tuple[int, int]:
        """The fewest and most replicas the policy ever asks for."""
        ...

    def desired(self, view: ControlView) -> Want: ...


@dataclass(slots=True)
class ControllerPolicy:
    """Our controller: ``decide.desired.desired_count`` on the workload's own spec."""

    spec: WorkloadSpec
    capacity: ReplicaCapacity | None = None
    name: str = "ours"
    interval_s: float = CONTROLLER_INTERVAL_S
    memory: ScaleMemory = field(default_factory=ScaleMemory)

    def bounds(self) -> tuple[int, int]:
        policy = self.spec.execution_policy_config
        if isinstance(policy, AutoscalingPolicy):
            return policy.min_workers, policy.max_workers
        if isinstance(policy, FixedPolicy):
            return policy.replicas, policy.replicas
        return 0, 1

    @property
    def shipped(self) -> bool:
        """Whether this is the controller as it ships (an autoscaling spec): the world
        then runs its step (``decide.step``), decision included, with :attr:`memory`."""
        return isinstance(self.spec.execution_policy_config, AutoscalingPolicy)

    def desired(self, view: ControlView) -> Want:
        decision = desired_count(
            spec=self.spec,
            signals=view.signals,
            fleet=view.fleet,
            memory=self.memory,
            now=view.now,
            capacity=self.capacity or view.capacity,
        )
        self.memory = decision.memory
        return Want(decision.desired, decision.reason)


def static_policy(spec: WorkloadSpec, *, replicas: int, name: str) -> ControllerPolicy:
    """A fixed count, decided by ``desired_count`` for a ``fixed`` spec."""
    fixed = spec.model_copy(
        update={
            "execution_policy": ExecutionPolicy.FIXED,
            "execution_policy_config": FixedPolicy(replicas=replicas),
        }
    )
    return ControllerPolicy(spec=fixed, name=name)


def _clamp(count: int, low: int, high: int) -> int:
    return min(max(count, low), high)


@dataclass(slots=True)
class RequestRatePolicy:
    """SkyServe's ``RequestRateAutoscaler`` with its default windows and delays."""

    target_qps_per_replica: float
    min_replicas: int
    max_replicas: int
    name: str = "skyserve-qps"
    interval_s: float = 20.0
    qps_window_s: float = 60.0
    upscale_delay_s: float = 300.0
    downscale_delay_s: float = 1200.0
    _target: int | None = None
    _up_count: int = 0
    _down_count: int = 0

    def bounds(self) -> tuple[int, int]:
        return self.min_replicas, self.max_replicas

    def desired(self, view: ControlView) -> Want:
        current = view.fleet.serving_or_soon if self._target is None else self._target
        qps = view.gateway.rate(view.now_s, window_s=self.qps_window_s)
        wanted = math.ceil(qps / self.target_qps_per_replica)
        wanted = _clamp(wanted, self.min_replicas, self.max_replicas)
        up_ticks = math.ceil(self.upscale_delay_s / self.interval_s)
        down_ticks = math.ceil(self.downscale_delay_s / self.interval_s)
        if wanted > current:
            self._up_count, self._down_count = self._up_count + 1, 0
            if self._up_count >= up_ticks:
                current, self._up_count = wanted, 0
        elif wanted < current:
            self._up_count, self._down_count = 0, self._down_count + 1
            if self._down_count >= down_ticks:
                current, self._down_count = wanted, 0
        else:
            self._up_count = self._down_count = 0
        self._target = current
        return Want(current, f"qps {qps:.2f} / {self.target_qps_per_replica:.2f} -> {wanted}")


@dataclass(slots=True)
class ConcurrencyPolicy:
    """Knative's KPA: stable (60 s) and panic (6 s) windows over per-second concurrency."""

    target_concurrency: float
    min_replicas: int
    max_replicas: int
    name: str = "knative-kpa"
    interval_s: float = 2.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    """At most ``ready / rate`` replicas remain after one step down (Knative's default)."""
    _panic_since: float | None = None
    _panic_count: int = 0

    def bounds(self) -> tuple[int, int]:
        return self.min_replicas, self.max_replicas

    def desired(self, view: ControlView) -> Want:
        gw, t = view.gateway, view.now_s
        stable = gw.mean_concurrency(t, window_s=self.stable_window_s)
        panic = gw.mean_concurrency(t, window_s=self.panic_window_s)
        want_stable = math.ceil(stable / self.target_concurrency)
        want_panic = math.ceil(panic / self.target_concurrency)
        ready = max(view.fleet.ready, 1)
        if want_panic / ready >= self.panic_threshold:
            self._panic_since = t
        elif self._panic_since is not None and t - self._panic_since >= self.stable_window_s:
            self._panic_since = None
        if self._panic_since is not None:
            # In panic the count only grows: never scale down while the burst may recur.
            self._panic_count = max(self._panic_count, want_panic, view.fleet.serving_or_soon)
            count = self._panic_count
            why = f"panic: concurrency {panic:.1f} over {self.panic_window_s:g}s"
        else:
            self._panic_count = 0
            floor = math.ceil(view.fleet.ready / self.max_scale_down_rate)
            count = max(want_stable, floor)
            why = f"stable: concurrency {stable:.1f} over {self.stable_window_s:g}s"
        count = _clamp(count, self.min_replicas, self.max_replicas)
        return Want(count, f"{why} / target {self.target_concurrency:.1f} -> {count}")


@dataclass(slots=True)
class ScheduledFleetPolicy:
    """A fleet known in advance: ``fleet[k]`` replicas serving in slot ``k`` of ``slot_s``
    seconds, each bought ``lead_s`` (the boot time) before its slot starts. Replays the
    oracle's plan through the simulator to check that it meets the SLO there."""

    fleet: tuple[int, ...]
    slot_s: float
    lead_s: float
    name: str = "oracle-replay"
    interval_s: float = CONTROLLER_INTERVAL_S

    def bounds(self) -> tuple[int, int]:
        return min(self.fleet, default=0), max(self.fleet, default=0)

    def count_at(self, t: float) -> int:
        """Replicas wanted (ready or booting) at ``t``: the slot now and any booting for a
        slot that starts within the lead."""
        if not self.fleet:
            return 0
        now = min(max(int(t // self.slot_s), 0), len(self.fleet) - 1)
        ahead = min(max(int((t + self.lead_s) // self.slot_s), 0), len(self.fleet) - 1)
        return max(self.fleet[now : ahead + 1])

    def desired(self, view: ControlView) -> Want:
        count = self.count_at(view.now_s)
        return Want(count, f"the oracle's plan: {count} replicas")
