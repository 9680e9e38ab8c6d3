"""Sharding the workloads across controllers: the pure parts (which shard, who should
hold it, how fast a dead controller's shards move) and the configuration."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from autoscaler.config import ConfigError, load_config, parse_config
from autoscaler.controller import check_sharding
from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile.shards import (
    NUM_SHARDS,
    LeaseSettings,
    ShardMember,
    assign,
    move_bound_sec,
    shard_of,
)
from autoscaler.store.db import open_store

MOVE_BAR_SEC = 15.0
"""A dead controller's workloads are reconciled by the others within this."""


def test_a_workloads_shard_is_the_same_in_every_process_and_release() -> None:
    # Controllers of two releases sharing a store must agree on every workload's shard:
    # were the hash to change, both could hold "its" shard and act on it at once.
    assert [shard_of("acme", s) for s in ("support-bot", "w00", "w01")] == [40, 44, 51]
    assert shard_of("other", "support-bot") == 15  # the project is part of the key
    assert all(0 <= shard_of("acme", f"w{i}") < NUM_SHARDS for i in range(1000))


def test_workloads_spread_over_every_shard() -> None:
    counts = Counter(shard_of("acme", f"w{i:05d}") for i in range(6400))
    assert len(counts) == NUM_SHARDS
    assert max(counts.values()) < 1.5 * 6400 / NUM_SHARDS


@pytest.mark.parametrize(("members", "sizes"), [(1, {64}), (3, {21, 22}), (4, {16}), (5, {12, 13})])
def test_every_live_controller_gets_an_equal_share(members: int, sizes: set[int]) -> None:
    names = [f"ctl-{i}" for i in range(members)]
    owners = assign(names)
    assert sorted(owners) == list(range(NUM_SHARDS))
    loads = Counter(owners.values())
    assert set(loads) == set(names)
    assert set(loads.values()) <= sizes
    assert assign(list(reversed(names))) == owners  # every member computes the same


def test_removing_or_adding_a_controller_moves_about_its_share() -> None:
    four = assign(["ctl-a", "ctl-b", "ctl-c", "ctl-d"])
    three = assign(["ctl-b", "ctl-c", "ctl-d"])
    gone = {s for s, m in four.items() if m == "ctl-a"}
    moved = {s for s in four if four[s] != three[s]}
    assert gone <= moved  # the dead controller's shards all find a live owner
    assert len(moved - gone) <= 4  # and the balance moves only a few others
    five = assign(["ctl-a", "ctl-b", "ctl-c", "ctl-d", "ctl-e"])
    joined = {s for s, m in five.items() if m == "ctl-e"}
    moved = {s for s in four if four[s] != five[s]}
    assert joined <= moved
    assert len(moved - joined) <= 6


def test_no_member_no_owner() -> None:
    assert assign([]) == {}


def test_the_default_leases_move_a_dead_controllers_workloads_within_15_s() -> None:
    config = load_config(None).sharding
    leases = LeaseSettings(ttl_sec=config.lease_ttl_sec, renew_sec=config.renew_sec)
    assert leases == LeaseSettings()
    # Its leases expire at most a TTL after its death, the new owner's next round comes
    # at most one renewal interval later; the rest of the 15 s is for that round's
    # statements and the new owner's first pass, which taking a shard starts at once.
    assert move_bound_sec(leases) == 13.0
    assert move_bound_sec(leases) <= MOVE_BAR_SEC - 2.0


def test_sharding_is_off_by_default_and_its_timings_are_checked() -> None:
    assert load_config(None).sharding.leases() is None
    on = parse_config({"sharding": {"enabled": True}}, source="x").sharding.leases()
    assert on == LeaseSettings(ttl_sec=10.0, renew_sec=3.0)
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"sharding": {"enabled": True, "lease_ttl_sec": 4, "renew_sec": 3}}, source="x"
        )
    assert str(caught.value) == (
        "controller config x: sharding: Value error, renew_sec 3 must be at most half of "
        "lease_ttl_sec 4, so that one failed renewal loses no lease"
    )


async def test_sharding_on_sqlite_is_refused_with_the_key(tmp_path: Path) -> None:
    config = parse_config({"sharding": {"enabled": True}}, source="x")
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 's.db'}") as engine:
        check_sharding(load_config(None), engine)  # off: nothing to refuse
        with pytest.raises(ConfigError, match=r"^sharding.enabled: true needs a PostgreSQL"):
            check_sharding(config, engine)


async def test_a_stop_while_the_database_hangs_is_bounded_and_closes_every_connection() -> None:
    """The database accepts connections and never answers (a hung server, a network
    partition): the rounds fail, each cut after its bound, and the orderly stop (releasing
    the leases) gives up after a round's bound too instead of the driver's minute-long
    connect timeout, with every connection the member opened closed by it."""
    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    two_tried = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append((reader, writer))
        if len(accepted) >= 2:  # two rounds tried, and failed
            two_tried.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/hung")
    member = ShardMember(
        engine,
        settings=LeaseSettings(ttl_sec=0.4, renew_sec=0.1),
        metrics=ControllerMetrics(),
        member_id="ctl-a",
    )
    try:
        stopping = asyncio.Event()
        rounds = asyncio.ensure_future(member.run(stopping))
        await asyncio.wait_for(two_tried.wait(), timeout=30)
        stopping.set()
        await rounds
        assert member.shards() == []
        # asyncpg waits 60 s for a server to answer a new connection
        await asyncio.wait_for(member.leave(), timeout=30)
        for reader, _ in accepted:  # closed by the member: the server reads its end
            await asyncio.wait_for(reader.read(), timeout=30)
            assert reader.at_eof()
    finally:
        for _, writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
        await engine.dispose()
