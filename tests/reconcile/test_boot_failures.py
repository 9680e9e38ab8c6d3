"""Replicas that end before they were ever ready: one ``boot_failed`` decision each, the
workload's next launch backed off, the series ended by a ready replica."""

from __future__ import annotations

from providers.base import InstanceState
from tests.reconcile.world import World, fixed


async def _fail_the_booting_replica(world: World) -> None:
    [booting] = [r for r in await world.rows("bot") if r.terminated_confirmed_at is None]
    assert booting.ready_at is None and booting.instance_id is not None
    world.cloud.set_state(booting.instance_id, InstanceState.TERMINATED)


async def test_a_failed_boot_is_reported_once_and_the_next_launch_waits_longer_each_time(
    world: World,
) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await _fail_the_booting_replica(world)
    await world.step(1)
    [failed] = await world.decisions("boot_failed")
    [row] = await world.rows("bot")
    assert row.terminated_confirmed_at is not None
    assert row.last_error == (
        f"boot failed: instance {row.instance_id} is terminated at the provider before it was ready"
    )
    assert failed.reason.startswith(f"replica {row.launch_id} on {row.offer_key} failed to start")
    assert failed.reason.endswith("1 failed boot in a row, next launch in 5s")
    assert failed.acted is False

    await world.step(2)  # within the wait: no launch, and no second report
    assert len(await world.rows("bot")) == 1
    assert len(await world.decisions("boot_failed")) == 1

    await world.step(3)  # the wait is over: launch again
    assert len(await world.rows("bot")) == 2
    await _fail_the_booting_replica(world)
    await world.step(1)
    second = (await world.decisions("boot_failed"))[-1]
    assert second.reason.endswith("2 failed boots in a row, next launch in 10s")
    await world.step(5)
    assert len(await world.rows("bot")) == 2  # still waiting: 10 s this time
    await world.step(5)
    assert len(await world.rows("bot")) == 3

    await world.step(5)  # this one boots: the series ends
    assert world.deps.memory.boot_backoff == {}
    assert len(await world.decisions("boot_failed")) == 2


async def test_a_replica_that_served_and_then_died_is_no_failed_boot(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    assert row.ready_at is not None and row.instance_id is not None
    world.cloud.set_state(row.instance_id, InstanceState.TERMINATED)
    await world.step(5)
    [row, *_] = await world.rows("bot")
    assert (row.last_error or "").startswith("died: ")
    assert await world.decisions("boot_failed") == []
    assert len(await world.rows("bot")) == 2  # replaced at once


async def test_a_workload_at_zero_after_a_failed_boot_is_left_alone_and_still_backs_off(
    world: World,
) -> None:
    """Its backoff alone does not step it in full every pass; when it launches again,
    the backoff holds the launch until its end, and the launch goes out then."""
    await world.apply(fixed("bot", 1))
    await world.step()
    await _fail_the_booting_replica(world)
    await world.step(1)  # reported: the next launch waits 5 s
    assert "next launch in 5s" in (await world.decisions("boot_failed"))[0].reason
    await world.apply(fixed("bot", 0))
    await world.step(0.5)
    await world.step(0.5)
    stepped = world.deps.metrics.pass_workloads.labels("stepped")._value.get()
    assert stepped == 0
    assert world.deps.memory.boot_backoff  # still backing off, yet left alone
    await world.apply(fixed("bot", 1))
    await world.step(1)  # 3 s into the wait: held
    assert len(await world.rows("bot")) == 1
    await world.step(1)
    assert len(await world.rows("bot")) == 1
    await world.step(2)  # the wait is over: launched
    assert len(await world.rows("bot")) == 2
