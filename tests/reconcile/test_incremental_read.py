"""A pass reads only the rows written since the last one, and compares only the
workloads something moved for: a change of one workload's row or of one instance at
the provider still steps that workload, and a steady pass reads no unchanged row."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from autoscaler.reconcile.fleet import FleetCache, read_fleet
from autoscaler.store.db import session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase
from providers.base import InstanceState
from tests.reconcile.test_changes import stepped
from tests.reconcile.world import World, fixed


@contextmanager
def selects(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """Every SELECT the store is asked for inside the block, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


async def rows_returned(engine: AsyncEngine, statements: list[tuple[str, Any]]) -> int:
    """How many rows of the workloads and the ledger these SELECTs return when run
    again (the store unchanged since)."""
    total = 0
    async with engine.connect() as conn:
        for statement, parameters in statements:
            lowered = statement.lower()
            if "from instances" not in lowered and "from workloads" not in lowered:
                continue
            total += len((await conn.exec_driver_sql(statement, parameters)).all())
    return total


async def converged(world: World, *slugs: str) -> None:
    for slug in slugs:
        await world.apply(fixed(slug, 2))
    for _ in range(4):  # launch; the engines answer; the rows are looked at once more
        await world.step(5)
    for slug in slugs:
        assert await world.phases(slug) == [Phase.READY, Phase.READY]
    await world.step(5)
    assert stepped(world) == (0, len(slugs))


async def drain_by_sql(world: World, launch_id: str) -> None:
    """Ask for a replica's drain as an operator's SQL would, outside the controller."""
    async with world.sessions() as s:
        await s.execute(
            update(LedgerRow)
            .where(LedgerRow.launch_id == launch_id)
            .values(drain_requested_at=world.now)
        )
        await s.commit()


async def test_a_steady_pass_reads_no_unchanged_row(engine: AsyncEngine) -> None:
    world = World(session_factory(engine))
    world.deps = world.make_deps(sweep_sec=3600.0)  # the spend SUM: the first pass only
    await converged(world, "a", "b", "c")
    with selects(engine) as steady:
        await world.step(5)
    assert stepped(world) == (0, 3)
    assert await rows_returned(engine, steady) == 0
    # One row written (an operator's SQL): the next pass reads it, and steps its workload.
    [first, _] = await world.rows("b")
    await drain_by_sql(world, first.launch_id)
    with selects(engine) as changed:
        await world.step(5)
    assert stepped(world) == (1, 2)
    assert await rows_returned(engine, changed) > 0


async def test_a_row_written_outside_the_controller_steps_its_workload(
    engine: AsyncEngine,
) -> None:
    world = World(session_factory(engine))
    await converged(world, "a", "b", "c")
    [first, _] = await world.rows("b")
    await drain_by_sql(world, first.launch_id)
    await world.step(5)
    assert stepped(world) == (1, 2)
    assert [r.phase for r in world.deps.memory.seen[first.workload_id].facts.rows].count(
        Phase.DRAINING
    ) == 1


async def test_an_instance_stopped_at_the_provider_steps_its_workload(
    engine: AsyncEngine,
) -> None:
    world = World(session_factory(engine))
    await converged(world, "a", "b", "c")
    [first, _] = await world.rows("c")
    world.cloud.set_state(first.instance_id or "", InstanceState.STOPPED)
    await world.step(5)
    assert stepped(world) == (1, 2)  # c alone, whose replica's machine is not running


async def _two_rows(engine: AsyncEngine) -> tuple[World, str, str]:
    world = World(session_factory(engine))
    await world.apply(fixed("a", 2))
    for _ in range(3):
        await world.step(5)
    first, second = await world.rows("a")
    return world, first.launch_id, second.launch_id


async def _mark(session: AsyncSession, launch_id: str, error: str) -> None:
    await session.execute(
        update(LedgerRow).where(LedgerRow.launch_id == launch_id).values(last_error=error)
    )


async def test_a_row_committed_after_a_later_one_is_still_read(pg_url: str) -> None:
    """PostgreSQL: a transaction that began writing first but commits after another's
    read is read by the next pass (the bound is the snapshot's ``xmax`` and the
    transactions it shows in progress, not the highest revision seen)."""
    from autoscaler.store.db import open_store

    async with open_store(pg_url) as engine:
        world, first, second = await _two_rows(engine)
        cache = FleetCache()
        async with world.sessions() as s:
            await read_fleet(s, cache=cache)
        async with world.sessions() as early, world.sessions() as late:
            await _mark(early, first, "early")  # the older transaction id, not committed
            await _mark(late, second, "late")
            await late.commit()
            async with world.sessions() as s:
                fleet = await read_fleet(s, cache=cache)
            errors = {r.launch_id: r.last_error for r in fleet.rows()}
            assert errors[second] == "late" and errors[first] is None
            await early.commit()
        async with world.sessions() as s:
            fleet = await read_fleet(s, cache=cache)
        assert {r.launch_id: r.last_error for r in fleet.rows()}[first] == "early"
        assert fleet.changed == {fleet.workloads[0].id}


async def test_an_incremental_read_equals_a_full_one(engine: AsyncEngine) -> None:
    world, first, second = await _two_rows(engine)
    await world.apply(fixed("b", 1))
    cache = FleetCache()
    async with world.sessions() as s:
        await read_fleet(s, cache=cache)
        await _mark(s, first, "reported")
        await s.execute(
            update(LedgerRow)
            .where(LedgerRow.launch_id == second)
            .values(terminated_confirmed_at=world.now)
        )
        await s.commit()
    await world.step(5)  # b launches: new rows
    async with world.sessions() as s:
        incremental = await read_fleet(s, cache=cache)
        whole = await read_fleet(s)
    assert incremental.workloads == whole.workloads
    assert incremental.usd_per_hour == whole.usd_per_hour
    assert second not in {r.launch_id for r in incremental.rows()}


async def test_after_any_pass_an_incremental_read_equals_a_full_one(engine: AsyncEngine) -> None:
    """Workloads applied, resized, deleted and applied again under the same slug, rows
    written outside the controller, machines gone at the provider: after every pass,
    reading on from the controller's kept fleet gives what a whole read gives."""
    rnd = random.Random(3)
    world = World(session_factory(engine))
    for i in range(40):
        slug, roll = rnd.choice("abc"), rnd.random()
        if roll < 0.3:
            await world.apply(fixed(slug, rnd.randint(0, 3)))
        elif roll < 0.4:
            await world.delete(slug)
        elif roll < 0.55:
            open_rows = [r for r in await world.rows() if r.terminated_confirmed_at is None]
            if open_rows:
                async with world.sessions() as s:
                    await _mark(s, rnd.choice(open_rows).launch_id, f"written {i}")
                    await s.commit()
        elif roll < 0.65 and world.live_instances():
            gone = rnd.choice(world.live_instances())
            world.cloud.set_state(gone.instance_id, InstanceState.TERMINATED)
        await world.step(rnd.choice([1.0, 5.0, 30.0]))
        cache = copy.deepcopy(world.deps.memory.fleet)
        async with world.sessions() as s:
            incremental = await read_fleet(s, cache=cache)
            whole = await read_fleet(s)
        assert incremental.workloads == whole.workloads
        assert incremental.usd_per_hour == pytest.approx(whole.usd_per_hour)
        assert dict(incremental.by_instance) == dict(whole.by_instance)
        assert incremental.by_ref == whole.by_ref
