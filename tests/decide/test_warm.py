"""Warm pools: parking instead of terminating, resuming before launching, hold times."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from autoscaler.decide.budget import BudgetLimits
from autoscaler.decide.plan import (
    Action,
    Drain,
    Launch,
    Park,
    Plan,
    ReplicaPhase,
    ReplicaView,
    Resume,
    Terminate,
    Timeouts,
    counted_phase,
    heed_spot_notice,
    plan_actions,
)
from autoscaler.decide.warm import (
    DEFAULT_START_TIMES,
    WAIT_VALUE,
    ParkMode,
    StartPath,
    StartSample,
    StartTimes,
    WarmPolicy,
    start_medians,
    start_sample,
    start_times_from,
    warm_policy_of,
)
from autoscaler.spec import WorkloadSpec

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
TIMEOUTS = Timeouts(scaling_up_sec=600, scaling_down_sec=120)
ROOMY = BudgetLimits(workload_usd_per_hour=100.0)
AUTO = WarmPolicy(max_stopped=4, max_sleeping=4)
STORAGE = 0.02
_STARTING = (ReplicaPhase.PENDING, ReplicaPhase.BOOTING)


def replica(
    launch_id: str,
    phase: ReplicaPhase = ReplicaPhase.READY,
    *,
    price: float = 1.0,
    generation: int = 1,
    in_flight: int = 0,
    drain_age: float | None = None,
    park: ParkMode | None = None,
    parked_age: float = 0.0,
    can_sleep: bool = True,
    can_stop: bool = True,
    prefill: bool = False,
) -> ReplicaView:
    stopped = park is ParkMode.STOPPED and phase in (ReplicaPhase.PARKED, ReplicaPhase.PARKING)
    return ReplicaView(
        launch_id=launch_id,
        phase=phase,
        generation=generation,
        offer_key=f"aws/us-east-1a/{launch_id}",
        usd_per_hour=STORAGE if stopped else price,
        running_usd_per_hour=price if stopped else None,
        stopped_usd_per_hour=STORAGE if can_stop else None,
        can_sleep=can_sleep,
        intent_at=NOW - timedelta(seconds=60 if phase in _STARTING else 7200),
        ready_at=NOW - timedelta(hours=1) if phase is not ReplicaPhase.PENDING else None,
        drain_requested_at=None if drain_age is None else NOW - timedelta(seconds=drain_age),
        in_flight=in_flight,
        park_mode=park,
        parked_at=NOW - timedelta(seconds=parked_age) if phase is ReplicaPhase.PARKED else None,
        prefill=prefill,
    )


def plan(
    desired: int,
    replicas: list[ReplicaView],
    *,
    warm: WarmPolicy | None = AUTO,
    limits: BudgetLimits = ROOMY,
    generation: int = 1,
    now: datetime = NOW,
) -> Plan:
    return plan_actions(
        desired=desired,
        replicas=replicas,
        spec_generation=generation,
        timeouts=TIMEOUTS,
        limits=limits,
        launch_usd_per_hour=1.0,
        now=now,
        warm=warm,
    )


def kinds(p: Plan) -> list[tuple[str, str | None, str | None]]:
    return [
        (
            type(a).__name__,
            getattr(a, "launch_id", None),
            a.mode.value if isinstance(a, Park) else None,
        )
        for a in p.actions
    ]


def test_a_drained_replica_sleeps_when_its_engine_can_else_its_machine_stops() -> None:
    drained = replica("a", ReplicaPhase.DRAINING, drain_age=30)
    assert kinds(plan(0, [drained])) == [("Park", "a", "sleeping")]
    no_sleep = replace(drained, can_sleep=False)
    p = plan(0, [no_sleep])
    assert kinds(p) == [("Park", "a", "stopped")]
    assert "stopped at $0.02/h instead of $1/h" in p.actions[0].reason


def test_without_a_pool_or_room_or_for_an_old_generation_a_drained_replica_is_terminated() -> None:
    drained = replica("a", ReplicaPhase.DRAINING, drain_age=30)
    assert kinds(plan(0, [drained], warm=None)) == [("Terminate", "a", None)]
    full = WarmPolicy(max_stopped=1, max_sleeping=0)
    held = replica("s", ReplicaPhase.PARKED, park=ParkMode.STOPPED)
    assert ("Terminate", "a", None) in kinds(plan(0, [drained, held], warm=full))
    assert kinds(plan(0, [drained], generation=2)) == [("Terminate", "a", None)]
    spot = replica("a", ReplicaPhase.DRAINING, drain_age=30, can_sleep=False, can_stop=False)
    assert kinds(plan(0, [spot])) == [("Terminate", "a", None)]


def test_a_spot_notice_releases_a_pool_member_and_a_warned_replica_is_never_parked() -> None:
    """A spot machine warned of its reclaim is no start path: asleep (or going to sleep)
    in the pool it is terminated, and the pool is refilled, elsewhere for the callers'
    unavailable market; drained, it is terminated instead of parked."""
    reclaim = NOW + timedelta(seconds=120)
    for phase in (ReplicaPhase.PARKING, ReplicaPhase.PARKED):
        action = heed_spot_notice("a", phase, reason="spot notice: r", now=NOW, reclaim_at=reclaim)
        assert isinstance(action, Terminate) and action.launch_id == "a"
        assert action.reason.startswith("spot notice: r; parked in the warm pool")
        # A notice without a time releases it all the same.
        untimed = heed_spot_notice("a", phase, reason="r", now=NOW, reclaim_at=None)
        assert untimed == Terminate("a", "r; parked in the warm pool: released, not resumed")
    drained = replace(
        replica("a", ReplicaPhase.DRAINING, drain_age=30, can_stop=False),
        warned=True,
        reclaim_at=reclaim,
    )
    p = plan(0, [drained])
    assert kinds(p) == [("Terminate", "a", None)]
    assert "not parked: its machine is reclaimed at 12:02:00" in p.actions[0].reason


def test_a_ready_replica_warned_without_a_reclaim_time_is_drained_at_once_never_parked() -> None:
    """A spot notice that gives no time (a provider of unknown lead) warns all the same:
    on a scale-down with room in the pool, the warned replica is counted out and drained
    at once, then terminated; the pool keeps its room for a replica that can come back."""
    warned = replace(
        replica("w", can_stop=False),
        phase=counted_phase(ReplicaPhase.READY, warned=True),
        warned=True,
    )
    assert warned.reclaim_at is None and warned.still_serving
    p = plan(1, [replica("a"), replica("b"), warned])
    assert ("Drain", "w", None) in kinds(p)
    assert not [a for a in p.actions if isinstance(a, Park)]
    [drain] = [a for a in p.actions if isinstance(a, Drain) and a.launch_id == "w"]
    assert "reclaim time not known: drained at once" in drain.reason
    # Its drain done, it is terminated; the replica drained beside it takes the pool's room.
    drained = [
        replica("a"),
        replace(warned, drain_requested_at=NOW - timedelta(seconds=5)),
        replica("b", ReplicaPhase.DRAINING, drain_age=5),
    ]
    p = plan(1, drained, warm=WarmPolicy(max_stopped=0, max_sleeping=1))
    assert kinds(p) == [("Terminate", "w", None), ("Park", "b", "sleeping")]
    assert "not parked: its machine is reclaimed at a time not known" in p.actions[0].reason


def test_the_plan_releases_a_warned_pool_member_and_never_resumes_it() -> None:
    """The plan alone says what heed_spot_notice says, whoever calls it first: a member of
    the warm pool warned of its reclaim is terminated, and a scale-up resumes the other
    member instead of it."""
    warned = replace(
        replica("warned", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, parked_age=10),
        warned=True,
    )
    other = replica("other", ReplicaPhase.PARKED, park=ParkMode.STOPPED, parked_age=300)
    p = plan(1, [warned, other])
    assert ("Terminate", "warned", None) in kinds(p)
    assert [a.launch_id for a in p.actions if isinstance(a, Resume)] == ["other"]
    [released] = [a for a in p.actions if isinstance(a, Terminate) and a.launch_id == "warned"]
    assert "warned of its spot reclaim: released, not resumed" in released.reason


def test_a_replica_still_serving_requests_is_not_parked_before_its_drain_ends() -> None:
    busy = replica("a", ReplicaPhase.DRAINING, drain_age=30, in_flight=2)
    p = plan(0, [busy])
    assert p.actions == ()
    assert p.requeue_after == pytest.approx(90)


def test_scale_up_wakes_sleeping_replicas_then_starts_stopped_ones_then_buys() -> None:
    fleet = [
        replica("stopped-old", ReplicaPhase.PARKED, park=ParkMode.STOPPED, parked_age=500),
        replica("stopped-new", ReplicaPhase.PARKED, park=ParkMode.STOPPED, parked_age=100),
        replica("asleep", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, parked_age=60),
    ]
    p = plan(4, fleet)
    assert kinds(p) == [
        ("Resume", "asleep", None),
        ("Resume", "stopped-new", None),
        ("Resume", "stopped-old", None),
        ("Launch", None, None),
    ]
    assert p.resumes[0].reason == "scale up 0 -> 4: resume the sleeping replica"


def test_a_resume_is_checked_against_the_ceiling_at_its_running_price() -> None:
    parked = replica("s", ReplicaPhase.PARKED, park=ParkMode.STOPPED, price=4.0)
    serving = replica("r", price=1.0)
    p = plan(2, [serving, parked], limits=BudgetLimits(workload_usd_per_hour=1.5))
    assert p.resumes == ()
    assert p.launches == ()
    reasons = [r.reason for r in p.refusals]
    assert reasons[0].startswith("resume of s refused")
    assert "$5" in reasons[0] and "$1.50" in reasons[0]  # $1 + $4 against the $1.50 ceiling
    assert reasons[1].startswith("launch refused")  # a fresh $1 machine does not fit either
    ok = plan(2, [serving, parked], limits=BudgetLimits(workload_usd_per_hour=5.0))
    assert kinds(ok) == [("Resume", "s", None)]


def test_a_parked_replica_too_dear_to_resume_does_not_hold_back_a_fresh_machine() -> None:
    # Stopped on a $4/h offer; placement now finds a $1/h one that fits the ceiling.
    parked = replica("s", ReplicaPhase.PARKED, park=ParkMode.STOPPED, price=4.0)
    asleep = replica("z", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, price=1.0)
    serving = replica("r", price=1.0)
    p = plan(2, [serving, parked], limits=BudgetLimits(workload_usd_per_hour=3.0))
    assert kinds(p) == [("Launch", None, None)]
    assert p.refusals == ()
    assert "resume of s refused" in p.launches[0].reason
    assert "a fresh machine fits" in p.launches[0].reason
    # One that fits is still resumed first, and the dear one passed over for the next.
    p = plan(3, [serving, parked, asleep], limits=BudgetLimits(workload_usd_per_hour=3.1))
    assert kinds(p) == [("Resume", "z", None), ("Launch", None, None)]


def test_a_resume_adds_no_machine_to_the_instance_count() -> None:
    parked = replica("s", ReplicaPhase.PARKED, park=ParkMode.STOPPED)
    limits = BudgetLimits(workload_usd_per_hour=100.0, max_instances=2)
    p = plan(3, [replica("r"), parked], limits=limits)
    assert kinds(p) == [("Resume", "s", None)]
    assert "max_instances 2" in p.refusals[0].reason


def test_an_automatic_pool_holds_a_sleeping_replica_for_the_re_buy_cost_then_stops_it() -> None:
    hold = 2 * (DEFAULT_START_TIMES.fresh_s - DEFAULT_START_TIMES.wake_s)
    assert WAIT_VALUE == 2.0
    young = replica("a", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, parked_age=hold - 40)
    p = plan(0, [young])
    assert p.actions == ()
    assert p.requeue_after == pytest.approx(40)
    old = replace(young, parked_at=NOW - timedelta(seconds=hold + 1))
    p = plan(0, [old])
    assert kinds(p) == [("Park", "a", "stopped")]
    assert f"sleeping {hold + 1:.0f}s >= hold {hold:.0f}s" in p.actions[0].reason


# The automatic pool as the spec builds it: a 300 s scale-down window, the simulator's
# start paths (a 180 s boot, a 75 s start, a 1 s wake).
WINDOWED = WarmPolicy(
    max_stopped=4,
    max_sleeping=4,
    held_ready_s=300.0,
    times=StartTimes(fresh_s=180.0, start_s=75.0, wake_s=1.0),
)


def test_a_replica_leaving_a_serving_fleet_is_stopped_at_once_not_put_to_sleep() -> None:
    # 2 x (75 s start - 1 s wake) = 148 s of sleep is worth less than the 300 s the
    # scale-down window already held the replica ready at its full price: no sleep.
    drained = replica("a", ReplicaPhase.DRAINING, drain_age=30)
    p = plan(1, [replica("r"), drained], warm=WINDOWED)
    assert kinds(p) == [("Park", "a", "stopped")]
    assert p.actions[0].reason.endswith(
        "; not asleep: its sleep would be held 0s (74s faster than a stopped machine's "
        "start x 2 x $1/h running / $1/h parked, less the 300s the scale-down window held "
        "it ready)"
    )
    # The last replica of a fleet going to zero still sleeps: every request waits on it.
    assert kinds(plan(0, [drained], warm=WINDOWED)) == [("Park", "a", "sleeping")]
    # So does one leaving a serving fleet where the stopped pool is full.
    no_room = replace(WINDOWED, max_stopped=0)
    assert kinds(plan(1, [replica("r"), drained], warm=no_room)) == [("Park", "a", "sleeping")]


def test_a_serving_fleets_sleep_is_priced_against_the_next_path_less_the_window() -> None:
    serving = replica("r")
    # A spot machine cannot stop: its sleep is priced against a fresh machine,
    # 2 x (180 - 1) - 300 = 58 s.
    spot = replica("a", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, can_stop=False)
    young = replace(spot, parked_at=NOW - timedelta(seconds=50))
    p = plan(1, [serving, young], warm=WINDOWED)
    assert p.actions == ()
    assert p.requeue_after == pytest.approx(8)
    old = replace(spot, parked_at=NOW - timedelta(seconds=59))
    p = plan(1, [serving, old], warm=WINDOWED)
    assert kinds(p) == [("Terminate", "a", None)]
    assert (
        "sleeping 59s >= hold 58s (179s faster than a fresh machine x 2 x $1/h running / "
        "$1/h parked, less the 300s the scale-down window held it ready)"
    ) in p.actions[0].reason
    # Where it can stop, the start is the lead it saves: 2 x 74 s < 300 s, stopped now.
    asleep = replica("b", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, parked_age=1)
    p = plan(1, [serving, asleep], warm=WINDOWED)
    assert kinds(p) == [("Park", "b", "stopped")]
    assert "74s faster than a stopped machine's start" in p.actions[0].reason
    # With nothing else serving, the same replica is held 2 x 179 s = 358 s.
    assert plan(0, [asleep], warm=WINDOWED).actions == ()
    assert (
        plan(0, [replace(asleep, parked_at=NOW - timedelta(seconds=357))], warm=WINDOWED).actions
        == ()
    )
    late = replace(asleep, parked_at=NOW - timedelta(seconds=359))
    assert kinds(plan(0, [late], warm=WINDOWED)) == [("Park", "b", "stopped")]


def test_a_slow_start_keeps_a_serving_fleets_replica_asleep_for_what_the_window_left() -> None:
    # A 400 s start: sleeping saves 399 s, worth 798 s of sleep, less the 300 s window.
    slow = replace(WINDOWED, times=StartTimes(fresh_s=900.0, start_s=400.0, wake_s=1.0))
    assert slow.hold_seconds(
        ParkMode.SLEEPING,
        running_usd_per_hour=1.0,
        holding_usd_per_hour=1.0,
        serving=True,
        can_stop=True,
    ) == pytest.approx(2 * 399 - 300)
    drained = replica("a", ReplicaPhase.DRAINING, drain_age=30)
    assert kinds(plan(1, [replica("r"), drained], warm=slow)) == [("Park", "a", "sleeping")]
    # A stopped replica's hold ignores the window (its disks cost a hundredth).
    assert slow.hold_seconds(
        ParkMode.STOPPED, running_usd_per_hour=2.0, holding_usd_per_hour=0.02, serving=True
    ) == pytest.approx(500 * 2 * 2.0 / 0.02)


def test_a_replica_starting_counts_as_serving_but_one_given_up_does_not() -> None:
    drained = replica("a", ReplicaPhase.DRAINING, drain_age=30)
    booting = replica("b", ReplicaPhase.BOOTING)
    assert kinds(plan(1, [booting, drained], warm=WINDOWED)) == [("Park", "a", "stopped")]
    overdue = replace(booting, intent_at=NOW - timedelta(seconds=TIMEOUTS.scaling_up_sec + 1))
    p = plan(0, [overdue, drained], warm=WINDOWED)
    assert ("Park", "a", "sleeping") in kinds(p)
    assert ("Terminate", "b", None) in kinds(p)


@settings(max_examples=200, deadline=None)
@given(
    fresh=st.floats(30.0, 900.0),
    start=st.floats(5.0, 900.0),
    wake=st.floats(0.0, 30.0),
    window=st.floats(0.0, 1200.0),
    price=st.floats(0.1, 100.0),
    can_stop=st.booleans(),
    gap=st.floats(0.0, 20_000.0),
)
def test_a_serving_fleets_sleep_is_ski_rental_over_the_window_and_the_sleep(
    fresh: float,
    start: float,
    wake: float,
    window: float,
    price: float,
    can_stop: bool,
    gap: float,
) -> None:
    """The window and the sleep together are the rent: they add up to the re-buy cost
    (2 x the lead time the next path loses, at the machine's price), so whenever the next
    need comes after the replica left service, what was paid is at most twice the best
    choice in hindsight, as long as the window alone did not already exceed it."""
    policy = WarmPolicy(
        max_stopped=1,
        max_sleeping=1,
        held_ready_s=window,
        times=StartTimes(fresh_s=fresh, start_s=start, wake_s=wake),
    )
    hold = policy.hold_seconds(
        ParkMode.SLEEPING,
        running_usd_per_hour=price,
        holding_usd_per_hour=price,
        serving=True,
        can_stop=can_stop,
    )
    assert hold is not None
    lead = max(0.0, (start if can_stop else fresh) - wake)
    rebuy = WAIT_VALUE * lead  # in machine-seconds
    assert window + hold == pytest.approx(max(window, rebuy))
    # The idle time since the replica was last needed: the window, then ``gap`` more.
    idle = window + gap
    paid = window + min(gap, hold) + (rebuy if gap > hold else 0.0)
    best = min(idle, rebuy)
    if window <= rebuy:
        assert paid <= 2 * best + 1e-6
    # Never longer than the same replica's hold with nothing else serving.
    alone = policy.hold_seconds(
        ParkMode.SLEEPING, running_usd_per_hour=price, holding_usd_per_hour=price
    )
    assert alone is not None
    assert hold <= alone + 1e-9 or start > fresh


def test_a_stopped_replica_is_held_while_its_disks_cost_less_than_buying_again() -> None:
    price = 2.0
    saved = DEFAULT_START_TIMES.fresh_s - DEFAULT_START_TIMES.start_s
    hold = saved * WAIT_VALUE * price / STORAGE  # 120 s x 2 x $2 / $0.02 = 24,000 s
    assert hold == pytest.approx(24_000)
    kept = replica(
        "s", ReplicaPhase.PARKED, park=ParkMode.STOPPED, price=price, parked_age=hold - 1
    )
    assert plan(0, [kept]).actions == ()
    gone = replace(kept, parked_at=NOW - timedelta(seconds=hold + 1))
    p = plan(0, [gone])
    assert kinds(p) == [("Terminate", "s", None)]
    reason = p.actions[0].reason
    assert "stopped 24001s >= hold 24000s" in reason
    assert "120s faster than a fresh machine x 2 x $2/h running / $0.02/h parked" in reason


def test_measured_start_times_set_the_hold() -> None:
    slow_boot = replace(AUTO, times=StartTimes(fresh_s=900.0, start_s=60.0, wake_s=5.0))
    asleep = replica("a", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, parked_age=1000)
    assert plan(0, [asleep], warm=slow_boot).actions == ()  # held 2 x 895 s
    assert kinds(plan(0, [asleep])) == [("Park", "a", "stopped")]  # held 2 x 170 s


def test_parked_replicas_of_an_old_generation_or_beyond_the_bound_are_terminated() -> None:
    old = replica("old", ReplicaPhase.PARKED, park=ParkMode.STOPPED, generation=1)
    assert kinds(plan(0, [old], generation=2)) == [("Terminate", "old", None)]
    small = WarmPolicy(max_stopped=1, max_sleeping=0, expire=False)
    fleet = [
        replica("x", ReplicaPhase.PARKED, park=ParkMode.STOPPED, parked_age=300),
        replica("y", ReplicaPhase.PARKED, park=ParkMode.STOPPED, parked_age=100),
    ]
    p = plan(0, fleet, warm=small)
    assert kinds(p) == [("Terminate", "x", None)]
    assert "warm pool holds 2 stopped, at most 1" in p.actions[0].reason
    assert kinds(plan(0, fleet, warm=None)) == [("Terminate", "x", None), ("Terminate", "y", None)]


def test_an_explicit_pool_is_refilled_one_replica_at_a_time_and_parked_once_ready() -> None:
    pool = WarmPolicy(max_stopped=2, max_sleeping=0, fill_stopped=2, expire=False)
    serving = replica("r")
    p = plan(1, [serving], warm=pool)
    assert kinds(p) == [("Launch", None, None)]
    assert p.launches[0].prefill
    assert p.launches[0].reason == "warm pool refill: 0/2 stopped, keep 2"
    booting = replica("f", ReplicaPhase.BOOTING, prefill=True)
    assert plan(1, [serving, booting], warm=pool).actions == ()
    ready = replica("f", prefill=True)
    assert kinds(plan(1, [serving, ready], warm=pool)) == [("Drain", "f", None)]
    drained = replica("f", ReplicaPhase.DRAINING, drain_age=5, prefill=True)
    assert kinds(plan(1, [serving, drained], warm=pool)) == [("Park", "f", "stopped")]
    parked = replica("f", ReplicaPhase.PARKED, park=ParkMode.STOPPED, prefill=True)
    p = plan(1, [serving, parked], warm=pool)
    assert kinds(p) == [("Launch", None, None)]  # the second of two
    assert p.launches[0].reason == "warm pool refill: 1/2 stopped, keep 2"


def test_a_refill_still_booting_is_ended_once_a_scale_down_fills_the_pool() -> None:
    pool = WarmPolicy(max_stopped=2, max_sleeping=0, fill_stopped=2, expire=False)
    parked = replica("p", ReplicaPhase.PARKED, park=ParkMode.STOPPED)
    booting = replica("f", ReplicaPhase.BOOTING, prefill=True)
    drained = replica("d", ReplicaPhase.DRAINING, drain_age=30)
    serving = replica("r")
    # The scale-down's replica takes the pool's last place: the refill is not needed.
    p = plan(1, [serving, parked, booting, drained], warm=pool)
    assert kinds(p) == [("Park", "d", "stopped"), ("Terminate", "f", None)]
    assert p.actions[1].reason == (
        "warm pool refill no longer needed while it booted: 0/0 sleeping, 2/2 stopped "
        "(keep 0 sleeping, 2 stopped)"
    )
    # Without that scale-down the refill boots on.
    assert plan(1, [serving, parked, booting], warm=pool).actions == ()
    # A refill already ready is drained and parked on: it is about to fill the place.
    ready = replica("f", prefill=True)
    assert kinds(plan(1, [serving, parked, ready], warm=pool)) == [("Drain", "f", None)]
    # Two booting for one place (the pool shrank meanwhile): the newer one is ended.
    older = replace(booting, launch_id="f0", intent_at=NOW - timedelta(seconds=90))
    p = plan(1, [serving, parked, booting, older], warm=pool)
    assert kinds(p) == [("Terminate", "f", None)]


def test_an_explicit_pool_never_expires_its_replicas() -> None:
    pool = WarmPolicy(max_stopped=1, max_sleeping=0, fill_stopped=1, expire=False)
    ancient = replica("s", ReplicaPhase.PARKED, park=ParkMode.STOPPED, parked_age=30 * 86400)
    p = plan(0, [ancient], warm=pool)
    assert p.actions == ()
    assert p.requeue_after is None


def test_the_warm_pool_the_spec_asks_for() -> None:
    def spec(pool: object, backend: str = "vllm") -> WorkloadSpec:
        return WorkloadSpec.model_validate(
            {
                "name": "w",
                "slug": "w",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "backend": backend,
                "execution_policy": "autoscaling",
                "execution_policy_config": {
                    "max_workers": 4,
                    "max_hourly_cost_usd": 20.0,
                    "warm_pool": pool,
                },
            }
        )

    explicit = warm_policy_of(spec({"stopped": 2, "sleeping": 1}))
    assert explicit == WarmPolicy(
        max_stopped=2, max_sleeping=1, fill_stopped=2, fill_sleeping=1, expire=False
    )
    auto = warm_policy_of(spec("auto"))
    # The scale-down window (300 s by default) is rent a partial scale-down already paid.
    assert auto == WarmPolicy(max_stopped=4, max_sleeping=4, held_ready_s=300.0)
    sglang = warm_policy_of(spec("auto", backend="sglang"))
    assert sglang is not None and sglang.max_sleeping == 0
    assert warm_policy_of(spec(None)) is None
    assert warm_policy_of(spec("auto"), deleted=True) is None
    with pytest.raises(ValidationError, match=r"3 stopped \+ 2 sleeping = 5 replicas"):
        spec({"stopped": 3, "sleeping": 2})
    with pytest.raises(ValidationError, match="backend 'sglang' cannot sleep; allowed: 0"):
        spec({"sleeping": 1}, backend="sglang")
    with pytest.raises(ValidationError, match="warm_pool"):
        spec("always")


# --- a property: any sequence of plans with a warm pool keeps the money invariants ---------


def _apply(fleet: list[ReplicaView], action: Action, now: datetime, serial: int) -> None:
    for index, r in enumerate(fleet):
        if isinstance(action, Launch) or r.launch_id != action.launch_id:
            continue
        if isinstance(action, Drain):
            assert r.phase is ReplicaPhase.READY
            fleet[index] = replace(r, phase=ReplicaPhase.DRAINING, drain_requested_at=now)
        elif isinstance(action, Terminate):
            assert r.phase not in (ReplicaPhase.TERMINATED, ReplicaPhase.TERMINATING)
            fleet[index] = replace(r, phase=ReplicaPhase.TERMINATING)
        elif isinstance(action, Park):
            assert r.phase in (ReplicaPhase.DRAINING, ReplicaPhase.PARKED)
            assert r.can_park(action.mode)
            fleet[index] = replace(r, phase=ReplicaPhase.PARKING, park_mode=action.mode)
        elif isinstance(action, Resume):
            assert r.phase is ReplicaPhase.PARKED
            fleet[index] = replace(
                r,
                phase=ReplicaPhase.BOOTING,
                usd_per_hour=r.running_price,
                running_usd_per_hour=None,
                park_mode=None,
                parked_at=None,
                resumed_at=now,
                drain_requested_at=None,
                prefill=False,
            )
    if isinstance(action, Launch):
        fleet.append(
            ReplicaView(
                launch_id=f"l{serial}",
                phase=ReplicaPhase.PENDING,
                generation=1,
                offer_key="k",
                usd_per_hour=1.5,
                intent_at=now,
                stopped_usd_per_hour=STORAGE if serial % 3 else None,
                can_sleep=serial % 2 == 0,
                prefill=action.prefill,
            )
        )


def _progress(fleet: list[ReplicaView], bits: int, now: datetime) -> None:
    for index, r in enumerate(fleet):
        if not bits >> (index % 16) & 1:
            continue
        if r.phase is ReplicaPhase.PENDING:
            r = replace(r, phase=ReplicaPhase.BOOTING)
        elif r.phase is ReplicaPhase.BOOTING:
            r = replace(r, phase=ReplicaPhase.READY, ready_at=now, in_flight=index % 2)
        elif r.phase is ReplicaPhase.TERMINATING:
            r = replace(r, phase=ReplicaPhase.TERMINATED)
        elif r.phase is ReplicaPhase.DRAINING:
            r = replace(r, in_flight=0)
        elif r.phase is ReplicaPhase.PARKING:
            stopped = r.park_mode is ParkMode.STOPPED
            r = replace(
                r,
                phase=ReplicaPhase.PARKED,
                parked_at=now,
                usd_per_hour=STORAGE if stopped else r.running_price,
                running_usd_per_hour=r.running_price if stopped else None,
            )
        fleet[index] = r


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2**16)), min_size=1, max_size=40),
    st.floats(2.0, 12.0),
    st.integers(2, 8),
    st.sampled_from(["auto", "explicit"]),
)
def test_parking_and_resuming_never_break_the_ceiling_nor_touch_a_replica_twice(
    steps: list[tuple[int, int]], ceiling: float, max_instances: int, kind: str
) -> None:
    warm = (
        WarmPolicy(max_stopped=3, max_sleeping=2)
        if kind == "auto"
        else WarmPolicy(
            max_stopped=2, max_sleeping=1, fill_stopped=2, fill_sleeping=1, expire=False
        )
    )
    limits = BudgetLimits(workload_usd_per_hour=ceiling, max_instances=max_instances)
    fleet: list[ReplicaView] = []
    now = NOW
    serial = 0
    for desired, bits in steps:
        now += timedelta(seconds=97)
        _progress(fleet, bits, now)
        p = plan_actions(
            desired=desired,
            replicas=fleet,
            spec_generation=1,
            timeouts=TIMEOUTS,
            limits=limits,
            launch_usd_per_hour=1.5,
            now=now,
            warm=warm,
        )
        touched = [a.launch_id for a in p.actions if not isinstance(a, Launch)]
        assert len(touched) == len(set(touched))
        for action in p.actions:
            serial += 1
            _apply(fleet, action, now, serial)
        live = [r for r in fleet if r.phase is not ReplicaPhase.TERMINATED]
        assert sum(r.usd_per_hour for r in live) <= ceiling + 1e-9
        assert sum(r.machines for r in live) <= max_instances
        for mode in ParkMode:
            held = sum(
                1
                for r in live
                if r.park_mode is mode and r.phase in (ReplicaPhase.PARKING, ReplicaPhase.PARKED)
            )
            assert held <= warm.bound(mode)


def test_a_refill_of_an_older_spec_still_booting_is_terminated_and_a_current_one_launched() -> None:
    pool = WarmPolicy(max_stopped=1, max_sleeping=0, fill_stopped=1, expire=False)
    booting = replica("f", ReplicaPhase.BOOTING, prefill=True, generation=1)
    p = plan(0, [booting], warm=pool, generation=2)
    assert kinds(p) == [("Terminate", "f", None), ("Launch", None, None)]
    assert "refill of generation 1 while it booted" in p.actions[0].reason
    assert p.launches[0].prefill
    # One already ready is drained first (it may hold requests), then ended, not parked.
    ready = replica("f", prefill=True, generation=1)
    assert kinds(plan(0, [ready], warm=pool, generation=2)) == [("Drain", "f", None)]
    drained = replica("f", ReplicaPhase.DRAINING, drain_age=5, prefill=True, generation=1)
    assert kinds(plan(0, [drained], warm=pool, generation=2)) == [("Terminate", "f", None)]


def test_start_samples_say_how_a_replica_became_ready_and_medians_fill_in_defaults() -> None:
    t0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    launch = start_sample(
        offer_key="a", intent_at=t0, ready_at=at(200), resumed_at=None, resumed_from=None
    )
    started = start_sample(
        offer_key="a", intent_at=t0, ready_at=at(1060), resumed_at=at(1000), resumed_from="stopped"
    )
    woken = start_sample(
        offer_key="a", intent_at=t0, ready_at=at(1003), resumed_at=at(1000), resumed_from="sleeping"
    )
    assert launch == StartSample("a", StartPath.LAUNCH, 200.0)
    assert started == StartSample("a", StartPath.START, 60.0)
    assert woken == StartSample("a", StartPath.WAKE, 3.0)
    # Not ready since its resume, or parked again (the path it came back by is unknown).
    assert (
        start_sample(
            offer_key="a", intent_at=t0, ready_at=None, resumed_at=at(5), resumed_from="stopped"
        )
        is None
    )
    assert (
        start_sample(
            offer_key="a", intent_at=t0, ready_at=at(9), resumed_at=at(5), resumed_from=None
        )
        is None
    )

    other = StartSample("b", StartPath.LAUNCH, 100.0)
    times = start_times_from([launch, other, started])
    assert times == StartTimes(fresh_s=150.0, start_s=60.0, wake_s=DEFAULT_START_TIMES.wake_s)
    assert start_times_from([]) is None
    assert start_medians([launch, other, started]) == {
        ("a", StartPath.LAUNCH): (200.0, 1),
        ("b", StartPath.LAUNCH): (100.0, 1),
        ("a", StartPath.START): (60.0, 1),
    }


def test_a_sleeping_replica_wakes_under_a_lowered_ceiling_since_waking_costs_nothing() -> None:
    asleep = replica("a", ReplicaPhase.PARKED, park=ParkMode.SLEEPING, price=4.0)
    serving = replica("r", price=4.0)
    lowered = BudgetLimits(workload_usd_per_hour=5.0)  # below the $8/h already paid
    assert kinds(plan(2, [serving, asleep], limits=lowered)) == [("Resume", "a", None)]
    stopped = replica("s", ReplicaPhase.PARKED, park=ParkMode.STOPPED, price=4.0)
    p = plan(2, [serving, stopped], limits=lowered)
    assert p.resumes == ()
    assert p.refusals and p.refusals[0].reason.startswith("resume of s refused")
