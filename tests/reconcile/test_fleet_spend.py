"""The fleet's spend is read once per pass (with the fleet's rows, and not at all per
workload), and the launches decided earlier in a pass count against the ceiling later in
the same pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.store.db import open_store, session_factory
from tests.reconcile.world import L4, L40S, World, fixed


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        yield engine


def fleet_sums(engine: AsyncEngine) -> list[str]:
    """Every SUM over the whole fleet's open rows the store is asked for, from now on."""
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.lower().split())
        if "sum(instances.hourly_usd)" in text and "workload_id" not in text:
            seen.append(text)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return seen


async def test_a_launch_later_in_a_pass_counts_the_spend_decided_earlier(
    engine: AsyncEngine,
) -> None:
    world = World(session_factory(engine), fleet_ceiling=2.7)
    await world.apply(fixed("alpha", 1))
    await world.apply(fixed("beta", 1))
    await world.step()  # one pass: alpha, then beta
    [alpha] = await world.rows("alpha")
    [beta] = await world.rows("beta")
    # alpha's L40S ($1.86) leaves $0.84 of the ceiling: beta gets an L4 ($0.80), not the
    # L40S it would get against a fleet total read before alpha's launch.
    assert alpha.offer_key == L40S.key
    assert beta.offer_key == L4.key
    assert alpha.hourly_usd + beta.hourly_usd <= 2.7


async def test_a_full_ceiling_refuses_the_next_workload_in_the_same_pass(
    engine: AsyncEngine,
) -> None:
    world = World(session_factory(engine), fleet_ceiling=2.0)
    await world.apply(fixed("alpha", 1))
    await world.apply(fixed("beta", 1))
    await world.apply(fixed("gamma", 1))
    await world.step()
    rows = await world.rows()
    assert sum(r.hourly_usd for r in rows) <= 2.0
    assert [r.workload_slug for r in rows] == ["alpha"]  # an L40S; $0.14/h fits nothing
    refused = await world.decisions("refused")
    assert len(refused) == 2
    assert all("fleet ceiling" in d.reason for d in refused)


async def test_a_pass_reads_the_fleet_total_once_not_per_workload(engine: AsyncEngine) -> None:
    world = World(session_factory(engine), fleet_ceiling=100.0)
    for slug in ("a", "b", "c", "d", "e"):
        await world.apply(fixed(slug, 2))
    sums = fleet_sums(engine)
    await world.step()  # launches: each workload's new rows move the pass's total
    # The pass's decisions start from the total of the rows it read in one query (no
    # SUM); the one SUM is the fleet-spend metric's at its end.
    assert len(sums) == 1
    assert len(await world.rows()) == 10
    assert world.deps.metrics.fleet_usd._value.get() == sum(
        r.hourly_usd for r in await world.rows()
    )


async def test_without_a_fleet_ceiling_no_step_reads_the_fleet_total(engine: AsyncEngine) -> None:
    world = World(session_factory(engine))
    for slug in ("a", "b", "c"):
        await world.apply(fixed(slug, 1))
    sums = fleet_sums(engine)
    await world.step()
    await world.step(5)
    assert len(sums) == 1  # the metric's, once per sweep_sec (30 s)
    await world.step(30)
    assert len(sums) == 2
    assert len(world.live_instances()) == 3
