"""The oracle's plan meets the SLO where every policy is measured: its repair adds
capacity where the replay misses, stops when capacity does not help, and the replay
starts with the replicas the first slots were bought for."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from autoscaler.sim.oracle import (
    REPAIR_STALL_ROUNDS,
    OraclePlan,
    Replay,
    Replayed,
    priced_plan,
    repair,
)
from autoscaler.sim.run import Scenario, plan_world, prepare, replay_oracle
from autoscaler.sim.workload import SimWorkload, feasible_offers
from catalog.model import Offer
from tests.sim.conftest import CALM_CLOUD, constant, ramp

PER_SLOT = 100
"""Requests per slot in the fake replays below."""


def _plan(offer: Offer, counts: Sequence[int], *, allowance: int) -> OraclePlan:
    return priced_plan(
        counts,
        offer=offer,
        spot=False,
        slot_s=60.0,
        boot_s=180.0,
        end_s=60.0 * len(counts),
        misses=0,
        allowance=allowance,
    )


def _fake_replay(true_need: Sequence[int], *, floor: int = 0) -> tuple[list[int], Replay]:
    """A replay where each slot misses 30 requests per replica short of ``true_need``
    (and never fewer than ``floor`` in slot 0); counts its calls."""
    calls = [0]

    def replay(plan: OraclePlan) -> Replayed:
        calls[0] += 1
        misses = [
            30 * max(need - held, 0) for need, held in zip(true_need, plan.fleet, strict=True)
        ]
        misses[0] = max(misses[0], floor)
        return Replayed(
            requests=(PER_SLOT,) * len(true_need), misses=tuple(misses), billed_usd=plan.cost_usd
        )

    return calls, replay


@pytest.fixture
def h100(workload: SimWorkload, offers: tuple[Offer, ...]) -> Offer:
    return feasible_offers(workload, offers)[0]


def test_repair_adds_capacity_where_the_replay_misses_until_the_slo_is_met(h100: Offer) -> None:
    true_need = [2, 2, 6, 6, 2, 1, 1, 1, 1, 1]
    allowance = 5  # of 1,000 requests: 99.5 %
    calls, replay = _fake_replay(true_need)
    relaxed = _plan(h100, [1] * len(true_need), allowance=allowance)
    repaired = repair(relaxed, replay=replay)
    assert repaired.meets_slo
    assert repaired.replayed is not None and repaired.replayed.total_misses <= allowance
    assert all(held >= need for held, need in zip(repaired.fleet, true_need, strict=True))
    assert repaired.repair_rounds == calls[0] - 1 >= 1
    # Its cost is the plan's own bill, dearer than the relaxed plan it started from.
    assert repaired.relaxed_cost_usd == relaxed.cost_usd < repaired.cost_usd
    again = _plan(h100, repaired.need, allowance=allowance)
    assert repaired.cost_usd == pytest.approx(again.cost_usd)
    assert repaired.fleet == again.fleet


def test_repair_stops_when_capacity_does_not_help_and_says_the_plan_falls_short(
    h100: Offer,
) -> None:
    # Slot 0 misses 50 requests however many replicas it holds (as a prompt queued behind
    # another long prefill does): the repair gives up instead of buying without end.
    calls, replay = _fake_replay([1] * 6, floor=50)
    repaired = repair(_plan(h100, [1] * 6, allowance=5), replay=replay)
    assert repaired.meets_slo is False
    assert repaired.replayed is not None and repaired.replayed.total_misses == 50
    assert calls[0] == REPAIR_STALL_ROUNDS + 1


def test_the_oracles_plan_meets_the_slo_when_replayed_in_the_simulator(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    prepared = prepare(
        Scenario(
            workload=workload, offers=offers, requests=ramp(), trace_name="t", cloud=CALM_CLOUD
        )
    )
    plan = prepared.oracle
    assert plan.meets_slo
    assert plan.replayed is not None and plan.replayed.attainment >= 0.99
    assert plan.allowance == math.floor(0.01 * len(prepared.requests))
    # The full report of the same replay agrees with what the oracle kept of it.
    report = replay_oracle(prepared)
    assert report.slo_attainment == pytest.approx(plan.replayed.attainment)
    assert report.cost_usd == pytest.approx(plan.replayed.billed_usd)
    assert report.oracle_cost_usd == plan.cost_usd


def test_the_replay_starts_with_the_replicas_bought_for_the_first_slots(
    workload: SimWorkload, offers: tuple[Offer, ...], h100: Offer
) -> None:
    # One replica in the first minute, three from the second: with a 180 s boot the two
    # more were bought before time 0, so they serve from time 0 like the warm fleet.
    plan = _plan(h100, [1, 3, 3, 3], allowance=0)
    world = plan_world(
        workload=workload,
        offers=offers,
        requests=constant(rps=2.0, seconds=240),
        seed=0,
        cloud=CALM_CLOUD,
        plan=plan,
    )
    outcomes = world.run()
    launches = [e for e in outcomes.events if e.kind == "launch"]
    assert len(launches) == 3
    assert all(e.t < 0 for e in launches)
    assert outcomes.timeline[0].ready == 3
