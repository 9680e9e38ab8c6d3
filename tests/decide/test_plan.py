"""From desired and observed replicas to launches, drains and terminations."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.decide.budget import BudgetLimits
from autoscaler.decide.plan import (
    SPOT_DRAIN_MARGIN_S,
    Drain,
    Launch,
    Plan,
    ReplicaPhase,
    ReplicaView,
    Terminate,
    Timeouts,
    heed_spot_notice,
    plan_actions,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
TIMEOUTS = Timeouts(scaling_up_sec=600, scaling_down_sec=120)
ROOMY = BudgetLimits(workload_usd_per_hour=100.0)


def replica(
    launch_id: str,
    phase: ReplicaPhase = ReplicaPhase.READY,
    *,
    price: float = 1.0,
    generation: int = 1,
    age: float = 1000,
    ready_age: float | None = None,
    drain_age: float | None = None,
    in_flight: int = 0,
) -> ReplicaView:
    ready = (
        ready_age if ready_age is not None else (age - 60 if phase is ReplicaPhase.READY else None)
    )
    return ReplicaView(
        launch_id=launch_id,
        phase=phase,
        generation=generation,
        offer_key=f"aws/us-east-1a/{launch_id}",
        usd_per_hour=price,
        intent_at=NOW - timedelta(seconds=age),
        ready_at=None if ready is None else NOW - timedelta(seconds=ready),
        drain_requested_at=None if drain_age is None else NOW - timedelta(seconds=drain_age),
        in_flight=in_flight,
    )


def plan(
    desired: int,
    replicas: list[ReplicaView],
    *,
    generation: int = 1,
    limits: BudgetLimits = ROOMY,
    price: float | None = 1.0,
) -> Plan:
    return plan_actions(
        desired=desired,
        replicas=replicas,
        spec_generation=generation,
        timeouts=TIMEOUTS,
        limits=limits,
        launch_usd_per_hour=price,
        now=NOW,
    )


def kinds(p: Plan) -> list[tuple[str, str | None]]:
    return [(type(a).__name__, getattr(a, "launch_id", None)) for a in p.actions]


def test_scale_up_launches_the_missing_replicas() -> None:
    p = plan(3, [replica("a")])
    assert kinds(p) == [("Launch", None), ("Launch", None)]
    assert p.launches[0].reason == "scale up 1 -> 3"


def test_launches_stop_at_the_budget_and_the_refusal_has_the_numbers() -> None:
    p = plan(
        5,
        [replica("a", price=4.10)] * 3,
        limits=BudgetLimits(workload_usd_per_hour=15.0),
        price=4.10,
    )
    assert p.launches == ()
    assert p.refusals[0].reason == (
        "launch refused: 3 x $4.10/h + $4.10/h = $16.40/h would exceed the workload "
        "ceiling $15.00/h"
    )


def test_scale_down_drains_the_most_expensive_then_the_newest() -> None:
    replicas = [
        replica("cheap-old", price=1.0, ready_age=900),
        replica("dear", price=3.0, ready_age=800),
        replica("cheap-new", price=1.0, ready_age=100),
    ]
    assert kinds(plan(2, replicas)) == [("Drain", "dear")]
    assert kinds(plan(1, replicas)) == [("Drain", "dear"), ("Drain", "cheap-new")]


def test_scale_down_terminates_replicas_still_booting_first() -> None:
    replicas = [replica("a"), replica("b"), replica("boot", ReplicaPhase.BOOTING, age=30)]
    p = plan(2, replicas)
    assert kinds(p) == [("Terminate", "boot")]
    assert "not serving yet" in p.actions[0].reason


def test_draining_replica_is_terminated_when_idle_or_past_the_timeout() -> None:
    idle = replica("idle", ReplicaPhase.DRAINING, drain_age=10, in_flight=0)
    busy = replica("busy", ReplicaPhase.DRAINING, drain_age=30, in_flight=2)
    stuck = replica("stuck", ReplicaPhase.DRAINING, drain_age=121, in_flight=1)
    p = plan(0, [idle, busy, stuck])
    assert kinds(p) == [("Terminate", "idle"), ("Terminate", "stuck")]
    assert "drain timeout: 1 request(s) still in flight" in p.actions[1].reason
    assert p.requeue_after == 90  # busy's drain deadline


def test_booting_replica_past_the_timeout_is_terminated_and_replaced() -> None:
    stuck = replica("stuck", ReplicaPhase.BOOTING, age=601)
    young = replica("young", ReplicaPhase.PENDING, age=100)
    p = plan(2, [stuck, young])
    assert kinds(p) == [("Terminate", "stuck"), ("Launch", None)]
    assert "scaling_up_timeout_sec 600" in p.actions[0].reason
    assert p.requeue_after == 500


def test_spec_drift_replaces_with_a_surge_of_one() -> None:
    old = [replica("o1", generation=1), replica("o2", generation=1, price=2.0)]
    first = plan(2, old, generation=2)
    assert kinds(first) == [("Launch", None)]
    assert first.launches[0].replaces == "o2"  # most expensive goes first
    booting = [*old, replica("n1", ReplicaPhase.BOOTING, generation=2, age=30)]
    assert kinds(plan(2, booting, generation=2)) == []  # wait for the surge to be ready
    ready = [*old, replica("n1", generation=2)]
    assert kinds(plan(2, ready, generation=2)) == [("Drain", "o2"), ("Launch", None)]


def test_spec_drift_without_budget_for_a_surge_replaces_in_place() -> None:
    old = [replica("o1", generation=1, price=5.0)]
    p = plan(1, old, generation=2, limits=BudgetLimits(workload_usd_per_hour=6.0), price=5.0)
    assert kinds(p) == [("Drain", "o1")]
    assert "replaced in place" in p.actions[0].reason
    assert "would exceed the workload ceiling $6.00/h" in p.actions[0].reason


def test_nothing_to_do_when_converged() -> None:
    p = plan(2, [replica("a"), replica("b"), replica("gone", ReplicaPhase.TERMINATED)])
    assert p.actions == ()
    assert p.requeue_after is None


# --- the ceiling is never crossed, whatever happens ---------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> tuple[float, list[tuple[int, float, int, int]]]:
    ceiling = draw(st.floats(1.0, 30.0))
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 12),  # desired
                st.floats(0.1, 8.0),  # the price placement found
                st.integers(0, 2**16),  # which replicas progress
                st.integers(0, 3),  # spec generation bump
            ),
            min_size=1,
            max_size=30,
        )
    )
    return ceiling, steps


@settings(max_examples=200, deadline=None)
@given(histories(), st.integers(1, 6), st.floats(5.0, 60.0))
def test_budget_is_never_exceeded_by_any_sequence_of_plans(
    history: tuple[float, list[tuple[int, float, int, int]]], max_instances: int, fleet_cap: float
) -> None:
    ceiling, steps = history
    limits = BudgetLimits(
        workload_usd_per_hour=ceiling, max_instances=max_instances, fleet_usd_per_hour=fleet_cap
    )
    other_workloads = fleet_cap / 3
    fleet: list[ReplicaView] = []
    now = NOW
    generation = 1
    serial = 0
    for desired, price, progress_bits, bump in steps:
        now += timedelta(seconds=45)
        generation += bump == 3
        fleet = _progress(fleet, progress_bits, now)
        live_total = sum(r.usd_per_hour for r in fleet if r.phase is not ReplicaPhase.TERMINATED)
        p = plan_actions(
            desired=desired,
            replicas=fleet,
            spec_generation=generation,
            timeouts=TIMEOUTS,
            limits=limits,
            launch_usd_per_hour=price,
            now=now,
            fleet_live_usd_per_hour=other_workloads + live_total,
        )
        for action in p.actions:
            if isinstance(action, Launch):
                serial += 1
                fleet.append(
                    ReplicaView(
                        launch_id=f"l{serial}",
                        phase=ReplicaPhase.PENDING,
                        generation=generation,
                        offer_key="k",
                        usd_per_hour=price,
                        intent_at=now,
                    )
                )
            elif isinstance(action, Drain | Terminate):
                fleet = [_apply(r, action, now) for r in fleet]
            else:
                raise AssertionError(f"no warm pool, yet {action}")
        live = [r for r in fleet if r.phase is not ReplicaPhase.TERMINATED]
        spent = sum(r.usd_per_hour for r in live)
        assert spent <= ceiling + 1e-9
        assert len(live) <= max_instances
        assert other_workloads + spent <= fleet_cap + 1e-9
        if p.refusals:
            assert all("refused" in r.reason for r in p.refusals)


def _apply(r: ReplicaView, action: Drain | Terminate, now: datetime) -> ReplicaView:
    if r.launch_id != action.launch_id:
        return r
    if isinstance(action, Drain):
        assert r.phase is ReplicaPhase.READY
        return replace(r, phase=ReplicaPhase.DRAINING, drain_requested_at=now)
    assert r.phase is not ReplicaPhase.TERMINATED
    return replace(r, phase=ReplicaPhase.TERMINATING)


def _progress(fleet: list[ReplicaView], bits: int, now: datetime) -> list[ReplicaView]:
    """Some replicas move on: pending -> booting -> ready, requests finish, and the
    provider confirms terminations."""
    moved: list[ReplicaView] = []
    for index, r in enumerate(fleet):
        go = bool(bits >> (index % 16) & 1)
        if go and r.phase is ReplicaPhase.PENDING:
            r = replace(r, phase=ReplicaPhase.BOOTING)
        elif go and r.phase is ReplicaPhase.BOOTING:
            r = replace(r, phase=ReplicaPhase.READY, ready_at=now, in_flight=index % 3)
        elif go and r.phase is ReplicaPhase.TERMINATING:
            r = replace(r, phase=ReplicaPhase.TERMINATED)
        elif r.phase is ReplicaPhase.DRAINING and go:
            r = replace(r, in_flight=0)
        moved.append(r)
    return moved


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 8),
    st.lists(
        st.tuples(st.sampled_from(list(ReplicaPhase)), st.floats(0.1, 5.0), st.integers(1, 3)),
        max_size=10,
    ),
)
def test_plan_moves_toward_desired_and_never_double_handles_a_replica(
    desired: int, rows: list[tuple[ReplicaPhase, float, int]]
) -> None:
    fleet = [
        replica(f"r{i}", phase, price=price, generation=gen, age=100, drain_age=10, in_flight=1)
        for i, (phase, price, gen) in enumerate(rows)
    ]
    p = plan(desired, fleet, generation=3)
    touched = [a.launch_id for a in p.actions if not isinstance(a, Launch)]
    assert len(touched) == len(set(touched))
    phases = {r.launch_id: r.phase for r in fleet}
    for action in p.actions:
        if isinstance(action, Drain):
            assert phases[action.launch_id] is ReplicaPhase.READY
        if isinstance(action, Terminate):
            assert phases[action.launch_id] not in (
                ReplicaPhase.TERMINATED,
                ReplicaPhase.TERMINATING,
            )
    active = [
        r
        for r in fleet
        if r.phase in (ReplicaPhase.PENDING, ReplicaPhase.BOOTING, ReplicaPhase.READY)
    ]
    removed = len(touched) - sum(
        1 for r in fleet if r.phase is ReplicaPhase.DRAINING and r.launch_id in touched
    )
    after = len(active) - removed + len(p.launches)
    if len(active) <= desired:
        assert after <= desired + 1  # a surge of one at most
    else:
        assert after >= desired or all(r.generation < 3 for r in active)


class _CountedPrice(float):
    """A price that counts the additions made with it (the budget's arithmetic)."""

    additions = 0

    def __add__(self, other: float) -> float:
        _CountedPrice.additions += 1
        return float(self) + float(other)

    def __radd__(self, other: float) -> float:
        _CountedPrice.additions += 1
        return float(other) + float(self)


def _additions_to_plan(desired: int) -> int:
    _CountedPrice.additions = 0
    fleet = [replica(f"r{i}", price=_CountedPrice(1.0)) for i in range(desired // 2)]
    p = plan(
        desired,
        fleet,
        limits=BudgetLimits(workload_usd_per_hour=1e9),
        price=_CountedPrice(1.0),
    )
    assert len(p.launches) == desired - desired // 2
    return _CountedPrice.additions


def test_the_budget_work_of_a_plan_grows_linearly_with_the_fleet() -> None:
    # Summing the whole ledger again for every launch made 8,000 launches take seconds
    # (quadratic); each launch adds its price once.
    small, large = _additions_to_plan(1_000), _additions_to_plan(8_000)
    assert large <= 8 * small + 8
    assert large <= 3 * 8_000


def test_launches_beyond_the_per_plan_limit_wait_for_the_next_plan_due_at_once() -> None:
    p = plan_actions(
        desired=10,
        replicas=[replica("a")],
        spec_generation=1,
        timeouts=TIMEOUTS,
        limits=ROOMY,
        launch_usd_per_hour=1.0,
        now=NOW,
        launch_limit=4,
    )
    assert len(p.launches) == 4
    assert p.requeue_after == 0
    exact = plan_actions(
        desired=5,
        replicas=[replica("a")],
        spec_generation=1,
        timeouts=TIMEOUTS,
        limits=ROOMY,
        launch_usd_per_hour=1.0,
        now=NOW,
        launch_limit=4,
    )
    assert len(exact.launches) == 4 and exact.requeue_after is None


def test_a_deleted_predecessor_s_instances_count_against_the_ceiling() -> None:
    p = plan_actions(
        desired=3,
        replicas=[],
        spec_generation=1,
        timeouts=TIMEOUTS,
        limits=BudgetLimits(workload_usd_per_hour=2.5),
        launch_usd_per_hour=1.0,
        now=NOW,
        inherited_usd_per_hour=[1.0],
    )
    assert len(p.launches) == 1
    assert p.refusals[0].reason == (
        "launch refused: 2 x $1.00/h + $1.00/h = $3.00/h would exceed the workload ceiling $2.50/h"
    )


RECLAIM = NOW + timedelta(seconds=120)


def warned(launch_id: str, *, reclaim: datetime = RECLAIM) -> ReplicaView:
    """A ready replica warned of its reclaim, still serving (the ledger's view of it)."""
    return replace(replica(launch_id, ReplicaPhase.DRAINING), warned=True, reclaim_at=reclaim)


def test_a_warned_replica_keeps_serving_while_the_plan_replaces_it_now() -> None:
    """At EC2's warning (120 s ahead) a ready replica is not drained: the plan counts it
    out, so the same step launches its replacement, and wakes at the drain margin."""
    notice = heed_spot_notice(
        "a", ReplicaPhase.READY, reason="spot notice", now=NOW, reclaim_at=RECLAIM
    )
    assert notice is None
    a = warned("a")
    assert a.still_serving
    p = plan(2, [a, replica("b")])
    assert kinds(p) == [("Launch", None)]
    assert p.requeue_after == 120 - SPOT_DRAIN_MARGIN_S


def test_a_warned_replica_drains_at_the_margin_before_its_reclaim() -> None:
    drain_at = RECLAIM - timedelta(seconds=SPOT_DRAIN_MARGIN_S)
    before = heed_spot_notice(
        "a",
        ReplicaPhase.READY,
        reason="n",
        now=drain_at - timedelta(seconds=1),
        reclaim_at=RECLAIM,
    )
    assert before is None
    at = heed_spot_notice("a", ReplicaPhase.READY, reason="n", now=drain_at, reclaim_at=RECLAIM)
    assert isinstance(at, Drain) and at.launch_id == "a"
    # In the plan: 30 s before its reclaim the replacement still boots, yet it drains.
    near = warned("a", reclaim=NOW + timedelta(seconds=SPOT_DRAIN_MARGIN_S))
    assert kinds(plan(2, [near, replica("b"), replica("c", ReplicaPhase.BOOTING, age=60)])) == [
        ("Drain", "a")
    ]
    # GCE's 30 s warning leaves no margin: drained at the warning; so is one whose
    # reclaim time is not known.
    gce = heed_spot_notice(
        "a", ReplicaPhase.READY, reason="n", now=NOW, reclaim_at=NOW + timedelta(seconds=30)
    )
    assert isinstance(gce, Drain)
    assert isinstance(
        heed_spot_notice("a", ReplicaPhase.READY, reason="n", now=NOW, reclaim_at=None), Drain
    )


def test_a_warned_replica_drains_once_its_replacement_is_ready() -> None:
    booting = plan(2, [warned("a"), replica("b"), replica("c", ReplicaPhase.BOOTING, age=60)])
    assert kinds(booting) == []  # the replacement boots: the warned replica serves on
    ready = plan(2, [warned("a"), replica("b"), replica("c")])
    assert kinds(ready) == [("Drain", "a")]
    assert "replacement serves" in ready.actions[0].reason
    # Once its drain started it is a draining replica like any other: ended when empty.
    drained = replace(warned("a"), drain_requested_at=NOW - timedelta(seconds=5))
    assert not drained.still_serving
    assert kinds(plan(2, [drained, replica("b"), replica("c")])) == [("Terminate", "a")]


def test_a_spot_notice_terminates_a_replica_that_would_not_serve_before_the_reclaim() -> None:
    for phase in (ReplicaPhase.PENDING, ReplicaPhase.BOOTING):
        assert heed_spot_notice("a", phase, reason="r", now=NOW, reclaim_at=RECLAIM) == Terminate(
            "a", "r"
        )
    for phase in (ReplicaPhase.DRAINING, ReplicaPhase.TERMINATING):
        assert heed_spot_notice("a", phase, reason="r", now=NOW, reclaim_at=RECLAIM) is None
