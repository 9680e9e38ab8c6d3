"""A spot machine's warning reaches the simulated controller before the reclaim, and it
acts as the reconciler does: the market skipped, the replica drained, its replacement
launched by the same step while the warned machine still serves what it holds."""

from __future__ import annotations

from autoscaler.sim.gateway import Outcome
from autoscaler.sim.policies import static_policy
from autoscaler.sim.workload import SimWorkload
from autoscaler.sim.world import CloudSettings, ScaleEvent, World
from catalog.model import Offer
from providers.simulated import SPOT_NOTICE_LEAD_S
from tests.sim.conftest import constant

RECLAIMING = CloudSettings(stockout_probability=0.0, spot_interruptions_per_hour=2.0)


def _world(workload: SimWorkload, offers: tuple[Offer, ...], *, seed: int) -> World:
    return World(
        workload=workload,
        offers=offers,
        policy=static_policy(workload.spec, replicas=2, name="static-2"),
        requests=constant(rps=2.0, seconds=1800),
        seed=seed,
        cloud=RECLAIMING,
        allow_spot=True,
        initial_replicas=2,
    )


def _at(events: list[ScaleEvent], kind: str, t: float) -> list[ScaleEvent]:
    return [e for e in events if e.kind == kind and e.t == t]


def test_a_warned_replica_is_drained_and_replaced_before_its_machine_is_reclaimed(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    world = _world(workload, offers, seed=4)
    world.run()
    notices = [e for e in world.events if e.kind == "notice" and e.t >= 0]
    heeded = 0
    for notice in notices:
        launch_id = notice.detail.split()[0]
        warned = world.replicas[launch_id]
        assert warned.notice_s == notice.t and warned.interrupt_s is not None
        lead = SPOT_NOTICE_LEAD_S[warned.offer.provider]
        assert warned.interrupt_s - warned.notice_s <= lead
        drains = [e for e in _at(world.events, "drain", notice.t) if e.detail.startswith(launch_id)]
        if not drains:
            continue  # it was not serving then (booting: terminated instead)
        heeded += 1
        assert "spot notice: " in drains[0].detail
        # The replacement is bought by the same step, away from the warned spot market,
        # while the warned machine still runs.
        [launch] = _at(world.events, "launch", notice.t)
        assert f"{warned.offer.key} spot" not in launch.detail
        assert notice.t < warned.interrupt_s
        assert warned.drain_s == notice.t
    assert heeded >= 2
    # No request was cut: each warned replica finished what it held before the reclaim.
    assert all(r.outcome is not Outcome.CUT for r in world.records)


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
