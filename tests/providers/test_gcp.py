"""The GCE provider against a local fake of the Compute REST API."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials

from catalog.model import Offer, ProviderName
from providers.base import (
    InstanceState,
    InsufficientCapacity,
    NotFound,
    Provider,
    QuotaExceeded,
    SpotInterruptionSource,
    Terminal,
    Transient,
)
from providers.gcp import (
    GcpConfig,
    GcpProvider,
    instance_name,
    label_value,
    launch_id_of,
    request_id,
    translate,
)
from tests.fakes.gcp_compute import FakeGceServer
from tests.providers.contract import (
    Capability,
    ErrorKind,
    ProviderContract,
    ProviderHarness,
    make_request,
)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

ZONE = "us-central1-a"
OFFER = Offer(
    provider=ProviderName.GCP,
    region="us-central1",
    zone=ZONE,
    instance_type="g2-standard-4",
    gpu="NVIDIA L4",
    gpu_count=1,
    vcpus=4,
    memory_gib=16,
    on_demand_usd_per_hour=0.7068,
    spot_usd_per_hour=0.2827,
)


@pytest.fixture(scope="module")
def gce() -> Iterator[FakeGceServer]:
    server = FakeGceServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def healthy(gce: FakeGceServer) -> Iterator[None]:
    yield
    gce.fail_inserts(None)


def _config(gce: FakeGceServer, **overrides: object) -> GcpConfig:
    settings: dict[str, object] = {
        "project": "acme-serving",
        "client_options": {"api_endpoint": gce.endpoint},
        "credentials": AnonymousCredentials(),  # type: ignore[no-untyped-call]
        "operation_poll_seconds": 0.01,
        "retry_wait_seconds": 0.01,
        "max_attempts": 3,
    }
    settings.update(overrides)
    return GcpConfig(**settings)  # type: ignore[arg-type]


class GcpHarness:
    offer = OFFER
    capabilities: frozenset[Capability] = frozenset({"capacity", "quota", "throttle", "preempt"})

    def __init__(self, gce: FakeGceServer) -> None:
        self.gce = gce

    def new_provider(self) -> Provider:
        return GcpProvider(_config(self.gce))

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        self.gce.fail_inserts("unavailable" if kind == "throttle" else kind)

    async def preempt(self, instance_id: str) -> None:
        zone, name = instance_id.split("/")
        self.gce.preempt(zone, name)

    async def settle(self) -> None:
        self.gce.settle()


class TestGcpContract(ProviderContract):
    @pytest.fixture
    def harness(self, gce: FakeGceServer) -> ProviderHarness:
        return GcpHarness(gce)


def test_the_gcp_provider_is_a_provider_with_spot_interruptions(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    assert isinstance(provider, Provider)
    assert isinstance(provider, SpotInterruptionSource)


async def test_launch_sends_labels_spot_scheduling_image_family_and_startup_script(
    gce: FakeGceServer,
) -> None:
    provider = GcpProvider(_config(gce))
    request = make_request(GcpHarness(gce), cluster_id="Prod-EU", spot=True)

    instance = await provider.launch(request)

    zone, name = instance.instance_id.split("/")
    sent = gce.instances[(zone, name)]
    assert sent["labels"]["autoscaler-cluster"] == "prod-eu"
    assert sent["labels"]["autoscaler-launch-id"] == label_value(request.launch_id)
    assert sent["scheduling"] == {
        "onHostMaintenance": "TERMINATE",
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
        "automaticRestart": False,
    }
    source = sent["disks"][0]["initializeParams"]["sourceImage"]
    assert source == (
        "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
    )
    metadata = {item["key"]: item["value"] for item in sent["metadata"]["items"]}
    assert metadata["startup-script"] == request.boot.startup_script
    assert "guestAccelerators" not in sent  # G2 machines carry their L4 built in
    # Tags come back verbatim, not as the lowercased labels.
    assert instance.cluster_id == "Prod-EU"
    assert instance.spot is True
    assert instance.private_address is not None
    assert [i.instance_id for i in await provider.list("Prod-EU")] == [instance.instance_id]
    assert await provider.list("prod-eu") == []


async def test_n1_machines_get_their_gpus_as_guest_accelerators(gce: FakeGceServer) -> None:
    harness = GcpHarness(gce)
    harness.offer = replace(OFFER, instance_type="n1-standard-8", gpu="NVIDIA T4", gpu_count=2)

    instance = await GcpProvider(_config(gce)).launch(make_request(harness, cluster_id="c-n1"))

    sent = gce.instances[tuple(instance.instance_id.split("/"))]  # type: ignore[index]
    assert sent["guestAccelerators"] == [
        {"acceleratorType": f"zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 2}
    ]


async def test_a_repeated_insert_reuses_the_request_id_and_creates_nothing(
    gce: FakeGceServer,
) -> None:
    provider = GcpProvider(_config(gce))
    request = make_request(GcpHarness(gce), cluster_id="c-rid")
    before = len(gce.operations)

    first = await provider.launch(request)
    second = await provider.launch(request)

    assert second.instance_id == first.instance_id
    assert len(gce.operations) == before + 1


async def test_a_taken_name_adopts_the_existing_instance(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    request = make_request(GcpHarness(gce), cluster_id="c-409")
    first = await provider.launch(request)
    gce._by_request_id.clear()  # GCE forgets request ids after a while

    again = await provider.launch(request)

    assert again.instance_id == first.instance_id


async def test_a_brief_outage_is_retried(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce, max_attempts=5))
    gce.fail_inserts("throttle")
    before = gce.insert_requests

    with pytest.raises(Transient, match="HTTP 429"):
        await provider.launch(make_request(GcpHarness(gce), cluster_id="c-429"))

    assert gce.insert_requests - before == 5


async def test_quota_failure_names_the_quota(gce: FakeGceServer) -> None:
    gce.fail_inserts("quota")
    with pytest.raises(QuotaExceeded, match="QUOTA_EXCEEDED: Quota 'NVIDIA_A100_GPUS'"):
        await GcpProvider(_config(gce)).launch(make_request(GcpHarness(gce), cluster_id="c-q"))


async def test_a_malformed_instance_id_is_not_found(gce: FakeGceServer) -> None:
    with pytest.raises(NotFound, match="'<zone>/<name>'"):
        await GcpProvider(_config(gce)).describe("just-a-name")


def test_instance_names_are_valid_gce_names_and_give_back_the_launch_id() -> None:
    name = instance_name("Prod-EU", "lch_01HZX3K9Q2")
    assert len(name) <= 63
    assert name[0].isalpha()
    assert name.replace("-", "").isalnum()
    assert name == name.lower()
    assert launch_id_of(name) == "lch_01HZX3K9Q2"
    long = instance_name("c", "x" * 80)
    assert len(long) <= 63
    assert launch_id_of(long) is None
    assert instance_name("c1", "l") != instance_name("c2", "l")


def test_request_ids_are_uuids_stable_per_launch() -> None:
    import uuid

    assert request_id("lch_1") == request_id("lch_1") != request_id("lch_2")
    assert uuid.UUID(request_id("lch_1")).version == 5


def _api_error(
    kind: type[google_exceptions.GoogleAPICallError],
    message: str,
    errors: list[dict[str, str]] | None = None,
) -> google_exceptions.GoogleAPICallError:
    return kind(message, errors=errors or [])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_api_error(google_exceptions.TooManyRequests, "slow down"), Transient),
        (_api_error(google_exceptions.ServiceUnavailable, "down"), Transient),
        (_api_error(google_exceptions.NotFound, "gone"), NotFound),
        (
            _api_error(google_exceptions.Forbidden, "x", errors=[{"reason": "rateLimitExceeded"}]),
            Transient,
        ),
        (
            _api_error(google_exceptions.Forbidden, "x", errors=[{"reason": "quotaExceeded"}]),
            QuotaExceeded,
        ),
        (_api_error(google_exceptions.BadRequest, "Invalid value for field"), Terminal),
        (
            _api_error(
                google_exceptions.BadRequest, "ZONE_RESOURCE_POOL_EXHAUSTED in us-central1-a"
            ),
            InsufficientCapacity,
        ),
    ],
)
def test_http_errors_map_to_what_the_caller_should_do(
    error: google_exceptions.GoogleAPICallError, expected: type[Exception]
) -> None:
    translated = translate(error, "launching g2-standard-4 in us-central1-a for w")
    assert type(translated) is expected
    assert str(translated).startswith("launching g2-standard-4 in us-central1-a for w: HTTP")


async def test_a_preempted_spot_vm_is_reported_with_its_launch(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    request = make_request(GcpHarness(gce), cluster_id="c-pre", spot=True)
    instance = await provider.launch(request)

    gce.preempt(*instance.instance_id.split("/"))

    [reported] = await provider.interruptions("c-pre")
    assert reported.launch_id == request.launch_id
    assert reported.zone == ZONE
    with pytest.raises(NotFound):
        await provider.describe(instance.instance_id)
    assert InstanceState.INTERRUPTED.is_gone
