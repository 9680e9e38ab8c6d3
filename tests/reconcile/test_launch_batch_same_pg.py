"""The pass's batch of launches (``reconcile.batch``) leaves the ledger and the decision
log as the full steps leave them for the same inputs: the same rows on the same offers
at the same prices, the same decisions with the same reasons, the same fleet ceiling.

Each case runs twice, on a fresh PostgreSQL database each time: once as the pass runs
it, once with the batch turned off (every workload stepped in full).

Required under ``CI=true``; elsewhere skipped with a message when no server answers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.reconcile import loop
from autoscaler.reconcile.batch import Batched
from autoscaler.reconcile.fleet import WorkloadFacts
from autoscaler.spec import WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Workload
from tests.conftest import fresh_pg_database
from tests.reconcile.world import World, autoscaling, fixed

pytestmark = pytest.mark.postgres

_RANDOM = {
    "id",
    "launch_id",
    "instance_id",
    "url",
    "private_address",
    "group_id",
    "engine_key",
    "revision",
}
"""Columns that differ between any two runs (fresh ids, the fake cloud's addresses, the
writing transaction's id)."""


@pytest.fixture
def pg_urls() -> Iterator[tuple[str, str]]:
    with fresh_pg_database() as one, fresh_pg_database() as other:
        yield one, other


@pytest.fixture
async def engines(pg_urls: tuple[str, str]) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    async with open_store(pg_urls[0]) as one, open_store(pg_urls[1]) as other:
        yield one, other


def _specs() -> list[WorkloadSpec]:
    return [
        fixed("a-fixed"),
        fixed("b-fixed"),
        autoscaling("c-scaling"),
        autoscaling("d-capped", max_hourly_cost_usd=0.5),  # no offer fits: refused
        fixed("e-two", 2),  # two launches: stepped in full either way
        fixed("f-fixed"),
    ]


async def _ledger(
    engine: AsyncEngine,
    *,
    batched: bool,
    fleet_ceiling: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], float]:
    """Apply the specs, run two passes; the rows and decisions, comparable across runs,
    and the workloads the first pass batched."""
    if not batched:

        async def full_steps(_deps: Any, due: Sequence[WorkloadFacts], **_: Any) -> Batched:
            return Batched(rest=tuple(due))

        monkeypatch.setattr(loop, "launch_batch", full_steps)
    world = World(session_factory(engine), fleet_ceiling=fleet_ceiling)
    for spec in _specs():
        await world.apply(spec)
    await world.step()
    count: float = world.deps.metrics.pass_workloads.labels("batched")._value.get()
    await world.step(5)
    async with world.sessions() as s:
        slugs = {w.id: w.slug for w in await s.execute(select(Workload.id, Workload.slug))}
    rows = [
        {k: v for k, v in vars(r).items() if not k.startswith("_") and k not in _RANDOM}
        for r in await world.rows()
    ]
    decisions = [
        (
            slugs[d.workload_id],
            d.kind,
            _masked(d.reason, d.inputs, d.result),
            d.at,
            d.cost_delta_usd_per_hour,
            d.acted,
        )
        for d in await world.decisions()
    ]
    monkeypatch.undo()
    return (
        sorted(rows, key=lambda r: (r["workload_slug"], r["offer_key"], r["hourly_usd"])),
        sorted(decisions, key=repr),
        count,
    )


def _masked(*parts: Any) -> str:
    """The decision's text with its launch and instance ids left out (fresh each run)."""
    return re.sub(r"\b(ln|i)-[0-9a-z]+", "<id>", repr(parts))


@pytest.mark.parametrize(
    "fleet_ceiling", [None, 100.0], ids=["no-fleet-ceiling", "fleet-ceiling-with-room"]
)
async def test_the_batch_leaves_the_ledger_the_full_steps_leave(
    engines: tuple[AsyncEngine, AsyncEngine],
    fleet_ceiling: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows, decisions, count = await _ledger(
        engines[0], batched=True, fleet_ceiling=fleet_ceiling, monkeypatch=monkeypatch
    )
    full_rows, full_decisions, none = await _ledger(
        engines[1], batched=False, fleet_ceiling=fleet_ceiling, monkeypatch=monkeypatch
    )
    assert count > 0 and none == 0
    assert rows == full_rows
    assert decisions == full_decisions


async def test_under_a_tight_fleet_ceiling_the_batch_buys_what_the_full_steps_buy(
    engines: tuple[AsyncEngine, AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for some launches only: which workloads get it depends on the order the
    full steps (eight at once) reach the fleet's total, so the two runs are compared by
    what they buy, not by workload (nor by refusals, logged per workload)."""
    ceiling = 4.0
    rows, decisions, count = await _ledger(
        engines[0], batched=True, fleet_ceiling=ceiling, monkeypatch=monkeypatch
    )
    full_rows, full_decisions, _ = await _ledger(
        engines[1], batched=False, fleet_ceiling=ceiling, monkeypatch=monkeypatch
    )
    assert count > 0

    def bought(ledger: list[dict[str, Any]]) -> list[tuple[str, float]]:
        open_rows = [r for r in ledger if r["terminated_confirmed_at"] is None]
        return sorted((r["offer_key"], r["hourly_usd"]) for r in open_rows)

    assert bought(rows) == bought(full_rows)
    assert sum(usd for _, usd in bought(rows)) <= ceiling

    def launches(log: list[tuple[Any, ...]]) -> int:
        return sum(d[1] == "launch" for d in log)

    assert launches(decisions) == launches(full_decisions) == len(bought(rows))
