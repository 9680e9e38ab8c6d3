"""A replica bought on-demand while the spot market was unavailable moves back to spot
once the market is available again: the spot replacement is bought and serving before
the on-demand machine is drained and terminated."""

from __future__ import annotations

from datetime import timedelta

from autoscaler.store.phase import Phase, phase_of
from providers.base import Transient
from tests.reconcile.world import OFFERS, World, autoscaling


async def _confirmed_only_when_gone(world: World) -> None:
    for row in await world.rows("bot"):
        if row.terminated_confirmed_at is not None:
            assert world.cloud.get(row.instance_id or "").state.is_gone


async def test_an_on_demand_stand_in_is_replaced_on_spot_once_the_market_is_back(
    world: World,
) -> None:
    until = world.now + timedelta(seconds=600)
    for offer in OFFERS:  # every spot market refused a moment ago
        world.deps.memory.unavailable[f"{offer.key}#spot"] = until
    await world.apply(autoscaling("bot", allow_spot_instances=True, max_hourly_cost_usd=10.0))
    await world.step()
    await world.step(5)
    [dear] = await world.rows("bot")
    assert not dear.spot and phase_of(dear) is Phase.READY

    await world.step(300)  # the market is still marked: nothing moves
    assert len(await world.rows("bot")) == 1

    await world.step(400)  # available again, and the on-demand replica served 10 minutes
    dear_row, cheap = await world.rows("bot")
    assert cheap.spot and cheap.offer_key == dear.offer_key
    assert phase_of(cheap) in (Phase.PENDING, Phase.BOOTING)
    assert phase_of(dear_row) is Phase.READY  # make before break
    said = [d.reason for d in await world.decisions() if "replace 1 x NVIDIA" in d.reason]
    assert said and "on-demand at $" in said[-1] and "saves $" in said[-1]
    [*_, launch] = await world.decisions("launch")
    assert launch.reason.startswith(f"replace {dear.launch_id}: 1 x NVIDIA")
    assert " spot $" in launch.reason

    await world.step(5)  # the spot replica is ready: the on-demand one drains
    phases = {r.launch_id: phase_of(r) for r in await world.rows("bot")}
    assert phases[cheap.launch_id] is Phase.READY
    assert phases[dear.launch_id] in (Phase.DRAINING, Phase.TERMINATING)

    world.provider.fail_next("terminate", Transient)
    for _ in range(6):
        await world.step(5)
        await _confirmed_only_when_gone(world)
    rows = {r.launch_id: r for r in await world.rows("bot")}
    assert rows[dear.launch_id].terminated_confirmed_at is not None
    assert world.cloud.get(rows[dear.launch_id].instance_id or "").state.is_gone
    assert phase_of(rows[cheap.launch_id]) is Phase.READY
    assert [i.instance_id for i in world.live_instances()] == [rows[cheap.launch_id].instance_id]

    await world.step(1800)  # nothing cheaper is left: the fleet stays as it is
    assert len(await world.rows("bot")) == 2
