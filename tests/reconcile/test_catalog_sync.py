"""A running controller's catalog: scheduled syncs, snapshots from other processes, and
failed syncs that keep the previous catalog."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.catalog_sync import LOCK_FILE, CatalogSync, LiveCatalog, SyncSchedule, _exclusive
from autoscaler.controller import Controller, run_controller
from autoscaler.metrics import ControllerMetrics
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from catalog.model import Offer
from catalog.snapshot import Snapshot, snapshot_path, write_snapshot
from catalog.sync.base import FetchError
from tests.reconcile.world import A10G, L4, World, fixed

BEFORE = Snapshot(
    offers=(L4,),
    taken_at=datetime(2024, 1, 1, tzinfo=UTC),  # long before the test clock
    source="test: before",
    location="before",
)


def _after(now: datetime) -> Snapshot:
    """The market after the sync: the L4 offer is gone, an A10G is on sale."""
    a10g = dataclasses.replace(A10G, on_demand_usd_per_hour=0.55)
    return Snapshot(offers=(a10g,), taken_at=now, source="test: after")


class Syncs:
    """A syncer that writes the new snapshot into the data dir (or fails), and says when."""

    def __init__(self, data_dir: Path, *, fail: bool = False) -> None:
        self.data_dir = data_dir
        self.fail = fail
        self.calls: list[datetime] = []
        self.done = asyncio.Event()

    async def __call__(self, now: datetime) -> Snapshot:
        self.calls.append(now)
        try:
            if self.fail:
                raise FetchError("aws us-east-1 GetProducts: ThrottlingException after 5 tries")
            snapshot = _after(now)
            write_snapshot(snapshot, snapshot_path(self.data_dir))
            return dataclasses.replace(snapshot, location=str(snapshot_path(self.data_dir)))
        finally:
            self.done.set()


def _live(world: World, data_dir: Path, metrics: ControllerMetrics) -> LiveCatalog:
    live = LiveCatalog(BEFORE, data_dir=data_dir, select=lambda s: s.offers, metrics=metrics)
    world.deps.offers = live.offers
    world.deps.metrics = metrics
    return live


def _sync(world: World, live: LiveCatalog, syncs: Syncs, **kw: object) -> CatalogSync:
    return CatalogSync(
        live=live,
        syncer=syncs,
        data_dir=syncs.data_dir,
        clock=world.clock,
        metrics=world.deps.metrics,
        **kw,  # type: ignore[arg-type]
    )


def _offer_of(row_offer_key: str, offers: tuple[Offer, ...]) -> Offer | None:
    return next((o for o in offers if o.key == row_offer_key), None)


async def test_a_sync_changes_the_offers_the_next_placement_sees(
    world: World, tmp_path: Path
) -> None:
    metrics = ControllerMetrics()
    live = _live(world, tmp_path, metrics)
    syncs = Syncs(tmp_path)
    await world.apply(fixed("bot", replicas=1))
    await world.step()
    [first] = await world.rows("bot")
    assert first.instance_type == L4.instance_type  # the cheapest before the sync

    assert await _sync(world, live, syncs).run_once() == "ok"
    await world.apply(fixed("later", replicas=1))
    await world.step(5)

    [second] = await world.rows("later")
    assert second.instance_type == A10G.instance_type
    assert second.hourly_usd == pytest.approx(0.55)  # the synced price
    assert [r.launch_id for r in await world.rows("bot")] == [first.launch_id]
    assert metrics.catalog_syncs.labels("ok")._value.get() == 1
    assert live.snapshot.source == "test: after"


async def test_a_failed_sync_keeps_the_previous_catalog_and_is_counted(
    world: World, tmp_path: Path
) -> None:
    metrics = ControllerMetrics()
    live = _live(world, tmp_path, metrics)

    result = await _sync(world, live, Syncs(tmp_path, fail=True)).run_once()

    assert result == "failed"
    assert live.offers() == (L4,)
    assert live.snapshot is BEFORE
    assert not snapshot_path(tmp_path).exists()
    assert metrics.catalog_syncs.labels("failed")._value.get() == 1
    await world.apply(fixed("bot", replicas=1))
    await world.step()
    [row] = await world.rows("bot")
    assert row.instance_type == L4.instance_type


async def test_only_the_leader_syncs_and_never_two_syncs_at_once(
    world: World, tmp_path: Path
) -> None:
    metrics = ControllerMetrics()
    live = _live(world, tmp_path, metrics)
    syncs = Syncs(tmp_path)
    leading = False
    sync = _sync(world, live, syncs, is_leader=lambda: leading)

    assert await sync.run_once() == "standby"
    leading = True
    with _exclusive(tmp_path / LOCK_FILE) as held:  # another process is syncing
        assert held
        assert await sync.run_once() == "busy"
    assert syncs.calls == []
    assert await sync.run_once() == "ok"
    assert len(syncs.calls) == 1


async def test_a_snapshot_another_process_wrote_is_picked_up_and_a_damaged_one_is_not(
    world: World, tmp_path: Path
) -> None:
    metrics = ControllerMetrics()
    live = _live(world, tmp_path, metrics)
    assert not live.refresh()  # nothing in the data dir yet

    write_snapshot(_after(world.now), snapshot_path(tmp_path))  # `autoscaler catalog sync`
    assert live.refresh()
    assert [o.instance_type for o in live.offers()] == [A10G.instance_type]
    assert not live.refresh()  # unchanged: nothing reloaded

    snapshot_path(tmp_path).write_text('{"format": 1, "rows": [')
    assert not live.refresh()
    assert [o.instance_type for o in live.offers()] == [A10G.instance_type]
    assert metrics.catalog_syncs.labels("unreadable")._value.get() == 1


def test_the_sync_is_a_jittered_interval_job(world: World, tmp_path: Path) -> None:
    metrics = ControllerMetrics()
    live = _live(world, tmp_path, metrics)
    controller = Controller(
        deps=world.deps,
        live=live,
        sync=_sync(world, live, Syncs(tmp_path)),
        schedule=SyncSchedule(interval_sec=3600, jitter_sec=300),
    )
    scheduler = AsyncIOScheduler(timezone=UTC)

    controller.schedule_jobs(scheduler)

    [job] = scheduler.get_jobs()
    assert job.trigger.interval == timedelta(hours=1)
    assert job.trigger.jitter == 300
    assert job.max_instances == 1


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'run.db'}") as opened:
        yield opened


async def test_the_running_controller_syncs_on_schedule_and_places_from_the_new_catalog(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    world = World(session_factory(engine))
    metrics = ControllerMetrics()
    live = _live(world, tmp_path / "data", metrics)
    syncs = Syncs(tmp_path / "data")
    controller = Controller(deps=world.deps, live=live, leading=False)
    controller.sync = _sync(world, live, syncs, is_leader=lambda: controller.leading)
    # BEFORE is months old: the first run is due at once, then every hour.
    controller.schedule = SyncSchedule(interval_sec=3600, jitter_sec=60)
    stopping, wake = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(
        run_controller(controller, engine=engine, stopping=stopping, wake=wake)
    )
    try:
        await asyncio.wait_for(syncs.done.wait(), timeout=30)
        await world.apply(fixed("bot", replicas=1))
        wake.set()
        rows = await _until_rows(world, "bot", count=1)
    finally:
        stopping.set()
        await asyncio.wait_for(running, timeout=30)

    assert len(syncs.calls) == 1
    assert rows[0].instance_type == A10G.instance_type
    assert metrics.catalog_syncs.labels("ok")._value.get() == 1


async def _until_rows(world: World, slug: str, *, count: int) -> list[LedgerRow]:
    async def poll() -> list[LedgerRow]:
        while True:
            rows = await world.rows(slug)
            if len(rows) >= count:
                return list(rows)
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), timeout=30)
