"""On PostgreSQL a pass steps several workloads at once (``reconcile.loop.steps_at_once``):
their launches overlap, each intent is still on record before its provider call, and
one workload's failure (in its provider call or in its step) stops and rolls back
nothing of the others'.

Required under ``CI=true``; elsewhere skipped with a message when no server answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from autoscaler.reconcile.batch import CALLS_AT_ONCE
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase
from providers.base import Instance, LaunchRequest
from providers.fake import FakeProvider
from tests.reconcile.world import L40S, PROJECT, World, fixed

pytestmark = pytest.mark.postgres

WORKLOADS = 12
CEILING = 5 * L40S.on_demand_usd_per_hour


@pytest.fixture
async def world(pg_url: str) -> AsyncIterator[World]:
    async with open_store(pg_url) as engine:
        yield World(session_factory(engine))


class OverlapProvider(FakeProvider):
    """Checks, inside each launch, that its intent is committed (read from another
    session); holds each launch until a second one is in flight, so launches that never
    overlap time out instead; ``broken``: launches of that workload raise an error the
    controller does not expect."""

    def __init__(self, world: World, *, broken: str | None = None) -> None:
        super().__init__(world.cloud, name="aws")
        self.world = world
        self.broken = broken
        self.in_flight = 0
        self.most_in_flight = 0
        self.overlapping = asyncio.Event()
        self.intents_missing: list[str] = []

    async def launch(self, request: LaunchRequest) -> Instance:
        async with self.world.sessions() as s:
            if await s.get(LedgerRow, request.launch_id) is None:
                self.intents_missing.append(request.launch_id)
        if request.tags.get("autoscaler:workload") == self.broken:
            raise RuntimeError("boom: an SDK answer the adapter does not know")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight > 1:
            self.overlapping.set()
        try:
            await asyncio.wait_for(self.overlapping.wait(), timeout=10)
        except TimeoutError:
            pass  # steps one at a time: ``most_in_flight`` stays 1
        finally:
            self.in_flight -= 1
        return await super().launch(request)


async def test_launches_of_several_workloads_overlap_each_after_its_intent(
    world: World,
) -> None:
    provider = OverlapProvider(world)
    world.deps = world.make_deps(provider=provider)
    for n in range(WORKLOADS):
        await world.apply(fixed(f"w{n:02d}", 1))
    await world.step()
    # One launch each: they go in the pass's batch, at most ``CALLS_AT_ONCE`` at once.
    assert 1 < provider.most_in_flight <= CALLS_AT_ONCE
    assert provider.intents_missing == []
    rows = await world.rows()
    assert len(rows) == WORKLOADS
    assert {r.instance_id for r in rows} == {i.instance_id for i in world.live_instances()}
    await world.step(5)
    for n in range(WORKLOADS):
        assert await world.phases(f"w{n:02d}") == [Phase.READY]


async def test_a_failing_provider_call_stops_no_other_workload(world: World) -> None:
    provider = OverlapProvider(world, broken="w03")
    world.deps = world.make_deps(provider=provider)
    for n in range(WORKLOADS):
        await world.apply(fixed(f"w{n:02d}", 1))
    await world.step()
    [decision] = await world.decisions("error")
    broken = await world.rows("w03")
    assert decision.workload_id == broken[0].workload_id
    assert "RuntimeError: boom" in decision.reason
    # Its intent stays on record, pending, and nothing was bought for it.
    assert [(r.instance_id, r.terminated_confirmed_at) for r in broken] == [(None, None)]
    assert all(i.tags["autoscaler:workload"] != "w03" for i in world.cloud.all())
    assert world.deps.metrics.quarantined.labels(PROJECT, "w03")._value.get() == 1
    await world.step(5)
    for n in range(WORKLOADS):
        if n != 3:
            assert await world.phases(f"w{n:02d}") == [Phase.READY]
    provider.broken = None
    await world.step(60)  # out of quarantine: the intent is launched under its launch id
    await world.step(5)
    assert await world.phases("w03") == [Phase.READY]
    assert len(world.live_instances()) == WORKLOADS


async def test_a_step_that_raises_rolls_back_no_other_workload(world: World) -> None:
    """A health check that raises for one workload's replica: its step fails after it
    read and wrote; every other workload's step commits."""
    for n in range(WORKLOADS):
        await world.apply(fixed(f"w{n:02d}", 1))
    await world.step()
    [doomed] = await world.rows("w05")
    original = world.health.healthy

    async def healthy(*, url: str, health_path: str, engine_key: str | None) -> bool:
        if url == doomed.url:
            raise RuntimeError("boom: a health probe that raises")
        return await original(url=url, health_path=health_path, engine_key=engine_key)

    world.health.healthy = healthy  # type: ignore[method-assign]
    await world.step(5)
    [decision] = await world.decisions("error")
    assert decision.workload_id == doomed.workload_id
    assert await world.phases("w05") == [Phase.BOOTING]
    for n in range(WORKLOADS):
        if n != 5:
            assert await world.phases(f"w{n:02d}") == [Phase.READY]


@pytest.mark.parametrize("broken", [None, "w00", "w06"])
async def test_the_fleet_ceiling_stays_exact_with_steps_at_once(
    pg_url: str, broken: str | None
) -> None:
    """Twelve workloads of one replica stepped at once under a fleet ceiling with room for
    five replicas on the offer they are placed on (L40S): exactly five rows, whatever the
    order, also when one workload's launch raises after its intent was committed (its
    pending intent counts)."""
    async with open_store(pg_url) as engine:
        world = World(session_factory(engine), fleet_ceiling=CEILING)
        provider = OverlapProvider(world, broken=broken)
        provider.overlapping.set()  # launches under a ceiling do not wait for each other
        world.deps = world.make_deps(provider=provider, fleet_ceiling=CEILING)
        for n in range(WORKLOADS):
            await world.apply(fixed(f"w{n:02d}", 1))
        await world.step()
        await world.step(5)
        rows = [r for r in await world.rows() if r.terminated_confirmed_at is None]
        assert len(rows) == 5
        assert sum(r.hourly_usd for r in rows) <= CEILING + 1e-9
        assert provider.intents_missing == []
        refused = await world.decisions("refused")
        assert refused and all("fleet ceiling" in d.reason for d in refused)


class SlowProvider(FakeProvider):
    """Each launch takes ``seconds`` (a cloud's launch call); counts the launches."""

    def __init__(self, world: World, *, seconds: float) -> None:
        super().__init__(world.cloud, name="aws")
        self.seconds = seconds

    async def launch(self, request: LaunchRequest) -> Instance:
        await asyncio.sleep(self.seconds)
        return await super().launch(request)


async def test_waiting_for_the_fleet_total_uses_up_no_share(pg_url: str) -> None:
    """Under a fleet ceiling the launches of steps running at once take turns; four steps
    whose launch takes 2 s each, with a share of 5 s: the last one waits 6 s for its turn
    and is not cut for it."""
    async with open_store(pg_url) as engine:
        world = World(session_factory(engine), fleet_ceiling=100.0)
        world.deps = world.make_deps(
            provider=SlowProvider(world, seconds=2.0),
            fleet_ceiling=100.0,
            workload_share_sec=5.0,
        )
        for n in range(4):
            await world.apply(fixed(f"w{n:02d}", 1))
        assert await world.step() > 0  # no step was cut: none asks for the next pass at once
        assert world.deps.metrics.pass_overruns.labels("workload")._value.get() == 0
        for n in range(4):
            assert await world.phases(f"w{n:02d}") == [Phase.BOOTING]
