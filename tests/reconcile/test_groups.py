"""Replica groups through the reconciler: a model no machine of the pool holds runs as
one leader and its workers, bought whole within the ceilings, ready when every member
is up, routed through its leader only, and replaced whole (drained first) when a member
is lost."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import update

from autoscaler.reconcile.deps import Deps
from autoscaler.spec import Backend, WorkloadSpec
from autoscaler.store.models import Instance
from autoscaler.store.phase import Phase, phase_of
from gateway.routes import load_route_table
from providers.base import InstanceState, LaunchRequest, Transient
from tests.reconcile.world import L40S, World, fixed

EIGHT_H100 = dataclasses.replace(
    L40S,
    instance_type="p5.48xlarge",
    gpu="NVIDIA H100 80GB HBM3",
    gpu_count=8,
    on_demand_usd_per_hour=55.04,
)
MODEL = "meta-llama/Llama-3.1-405B-Instruct"  # about 800 GiB in BF16: two 640 GiB machines


def _deps(world: World, **settings: Any) -> Deps:
    # The fake cloud stands in for a provider whose machines boot a group's roles.
    deps = world.make_deps(group_providers=frozenset({"aws"}), **settings)
    return dataclasses.replace(deps, offers=lambda: (EIGHT_H100,))


async def _ready_group(world: World) -> list[Any]:
    world.deps = _deps(world)
    await world.apply(fixed("big", 1, model=MODEL))
    await world.step()
    await world.step(5)
    return await world.rows("big")


async def test_a_model_no_machine_holds_runs_as_a_group_routed_through_its_leader(
    world: World,
) -> None:
    rows = await _ready_group(world)
    assert len(rows) == 2 and {r.group_role for r in rows} == {"leader", "worker"}
    leader = next(r for r in rows if r.group_role == "leader")
    worker = next(r for r in rows if r.group_role == "worker")
    assert phase_of(leader) is Phase.READY
    assert phase_of(worker) is Phase.READY  # ready with its leader, never routed to
    [launch] = await world.decisions("launch")
    assert launch.cost_delta_usd_per_hour == 2 * EIGHT_H100.on_demand_usd_per_hour
    assert "no single machine holds the model: a group of 2" in launch.reason
    async with world.sessions() as s:
        table = await load_route_table(s, now=world.now)
    [route] = table.workloads.values()
    assert [r.key for r in route.replicas] == [leader.launch_id]
    assert len(world.live_instances()) == 2
    await world.step(5)
    assert len(await world.rows("big")) == 2  # one replica wanted: one group, no more


async def test_the_leader_is_not_ready_until_every_member_is_launched(world: World) -> None:
    world.deps = _deps(world)
    world.provider.fail_next("launch", Transient)
    await world.apply(fixed("big", 1, model=MODEL))
    await world.step()
    rows = await world.rows("big")
    assert len(rows) == 2 and all(phase_of(r) is not Phase.READY for r in rows)


async def test_a_scripted_leader_is_ready_only_once_every_worker_checked_in(
    world: World,
) -> None:
    world.deps = _deps(world, callback_url="http://controller.test:8001")
    await world.apply(fixed("big", 1, model=MODEL))
    await world.step()
    for _ in range(3):  # the leader's engine answers, but its worker has not checked in
        await world.step(5)
    rows = await world.rows("big")
    assert all(r.launched_at is not None for r in rows)
    assert all(phase_of(r) is Phase.BOOTING for r in rows)
    async with world.sessions() as s, s.begin():  # what the boot callback's ready records
        worker = next(r for r in await world.rows("big") if r.group_role == "worker")
        await s.execute(
            update(Instance)
            .where(Instance.launch_id == worker.launch_id)
            .values(joined_at=world.now)
        )
    await world.step(5)
    assert all(phase_of(r) is Phase.READY for r in await world.rows("big"))


async def test_a_lost_member_replaces_the_whole_group_drained_first(world: World) -> None:
    rows = await _ready_group(world)
    leader = next(r for r in rows if r.group_role == "leader")
    worker = next(r for r in rows if r.group_role == "worker")
    assert worker.instance_id is not None
    world.cloud.set_state(worker.instance_id, InstanceState.TERMINATED)  # the worker dies
    await world.step(5)
    old = {r.launch_id: r for r in await world.rows("big")}
    assert phase_of(old[worker.launch_id]) is Phase.TERMINATED
    assert old[leader.launch_id].drain_requested_at is not None  # drained, not cut off
    for _ in range(6):
        await world.step(10)
    rows = await world.rows("big")
    first = [r for r in rows if r.group_id == leader.group_id]
    assert all(phase_of(r) is Phase.TERMINATED for r in first)
    second = [r for r in rows if r.group_id != leader.group_id]
    assert len(second) == 2 and len({r.group_id for r in second}) == 1
    assert any(phase_of(r) is Phase.READY for r in second)
    assert len(world.live_instances()) == 2


async def test_the_ceiling_counts_the_whole_group_before_any_member_is_bought(
    world: World,
) -> None:
    world.deps = _deps(world)
    one_member = EIGHT_H100.on_demand_usd_per_hour
    spec = WorkloadSpec.model_validate(
        {
            "name": "big",
            "slug": "big",
            "model": MODEL,
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": 1,
                "max_workers": 2,
                "max_hourly_cost_usd": one_member * 1.5,
                "workers": {
                    "source": "cloud",
                    "cloud_pool": {"gpu_pool": ["NVIDIA H100 80GB HBM3"]},
                },
            },
        }
    )
    await world.apply(spec)
    await world.step()
    assert await world.rows("big") == []
    assert world.provider.calls_to("launch") == []
    refused = await world.decisions("refused")
    assert refused and "group" in refused[-1].reason and "headroom" in refused[-1].reason


async def test_an_sglang_groups_members_boot_with_their_own_node_rank(world: World) -> None:
    world.deps = _deps(world)
    spec = fixed("big", 1, model=MODEL).model_copy(update={"backend": Backend.SGLANG})
    await world.apply(spec)
    await world.step()
    rows = await world.rows("big")
    assert len(rows) == 2
    ranks = {}
    for row in rows:
        command = row.engine_command or []
        assert command[command.index("--nnodes") + 1] == "2"
        assert command[command.index("--dist-init-addr") + 1] == "${GROUP_LEADER_ADDRESS}:20000"
        ranks[row.group_role] = command[command.index("--node-rank") + 1]
    assert ranks == {"leader": "0", "worker": "1"}
    requests = [c.argument for c in world.provider.calls_to("launch")]
    launched = {r.launch_id: r.boot.command for r in requests if isinstance(r, LaunchRequest)}
    assert {r.launch_id: tuple(r.engine_command or ()) for r in rows} == launched


def _autoscaling(*, max_instances: int, min_workers: int = 2) -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {
            "name": "big",
            "slug": "big",
            "model": MODEL,
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": min_workers,
                "max_workers": 4,
                "max_hourly_cost_usd": 1000,
                "workers": {
                    "source": "cloud",
                    "cloud_pool": {
                        "gpu_pool": ["NVIDIA H100 80GB HBM3"],
                        "max_instances": max_instances,
                    },
                },
            },
        }
    )


async def test_max_instances_counts_every_member_of_a_group(world: World) -> None:
    world.deps = _deps(world)
    await world.apply(_autoscaling(max_instances=3))  # two replicas wanted: 4 machines
    await world.step()
    await world.step(5)
    rows = await world.rows("big")
    assert len(rows) == 2 and len({r.group_id for r in rows}) == 1
    assert len(world.provider.calls_to("launch")) == 2
    refused = await world.decisions("refused")
    assert refused
    assert "2 instance(s) + a group of 2 = 4 would exceed max_instances 3" in refused[-1].reason


async def test_a_group_larger_than_max_instances_is_never_bought(world: World) -> None:
    world.deps = _deps(world)
    await world.apply(_autoscaling(max_instances=1, min_workers=1))
    await world.step()
    assert await world.rows("big") == [] and world.provider.calls_to("launch") == []
    [refused] = await world.decisions("refused")
    assert "a group of 2 = 2 would exceed max_instances 1" in refused.reason


async def test_no_group_is_bought_on_a_provider_left_out_of_group_providers(
    world: World,
) -> None:
    world.deps = dataclasses.replace(
        world.make_deps(group_providers=frozenset({"gcp", "simulated"})),
        offers=lambda: (EIGHT_H100,),
    )
    await world.apply(fixed("big", 1, model=MODEL))
    await world.step()
    assert await world.rows("big") == [] and world.provider.calls_to("launch") == []
    [refused] = await world.decisions("refused")
    assert "no offer fits" in refused.reason
