"""Several controllers sharing the fleet on PostgreSQL: shard leases move when a
controller dies, never before its lease ends; a launch commits only under its lease;
the fleet ceiling is exact across controllers; four controllers share forty workloads
and lose one.

Required under ``CI=true``; elsewhere skipped with a message when no server answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.catalog_sync import LiveCatalog
from autoscaler.controller import Controller, run_controller
from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile import batch
from autoscaler.reconcile.deps import (
    Deps,
    LeaseLost,
    NoSignals,
    ProviderEntry,
    ProviderRegistry,
    Settings,
)
from autoscaler.reconcile.ledger import FLEET_LOCK_ID
from autoscaler.reconcile.provisioner import LaunchRefused, admit, new_launch_id
from autoscaler.reconcile.shards import NUM_SHARDS, LeaseSettings, ShardMember, shard_of
from autoscaler.spec import OnDrift
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import ShardLease, Workload
from autoscaler.store.workloads import ensure_workload
from catalog.snapshot import load_bundled
from providers.base import SystemClock, utc
from providers.fake import FakeCloud, FakeProvider
from tests.reconcile.world import A10G, CLUSTER, L4, OFFERS, PROJECT, FakeHealth, fixed

pytestmark = pytest.mark.postgres

FAST = LeaseSettings(ttl_sec=3.0, renew_sec=0.5)
"""Short leases keep the tests quick; the defaults' bound is checked in test_shards."""


@pytest.fixture
async def engines(pg_url: str) -> AsyncIterator[list[AsyncEngine]]:
    """Five engines on one database: a controller process each, and an observer."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_store(pg_url)) for _ in range(5)]


async def _until(check: Callable[[], Awaitable[bool]], *, what: str, within: float = 60) -> None:
    """Wait for ``check`` to hold, asking again as the controllers work."""

    async def poll() -> None:
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout=within)
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what}") from None


async def _db_now(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        value = await conn.scalar(text("SELECT clock_timestamp()"))
    assert isinstance(value, datetime)
    return value


async def _leases(engine: AsyncEngine) -> dict[int, ShardLease]:
    async with session_factory(engine)() as s:
        return {lease.shard: lease for lease in await s.scalars(select(ShardLease))}


def _member(engine: AsyncEngine, name: str) -> ShardMember:
    return ShardMember(engine, settings=FAST, metrics=ControllerMetrics(), member_id=name)


# --- leases ---------------------------------------------------------------------------


async def test_a_dead_members_shards_move_only_after_its_leases_expire(
    engines: list[AsyncEngine],
) -> None:
    a, b = _member(engines[0], "ctl-a"), _member(engines[1], "ctl-b")
    await a.renew_once()
    assert a.shards() == list(range(NUM_SHARDS))  # alone: every shard
    await b.renew_once()  # b joins; a's shards are not free yet
    await a.renew_once()  # a sees b and gives b its share
    await b.renew_once()
    assert len(a.shards()) == len(b.shards()) == NUM_SHARDS // 2
    assert set(a.shards()).isdisjoint(b.shards())
    before = await _leases(engines[4])

    await a.close()  # a dies: nothing released
    died_at = await _db_now(engines[4])
    await b.renew_once()
    assert len(b.shards()) == NUM_SHARDS // 2  # a's leases still run

    async def b_holds_all() -> bool:
        await b.renew_once()
        return len(b.shards()) == NUM_SHARDS

    await _until(b_holds_all, what="b takes a's shards")
    after = await _leases(engines[4])
    for shard, lease in before.items():
        if lease.holder != "ctl-a":
            continue
        taken = after[shard]
        assert taken.holder == "ctl-b" and taken.token == lease.token + 1
        assert taken.acquired_at is not None and lease.expires_at is not None
        assert taken.acquired_at >= lease.expires_at  # never before a's lease ended
        assert (taken.acquired_at - died_at).total_seconds() <= FAST.ttl_sec + FAST.renew_sec + 1
    await b.close()


async def test_a_member_that_stops_hands_its_shards_over_at_the_next_round(
    engines: list[AsyncEngine],
) -> None:
    a, b = _member(engines[0], "ctl-a"), _member(engines[1], "ctl-b")
    for member in (a, b, a, b):
        await member.renew_once()
    await a.leave()
    await b.renew_once()  # no wait for a TTL
    assert b.shards() == list(range(NUM_SHARDS))
    async with engines[4].connect() as conn:
        members = (await conn.execute(text("SELECT member_id FROM controller_members"))).all()
    assert [m for (m,) in members] == ["ctl-b"]
    await b.close()


async def test_a_launch_commits_only_under_its_lease_and_holds_off_a_taker(
    engines: list[AsyncEngine],
) -> None:
    a = _member(engines[0], "ctl-a")
    await a.renew_once()
    shard = shard_of(PROJECT, "bot")
    async with session_factory(engines[0])() as s:
        await a.fence(s, project=PROJECT, slug="bot")  # held until this transaction ends
        async with engines[4].connect() as conn:  # a taker's lock on the row is refused
            with pytest.raises(DBAPIError, match="could not obtain lock"):
                await conn.execute(
                    select(ShardLease).where(ShardLease.shard == shard).with_for_update(nowait=True)
                )
        await a.renew_once()  # while a's own round renews it
        assert shard in a.shards()
        await s.commit()
    # Taken behind a's back (a clock gone wrong, an operator): a's next launch finds out.
    async with session_factory(engines[4])() as s, s.begin():
        await s.execute(
            update(ShardLease)
            .where(ShardLease.shard == shard)
            .values(holder="ctl-b", token=ShardLease.token + 1)
        )
    async with session_factory(engines[0])() as s:
        with pytest.raises(LeaseLost, match=f"shard {shard} of acme/bot"):
            await a.fence(s, project=PROJECT, slug="bot")
    assert shard not in a.shards()  # and stops acting on it at once
    await a.close()


async def test_a_step_that_outlived_its_lease_launches_nothing_after_the_shard_came_back(
    engines: list[AsyncEngine],
) -> None:
    """A step reads the workload's rows under one lease; the lease lapses, another
    controller takes the shard (and may launch), then this controller takes it back. The
    step's launch would act on rows read before the other's writes: it is fenced out."""
    a = _member(engines[0], "ctl-a")
    await a.renew_once()
    shard = shard_of(PROJECT, "bot")
    with a.step_scope(PROJECT, "bot"):  # the step starts under a's first lease
        for holder in ("ctl-b", "ctl-a"):  # taken by b, then taken back by a
            async with session_factory(engines[4])() as s, s.begin():
                await s.execute(
                    update(ShardLease)
                    .where(ShardLease.shard == shard)
                    .values(holder=holder, token=ShardLease.token + 1)
                )
        await a.renew_once()
        assert shard in a.shards()  # a holds it again, under a new token
        async with session_factory(engines[0])() as s:
            with pytest.raises(LeaseLost, match=f"shard {shard} of acme/bot"):
                await a.fence(s, project=PROJECT, slug="bot")
    async with session_factory(engines[0])() as s:  # a step started now may launch
        await a.fence(s, project=PROJECT, slug="bot")
        await s.commit()
    await a.close()


# --- the fleet ceiling across controllers ------------------------------------------------


def _deps(engine: AsyncEngine, *, ceiling: float, member: ShardMember) -> Deps:
    return Deps(
        sessions=session_factory(engine),
        providers=ProviderRegistry({}),
        clock=SystemClock(),
        signals=NoSignals(),
        health=FakeHealth(),
        offers=lambda: OFFERS,
        settings=Settings(cluster_id=CLUSTER, fleet_max_hourly_cost_usd=ceiling),
        shards=member,
    )


async def _workload(engine: AsyncEngine, slug: str) -> Workload:
    async with session_factory(engine)() as s, s.begin():
        result = await ensure_workload(
            s, project=PROJECT, spec=fixed(slug), on_drift=OnDrift.RECONCILE, now=utc(0)
        )
        return result.workload


async def _launch(deps: Deps, workload: Workload, price: float) -> str | None:
    """What the provisioner does before the provider hears of a launch: admit, write
    the intent, commit. The refusal when the fleet ceiling has no room, else ``None``."""
    async with deps.sessions() as s:
        try:
            await admit(deps, s, workload=workload, usd_per_hour=price)
        except LaunchRefused as refused:
            return refused.reason
        s.add(
            LedgerRow(
                launch_id=new_launch_id(),
                workload_id=workload.id,
                project=workload.project,
                workload_slug=workload.slug,
                spec_generation=1,
                provider="aws",
                offer_key=L4.key,
                region="us-east-1",
                zone="us-east-1a",
                instance_type=L4.instance_type,
                gpu=L4.gpu,
                gpu_count=1,
                hourly_usd=price,
                intent_at=utc(0),
            )
        )
        await s.commit()
        return None


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prices=st.lists(
        st.lists(st.sampled_from([0.4, 0.8, 1.0, 1.86, 3.2]), min_size=1, max_size=6),
        min_size=2,
        max_size=4,
    ),
    ceiling=st.sampled_from([2.0, 5.0, 7.5]),
)
def test_concurrent_controllers_never_launch_past_the_fleet_ceiling(
    pg_url: str, prices: list[list[float]], ceiling: float
) -> None:
    """Each controller launches its list of prices at once with the others; whatever
    the interleaving, the fleet's total stays within the ceiling, and a launch was
    refused only if it did not fit even in the final total (the total only grows)."""

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            opened = [await stack.enter_async_context(open_store(pg_url)) for _ in prices]
            async with opened[0].begin() as conn:
                await conn.execute(
                    text("TRUNCATE instances, decisions, shard_leases, controller_members")
                )
            sharders = []
            for n, engine in enumerate(opened):
                member = _member(engine, f"ctl-{n}")
                await member.renew_once()
                sharders.append(member)
            for member in sharders:  # every member sees all the others
                await member.renew_once()
            runs = []
            for n, (engine, member) in enumerate(zip(opened, sharders, strict=True)):
                slug = next(  # a workload of this controller's own shards
                    f"w{n}-{i}" for i in range(10_000) if member.owns(PROJECT, f"w{n}-{i}")
                )
                workload = await _workload(engine, slug)
                deps = _deps(engine, ceiling=ceiling, member=member)

                async def run(
                    deps: Deps, workload: Workload, mine: list[float]
                ) -> list[str | None]:
                    return [await _launch(deps, workload, p) for p in mine]

                runs.append(run(deps, workload, prices[n]))
            outcomes = await asyncio.gather(*runs)
            async with session_factory(opened[0])() as s:
                total = float(await s.scalar(select(func.sum(LedgerRow.hourly_usd))) or 0)
            assert total <= ceiling + 1e-9
            for mine, done in zip(prices, outcomes, strict=True):
                for price, refusal in zip(mine, done, strict=True):
                    if refusal is not None:
                        assert "would exceed the fleet ceiling" in refusal
                        assert total + price > ceiling + 1e-9
            for member in sharders:
                await member.close()

    asyncio.run(scenario())


# --- renewals and launches waiting for the fleet reservation ---------------------------


async def _waiting_for_the_reservation(engine: AsyncEngine) -> bool:
    """Whether a transaction waits for the fleet reservation's advisory lock."""
    async with engine.connect() as conn:
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid = :id AND NOT granted"
            ),
            {"id": FLEET_LOCK_ID},
        )
    return bool(waiting)


async def _intents(engine: AsyncEngine, workload: Workload) -> int:
    async with session_factory(engine)() as s:
        count = await s.scalar(
            select(func.count()).select_from(LedgerRow).where(LedgerRow.workload_id == workload.id)
        )
    return int(count or 0)


async def test_a_round_renews_while_a_launch_waits_for_the_fleet_reservation(
    engines: list[AsyncEngine],
) -> None:
    """Another controller's launch holds the reservation, so this controller's launch
    waits for it with its shard's lease row fenced; the round still renews that lease
    (and the others), and the launch then commits under it."""
    a = _member(engines[0], "ctl-a")
    await a.renew_once()
    workload = await _workload(engines[0], "bot")
    deps = _deps(engines[0], ceiling=100.0, member=a)
    shard = shard_of(PROJECT, "bot")
    async with engines[4].connect() as other:
        await other.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": FLEET_LOCK_ID})
        launch = asyncio.create_task(_launch(deps, workload, 1.0))
        renewal: asyncio.Task[None] | None = None
        try:

            async def launch_waits() -> bool:
                return await _waiting_for_the_reservation(engines[4])

            await _until(launch_waits, what="the launch waits for the reservation")
            before = (await _leases(engines[4]))[shard].expires_at
            renewal = asyncio.create_task(a.renew_once())

            async def renewed() -> bool:
                return renewal is not None and renewal.done()

            await _until(renewed, what="the round while the launch waits", within=30)
            renewal.result()
            after = (await _leases(engines[4]))[shard]
            assert after.holder == "ctl-a" and before is not None and after.expires_at is not None
            assert after.expires_at > before
            assert shard in a.shards()
            assert not launch.done()  # still waiting for the reservation
        finally:
            await other.rollback()  # the other launch commits: the reservation is free
            if renewal is not None:
                await asyncio.gather(renewal, return_exceptions=True)
    assert await launch is None  # launched, under the renewed lease
    assert await _intents(engines[4], workload) == 1
    await a.close()


async def test_a_launch_whose_lease_lapsed_while_it_waited_for_the_reservation_buys_nothing(
    engines: list[AsyncEngine],
) -> None:
    """A controller stops renewing (stalled) while its launch waits for the reservation:
    no other controller takes the fenced shard meanwhile, the launch, once it gets the
    reservation, finds its lease lapsed and writes nothing, and the shard then moves."""
    a = _member(engines[0], "ctl-a")
    await a.renew_once()  # and no round after this one
    workload = await _workload(engines[0], "bot")
    deps = _deps(engines[0], ceiling=100.0, member=a)
    shard = shard_of(PROJECT, "bot")
    b = _member(engines[1], "ctl-b")
    async with engines[4].connect() as other:
        await other.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": FLEET_LOCK_ID})
        launch = asyncio.create_task(_launch(deps, workload, 1.0))
        try:

            async def launch_waits() -> bool:
                return await _waiting_for_the_reservation(engines[4])

            await _until(launch_waits, what="the launch waits for the reservation")

            async def b_took_the_rest() -> bool:
                await b.renew_once()
                return len(b.shards()) == NUM_SHARDS - 1

            await _until(b_took_the_rest, what="b takes every lapsed shard but the fenced one")
            assert shard not in b.shards()
            assert not a.owns(PROJECT, "bot")
        finally:
            await other.rollback()
    with pytest.raises(LeaseLost, match=f"shard {shard} of acme/bot"):
        await launch
    assert await _intents(engines[4], workload) == 0

    async def b_holds_all() -> bool:
        await b.renew_once()
        return len(b.shards()) == NUM_SHARDS

    await _until(b_holds_all, what="b takes the shard once the launch gave up")
    await a.close()
    await b.close()


# --- four controllers, forty workloads, one killed ----------------------------------------


@dataclass
class Running:
    name: str
    engine: AsyncEngine
    controller: Controller
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def reconciled(self) -> set[str]:
        """Workloads whose step this controller ran (it exports their desired count)."""
        return {
            sample.labels["workload"]
            for metric in self.controller.deps.metrics.desired.collect()
            for sample in metric.samples
        }

    def shards_owned(self) -> float:
        value = self.controller.deps.metrics.registry.get_sample_value(
            "autoscaler_controller_shards_owned"
        )
        return value or 0.0


def _controller(engine: AsyncEngine, cloud: FakeCloud, *, data_dir: Path) -> Controller:
    metrics = ControllerMetrics()
    deps = Deps(
        sessions=session_factory(engine),
        providers=ProviderRegistry({"aws": ProviderEntry(FakeProvider(cloud, name="aws"))}),
        clock=SystemClock(),
        signals=NoSignals(),
        health=FakeHealth(),
        offers=lambda: OFFERS,
        settings=Settings(cluster_id=CLUSTER, fleet_max_hourly_cost_usd=CEILING, tick_sec=0.5),
        metrics=metrics,
    )
    live = LiveCatalog(load_bundled(), data_dir=data_dir, select=lambda _s: OFFERS, metrics=metrics)
    return Controller(deps=deps, live=live)


CEILING = 70.0
"""Forty one-replica workloads, placed on L40S at $1.86/h (on A10G at $1.00/h where
that is all the room left), want more than this."""


async def _fleet(engine: AsyncEngine) -> list[LedgerRow]:
    async with session_factory(engine)() as s:
        return list(
            await s.scalars(select(LedgerRow).where(LedgerRow.terminated_confirmed_at.is_(None)))
        )


async def test_four_controllers_share_forty_workloads_and_survive_losing_one(
    engines: list[AsyncEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    write_intents = batch._write_intents

    async def recorded(deps: Any, launches: Any, *, fleet: Any) -> Any:
        batches.append(len(launches))
        return await write_intents(deps, launches, fleet=fleet)

    monkeypatch.setattr(batch, "_write_intents", recorded)
    observer = engines[4]
    cloud = FakeCloud(clock=SystemClock())
    fleet = [
        Running(f"ctl-{n}", engines[n], _controller(engines[n], cloud, data_dir=tmp_path / f"c{n}"))
        for n in range(4)
    ]
    peak = 0.0
    watching = True

    async def watch_spend() -> None:
        nonlocal peak
        while watching:
            peak = max(peak, sum(r.hourly_usd for r in await _fleet(observer)))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_spend())
    for running in fleet:
        running.task = asyncio.create_task(
            run_controller(
                running.controller,
                engine=running.engine,
                stopping=running.stopping,
                sharding=FAST,
                member_id=running.name,
            )
        )
    try:

        async def balanced() -> bool:
            return all(r.shards_owned() == NUM_SHARDS // 4 for r in fleet)

        await _until(balanced, what="the four controllers hold 16 shards each")
        slugs = [f"w{i:02d}" for i in range(40)]
        for slug in slugs:
            await _workload(observer, slug)

        async def launched() -> bool:
            rows = await _fleet(observer)
            seen = set().union(*(r.reconciled() for r in fleet))
            full = sum(r.hourly_usd for r in rows) + A10G.on_demand_usd_per_hour > CEILING
            return seen == set(slugs) and full and all(r.instance_id for r in rows)

        await _until(launched, what="every workload reconciled and the ceiling reached")
        owners = {slug: [r.name for r in fleet if slug in r.reconciled()] for slug in slugs}
        assert all(len(names) == 1 for names in owners.values()), owners  # exactly one each
        assert batches == []  # sharded: each launch stepped in full, under its lease

        victim, survivors = fleet[1], [fleet[0], *fleet[2:]]
        its_workloads = victim.reconciled()
        assert its_workloads
        held_before = {
            s: lease
            for s, lease in (await _leases(observer)).items()
            if lease.holder == victim.name
        }
        assert victim.task is not None
        victim.task.cancel()  # as SIGKILL: no lease released
        killed_at = await _db_now(observer)
        await asyncio.gather(victim.task, return_exceptions=True)

        async def moved() -> bool:
            return its_workloads <= set().union(*(r.reconciled() for r in survivors))

        await _until(moved, what="the killed controller's workloads reconciled by the others")
        move_sec = (await _db_now(observer) - killed_at).total_seconds()
        # Reported, not asserted: the time depends on the machine's load, and the
        # handover's rule (not before the lease ended, only to survivors) is checked below.
        print(f"workloads of the killed controller reconciled elsewhere {move_sec:.2f}s after")
        after = await _leases(observer)
        for shard, lease in held_before.items():
            taken, ended = after[shard].acquired_at, lease.expires_at
            assert after[shard].holder in {r.name for r in survivors}
            assert taken is not None and ended is not None
            assert taken >= ended  # not before the killed controller's lease ended

        await _until(launched, what="intents left by the killed controller resolved")
    finally:
        for running in fleet:
            running.stopping.set()
        await asyncio.gather(*(r.task for r in fleet if r.task), return_exceptions=True)
        watching = False
        await watcher

    rows = await _fleet(observer)
    machines = await FakeProvider(cloud, name="aws").list(CLUSTER)
    live = {i.launch_id for i in machines if not i.state.is_gone}
    assert {r.launch_id for r in rows} == live  # every machine on record, none twice
    total = sum(r.hourly_usd for r in rows)
    assert total <= CEILING
    assert total + min(r.hourly_usd for r in rows) > CEILING  # filled, not left unused
    assert len(rows) < len(slugs)  # so some workloads were refused
    assert max(sum(1 for r in rows if r.workload_slug == s) for s in slugs) == 1
    assert peak <= CEILING


async def test_every_connection_a_member_opens_has_the_servers_round_limit(
    engines: list[AsyncEngine],
) -> None:
    """The server cuts a statement of a round past half the lease on the member's first
    connection and on one the driver opens again by itself after a round was cancelled
    mid-statement (the connection invalidated), not only on the first."""
    member = _member(engines[0], "limits")
    try:
        conn = await member._connection()
        first = (await conn.execute(text("SHOW statement_timeout"))).scalar_one()
        await conn.rollback()
        await conn.invalidate()  # what a cancelled statement leaves
        again = (await conn.execute(text("SHOW statement_timeout"))).scalar_one()
        await conn.rollback()
    finally:
        await member.close()
    assert first == again == f"{int(FAST.round_timeout_sec * 1000)}ms"
