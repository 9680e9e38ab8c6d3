"""A stopped machine is still ours: never swept as an orphan while its launch is open,
swept like any orphan when nobody claims it, and terminated (again) when asked to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from autoscaler.config import parse_config
from autoscaler.controller import build_registry
from autoscaler.decide.signals import Signals
from autoscaler.reconcile.deps import ProviderEntry, ProviderRegistry
from autoscaler.reconcile.liveness import TERMINATE_RESEND_SEC
from autoscaler.store.db import create_engine, session_factory
from catalog.storage import stopped_usd_per_hour
from providers.base import (
    BootSpec,
    Instance,
    InstanceState,
    LaunchRequest,
    SystemClock,
    Terminal,
    Transient,
    instance_tags,
)
from providers.fake import FakeProvider
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


class DeletingLikeGce(FakeProvider):
    """Shows a VM being deleted as ``STOPPING``, as GCE does, and refuses a second
    delete while the first is under way (GCE: 400, the resource is not ready)."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")
        self.deleting: set[str] = set()

    async def terminate(self, instance_id: str) -> None:
        action = f"terminating {instance_id}"
        self._enter("terminate", instance_id, action)
        if instance_id in self.deleting:
            raise Terminal(action, "HTTP 400: the resource is not ready")
        self.deleting.add(instance_id)

    async def list(self, cluster_id: str) -> list[Instance]:
        return [self._shown(i) for i in await super().list(cluster_id)]

    async def describe(self, instance_id: str) -> Instance:
        return self._shown(await super().describe(instance_id))

    def _shown(self, instance: Instance) -> Instance:
        if instance.instance_id in self.deleting and not instance.state.is_gone:
            return replace(instance, state=InstanceState.STOPPING)
        return instance


async def test_a_machine_being_deleted_is_not_sent_its_terminate_each_pass(world: World) -> None:
    provider = DeletingLikeGce(world)
    world.deps = world.make_deps(provider=provider)
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)
    await world.delete("bot")

    for _ in range(10):  # 50 s: the deletion is under way, shown STOPPING
        await world.step(5)

    assert len(provider.calls_to("terminate")) == 1
    [ending] = await world.rows("bot")
    assert ending.last_error is None and ending.terminated_confirmed_at is None
    await world.step(TERMINATE_RESEND_SEC)  # still stopping after that: asked again
    assert len(provider.calls_to("terminate")) == 2
    world.cloud.set_state(row.instance_id or "", InstanceState.TERMINATED)
    await world.step(5)
    [ended] = await world.rows("bot")
    assert ended.terminated_confirmed_at is not None


def test_the_configured_gce_boot_disk_is_the_disk_its_vms_ask_for() -> None:
    config = parse_config(
        {
            "callback_url": "https://autoscaler.internal:8001",
            "providers": {
                "gcp": {"project": "p", "zones": ["us-central1-a"], "boot_disk_gib": 500}
            },
        },
        source="test",
    )
    assert config.providers.gcp is not None
    assert config.providers.gcp.provider_config().boot_disk_gib == 500
