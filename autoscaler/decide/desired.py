"""The desired replica count for any execution policy: one call for the reconciler.

* fixed: ``replicas``, always.
* scheduled: ``replicas`` while the schedule is active, else 0; ``recheck_at`` says when
  that changes, so the controller can wake exactly then. ``schedule_offset`` moves the
  moment the schedule is read at (a rehearsal of a schedule: ``autoscaler run
  --schedule-offset``); ``recheck_at`` stays on the real clock.
* autoscaling: :func:`autoscaler.decide.scaling.desired_replicas`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from autoscaler.decide.queueing import ReplicaCapacity
from autoscaler.decide.scaling import (
    Direction,
    FleetCounts,
    ScaleDecision,
    ScaleMemory,
    SpotRisk,
    desired_replicas,
)
from autoscaler.decide.schedule import format_offset, schedule_state
from autoscaler.decide.signals import Signals
from autoscaler.spec import (
    AutoscalingPolicy,
    EndpointType,
    FixedPolicy,
    ScheduledPolicy,
    WorkloadSpec,
)


def desired_count(
    *,
    spec: WorkloadSpec,
    signals: Signals,
    fleet: FleetCounts,
    memory: ScaleMemory,
    now: datetime,
    capacity: ReplicaCapacity | None = None,
    schedule_offset: timedelta = timedelta(0),
    concurrency_target: int | None = None,
    spot: SpotRisk | None = None,
) -> ScaleDecision:
    """How many replicas ``spec`` wants at ``now``, with the reason; a schedule is read
    at ``now + schedule_offset``. ``concurrency_target``: requests per replica the
    autoscaler scales to (``decide.inputs.concurrency_target``); ``spot``: an
    autoscaling fleet on spot, at this risk (``decide.scaling``'s spot spares)."""
    policy = spec.execution_policy_config
    if isinstance(policy, AutoscalingPolicy):
        return desired_replicas(
            policy=policy,
            signals=signals,
            fleet=fleet,
            memory=memory,
            now=now,
            capacity=capacity,
            concurrency_target=concurrency_target,
            jobs_only=spec.endpoint_type is EndpointType.ASYNC,
            spot=spot,
        )
    if isinstance(policy, ScheduledPolicy):
        state = schedule_state(policy, now=now + schedule_offset)
        shifted = f" (schedule clock {format_offset(schedule_offset)})" if schedule_offset else ""
        return ScaleDecision(
            desired=state.replicas,
            reason=f"scheduled{shifted}: {state.reason}",
            direction=_direction(state.replicas, fleet.serving_or_soon),
            memory=memory,
            recheck_at=state.next_change_at - schedule_offset,
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
