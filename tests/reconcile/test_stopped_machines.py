"""A stopped machine is still ours: never swept as an orphan while its launch is open,
swept like any orphan when nobody claims it, and terminated (again) when asked to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoscaler.config import parse_config
from autoscaler.controller import build_registry
from autoscaler.decide.signals import Signals
from autoscaler.reconcile.deps import ProviderEntry, ProviderRegistry
from autoscaler.store.db import create_engine, session_factory
from catalog.storage import stopped_usd_per_hour
from providers.base import (
    BootSpec,
    InstanceState,
    LaunchRequest,
    SystemClock,
    Transient,
    instance_tags,
)
from tests.reconcile.world import CLUSTER, L4, PROJECT, World, fixed


def _request(launch_id: str) -> LaunchRequest:
    return LaunchRequest(
        offer=L4,
        spot=False,
        boot=BootSpec(image="x", command=("x",), port=8000, health_path="/health", model_id="m"),
        launch_id=launch_id,
        tags=instance_tags(
            cluster_id=CLUSTER, project=PROJECT, workload="ghost", launch_id=launch_id
        ),
    )


async def test_a_stopped_machine_of_an_open_launch_is_kept(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    await world.provider.stop(row.instance_id or "")
    assert world.cloud.get(row.instance_id or "").state is InstanceState.STOPPED

    for _ in range(4):
        await world.step(301)  # well past the orphan grace (600 s)

    assert world.provider.calls_to("terminate") == []
    assert world.cloud.get(row.instance_id or "").state is InstanceState.STOPPED
    [still] = await world.rows("bot")
    assert still.terminated_confirmed_at is None


async def test_a_stopped_machine_nobody_claims_is_an_orphan(world: World) -> None:
    unknown = world.cloud.create(_request("ln-stopped-ghost"), "aws")
    world.cloud.stop(unknown.instance_id, action="stopping")
    await world.step()
    assert world.provider.calls_to("terminate") == []  # within the grace period

    await world.step(601)

    assert [c.argument for c in world.provider.calls_to("terminate")] == [unknown.instance_id]
    assert world.cloud.get(unknown.instance_id).state is InstanceState.TERMINATED


async def test_a_stopped_machine_asked_to_end_is_terminated_until_it_is(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    await world.provider.stop(row.instance_id or "")
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)
    await world.delete("bot")
    world.provider.fail_next("terminate", Transient)

    for _ in range(4):  # refused once: the machine stays stopped, and is terminated again
        await world.step(5)

    assert len(world.provider.calls_to("terminate")) >= 2
    assert world.cloud.get(row.instance_id or "").state is InstanceState.TERMINATED
    [ended] = await world.rows("bot")
    assert ended.terminated_confirmed_at is not None


async def test_a_stopped_machine_is_priced_at_the_disk_the_launch_asked_for(world: World) -> None:
    # A 1000 GiB root volume (``root_volume_gib``) bills five times the 200 GiB default.
    world.deps.providers = ProviderRegistry({"aws": ProviderEntry(world.provider, disk_gib=1000)})
    await world.apply(fixed("bot", 1))
    await world.step()

    [row] = await world.rows("bot")
    assert row.stopped_usd_per_hour == pytest.approx(stopped_usd_per_hour(L4, 1000))
    assert row.stopped_usd_per_hour == pytest.approx(5 * stopped_usd_per_hour(L4))


def test_the_configured_root_volume_is_the_disk_a_stopped_machine_bills(tmp_path: Path) -> None:
    config = parse_config(
        {
            "callback_url": "https://autoscaler.internal:8001",
            "providers": {"aws": {"regions": ["us-east-1"], "root_volume_gib": 500}},
        },
        source="test",
    )
    sessions = session_factory(create_engine(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite"))
    registry = build_registry(config, sessions=sessions, data_dir=tmp_path, clock=SystemClock())
    entry = registry.get("aws")
    assert entry is not None and entry.disk_gib == 500
