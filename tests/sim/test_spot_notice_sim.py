"""A spot machine's warning reaches the simulated controller before the reclaim, and it
acts as the reconciler does: the market skipped, the replacement launched by the same
step, the warned replica serving new requests until its replacement is ready or the
drain margin before the reclaim, then drained; before the trace starts too, for the
warm fleet."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.decide.plan import SPOT_DRAIN_MARGIN_S
from autoscaler.sim.gateway import Outcome
from autoscaler.sim.policies import ControllerPolicy, static_policy
from autoscaler.sim.workload import SimWorkload
from autoscaler.sim.world import WARM_LEAD_S, CloudSettings, ScaleEvent, World
from catalog.model import Offer, ProviderName
from providers.base import SPOT_NOTICE_LEAD_S
from tests.sim.conftest import constant

RECLAIMING = CloudSettings(stockout_probability=0.0, spot_interruptions_per_hour=2.0)
FAST_BOOTS = replace(RECLAIMING, boot_median_s=40.0, boot_sigma=0.05)
"""Replacements ready well inside EC2's 120 s warning."""


def _aws(offers: tuple[Offer, ...]) -> tuple[Offer, ...]:
    """AWS offers only: their 120 s warning leaves time to serve on (GCE's 30 s does not)."""
    return tuple(o for o in offers if o.provider is ProviderName.AWS)


def _world(
    workload: SimWorkload,
    offers: tuple[Offer, ...],
    *,
    seed: int,
    cloud: CloudSettings = RECLAIMING,
) -> World:
    return World(
        workload=workload,
        offers=offers,
        policy=static_policy(workload.spec, replicas=2, name="static-2"),
        requests=constant(rps=2.0, seconds=1800),
        seed=seed,
        cloud=cloud,
        allow_spot=True,
        initial_replicas=2,
    )


def _at(events: list[ScaleEvent], kind: str, t: float) -> list[ScaleEvent]:
    return [e for e in events if e.kind == kind and e.t == t]


def _served_on(world: World) -> tuple[int, int]:
    """Check each warned replica that was serving; how many were drained at the margin
    before their reclaim, and how many earlier, once a replacement was ready."""
    at_margin = replaced = 0
    for notice in (e for e in world.events if e.kind == "notice" and e.t >= 0):
        launch_id = notice.detail.split()[0]
        warned = world.replicas[launch_id]
        assert warned.notice_s == notice.t and warned.interrupt_s is not None
        assert warned.interrupt_s - warned.notice_s <= SPOT_NOTICE_LEAD_S[warned.offer.provider]
        if warned.drain_s is None or warned.running_s > notice.t:
            continue  # it was not serving then (booting: terminated instead)
        # The replacement is bought by the same step, away from the warned spot market.
        [launch] = _at(world.events, "launch", notice.t)
        assert f"{warned.offer.key} spot" not in launch.detail
        # The drain at the margin is due at the reclaim's time less the margin, as the
        # step's datetimes carry it (to the microsecond).
        drain_at = warned.interrupt_s - SPOT_DRAIN_MARGIN_S
        assert notice.t < warned.drain_s <= drain_at + 1e-6
        # It took requests that arrived after the warning, until its drain.
        assert any(
            r.replica == launch_id and notice.t < r.arrival_s < warned.drain_s
            for r in world.records
        )
        if warned.drain_s == pytest.approx(drain_at, abs=1e-6):
            at_margin += 1
            continue
        # Drained before the margin only once a replica ready since the warning serves,
        # at the controller's next step after it.
        ready = [e.t for e in world.events if e.kind == "ready" and notice.t < e.t]
        assert ready and min(ready) <= warned.drain_s <= min(ready) + 15.0
        replaced += 1
    # No request was cut: each warned replica finished what it held before the reclaim.
    assert all(r.outcome is not Outcome.CUT for r in world.records)
    return at_margin, replaced


def test_a_warned_replica_serves_until_the_margin_while_its_replacement_boots(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    """Boots of about three minutes: no replacement is ready within EC2's 120 s, so each
    warned replica serves for 90 s and drains 30 s before its reclaim."""
    world = _world(workload, _aws(offers), seed=4)
    world.run()
    at_margin, replaced = _served_on(world)
    assert at_margin >= 2 and replaced == 0


def test_a_warned_replica_serves_until_its_replacement_is_ready(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    world = _world(workload, _aws(offers), seed=4, cloud=FAST_BOOTS)
    world.run()
    at_margin, replaced = _served_on(world)
    assert replaced >= 2 and at_margin == 0


def test_a_gce_warning_drains_at_once(workload: SimWorkload, offers: tuple[Offer, ...]) -> None:
    """GCE's 30 s warning is within the drain margin: no time to serve on."""
    world = _world(workload, offers, seed=5)
    world.run()
    gce = [e for e in world.events if e.kind == "notice" and e.t >= 0 and "gcp/" in e.detail]
    assert len(gce) >= 2
    for notice in gce:
        warned = world.replicas[notice.detail.split()[0]]
        assert warned.drain_s == notice.t or warned.running_s > notice.t


def test_a_run_with_warnings_is_the_same_for_a_seed(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    first = _world(workload, offers, seed=4).run()
    again = _world(workload, offers, seed=4).run()
    assert any(e.kind == "notice" for e in first.events)
    assert [(e.t, e.kind, e.detail) for e in first.events] == [
        (e.t, e.kind, e.detail) for e in again.events
    ]
    assert first.cost_usd == again.cost_usd


def _warm_ours(workload: SimWorkload, offers: tuple[Offer, ...], *, seed: int) -> World:
    """Our controller on two warm spot replicas, bought 30 minutes before the traffic,
    at 2 reclaims a machine-hour: the warm fleet is warned before time 0."""
    return World(
        workload=workload,
        offers=offers,
        policy=ControllerPolicy(spec=workload.spec),
        requests=constant(rps=2.0, seconds=600),
        seed=seed,
        cloud=RECLAIMING,
        allow_spot=True,
        initial_replicas=2,
    )


def test_a_warm_replica_warned_before_the_trace_is_replaced_before_it(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    """The controller runs while the warm fleet waits for the traffic: a warning then is
    heeded as during the replay, so the fleet meets the first request at its warm size."""
    world = _warm_ours(workload, offers, seed=6)
    outcomes = world.run()
    [notice] = [e for e in outcomes.events if e.kind == "notice"]
    assert -WARM_LEAD_S < notice.t < -300.0  # a warm replica, well before the trace
    # The replacement is bought at the warning, away from the warned spot market.
    warned = world.replicas[notice.detail.split()[0]]
    [launch] = _at(outcomes.events, "launch", notice.t)
    assert f"{warned.offer.key} spot" not in launch.detail
    first = outcomes.timeline[0]
    assert first.t == 0.0 and (first.ready, first.booting, first.draining) == (2, 0, 0)
    assert all(r.ttft_s is not None and r.ttft_s < 1.0 for r in outcomes.records)


def test_what_the_controller_buys_before_the_trace_is_billed_from_time_0(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    """Replacements bought and warned machines ended before time 0 are billed as the
    warm fleet is: for the time they run after time 0."""
    world = _warm_ours(workload, offers, seed=7)
    outcomes = world.run()
    assert sum(1 for e in outcomes.events if e.kind == "launch" and e.t < 0) > 2
    held = 0.0
    for r in world.replicas.values():
        stop = min(x for x in (r.ended_s, r.interrupt_s, outcomes.end_s) if x is not None)
        held += max(0.0, stop - max(r.intent_s, 0.0)) * r.usd_per_hour / 3600.0
    assert outcomes.cost_usd == pytest.approx(held)
