"""An eventually consistent cloud: instances the provider does not show yet.

EC2 answers ``InvalidInstanceID.NotFound`` for a while after ``RunInstances`` returned
an instance. The controller must not take that absence as the instance's death: no row
closed on it, no replacement bought for it, nothing left running unaccounted.
"""

from __future__ import annotations

from autoscaler.reconcile.deps import Memory
from autoscaler.store.phase import Phase
from providers.base import Instance, LaunchRequest, Transient
from providers.fake import FakeProvider
from tests.reconcile.world import World, fixed


async def test_an_instance_not_visible_yet_is_neither_closed_nor_replaced(world: World) -> None:
    world.cloud.visibility_delay_sec = 17  # longer than three 5 s ticks
    await world.apply(fixed("bot", 1))
    await world.step()
    for _ in range(6):
        await world.step(5)
        rows = await world.rows("bot")
        assert len(rows) == 1, "a replacement was bought for an instance not visible yet"
        assert rows[0].terminated_confirmed_at is None
        assert len(world.live_instances()) == 1
    assert await world.phases("bot") == [Phase.READY]
    assert len(world.provider.calls_to("launch")) == 1


async def test_unseen_instances_count_against_the_ceiling(world: World) -> None:
    world.cloud.visibility_delay_sec = 30
    await world.apply(fixed("bot", 3))
    for _ in range(8):
        await world.step(5)
        live = world.live_instances()
        assert len(live) <= 3, "more machines running than the workload asks for"
        open_rows = [r for r in await world.rows("bot") if r.terminated_confirmed_at is None]
        assert {r.instance_id for r in open_rows} == {i.instance_id for i in live}


async def test_a_delete_while_unseen_terminates_once_the_instance_shows(world: World) -> None:
    world.cloud.visibility_delay_sec = 20
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.delete("bot")
    for _ in range(8):
        await world.step(5)
        [row] = await world.rows("bot")
        if row.terminated_confirmed_at is not None:
            assert world.live_instances() == [], "closed while its machine still runs"
    assert world.live_instances() == []
    [row] = await world.rows("bot")
    assert row.terminate_requested_at is not None
    assert row.terminated_confirmed_at is not None


class LosesFirstAnswer(FakeProvider):
    """Creates the first machine, then loses the answer (a reset connection)."""

    lost = False

    async def launch(self, request: LaunchRequest) -> Instance:
        instance = await super().launch(request)
        if not self.lost:
            self.lost = True
            raise Transient(request.action, "connection reset after the request was sent")
        return instance


async def test_a_lost_launch_answer_is_adopted_not_bought_twice(world: World) -> None:
    world.cloud.visibility_delay_sec = 12
    world.deps = world.make_deps(provider=LosesFirstAnswer(world.cloud, name="aws"))
    await world.apply(fixed("bot", 1))
    for _ in range(6):
        await world.step(5)
    assert len(world.cloud.all()) == 1  # one machine: the launch id is the ClientToken
    [row] = await world.rows("bot")
    assert row.instance_id == world.cloud.all()[0].instance_id
    assert row.terminated_confirmed_at is None


async def test_a_restarted_controller_waits_the_grace_again(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    [row] = await world.rows("bot")
    world.cloud.forget(row.instance_id or "")
    await world.step(world.deps.settings.visibility_grace_sec - 10)
    world.deps.memory = Memory()  # a restart forgets what it had seen
    await world.step(20)
    assert (await world.rows("bot"))[0].terminated_confirmed_at is None
