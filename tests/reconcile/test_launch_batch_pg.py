"""On PostgreSQL the workloads of a pass whose step is one launch are launched in one
batch (``reconcile.batch``): every intent is committed before the first provider call,
and one workload's refusal, error or failed write changes nothing of the others'.

Required under ``CI=true``; elsewhere skipped with a message when no server answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase
from providers.base import Instance, InsufficientCapacity, LaunchRequest, Transient
from providers.fake import FakeProvider
from tests.reconcile.world import PROJECT, World, fixed

pytestmark = pytest.mark.postgres

WORKLOADS = 6


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    async with open_store(pg_url) as engine:
        yield engine


class RecordingProvider(FakeProvider):
    """Counts, at each launch, the intents committed (read from another session), and
    answers a workload's launches with an injected error (``errors``, by slug)."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")
        self.world = world
        self.intents_seen: list[int] = []
        self.errors: dict[str, Exception] = {}

    async def launch(self, request: LaunchRequest) -> Instance:
        async with self.world.sessions() as s:
            self.intents_seen.append(await s.scalar(select(func.count(LedgerRow.launch_id))) or 0)
        error = self.errors.get(request.tags["autoscaler:workload"])
        if error is not None:
            raise error
        return await super().launch(request)


def _world(engine: AsyncEngine) -> tuple[World, RecordingProvider]:
    world = World(session_factory(engine))
    provider = RecordingProvider(world)
    world.deps = world.make_deps(provider=provider)
    return world, provider


def _batched(world: World) -> float:
    value: float = world.deps.metrics.pass_workloads.labels("batched")._value.get()
    return value


async def _apply_all(world: World) -> None:
    for n in range(WORKLOADS):
        await world.apply(fixed(f"w{n:02d}", 1))


async def test_every_intent_of_the_batch_is_committed_before_the_first_call(
    engine: AsyncEngine,
) -> None:
    world, provider = _world(engine)
    await _apply_all(world)
    await world.step()
    assert _batched(world) == WORKLOADS
    assert provider.intents_seen == [WORKLOADS] * WORKLOADS
    rows = await world.rows()
    assert len(rows) == WORKLOADS
    assert {r.instance_id for r in rows} == {i.instance_id for i in world.live_instances()}
    assert len(await world.decisions("launch")) == WORKLOADS
    await world.step(5)
    for n in range(WORKLOADS):
        assert await world.phases(f"w{n:02d}") == [Phase.READY]


async def test_a_refusal_a_transient_error_and_a_crash_stay_their_workloads_own(
    engine: AsyncEngine,
) -> None:
    world, provider = _world(engine)
    provider.errors = {
        "w01": InsufficientCapacity("launching", "no capacity"),
        "w02": Transient("launching", "throttled", retry_after=30.0),
        "w03": RuntimeError("boom: an SDK answer the adapter does not know"),
    }
    await _apply_all(world)
    await world.step()
    assert _batched(world) == WORKLOADS
    [refused] = await world.rows("w01")
    assert refused.terminated_confirmed_at is not None  # the provider's word: none bought
    assert (refused.last_error or "").startswith("launch failed:")
    [failed] = await world.decisions("launch_failed")
    assert failed.workload_id == refused.workload_id
    [throttled] = await world.rows("w02")
    assert (throttled.instance_id, throttled.terminated_confirmed_at) == (None, None)
    assert "throttled" in (throttled.last_error or "")
    [crashed] = await world.rows("w03")
    assert (crashed.instance_id, crashed.terminated_confirmed_at) == (None, None)
    [error] = await world.decisions("error")
    assert error.workload_id == crashed.workload_id and "RuntimeError: boom" in error.reason
    assert world.deps.metrics.quarantined.labels(PROJECT, "w03")._value.get() == 1
    assert {i.tags["autoscaler:workload"] for i in world.live_instances()} == {
        "w00",
        "w04",
        "w05",
    }
    provider.errors = {}
    await world.step(60)  # the pending intents are launched under their launch ids
    await world.step(5)
    for n in range(WORKLOADS):
        assert Phase.READY in await world.phases(f"w{n:02d}")
    assert len(world.live_instances()) == WORKLOADS


async def test_a_failed_write_of_the_intents_steps_each_workload_in_full(
    engine: AsyncEngine,
) -> None:
    """The store refuses one workload's intent: the batch's transaction fails whole, and
    each workload is stepped in full in the same pass; only that one fails."""
    world, provider = _world(engine)
    async with engine.begin() as c:
        await c.execute(
            text(
                "CREATE FUNCTION refuse_w03() RETURNS trigger AS $$ BEGIN "
                "IF NEW.workload_slug = 'w03' THEN RAISE EXCEPTION 'w03 refused'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await c.execute(
            text(
                "CREATE TRIGGER refuse_w03 BEFORE INSERT ON instances "
                "FOR EACH ROW EXECUTE FUNCTION refuse_w03()"
            )
        )
    await _apply_all(world)
    await world.step()
    assert _batched(world) == 0
    assert await world.rows("w03") == []
    [error] = await world.decisions("error")
    assert "w03 refused" in error.reason
    for n in (0, 1, 2, 4, 5):
        [row] = await world.rows(f"w{n:02d}")
        assert row.instance_id is not None
    assert len(world.live_instances()) == WORKLOADS - 1
    assert len(provider.intents_seen) == WORKLOADS - 1


async def test_a_failed_write_of_the_results_writes_each_row_on_its_own(
    engine: AsyncEngine,
) -> None:
    """The store refuses one row's instance id: every other row records its instance;
    that one stays a pending intent, adopted by launch id once the store takes it."""
    world, _ = _world(engine)
    async with engine.begin() as c:
        await c.execute(
            text(
                "CREATE FUNCTION refuse_w02() RETURNS trigger AS $$ BEGIN "
                "IF NEW.workload_slug = 'w02' AND NEW.instance_id IS NOT NULL THEN "
                "RAISE EXCEPTION 'w02 refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await c.execute(
            text(
                "CREATE TRIGGER refuse_w02 BEFORE UPDATE ON instances "
                "FOR EACH ROW EXECUTE FUNCTION refuse_w02()"
            )
        )
    await _apply_all(world)
    await world.step()
    assert _batched(world) == WORKLOADS
    assert len(world.live_instances()) == WORKLOADS
    [pending] = await world.rows("w02")
    assert pending.instance_id is None and pending.terminated_confirmed_at is None
    for n in (0, 1, 3, 4, 5):
        [row] = await world.rows(f"w{n:02d}")
        assert row.instance_id is not None
    async with engine.begin() as c:
        await c.execute(text("DROP TRIGGER refuse_w02 ON instances"))
    await world.step(5)
    [adopted] = await world.rows("w02")
    assert adopted.instance_id is not None
    assert len(await world.rows()) == WORKLOADS  # adopted, not bought twice
    assert len(world.live_instances()) == WORKLOADS


async def test_a_pass_past_its_budget_batches_nothing_and_continues_where_it_stopped(
    engine: AsyncEngine,
) -> None:
    """A pass whose budget is spent before its batch starts no launch of it: no intent
    is written that no call follows, and no workload is reported over its share."""
    world = World(session_factory(engine))
    world.deps = world.make_deps(pass_budget_sec=0.0)
    for slug in ("a", "b", "c"):
        await world.apply(fixed(slug, 1))
    assert await world.step() == 0
    assert [len(await world.rows(slug)) for slug in "abc"] == [1, 0, 0]
    assert len(world.live_instances()) == 1
    overruns = world.deps.metrics.pass_overruns
    assert overruns.labels("workload")._value.get() == 0
    assert overruns.labels("pass")._value.get() == 1
    await world.step()
    await world.step()
    assert [len(await world.rows(slug)) for slug in "abc"] == [1, 1, 1]
    assert len(world.live_instances()) == 3


async def test_workloads_of_equal_placement_inputs_share_one_placement_in_a_pass(
    engine: AsyncEngine,
) -> None:
    world, _ = _world(engine)
    await world.apply(fixed("small-a", 1))
    await world.apply(fixed("small-b", 1))
    await world.apply(fixed("large", 1, model_memory_gib=40.0))  # only the L40S holds it
    await world.step()
    memo = world.deps.memory.placements
    assert (memo.computed, memo.shared) == (2, 1)
    [a], [b], [large] = [await world.rows(slug) for slug in ("small-a", "small-b", "large")]
    placed = {d.workload_id: d.inputs["placement"] for d in await world.decisions("launch")}
    assert placed[a.workload_id] == placed[b.workload_id] != placed[large.workload_id]
    assert "of 3 option(s)" in placed[a.workload_id]
    assert "of 1 option(s)" in placed[large.workload_id]  # only the L40S holds 40 GiB
    assert large.instance_type == "g6e.xlarge"
