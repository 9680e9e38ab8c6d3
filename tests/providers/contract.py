"""One contract every provider keeps, run against each of them.

To run it against a provider, subclass :class:`ProviderContract` as ``Test…Contract`` in
a test module and define a ``harness`` fixture returning a :class:`ProviderHarness`::

    class TestLocalContract(ProviderContract):
        @pytest.fixture
        def harness(self) -> ProviderHarness:
            return LocalHarness(...)

A harness says which failures it can inject (``capabilities``); tests of the others are
skipped for that provider, so adding a provider that cannot run out of capacity (this
machine) still runs the rest of the contract.
"""

from __future__ import annotations

import uuid
from typing import Literal, Protocol

import pytest

from catalog.model import Offer
from providers.base import (
    LAUNCH_ID_TAG,
    BootSpec,
    InstanceState,
    InsufficientCapacity,
    LaunchRequest,
    NotFound,
    Provider,
    QuotaExceeded,
    SpotInterruptionSource,
    Terminal,
    Transient,
    instance_tags,
)

ErrorKind = Literal["capacity", "quota", "throttle"]
Capability = Literal["capacity", "quota", "throttle", "preempt", "stop_spot"]
"""``stop_spot``: spot machines can be stopped (GCE, this machine); without it a stop of
a spot machine must be refused with :class:`Terminal` (EC2's one-time spot requests)."""


class ProviderHarness(Protocol):
    """What the contract needs from a provider under test and the world behind it."""

    offer: Offer
    """An offer the provider can launch, with a spot price."""

    capabilities: frozenset[Capability]
    """Which failures :meth:`fail_launches` and :meth:`preempt` can produce."""

    def new_provider(self) -> Provider:
        """A fresh provider object with no memory of earlier calls (as after a crash)."""
        ...

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        """Make every launch fail with ``kind`` from now on; ``None`` heals the cloud."""
        ...

    async def preempt(self, instance_id: str) -> None:
        """Reclaim a spot instance as the cloud would."""
        ...

    async def settle(self) -> None:
        """Let the cloud make progress (advance a simulated clock): booting machines
        run, stopping ones are stopped; a no-op where that happens by itself."""
        ...


def make_request(
    harness: ProviderHarness,
    *,
    cluster_id: str,
    launch_id: str | None = None,
    spot: bool = False,
    workload: str = "support-bot",
) -> LaunchRequest:
    launch_id = launch_id or f"lch_{uuid.uuid4().hex[:16]}"
    return LaunchRequest(
        offer=harness.offer,
        spot=spot,
        boot=BootSpec(
            image="vllm/vllm-openai:v0.6.3",
            command=("vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--port", "8080"),
            port=8080,
            health_path="/health",
            model_id="Qwen/Qwen2.5-0.5B-Instruct",
            env={"VLLM_LOGGING_LEVEL": "INFO"},
            secret_env_names=("HF_TOKEN",),
            cuda_version="12.4",
            startup_script="#!/bin/bash\necho booting\n",
        ),
        launch_id=launch_id,
        tags=instance_tags(
            cluster_id=cluster_id, project="acme", workload=workload, launch_id=launch_id
        ),
    )


def _require(harness: ProviderHarness, capability: Capability) -> None:
    if capability not in harness.capabilities:
        pytest.skip(f"this provider's harness cannot inject {capability!r}")


class ProviderContract:
    """The provider contract as tests. Subclass it and define a ``harness`` fixture."""

    @pytest.fixture
    def cluster_id(self) -> str:
        """A cluster of its own per test, so tests sharing one cloud cannot see each other."""
        return f"c-{uuid.uuid4().hex[:10]}"

    async def test_launch_tags_the_instance_and_lists_it_in_its_cluster(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        request = make_request(harness, cluster_id=cluster_id)

        instance = await provider.launch(request)

        assert instance.launch_id == request.launch_id
        assert instance.zone == harness.offer.zone
        assert instance.instance_type == harness.offer.instance_type
        assert instance.spot is False
        assert instance.state in (InstanceState.PENDING, InstanceState.RUNNING)
        assert instance.launched_at.tzinfo is not None
        assert dict(instance.tags).items() >= dict(request.tags).items()
        listed = await provider.list(cluster_id)
        assert [i.instance_id for i in listed] == [instance.instance_id]
        assert await provider.list(f"{cluster_id}-other") == []

    async def test_instance_reaches_running(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        instance = await provider.launch(make_request(harness, cluster_id=cluster_id))

        await harness.settle()

        described = await provider.describe(instance.instance_id)
        assert described.state is InstanceState.RUNNING
        assert described.instance_id == instance.instance_id

    async def test_a_new_provider_finds_a_launch_by_its_id_after_a_crash(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        request = make_request(harness, cluster_id=cluster_id)
        launched = await harness.new_provider().launch(request)

        survivor = harness.new_provider()
        found = await survivor.find_by_launch_id(cluster_id, request.launch_id)

        assert found is not None
        assert found.instance_id == launched.instance_id
        assert found.tags[LAUNCH_ID_TAG] == request.launch_id
        assert await survivor.find_by_launch_id(cluster_id, "lch_never_launched") is None
        assert await survivor.find_by_launch_id(f"{cluster_id}-other", request.launch_id) is None

    async def test_the_same_launch_id_twice_buys_one_instance(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        request = make_request(harness, cluster_id=cluster_id)

        first = await harness.new_provider().launch(request)
        second = await harness.new_provider().launch(request)

        assert second.instance_id == first.instance_id
        listed = await harness.new_provider().list(cluster_id)
        assert [i.instance_id for i in listed] == [first.instance_id]

    async def test_terminate_is_idempotent_and_confirmed_by_describe(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        instance = await provider.launch(make_request(harness, cluster_id=cluster_id))

        await provider.terminate(instance.instance_id)
        await provider.terminate(instance.instance_id)
        await harness.settle()

        try:
            described = await provider.describe(instance.instance_id)
        except NotFound:
            pass
        else:
            assert described.state is InstanceState.TERMINATED
        alive = [i for i in await provider.list(cluster_id) if not i.state.is_gone]
        assert alive == []

    async def test_describe_of_an_unknown_instance_raises_not_found(
        self, harness: ProviderHarness
    ) -> None:
        provider = harness.new_provider()
        unknown = await _unknown_instance_id(harness)

        with pytest.raises(NotFound):
            await provider.describe(unknown)
        await provider.terminate(unknown)  # already gone is a success

    async def test_no_capacity_is_insufficient_capacity_naming_the_launch(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        _require(harness, "capacity")
        provider = harness.new_provider()
        request = make_request(harness, cluster_id=cluster_id)
        await harness.fail_launches("capacity")

        with pytest.raises(InsufficientCapacity) as caught:
            await provider.launch(request)

        message = str(caught.value)
        assert harness.offer.instance_type in message
        assert harness.offer.zone in message
        assert "support-bot" in message
        assert await provider.list(cluster_id) == []
        await harness.fail_launches(None)
        instance = await provider.launch(request)  # the same launch id, retried later
        assert instance.launch_id == request.launch_id

    async def test_an_account_limit_is_quota_exceeded(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        _require(harness, "quota")
        provider = harness.new_provider()
        await harness.fail_launches("quota")

        with pytest.raises(QuotaExceeded) as caught:
            await provider.launch(make_request(harness, cluster_id=cluster_id))

        assert harness.offer.instance_type in str(caught.value)
        assert await provider.list(cluster_id) == []

    async def test_throttling_is_transient_with_a_retry_delay(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        _require(harness, "throttle")
        provider = harness.new_provider()
        request = make_request(harness, cluster_id=cluster_id)
        await harness.fail_launches("throttle")

        with pytest.raises(Transient) as caught:
            await provider.launch(request)

        assert caught.value.retry_after > 0
        await harness.fail_launches(None)
        instance = await provider.launch(request)
        listed = await provider.list(cluster_id)
        assert [i.instance_id for i in listed] == [instance.instance_id]

    async def test_a_spot_interruption_is_reported(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        _require(harness, "preempt")
        provider = harness.new_provider()
        spot = await provider.launch(make_request(harness, cluster_id=cluster_id, spot=True))
        on_demand = await provider.launch(make_request(harness, cluster_id=cluster_id))
        assert spot.spot is True
        await harness.settle()

        await harness.preempt(spot.instance_id)

        assert isinstance(provider, SpotInterruptionSource)
        reported = await provider.interruptions(cluster_id)
        assert [(r.instance_id, r.launch_id) for r in reported] == [
            (spot.instance_id, spot.launch_id)
        ]
        assert await provider.interruptions(f"{cluster_id}-other") == []
        states = {i.instance_id: i.state for i in await provider.list(cluster_id)}
        assert states.get(spot.instance_id, InstanceState.INTERRUPTED) is (
            InstanceState.INTERRUPTED
        )
        assert states[on_demand.instance_id] is InstanceState.RUNNING

    # Stop and start: a warm pool of stopped machines.

    async def test_a_stopped_machine_is_still_listed_and_starts_again_as_itself(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        request = make_request(harness, cluster_id=cluster_id)
        launched = await provider.launch(request)
        await harness.settle()

        await provider.stop(launched.instance_id)
        await harness.settle()

        stopped = await provider.describe(launched.instance_id)
        assert stopped.state is InstanceState.STOPPED
        assert not stopped.state.is_gone
        listed = {i.instance_id: i.state for i in await provider.list(cluster_id)}
        assert listed == {launched.instance_id: InstanceState.STOPPED}
        found = await harness.new_provider().find_by_launch_id(cluster_id, request.launch_id)
        assert found is not None and found.instance_id == launched.instance_id

        started = await harness.new_provider().start(launched.instance_id)  # after a crash

        assert started.instance_id == launched.instance_id
        assert started.launch_id == request.launch_id
        assert dict(started.tags).items() >= dict(request.tags).items()
        assert started.state in (InstanceState.PENDING, InstanceState.RUNNING)
        await harness.settle()
        running = await provider.describe(launched.instance_id)
        assert running.state is InstanceState.RUNNING
        assert [i.instance_id for i in await provider.list(cluster_id)] == [launched.instance_id]

    async def test_stop_and_start_are_idempotent(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        launched = await provider.launch(make_request(harness, cluster_id=cluster_id))
        await harness.settle()

        await provider.stop(launched.instance_id)
        await provider.stop(launched.instance_id)  # stopping: fine
        await harness.settle()
        await harness.new_provider().stop(launched.instance_id)  # stopped: fine
        assert (await provider.describe(launched.instance_id)).state is InstanceState.STOPPED

        first = await provider.start(launched.instance_id)
        second = await provider.start(launched.instance_id)  # on its way up: returned as is
        await harness.settle()
        third = await provider.start(launched.instance_id)  # running: returned as is

        assert first.instance_id == second.instance_id == third.instance_id
        assert third.state is InstanceState.RUNNING
        assert [i.instance_id for i in await provider.list(cluster_id)] == [launched.instance_id]

    async def test_a_stopped_machine_is_terminated_like_any(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        launched = await provider.launch(make_request(harness, cluster_id=cluster_id))
        await harness.settle()
        await provider.stop(launched.instance_id)
        await harness.settle()

        await provider.terminate(launched.instance_id)
        await harness.settle()

        try:
            described = await provider.describe(launched.instance_id)
        except NotFound:
            pass
        else:
            assert described.state is InstanceState.TERMINATED
        alive = [i for i in await provider.list(cluster_id) if not i.state.is_gone]
        assert alive == []
        with pytest.raises(NotFound):  # nothing left to start, nor to stop
            await provider.start(launched.instance_id)
        with pytest.raises(NotFound):
            await provider.stop(launched.instance_id)

    async def test_stop_and_start_of_an_unknown_instance_raise_not_found(
        self, harness: ProviderHarness
    ) -> None:
        provider = harness.new_provider()
        unknown = await _unknown_instance_id(harness)

        with pytest.raises(NotFound):
            await provider.stop(unknown)
        with pytest.raises(NotFound):
            await provider.start(unknown)

    async def test_a_spot_machine_is_stopped_only_where_the_cloud_allows(
        self, harness: ProviderHarness, cluster_id: str
    ) -> None:
        provider = harness.new_provider()
        spot = await provider.launch(make_request(harness, cluster_id=cluster_id, spot=True))
        await harness.settle()

        if "stop_spot" in harness.capabilities:
            await provider.stop(spot.instance_id)
            await harness.settle()
            assert (await provider.describe(spot.instance_id)).state is InstanceState.STOPPED
            return
        with pytest.raises(Terminal) as caught:
            await provider.stop(spot.instance_id)
        assert spot.instance_id in str(caught.value)
        assert "spot" in str(caught.value)
        assert (await provider.describe(spot.instance_id)).state is InstanceState.RUNNING


async def _unknown_instance_id(harness: ProviderHarness) -> str:
    """An id shaped like the provider's own that names no instance."""
    provider = harness.new_provider()
    probe = await provider.launch(make_request(harness, cluster_id=f"probe-{uuid.uuid4().hex}"))
    await provider.terminate(probe.instance_id)
    # Swap the last characters: same shape, different instance.
    tail = probe.instance_id[-4:]
    replacement = "".join("0" if ch != "0" else "1" for ch in tail)
    return probe.instance_id[:-4] + replacement
