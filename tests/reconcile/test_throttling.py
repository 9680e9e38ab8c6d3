"""Throttling is a time to retry recorded per launch, not a sleep in the pass."""

from __future__ import annotations

from autoscaler.store.phase import Phase
from providers.errors import Throttled
from tests.reconcile.world import World, fixed


async def test_a_throttled_launch_waits_for_its_retry_time_and_others_go_on(
    world: World,
) -> None:
    await world.apply(fixed("slow", 1))
    world.provider.fail_next(
        "launch", Throttled("launching", "RequestLimitExceeded", retry_after=30)
    )
    await world.step()
    [intent] = await world.rows("slow")
    assert intent.instance_id is None and intent.terminated_confirmed_at is None
    await world.apply(fixed("fine", 1))
    await world.step(5)
    await world.step(5)
    assert await world.phases("fine") == [Phase.READY]  # the other workload went on
    assert len(world.provider.calls_to("find_by_launch_id")) == 0  # not tried before 30 s
    assert len(world.provider.calls_to("launch")) == 2  # slow's one, fine's one
    await world.step(20)
    assert len(world.provider.calls_to("find_by_launch_id")) == 1
    assert await world.phases("slow") in ([Phase.BOOTING], [Phase.READY])
    assert len(world.live_instances()) == 2
