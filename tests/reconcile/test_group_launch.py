"""Replica groups bought as one: every member's intent (and the whole group's price) is
on record before any member is bought, a refused member leaves no half-bought group,
and a crash or a transient error between members is resumed by each member's intent."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select

from autoscaler.decide.placement import Placement
from autoscaler.reconcile.deps import Deps
from autoscaler.reconcile.ledger import fleet_usd_per_hour, open_rows
from autoscaler.reconcile.liveness import sync_with_provider
from autoscaler.reconcile.observe import observe
from autoscaler.reconcile.provisioner import LaunchOutcome, launch_replica, resolve_intent
from autoscaler.spec import WorkloadSpec
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase, phase_of
from catalog.query import Market
from providers.base import (
    GROUP_TAG,
    ROLE_TAG,
    Instance,
    InsufficientCapacity,
    LaunchRequest,
    Transient,
)
from providers.fake import FakeProvider
from tests.reconcile.world import L40S, World, fixed

EIGHT_L40S = dataclasses.replace(
    L40S, instance_type="g6e.48xlarge", gpu_count=8, on_demand_usd_per_hour=30.13
)
MODEL = "meta-llama/Llama-3.1-405B-Instruct"


class FailingMember(FakeProvider):
    """Refuses the ``nth`` launch call (1-based) with ``error``; records, at each launch,
    the hourly total the ledger already holds."""

    def __init__(self, world: World, *, nth: int | None, error: type = InsufficientCapacity):
        super().__init__(world.cloud, name="aws")
        self.world, self.nth, self.error = world, nth, error
        self.launches = 0
        self.ledger_usd_at_launch: list[float] = []

    async def launch(self, request: LaunchRequest) -> Instance:
        self.launches += 1
        async with self.world.sessions() as s:
            self.ledger_usd_at_launch.append(await fleet_usd_per_hour(s))
        if self.launches == self.nth:
            self.fail_next("launch", self.error)
        return await super().launch(request)


def _deps(world: World, **settings: Any) -> Deps:
    return dataclasses.replace(world.make_deps(**settings), offers=lambda: (EIGHT_L40S,))


def _group(size: int) -> Placement:
    return Placement(
        reason=f"a group of {size} x {EIGHT_L40S.key}",
        offer=EIGHT_L40S,
        market=Market.ON_DEMAND,
        usd_per_hour=size * EIGHT_L40S.on_demand_usd_per_hour,
        group_size=size,
    )


async def _launch(world: World, size: int) -> LaunchOutcome:
    await world.apply(fixed("big", 1, model=MODEL))
    async with world.sessions() as s:
        workload = await s.scalar(select(Workload).where(Workload.slug == "big"))
        assert workload is not None
        spec = WorkloadSpec.model_validate(workload.spec)
        return await launch_replica(
            world.deps, s, workload=workload, spec=spec, placement=_group(size),
            reason="scale up 0 -> 1", now=world.now,
        )  # fmt: skip


async def _next_pass(world: World, seconds: float = 5.0) -> None:
    """What a reconciler pass does to a group's rows before planning: bring launched
    rows in line with the provider, then resolve pending intents by launch id."""
    world.clock.advance(seconds)
    observed = await observe(world.deps)
    async with world.sessions() as s:
        workload = await s.scalar(select(Workload).where(Workload.slug == "big"))
        assert workload is not None
        spec = WorkloadSpec.model_validate(workload.spec)
        rows = await open_rows(s, workload.id)
        await sync_with_provider(world.deps, s, rows=rows, observed=observed, port=8000,
                                 now=world.now)  # fmt: skip
        for row in rows:
            if row.terminated_confirmed_at is None and row.instance_id is None:
                await resolve_intent(world.deps, s, row=row, spec=spec, now=world.now)


async def test_every_member_is_on_record_with_the_group_price_before_any_is_bought(
    world: World,
) -> None:
    provider = FailingMember(world, nth=None)
    world.deps = _deps(world, provider=provider)
    outcome = await _launch(world, 3)
    assert outcome.bought
    price = EIGHT_L40S.on_demand_usd_per_hour
    assert provider.ledger_usd_at_launch[0] == 3 * price  # the whole group, before the first
    rows = await world.rows("big")
    assert [r.group_role for r in rows].count("leader") == 1 and len(rows) == 3
    leader = next(r for r in rows if r.group_role == "leader")
    assert {r.group_id for r in rows} == {leader.launch_id} and {r.group_size for r in rows} == {3}
    assert all(r.instance_id is not None and r.zone == EIGHT_L40S.zone for r in rows)
    [launch] = await world.decisions("launch")
    assert launch.cost_delta_usd_per_hour == 3 * price
    assert sorted(launch.result["members"]) == sorted(r.launch_id for r in rows)
    for call in provider.calls_to("launch"):
        request = call.argument
        assert isinstance(request, LaunchRequest)
        assert request.tags[GROUP_TAG] == leader.launch_id
        role = "leader" if request.launch_id == leader.launch_id else "worker"
        assert request.tags[ROLE_TAG] == role
        argv = request.boot.command
        assert argv[argv.index("--pipeline-parallel-size") + 1] == "3"
        assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    first = provider.calls_to("launch")[0].argument
    assert isinstance(first, LaunchRequest) and first.launch_id == leader.launch_id


async def test_a_capacity_error_on_the_third_member_leaves_nothing_bought(world: World) -> None:
    provider = FailingMember(world, nth=3)
    world.deps = _deps(world, provider=provider)
    outcome = await _launch(world, 4)
    assert not outcome.bought
    rows = {r.launch_id: r for r in await world.rows("big")}
    launched = [r for r in rows.values() if r.instance_id is not None]
    assert len(launched) == 2
    # Asked to terminate, and not marked terminated before the provider shows them gone.
    assert all(phase_of(r) is Phase.TERMINATING for r in launched)
    assert not world.live_instances()  # the fake terminates at once
    refused = [r for r in rows.values() if "launch failed" in (r.last_error or "")]
    never = [r for r in rows.values() if (r.last_error or "").startswith("never launched")]
    assert len(refused) == 1 and len(never) == 1
    assert all(r.terminated_confirmed_at is not None for r in refused + never)
    assert provider.launches == 3  # the fourth member was never asked for
    await _next_pass(world)
    assert all(phase_of(r) is Phase.TERMINATED for r in await world.rows("big"))
    async with world.sessions() as s:
        assert await fleet_usd_per_hour(s) == 0.0


async def test_a_crash_between_members_is_resumed_by_each_members_intent(world: World) -> None:
    """The leader is bought, then the controller dies (a transient error stands in for
    the lost answer); the next pass launches the rest by their own launch ids, and asking
    again never buys a second machine."""
    provider = FailingMember(world, nth=2, error=Transient)
    world.deps = _deps(world, provider=provider)
    outcome = await _launch(world, 3)
    assert not outcome.bought
    pending = [r for r in await world.rows("big") if r.instance_id is None]
    assert len(pending) == 2 and all(phase_of(r) is Phase.PENDING for r in pending)
    world.deps = _deps(world, provider=FailingMember(world, nth=None))  # a new controller
    await _next_pass(world, seconds=60)
    rows = await world.rows("big")
    assert all(r.instance_id is not None for r in rows)
    assert len(world.live_instances()) == 3
    assert len({i.launch_id for i in world.live_instances()}) == 3


async def test_a_member_refused_on_a_later_pass_abandons_the_group(world: World) -> None:
    provider = FailingMember(world, nth=2, error=Transient)
    world.deps = _deps(world, provider=provider)
    await _launch(world, 3)
    retry = FailingMember(world, nth=1)  # the first retried member is refused
    world.deps = _deps(world, provider=retry, visibility_grace_sec=30)
    await _next_pass(world, seconds=60)
    assert not world.live_instances()
    for _ in range(3):
        await _next_pass(world, seconds=30)
    rows = await world.rows("big")
    assert all(phase_of(r) is Phase.TERMINATED for r in rows), [
        (r.launch_id, phase_of(r), r.last_error) for r in rows
    ]
    assert len(world.cloud.all()) == 1  # only the leader was ever bought, and it is gone
