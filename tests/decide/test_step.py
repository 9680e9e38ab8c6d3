"""The workload step: a draining replica's own requests decide when it goes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from autoscaler.decide.inputs import Measured
from autoscaler.decide.plan import ReplicaPhase, ReplicaView, Terminate
from autoscaler.decide.scaling import FleetCounts, ScaleMemory
from autoscaler.decide.signals import Signals
from autoscaler.decide.step import ReplicaState, StepKnobs, WorkloadView, fleet_counts, step
from autoscaler.decide.warm import ParkMode, warm_policy_of
from tests.reconcile.world import L4, OFFERS, autoscaling

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def _replica(launch_id: str, phase: ReplicaPhase) -> ReplicaState:
    return ReplicaState(
        view=ReplicaView(
            launch_id=launch_id,
            phase=phase,
            generation=1,
            offer_key=L4.key,
            usd_per_hour=L4.on_demand_usd_per_hour,
            intent_at=NOW - timedelta(minutes=30),
            ready_at=NOW - timedelta(minutes=25),
            drain_requested_at=(
                NOW - timedelta(seconds=10) if phase is ReplicaPhase.DRAINING else None
            ),
            in_flight=0,
        ),
        zone=L4.zone,
        shape=(L4.gpu, L4.gpu_count),
    )


def _terminated(measured: Measured) -> list[str]:
    view = WorkloadView(
        spec=autoscaling("bot"),
        generation=1,
        replicas=[_replica("a", ReplicaPhase.READY), _replica("b", ReplicaPhase.DRAINING)],
        measured=measured,
        offers=OFFERS,
    )
    result = step(view, memory=ScaleMemory(), unavailable={}, now=NOW, knobs=StepKnobs())
    return [a.launch_id for a in result.plan.actions if isinstance(a, Terminate)]


def test_a_drained_replica_goes_once_its_own_requests_are_done() -> None:
    busy_elsewhere = Signals(in_flight=5, last_request_at=NOW)
    assert _terminated(Measured(signals=busy_elsewhere, replica_in_flight={"a": 5})) == ["b"]
    assert _terminated(Measured(signals=busy_elsewhere, replica_in_flight={"b": 1})) == []


def test_without_a_per_replica_count_the_workload_total_keeps_the_drain() -> None:
    busy = Signals(in_flight=5, last_request_at=NOW)
    assert _terminated(Measured(signals=busy)) == []
    assert _terminated(Measured(signals=Signals(last_request_at=NOW))) == ["b"]


def _refill_booting() -> ReplicaState:
    booting = _replica("f", ReplicaPhase.BOOTING)
    return replace(
        booting,
        view=replace(
            booting.view, prefill=True, intent_at=NOW - timedelta(seconds=60), ready_at=None
        ),
    )


def test_a_warm_pool_refill_on_its_way_does_not_stand_in_for_a_serving_replica() -> None:
    view = WorkloadView(
        spec=autoscaling("bot", warm_pool={"sleeping": 1}),
        generation=1,
        replicas=[_replica("a", ReplicaPhase.READY), _refill_booting()],
        measured=Measured(signals=Signals(last_request_at=NOW)),
        offers=OFFERS,
    )
    # The refill is parked once ready: it counts as neither ready nor booting capacity.
    assert fleet_counts(view.replicas, warm=warm_policy_of(view.spec)) == FleetCounts(
        ready=1, booting=0, draining=0
    )
    result = step(
        view,
        memory=ScaleMemory(),
        unavailable={},
        now=NOW,
        knobs=StepKnobs(),
        count=(2, "two replicas wanted"),
    )
    # Scale-up to two serving replicas buys one now, not once the refill has parked.
    assert [type(a).__name__ for a in result.plan.actions] == ["Launch"]
    assert not result.plan.launches[0].prefill
    assert result.plan.refusals == ()
    assert result.placement is not None and result.placement.found


def _explicit_pool_step(
    replicas: list[ReplicaState], *, desired: int, **policy: object
) -> tuple[list[tuple[str, str | None, bool]], list[str]]:
    view = WorkloadView(
        spec=autoscaling("bot", min_workers=0, warm_pool={"stopped": 1}, **policy),
        generation=2,
        replicas=replicas,
        measured=Measured(signals=Signals(last_request_at=NOW)),
        offers=OFFERS,
    )
    result = step(
        view,
        memory=ScaleMemory(),
        unavailable={},
        now=NOW,
        knobs=StepKnobs(),
        count=(desired, f"{desired} wanted"),
    )
    actions = [
        (type(a).__name__, getattr(a, "launch_id", None), getattr(a, "prefill", False))
        for a in result.plan.actions
    ]
    return actions, [r.reason for r in result.plan.refusals]


def test_a_refill_given_up_is_replaced_without_a_false_no_offer_refusal() -> None:
    # Scaled to zero; the pool's refill was not ready within scaling_up_timeout_sec (300 s).
    late = _refill_booting()
    late = replace(
        late,
        view=replace(late.view, generation=2, intent_at=NOW - timedelta(seconds=400)),
    )
    actions, refusals = _explicit_pool_step([late], desired=0)
    assert actions == [("Terminate", "f", False), ("Launch", None, True)]
    assert refusals == []
    # A stopped machine of the previous spec leaves the pool: it is replaced the same way.
    old = _replica("s", ReplicaPhase.READY)
    old = replace(
        old,
        view=replace(
            old.view, phase=ReplicaPhase.PARKED, park_mode=ParkMode.STOPPED, parked_at=NOW
        ),
    )
    actions, refusals = _explicit_pool_step([old], desired=0)
    assert actions == [("Terminate", "s", False), ("Launch", None, True)]
    assert refusals == []


def test_a_pool_of_stopped_machines_is_not_refilled_with_spot_machines_that_cannot_stop() -> None:
    serving = _replica("a", ReplicaPhase.READY)
    serving = replace(serving, view=replace(serving.view, generation=2))
    # Placement picks the spot market (60 % cheaper); a spot machine is never stopped,
    # so a refill would be bought, booted, drained and terminated, over and over.
    actions, refusals = _explicit_pool_step([serving], desired=1, allow_spot_instances=True)
    assert actions == []
    assert refusals == []
    actions, _ = _explicit_pool_step([serving], desired=1)
    assert actions == [("Launch", None, True)]  # on demand, it can stop
