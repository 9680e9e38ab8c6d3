"""The desired replica count for any execution policy: one call for the reconciler.

* fixed: ``replicas``, always.
* scheduled: ``replicas`` while the schedule is active, else 0; ``recheck_at`` says when
  that changes, so the controller can wake exactly then.
* autoscaling: :func:`autoscaler.decide.scaling.desired_replicas`.
"""

from __future__ import annotations

from datetime import datetime

from autoscaler.decide.queueing import ReplicaCapacity
from autoscaler.decide.scaling import (
    Direction,
    FleetCounts,
    ScaleDecision,
    ScaleMemory,
    desired_replicas,
)
from autoscaler.decide.schedule import schedule_state
from autoscaler.decide.signals import Signals
from autoscaler.spec import AutoscalingPolicy, FixedPolicy, ScheduledPolicy, WorkloadSpec


def desired_count(
    *,
    spec: WorkloadSpec,
    signals: Signals,
    fleet: FleetCounts,
    memory: ScaleMemory,
    now: datetime,
    capacity: ReplicaCapacity | None = None,
) -> ScaleDecision:
    """How many replicas ``spec`` wants at ``now``, with the reason."""
    policy = spec.execution_policy_config
    if isinstance(policy, AutoscalingPolicy):
        return desired_replicas(
            policy=policy, signals=signals, fleet=fleet, memory=memory, now=now, capacity=capacity
        )
    if isinstance(policy, ScheduledPolicy):
        state = schedule_state(policy, now=now)
        return ScaleDecision(
            desired=state.replicas,
            reason=f"scheduled: {state.reason}",
            direction=_direction(state.replicas, fleet.serving_or_soon),
            memory=memory,
            recheck_at=state.next_change_at,
        )
    assert isinstance(policy, FixedPolicy)
    return ScaleDecision(
        desired=policy.replicas,
        reason=f"fixed: {policy.replicas} replica{'s' if policy.replicas != 1 else ''}",
        direction=_direction(policy.replicas, fleet.serving_or_soon),
        memory=memory,
    )


def _direction(desired: int, current: int) -> Direction:
    if desired > current:
        return Direction.UP
    if desired < current:
        return Direction.ZERO if desired == 0 else Direction.DOWN
    return Direction.HOLD
