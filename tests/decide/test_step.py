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


WORKER_DOWN = "1 of 4 gateway workers did not answer (worker 2)"


def test_a_drain_waits_while_the_signals_read_is_incomplete() -> None:
    """The answering workers count nothing on the draining replica, but one worker did
    not answer: its requests may be there. The drain waits, and the decision says why;
    a complete read with nothing on it ends the drain."""
    idle = Signals(last_request_at=NOW)
    partial = Measured(signals=idle, replica_in_flight={}, incomplete=WORKER_DOWN)
    assert _terminated(partial) == []
    view = WorkloadView(
        spec=autoscaling("bot"),
        generation=1,
        replicas=[_replica("a", ReplicaPhase.READY), _replica("b", ReplicaPhase.DRAINING)],
        measured=partial,
        offers=OFFERS,
    )
    decided = step(view, memory=ScaleMemory(), unavailable={}, now=NOW, knobs=StepKnobs())
    assert f"signals incomplete ({WORKER_DOWN}): drain of b waits" in decided.decision.reason
    assert decided.decision.waits is not None
    assert decided.plan.requeue_after is not None  # woken at the drain's timeout
    assert _terminated(Measured(signals=idle, replica_in_flight={})) == ["b"]


def test_a_drain_on_an_incomplete_read_ends_at_its_timeout_saying_the_count_is_unknown() -> None:
    late = _replica("b", ReplicaPhase.DRAINING)
    late = replace(late, view=replace(late.view, drain_requested_at=NOW - timedelta(hours=1)))
    view = WorkloadView(
        spec=autoscaling("bot"),
        generation=1,
        replicas=[_replica("a", ReplicaPhase.READY), late],
        measured=Measured(
            signals=Signals(last_request_at=NOW), replica_in_flight={}, incomplete=WORKER_DOWN
        ),
        offers=OFFERS,
    )
    decided = step(view, memory=ScaleMemory(), unavailable={}, now=NOW, knobs=StepKnobs())
    [ended] = [a for a in decided.plan.actions if isinstance(a, Terminate)]
    assert ended.launch_id == "b"
    assert "requests in flight not known" in ended.reason and WORKER_DOWN in ended.reason


def test_no_scale_down_is_decided_on_an_incomplete_read() -> None:
    """Three ready replicas and no request for an hour: the rules scale down on a
    complete read; on one that missed a worker they hold, and say so."""
    quiet = Signals(last_request_at=NOW - timedelta(hours=1))
    spec = autoscaling("bot", min_workers=0, scale_to_zero=True)
    replicas = [_replica(k, ReplicaPhase.READY) for k in "abc"]

    def decided(measured: Measured) -> tuple[int, str]:
        view = WorkloadView(
            spec=spec, generation=1, replicas=replicas, measured=measured, offers=OFFERS
        )
        memory = ScaleMemory(calm_since=NOW - timedelta(hours=1))
        result = step(view, memory=memory, unavailable={}, now=NOW, knobs=StepKnobs())
        drained = [a for a in result.plan.actions if not isinstance(a, Terminate)]
        assert bool(drained) == (result.decision.desired < 3)
        return result.decision.desired, result.decision.reason

    complete_desired, _ = decided(Measured(signals=quiet, replica_in_flight={}))
    assert complete_desired < 3
    held, reason = decided(Measured(signals=quiet, replica_in_flight={}, incomplete=WORKER_DOWN))
    assert held == 3
    assert reason.startswith(f"signals incomplete ({WORKER_DOWN}): scale-down waits")
