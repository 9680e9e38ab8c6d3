"""A pass steps only the workloads whose inputs changed or whose timers fell due, and
leaving the others alone never hides what their own step would have done."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.decide.signals import Signals
from autoscaler.reconcile.changes import PROBE_EVERY
from autoscaler.reconcile.fleet import RowFacts, read_fleet
from autoscaler.spec import WorkloadSpec
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase, phase_of
from providers.base import InstanceState
from tests.reconcile.world import PROJECT, World, autoscaling, fixed

HOUR = timedelta(hours=1)


def stepped(world: World) -> tuple[int, int]:
    """(stepped in full, left alone) in the last pass."""
    gauge = world.deps.metrics.pass_workloads
    return (
        int(gauge.labels("stepped")._value.get()),
        int(gauge.labels("left_alone")._value.get()),
    )


@contextmanager
def writes(world: World) -> Iterator[list[str]]:
    """Every INSERT, UPDATE or DELETE the store is asked for inside the block."""
    engine: AsyncEngine = world.sessions.kw["bind"]
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


async def converged(world: World, *slugs: str, replicas: int = 2) -> None:
    for slug in slugs:
        await world.apply(fixed(slug, replicas))
    await world.step()  # launch
    await world.step(5)  # the engines answer: ready
    await world.step(5)  # the rows the last pass changed are looked at once more
    for slug in slugs:
        assert await world.phases(slug) == [Phase.READY] * replicas


async def test_a_converged_fleet_is_left_alone_without_a_write_or_a_provider_call(
    world: World,
) -> None:
    await converged(world, "a", "b", "c")
    calls = len(world.provider.calls)
    with writes(world) as written:
        await world.step(5)
    assert stepped(world) == (0, 3)
    assert written == []
    assert [c.method for c in world.provider.calls[calls:]] == ["list"]
    assert len(world.health.asked) > 0  # the engines are still asked, in one batch


async def test_a_reapplied_spec_wakes_its_workload_alone(world: World) -> None:
    await converged(world, "a", "b", "c")
    await world.apply(fixed("b", 3))
    await world.step(5)
    assert stepped(world) == (1, 2)
    assert len(await world.rows("b")) == 3
    assert len(await world.rows("a")) == len(await world.rows("c")) == 2


async def test_an_engine_that_stops_answering_is_noticed_while_left_alone(world: World) -> None:
    await converged(world, "a", "b")
    await world.step(5)
    assert stepped(world) == (0, 2)
    [first, _] = await world.rows("a")
    world.health.down.add(first.url or "")
    for _ in range(PROBE_EVERY):  # a left-alone workload's replicas are probed in turn
        await world.step(5)
        if stepped(world) != (0, 2):
            break
    assert stepped(world) == (1, 1)
    await world.step(25)  # past the unhealthy grace
    rows = await world.rows("a")
    assert rows[0].terminate_requested_at is not None
    assert "unhealthy" in (await world.decisions("terminate"))[0].reason


async def test_an_instance_gone_at_the_provider_is_closed_and_replaced(world: World) -> None:
    await converged(world, "a", "b")
    await world.step(5)
    [first, _] = await world.rows("b")
    world.cloud.set_state(first.instance_id or "", InstanceState.TERMINATED)
    await world.step(5)
    rows = await world.rows("b")
    assert rows[0].terminated_confirmed_at is not None
    assert len([r for r in rows if r.terminated_confirmed_at is None]) == 2  # replaced


async def test_a_change_written_by_another_process_wakes_the_workload(world: World) -> None:
    """A boot callback's report (here, a spot notice on a serving replica) changes the
    rows the workload reads: its step runs and drains the replica."""
    await converged(world, "a")
    await world.step(5)
    [first, _] = await world.rows("a")
    async with world.sessions() as s:
        row = await s.get(type(first), first.launch_id)
        assert row is not None
        row.last_error = "spot notice: the provider reclaims it"
        await s.commit()
    await world.step(5)
    assert (await world.rows("a"))[0].drain_requested_at is not None


async def test_every_workload_is_stepped_at_its_resync(world: World) -> None:
    world.deps = world.make_deps(resync_sec=60.0)
    await converged(world, "a", "b", "c")
    await world.step(5)
    assert stepped(world) == (0, 3)
    await world.step(60)
    assert stepped(world) == (3, 0)


async def test_an_idle_autoscaling_workload_scales_down_with_nothing_changed(
    world: World,
) -> None:
    """Its count reads the clock (the scale-down window), so its pure step runs each pass
    on the facts read: it is left alone while the decision holds, and stepped the pass
    the window has passed."""
    await world.apply(autoscaling("bot", min_workers=1, scale_down_time_window_sec=60))
    await world.step()
    await world.step(5)
    ref = (PROJECT, "bot")
    for _ in range(8):  # slow answers: scale up to two
        now = world.clock.now()
        samples = tuple((t, 3.0) for t in range(int(now) - 120, int(now), 2))
        world.signals.by_ref[ref] = Signals.from_epoch(
            ttft_samples=samples, request_rate=5.0, in_flight=4, queue_depth=0, last_request_at=now
        )
        await world.step(5)
    ready = (await world.phases("bot")).count(Phase.READY)
    assert ready >= 2
    del world.signals.by_ref[ref]  # then quiet: nothing measured, nothing written
    left_alone = 0
    for _ in range(40):
        await world.step(5)
        if Phase.DRAINING in await world.phases("bot"):
            break
        left_alone += stepped(world)[1]
    assert Phase.DRAINING in await world.phases("bot")  # the window passed: one drained
    assert left_alone > 0  # and the passes before it left the workload alone
    assert any(d.result["direction"] == "down" for d in await world.decisions("scale"))


# The ledger's columns a workload's step does not read: everything else must be in the
# facts a pass compares, or a change to it would not wake the workload.
NOT_READ_BY_A_STEP = {
    "engine_key",  # read apart, once per row (fleet.engine_keys)
    "engine_command",
    "engine",
    "engine_reason",
    "private_address",  # read at a group member's launch only
    "region",  # fixed at the intent, with the offer its offer_key names
    "instance_type",
    "spot",
    "revision",  # which rows a pass reads (fleet.FleetCache), not what a step reads
}


def test_the_facts_a_pass_compares_cover_every_column_a_step_reads() -> None:
    columns = {c.name for c in LedgerRow.__table__.columns}
    assert columns - NOT_READ_BY_A_STEP <= set(RowFacts._fields)


async def test_the_phase_read_with_the_facts_is_the_ledgers(world: World) -> None:
    await world.apply(fixed("a", 3))
    await world.step()
    await world.step(5)
    async with world.sessions() as s:
        rows = await s.scalars(select(LedgerRow).order_by(LedgerRow.launch_id))
        [_, second, third] = rows
        second.drain_requested_at = world.now
        third.terminate_requested_at = world.now
        await s.commit()
        fleet = await read_fleet(s)
        ledger = {r.launch_id: phase_of(r) for r in await s.scalars(select(LedgerRow))}
    facts = {r.launch_id: r.phase for r in fleet.rows()}
    assert facts == ledger
    assert sorted(facts.values()) == sorted([Phase.READY, Phase.DRAINING, Phase.TERMINATING])
    assert {r.launch_id: phase_of(r) for r in fleet.rows()} == ledger


def _pooled(slug: str, pool: object, *, backend: str = "vllm") -> WorkloadSpec:
    """An autoscaling workload that scales to zero, with the warm pool ``pool``."""
    spec = autoscaling(
        slug,
        min_workers=0,
        scale_to_zero=True,
        scale_to_zero_timeout_sec=60,
        warm_pool=pool,
    ).model_dump(mode="json", exclude_unset=True)
    return WorkloadSpec.model_validate({**spec, "backend": backend})


def _idle(world: World, *slugs: str) -> None:
    for slug in slugs:
        world.signals.by_ref[(PROJECT, slug)] = Signals(last_request_at=world.now - HOUR)


async def _warm_fleet(world: World) -> None:
    """A serving workload with an automatic pool, and two idle ones whose pools hold a
    stopped machine and a sleeping engine, all settled."""
    await world.apply(_pooled("stopped", {"stopped": 1}))
    await world.apply(_pooled("asleep", {"sleeping": 1}))
    await world.apply(_pooled("serving", "auto"))
    _idle(world, "stopped", "asleep")
    world.signals.by_ref[(PROJECT, "serving")] = Signals(queue_depth=1, last_request_at=world.now)
    for _ in range(8):
        await world.step(5)
    world.signals.by_ref[(PROJECT, "serving")] = Signals(last_request_at=world.now)
    for _ in range(3):
        await world.step(5)
    assert await world.phases("stopped") == [Phase.PARKED]
    assert await world.phases("asleep") == [Phase.PARKED]
    assert await world.phases("serving") == [Phase.READY]


async def test_a_fleet_with_warm_pools_is_left_alone_without_a_write_or_a_call(
    world: World,
) -> None:
    """A parked replica (a stopped machine the provider shows stopped, a sleeping engine)
    and a warm pool's start times read no further: their workloads are not stepped."""
    await _warm_fleet(world)
    calls, sleeps = len(world.provider.calls), len(world.sleeper.calls)
    with writes(world) as written:
        for _ in range(3):
            await world.step(5)
            assert stepped(world) == (0, 3)
    assert written == []
    assert [c.method for c in world.provider.calls[calls:]] == ["list"] * 3
    assert world.sleeper.calls[sleeps:] == []


async def test_a_parked_replica_left_alone_moves_on_at_its_measured_hold_time(
    world: World,
) -> None:
    """An automatic pool holds a sleeping engine for as long as the measured start times
    say (here a fresh machine took 150 s, not the default 180 s): the passes that leave
    the workload alone plan with the times its last full step read, so the park moves on
    at that hold time, not later."""
    await world.apply(_pooled("bot", "auto"))
    world.signals.by_ref[(PROJECT, "bot")] = Signals(queue_depth=1, last_request_at=world.now)
    await world.step()
    await world.step(150)  # ready: a fresh start of 150 s measured
    _idle(world, "bot")
    for _ in range(4):
        await world.step(70)
        if await world.phases("bot") == [Phase.PARKED]:
            break
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKED and row.park_mode == "sleeping"
    assert row.parked_at is not None
    left_alone = 0
    while (await world.rows("bot"))[0].park_mode == "sleeping":
        await world.step(10)
        left_alone += stepped(world)[1]
        assert (world.now - row.parked_at).total_seconds() < 400
    waited = (world.now - row.parked_at).total_seconds()
    # Held (150 - 10) s x 2 = 280 s with the measured fresh start (340 s by default).
    assert 280 <= waited < 290
    assert left_alone > 0


async def test_an_unchanged_fleet_is_read_as_the_facts_already_held(world: World) -> None:
    """Facts equal to the last pass's are those very objects (a pass makes no new
    long-lived objects for an unchanged fleet); a changed row is read anew."""
    await converged(world, "a", "b")
    async with world.sessions() as s:
        first = await read_fleet(s)
    held = {w.id: w for w in first.workloads}
    async with world.sessions() as s:
        row = await s.get(LedgerRow, first.workloads[1].rows[1].launch_id)
        assert row is not None
        row.drain_requested_at = world.now
        await s.commit()
        second = await read_fleet(s, previous=held.get)
    [a, b] = second.workloads
    assert a is first.workloads[0]
    assert b is not first.workloads[1] and b != first.workloads[1]
    assert b.rows[0] is first.workloads[1].rows[0]
    assert [r.phase for r in b.rows] == [Phase.READY, Phase.DRAINING]


async def test_a_workloads_rows_are_read_oldest_first(world: World) -> None:
    """The store is not asked to sort the fleet's rows: each workload's are put in order
    of their intents (the order a step and the last pass's facts have them in)."""
    await world.apply(fixed("a", 3))
    await world.step()
    first = (await world.rows("a"))[0]
    async with world.sessions() as s:
        row = await s.get(LedgerRow, first.launch_id)
        assert row is not None
        row.intent_at = world.now + HOUR  # the first row stored is now the newest intent
        await s.commit()
        fleet = await read_fleet(s)
    [a] = fleet.workloads
    assert [r.launch_id for r in a.rows][-1] == first.launch_id
    assert [r.intent_at for r in a.rows] == sorted(r.intent_at for r in a.rows)


async def test_a_rows_sleep_flag_is_read_once_and_forgotten_when_it_closes(world: World) -> None:
    await world.apply(fixed("a", 2))
    await world.step()
    flags: dict[str, bool] = {}
    async with world.sessions() as s:
        fleet = await read_fleet(s, sleep_flags=flags)
    assert flags == {r.launch_id: False for r in fleet.rows()}  # a fixed vLLM never sleeps
    first, second = (r.launch_id for r in fleet.rows())
    flags[first] = True  # kept: the store is not asked again (a command never changes)
    async with world.sessions() as s:
        fleet = await read_fleet(s, sleep_flags=flags)
        assert {r.launch_id: r.booted_to_sleep for r in fleet.rows()}[first] is True
        row = await s.get(LedgerRow, first)
        assert row is not None
        row.terminated_confirmed_at = world.now
        await s.commit()
        await read_fleet(s, sleep_flags=flags)
    assert flags == {second: False}
