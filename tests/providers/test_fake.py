"""The recording fake keeps the provider contract, and records and fails on demand."""

from __future__ import annotations

import pytest

from catalog.model import Offer, ProviderName
from providers.base import (
    InstanceState,
    InsufficientCapacity,
    ManualClock,
    Provider,
    ProviderError,
    QuotaExceeded,
    SpotInterruptionSource,
    Transient,
)
from providers.fake import FakeCloud, FakeProvider
from tests.providers.contract import (
    Capability,
    ErrorKind,
    ProviderContract,
    ProviderHarness,
    make_request,
)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

OFFER = Offer(
    provider=ProviderName.AWS,
    region="us-east-1",
    zone="us-east-1a",
    instance_type="g5.xlarge",
    gpu="NVIDIA A10G",
    gpu_count=1,
    vcpus=4,
    memory_gib=16,
    on_demand_usd_per_hour=1.006,
    spot_usd_per_hour=0.4,
)

_ERRORS: dict[ErrorKind, type[ProviderError]] = {
    "capacity": InsufficientCapacity,
    "quota": QuotaExceeded,
    "throttle": Transient,
}


class FakeHarness:
    offer = OFFER
    capabilities: frozenset[Capability] = frozenset({"capacity", "quota", "throttle", "preempt"})

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.cloud = FakeCloud(clock=self.clock, boot_seconds=60)

    def new_provider(self) -> Provider:
        return FakeProvider(self.cloud)

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        self.cloud.launch_error = None if kind is None else _ERRORS[kind]

    async def preempt(self, instance_id: str) -> None:
        self.cloud.interrupt(instance_id)

    async def settle(self) -> None:
        self.clock.advance(120)


class TestFakeContract(ProviderContract):
    @pytest.fixture
    def harness(self) -> ProviderHarness:
        return FakeHarness()


def test_the_fake_is_a_provider_with_spot_interruptions() -> None:
    provider = FakeProvider()
    assert isinstance(provider, Provider)
    assert isinstance(provider, SpotInterruptionSource)


async def test_records_calls_in_order_and_fails_the_next_call_once() -> None:
    provider = FakeProvider()
    request = make_request(FakeHarness(), cluster_id="c1")
    provider.fail_next("launch", InsufficientCapacity(request.action, "no g5 today"))

    with pytest.raises(InsufficientCapacity, match="no g5 today"):
        await provider.launch(request)
    instance = await provider.launch(request)
    await provider.terminate(instance.instance_id)

    assert [call.method for call in provider.calls] == ["launch", "launch", "terminate"]
    assert provider.calls_to("launch")[0].argument == request
    assert (await provider.describe(instance.instance_id)).state is InstanceState.TERMINATED


async def test_an_error_class_gets_the_failed_action_in_its_message() -> None:
    provider = FakeProvider()
    provider.fail_next("launch", QuotaExceeded)

    with pytest.raises(QuotaExceeded, match=r"launching g5\.xlarge in us-east-1a for support-bot"):
        await provider.launch(make_request(FakeHarness(), cluster_id="c1"))


async def test_forgotten_instances_disappear_from_lists() -> None:
    provider = FakeProvider()
    instance = await provider.launch(make_request(FakeHarness(), cluster_id="c1"))
    await provider.terminate(instance.instance_id)

    provider.cloud.forget(instance.instance_id)

    assert await provider.list("c1") == []


def test_only_spot_instances_can_be_interrupted() -> None:
    cloud = FakeCloud()
    instance = cloud.create(make_request(FakeHarness(), cluster_id="c1"), "fake")
    with pytest.raises(ValueError, match="on-demand"):
        cloud.interrupt(instance.instance_id)


async def test_lists_show_each_machine_as_of_the_clock_whichever_call_read_it_last() -> None:
    clock = ManualClock()
    cloud = FakeCloud(clock=clock, boot_seconds=60, stop_seconds=30)
    provider = FakeProvider(cloud)
    first = await provider.launch(make_request(FakeHarness(), cluster_id="c1"))
    second = await provider.launch(make_request(FakeHarness(), cluster_id="c1"))
    await provider.launch(make_request(FakeHarness(), cluster_id="c2"))

    clock.advance(60)  # both boots are over, though no call has read either since
    assert [i.state for i in await provider.list("c1")] == [InstanceState.RUNNING] * 2
    await provider.stop(first.instance_id)
    assert (await provider.describe(second.instance_id)).state is InstanceState.RUNNING
    assert [i.state for i in await provider.list("c1")] == [
        InstanceState.STOPPING,
        InstanceState.RUNNING,
    ]

    clock.advance(30)
    assert [i.state for i in cloud.all()] == [
        InstanceState.STOPPED,
        InstanceState.RUNNING,
        InstanceState.RUNNING,
    ]
    assert [i.instance_id for i in await provider.list("c2")] == [cloud.all()[2].instance_id]


async def test_an_interruption_is_reported_while_the_new_instance_is_not_listed_yet() -> None:
    cloud = FakeCloud(visibility_delay_sec=30)
    provider = FakeProvider(cloud)
    instance = await provider.launch(make_request(FakeHarness(), cluster_id="c1", spot=True))
    cloud.interrupt(instance.instance_id)

    assert await provider.list("c1") == []  # not shown yet
    assert [i.instance_id for i in await provider.interruptions("c1")] == [instance.instance_id]
    assert await provider.interruptions("c2") == []
