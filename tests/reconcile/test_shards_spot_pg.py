"""Spot interruption warnings with sharding, on PostgreSQL: a provider's notice queue
hands each warning to whichever controller reads it first; the controller that owns the
instance's workload acts on it all the same, once.

Required under ``CI=true``; elsewhere skipped with a message when no server answers."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.decide.signals import Signals
from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile.shards import LeaseSettings, ShardMember
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import SpotNotice
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from providers.base import SpotInterruption
from providers.fake import FakeCloud, FakeProvider
from tests.reconcile.world import PROJECT, World, autoscaling

pytestmark = pytest.mark.postgres

LONG = LeaseSettings(ttl_sec=120.0, renew_sec=40.0)
"""Leases outlasting a test: rounds run only when the test asks for one."""

WARNING = "EC2 Spot Instance Interruption Warning (SQS): terminate at 2026-12-01T01:00:00Z"


@dataclass
class NoticeQueue:
    """An SQS queue as the controllers see it: a message read is gone for every reader."""

    messages: list[SpotInterruption] = field(default_factory=list)


class QueuedProvider(FakeProvider):
    """The fake cloud with a notice queue shared by every controller's provider."""

    def __init__(self, cloud: FakeCloud, queue: NoticeQueue) -> None:
        super().__init__(cloud, name="aws")
        self.queue = queue

    async def spot_notices(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        read, self.queue.messages = self.queue.messages, []
        return read


@dataclass
class Fleet:
    owner: World
    other: World
    owner_member: ShardMember
    other_member: ShardMember
    queue: NoticeQueue
    slug: str
    observer: AsyncEngine

    def counted(self, world: World) -> float:
        value = world.deps.metrics.registry.get_sample_value(
            "autoscaler_controller_spot_notices_total", {"provider": "aws", "source": "queue"}
        )
        return value or 0.0

    async def stored(self) -> int:
        async with session_factory(self.observer)() as s:
            return int(await s.scalar(select(func.count()).select_from(SpotNotice)) or 0)

    def warn(self, instance_id: str, launch_id: str) -> None:
        self.queue.messages.append(
            SpotInterruption(
                instance_id=instance_id,
                launch_id=launch_id,
                zone="us-east-1a",
                instance_type="g5.xlarge",
                noticed_at=self.owner.now,
                reason=WARNING,
            )
        )


@pytest.fixture
async def fleet(pg_url: str) -> AsyncIterator[Fleet]:
    """Two controllers on one database, one cloud, one clock and one notice queue, and a
    spot replica serving a workload of the first one's shards."""
    async with AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(open_store(pg_url)) for _ in range(3)]
        owner = World(session_factory(engines[0]))
        other = World(session_factory(engines[1]))
        other.clock, other.cloud = owner.clock, owner.cloud
        other.signals, other.health = owner.signals, owner.health
        queue = NoticeQueue()
        members = []
        for world, engine, name in ((owner, engines[0], "ctl-a"), (other, engines[1], "ctl-b")):
            member = ShardMember(engine, settings=LONG, metrics=ControllerMetrics(), member_id=name)
            world.deps = world.make_deps(provider=QueuedProvider(owner.cloud, queue))
            world.deps.shards = member
            members.append(member)
        for member in (*members, *members):  # each sees the other, then takes its share
            await member.renew_once()
        owner_member, other_member = members
        slug = next(f"bot{i}" for i in range(1000) if owner_member.owns(PROJECT, f"bot{i}"))
        assert not other_member.owns(PROJECT, slug)
        await owner.apply(autoscaling(slug, allow_spot_instances=True, max_hourly_cost_usd=10))
        for seconds in (0, 5):
            await other.step(seconds)
            await owner.step()
        [replica] = await owner.rows(slug)
        assert replica.spot and phase_of(replica) is Phase.READY
        owner.signals.by_ref[(PROJECT, slug)] = Signals(in_flight=1)
        try:
            yield Fleet(owner, other, owner_member, other_member, queue, slug, engines[2])
        finally:
            for member in members:
                await member.close()


@pytest.mark.parametrize("reader", ["other", "owner"])
async def test_a_warning_is_acted_on_by_the_owner_whoever_reads_it(
    fleet: Fleet, reader: str
) -> None:
    owner, other = fleet.owner, fleet.other
    [doomed] = await owner.rows(fleet.slug)
    assert doomed.instance_id is not None
    fleet.warn(doomed.instance_id, doomed.launch_id)
    reclaim = owner.now + timedelta(seconds=120)  # the queue's warning: EC2's lead

    if reader == "other":
        await other.step(1)  # reads the queue: the warning is another controller's
        assert fleet.queue.messages == []
        [untouched] = await owner.rows(fleet.slug)
        assert untouched.last_error is None and phase_of(untouched) is Phase.READY
        assert await fleet.stored() == 1
        await owner.step()  # the owner's next pass
    else:
        await owner.step(1)  # read and acted on in the same pass

    old, replacement = await owner.rows(fleet.slug)
    assert old.launch_id == doomed.launch_id
    assert phase_of(old) is Phase.READY  # warned two minutes ahead: it serves on
    assert old.last_error == f"{SPOT_NOTICE}{WARNING}" and old.reclaim_at == reclaim
    assert phase_of(replacement) in (Phase.PENDING, Phase.BOOTING)
    assert (replacement.offer_key, replacement.spot) != (doomed.offer_key, True)
    assert fleet.counted(owner) == 1 and fleet.counted(other) == 0
    assert await fleet.stored() == 0

    fleet.warn(doomed.instance_id, doomed.launch_id)  # delivered again, as SQS may
    for world in (other, owner, other, owner):
        await world.step(1)
    assert len(await owner.rows(fleet.slug)) == 2  # one replacement
    # One decision heeds the warning; the drain once the replacement serves is another.
    heeded = [d for d in await owner.decisions("drain") if "replaced now" in d.reason]
    assert len(heeded) == 1
    assert fleet.counted(owner) == 1 and fleet.counted(other) == 0
    assert await fleet.stored() == 0


async def test_a_warning_read_while_its_shard_has_no_holder_waits_for_the_next_one(
    fleet: Fleet,
) -> None:
    owner, other = fleet.owner, fleet.other
    [doomed] = await owner.rows(fleet.slug)
    assert doomed.instance_id is not None
    await fleet.owner_member.leave()  # the owner stops; the other has not taken over yet
    fleet.warn(doomed.instance_id, doomed.launch_id)
    reclaim = owner.now + timedelta(seconds=120)  # the queue's warning: EC2's lead
    fleet.warn("i-0nobodys0", "l-nobody")  # an instance no row will ever match

    await other.step(1)
    assert await fleet.stored() == 2  # nobody acted: kept for whoever holds the shard
    await fleet.other_member.renew_once()  # takes the shards the owner left
    assert fleet.other_member.owns(PROJECT, fleet.slug)
    await other.step()

    old, replacement = await other.rows(fleet.slug)
    assert phase_of(old) is Phase.READY
    assert old.last_error == f"{SPOT_NOTICE}{WARNING}" and old.reclaim_at == reclaim
    assert phase_of(replacement) in (Phase.PENDING, Phase.BOOTING)
    assert fleet.counted(other) == 1
    assert await fleet.stored() == 1  # the unmatched one, until it expires
