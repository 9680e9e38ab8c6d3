"""The GCE provider against a local fake of the Compute REST API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace

import pytest
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials

from catalog.cuda import (
    MachineImage,
    cuda_version,
    driver_runs,
    known_cuda_versions,
    offer_cuda_problem,
)
from catalog.cuda import machine_images as table_images
from catalog.gpus import resolve_gpu
from catalog.model import Offer, ProviderName
from catalog.snapshot import load_bundled
from providers.base import (
    GROUP_TAG,
    ROLE_TAG,
    InstanceState,
    InsufficientCapacity,
    LaunchRequest,
    NotFound,
    Provider,
    QuotaExceeded,
    SpotInterruptionSource,
    Terminal,
    Transient,
)
from providers.errors import Throttled
from providers.gcp import (
    ENGINE_PORTS,
    GcpConfig,
    GcpProvider,
    choose_image,
    compact_policy_name,
    image_source,
    instance_name,
    label_value,
    launch_id_of,
    request_id,
    translate,
)
from providers.gcp_firewall import cluster_network_tag, firewall_rule_name
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
    gce.fail_starts(None)


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
    capabilities: frozenset[Capability] = frozenset(
        {"capacity", "quota", "throttle", "preempt", "stop_spot"}
    )

    def __init__(self, gce: FakeGceServer) -> None:
        self.gce = gce

    def new_provider(self) -> Provider:
        return GcpProvider(_config(self.gce))

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        self.gce.fail_inserts(kind)

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
    disk = sent["disks"][0]["initializeParams"]
    # Named: the API's default (pd-standard) is refused on G2; and it is what a stop bills.
    assert (disk["diskType"], disk["diskSizeGb"]) == (f"zones/{ZONE}/diskTypes/pd-balanced", "200")
    source = disk["sourceImage"]
    # The newest-driver image that runs the 12.4 pin on an L4, from the catalog's table.
    assert source == (
        "projects/deeplearning-platform-release/global/images/family/"
        "common-cu129-ubuntu-2204-nvidia-580"
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


A3 = replace(
    OFFER, instance_type="a3-highgpu-8g", gpu="NVIDIA H100 80GB HBM3", gpu_count=8,
    vcpus=208, memory_gib=1872, on_demand_usd_per_hour=88.25, spot_usd_per_hour=None,
)  # fmt: skip


def _member(gce: FakeGceServer, cluster: str, group: str, role: str) -> LaunchRequest:
    harness = GcpHarness(gce)
    harness.offer = A3
    request = make_request(harness, cluster_id=cluster)
    return replace(request, tags={**request.tags, GROUP_TAG: group, ROLE_TAG: role})


async def test_a_groups_members_share_one_compact_placement_policy_reused_by_later_groups(
    gce: FakeGceServer,
) -> None:
    cluster = "Big-Models"
    provider = GcpProvider(_config(gce))
    try:
        leader = await provider.launch(_member(gce, cluster, "ln-g1", "leader"))
        worker = await provider.launch(_member(gce, cluster, "ln-g1", "worker"))
        single = await provider.launch(make_request(GcpHarness(gce), cluster_id=cluster))
    finally:
        provider.close()
    name = compact_policy_name(cluster, ZONE, "a3-highgpu-8g")
    policy = gce.resource_policies[("us-central1", name)]
    assert policy["groupPlacementPolicy"] == {"collocation": "COLLOCATED"}
    url = f"projects/acme-serving/regions/us-central1/resourcePolicies/{name}"
    for member in (leader, worker):
        zone, vm = member.instance_id.split("/")
        assert gce.instances[(zone, vm)]["resourcePolicies"] == [url]
    zone, vm = single.instance_id.split("/")
    assert "resourcePolicies" not in gce.instances[(zone, vm)]  # not a group member
    assert gce.policy_inserts == 1  # created once, then reused

    restarted = GcpProvider(_config(gce))  # a new controller: the policy exists already
    try:
        again = await restarted.launch(_member(gce, cluster, "ln-g2", "leader"))
    finally:
        restarted.close()
    zone, vm = again.instance_id.split("/")
    assert gce.instances[(zone, vm)]["resourcePolicies"] == [url]
    assert [k for k in gce.resource_policies if k[1] == name] == [("us-central1", name)]


def test_compact_policy_names_are_valid_gce_names() -> None:
    name = compact_policy_name("c" * 63, "europe-west4-a", "a3-megagpu-8g")
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert compact_policy_name("a", ZONE, "a3-highgpu-8g") != compact_policy_name(
        "b", ZONE, "a3-highgpu-8g"
    )


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
    gce.fail_inserts("unavailable")
    before = gce.insert_requests

    with pytest.raises(Transient, match="HTTP 503"):
        await provider.launch(make_request(GcpHarness(gce), cluster_id="c-503"))

    assert gce.insert_requests - before == 5


async def test_a_rate_limit_is_raised_at_once_and_a_later_retry_buys_one_vm(
    gce: FakeGceServer,
) -> None:
    provider = GcpProvider(_config(gce, max_attempts=5, throttle_retry_after=7.0))
    gce.fail_inserts("throttle")
    request = make_request(GcpHarness(gce), cluster_id="c-429")
    before = gce.insert_requests

    with pytest.raises(Throttled, match="HTTP 429") as caught:  # no sleep in the provider
        await provider.launch(request)
    assert gce.insert_requests - before == 1  # not retried in the call: the caller waits
    assert caught.value.retry_after == 7.0

    gce.fail_inserts(None)
    gce.fail_starts(None)
    instance = await provider.launch(request)  # the same launch, when the controller retries
    assert [i.instance_id for i in await provider.list("c-429")] == [instance.instance_id]


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
        (_api_error(google_exceptions.TooManyRequests, "slow down"), Throttled),
        (_api_error(google_exceptions.ServiceUnavailable, "down"), Transient),
        (_api_error(google_exceptions.NotFound, "gone"), NotFound),
        (
            _api_error(google_exceptions.Forbidden, "x", errors=[{"reason": "rateLimitExceeded"}]),
            Throttled,
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


def _with_port(request: LaunchRequest, port: int) -> LaunchRequest:
    return replace(request, boot=replace(request.boot, port=port))


def _source_image(gce: FakeGceServer, instance_id: str) -> str:
    zone, name = instance_id.split("/")
    return str(gce.instances[(zone, name)]["disks"][0]["initializeParams"]["sourceImage"])


async def test_the_firewall_rule_is_created_once_reused_and_removed_with_the_cluster(
    gce: FakeGceServer,
) -> None:
    cluster = "fw-life"
    name = firewall_rule_name(cluster)
    provider = GcpProvider(_config(gce, source_ranges=("10.20.0.0/16",)))
    harness = GcpHarness(gce)

    first = await provider.launch(make_request(harness, cluster_id=cluster))
    second = await provider.launch(make_request(harness, cluster_id=cluster))
    # A controller restarted (a new provider object) finds the rule and leaves it as it is.
    third = await GcpProvider(_config(gce, source_ranges=("10.20.0.0/16",))).launch(
        make_request(harness, cluster_id=cluster)
    )

    assert [c for c in gce.firewall_calls if c[1] == name] == [("insert", name)]
    rule = gce.firewalls[name]
    assert rule["sourceRanges"] == ["10.20.0.0/16"]
    assert rule["targetTags"] == [cluster_network_tag(cluster)]
    assert rule["allowed"] == [{"IPProtocol": "tcp", "ports": ["8080"]}]
    assert f"autoscaler:cluster={cluster}" in rule["description"]
    for instance in (first, second, third):
        zone, vm = instance.instance_id.split("/")
        assert cluster_network_tag(cluster) in gce.instances[(zone, vm)]["tags"]["items"]

    # An engine on another port widens the same rule instead of making a second one.
    fourth = await provider.launch(_with_port(make_request(harness, cluster_id=cluster), 30000))
    assert gce.firewalls[name]["allowed"] == [{"IPProtocol": "tcp", "ports": ["8080", "30000"]}]
    assert [c for c in gce.firewall_calls if c[1] == name] == [("insert", name), ("patch", name)]

    with pytest.raises(Terminal, match="instances of the cluster still exist"):
        await provider.release_cluster(cluster)
    assert name in gce.firewalls
    for instance in (first, second, third, fourth):
        await provider.terminate(instance.instance_id)

    assert await provider.release_cluster(cluster) == [f"firewall rule {name}"]
    assert name not in gce.firewalls
    assert await provider.release_cluster(cluster) == []  # idempotent


async def test_a_rule_under_our_name_that_is_not_ours_is_left_alone(gce: FakeGceServer) -> None:
    cluster = "fw-foreign"
    name = firewall_rule_name(cluster)
    gce.firewalls[name] = {"name": name, "description": "made by hand", "allowed": []}
    provider = GcpProvider(_config(gce))
    before = gce.insert_requests

    with pytest.raises(Terminal, match=f"a firewall rule {name} exists that this cluster did not"):
        await provider.launch(make_request(GcpHarness(gce), cluster_id=cluster))

    assert gce.insert_requests == before  # nothing bought
    assert await provider.release_cluster(cluster) == []
    assert gce.firewalls[name]["description"] == "made by hand"
    del gce.firewalls[name]


async def test_check_mode_refuses_to_start_with_the_exact_rule_to_create(
    gce: FakeGceServer,
) -> None:
    cluster = "fw-check"
    provider = GcpProvider(_config(gce, firewall="check", source_ranges=("10.8.0.0/24",)))
    ports = ",".join(f"tcp:{p}" for p in ENGINE_PORTS)

    with pytest.raises(Terminal) as refused:
        await provider.preflight(cluster)

    command = (
        f"gcloud compute firewall-rules create {firewall_rule_name(cluster)} "
        f"--project acme-serving --network default --direction INGRESS --action ALLOW "
        f"--rules {ports} --source-ranges 10.8.0.0/24 "
        f"--target-tags {cluster_network_tag(cluster)}"
    )
    assert str(refused.value).endswith(f"create one: {command}")
    # An operator's rule (another name, a wider range, the shared tag) is enough.
    gce.firewalls["allow-gateway"] = {
        "name": "allow-gateway",
        "network": "https://www.googleapis.com/compute/v1/projects/acme-serving/global/networks/default",
        "direction": "INGRESS",
        "sourceRanges": ["10.0.0.0/8"],
        "targetTags": ["autoscaler-engine"],
        "allowed": [{"IPProtocol": "tcp", "ports": ["8000", "11434", "30000"]}],
    }
    try:
        await provider.preflight(cluster)
        # In check mode a launch creates no rule.
        await provider.launch(make_request(GcpHarness(gce), cluster_id=cluster))
        assert firewall_rule_name(cluster) not in gce.firewalls
    finally:
        del gce.firewalls["allow-gateway"]


async def test_a_cuda_13_pin_boots_an_image_whose_driver_runs_13(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    request = make_request(GcpHarness(gce), cluster_id="c-cu13")
    request = replace(request, boot=replace(request.boot, cuda_version="13.0"))

    instance = await provider.launch(request)

    source = _source_image(gce, instance.instance_id)
    [image] = [i for i in table_images(ProviderName.GCP) if image_source(i) == source]
    assert image.driver >= cuda_version("13.0").min_driver
    assert "cu124" not in source  # the driver-550 family cannot run 13.0


def test_every_gcp_offer_the_catalog_admits_for_a_pin_boots_a_driver_that_runs_it() -> None:
    images = table_images(ProviderName.GCP)
    checked = 0
    for offer in {
        o.gpu: o for o in load_bundled().offers if o.provider is ProviderName.GCP
    }.values():
        gpu = resolve_gpu(offer.gpu)
        for pin in known_cuda_versions():
            admitted = offer_cuda_problem(provider=ProviderName.GCP, gpu=gpu, pins=(pin,)) is None
            if not admitted:
                with pytest.raises(LookupError):
                    choose_image(offer, cuda=pin, images=images)
                continue
            chosen = choose_image(offer, cuda=pin, images=images)
            assert driver_runs(chosen.driver, version=pin, gpu=gpu), (offer.gpu, pin, chosen)
            checked += 1
    assert checked > 20


async def test_configured_images_replace_the_table_and_a_pin_they_cannot_run_buys_nothing(
    gce: FakeGceServer,
) -> None:
    old_only = (MachineImage(ProviderName.GCP, "my-images/cu124-family", (550, 90, 7)),)
    provider = GcpProvider(_config(gce, images=old_only))
    request = make_request(GcpHarness(gce), cluster_id="c-own-images")

    instance = await provider.launch(request)  # 12.4 runs on driver 550.90
    assert _source_image(gce, instance.instance_id) == (
        "projects/my-images/global/images/family/cu124-family"
    )
    pinned = make_request(GcpHarness(gce), cluster_id="c-own-images")
    pinned = replace(pinned, boot=replace(pinned.boot, cuda_version="13.0"))
    before = gce.insert_requests
    with pytest.raises(Terminal, match=r"no image's driver runs CUDA 13.0 on NVIDIA L4"):
        await provider.launch(pinned)
    assert gce.insert_requests == before


async def test_the_controller_refuses_to_start_without_a_rule_in_check_mode(
    gce: FakeGceServer,
) -> None:
    from types import SimpleNamespace
    from typing import cast

    from autoscaler.catalog_sync import LiveCatalog
    from autoscaler.config import ConfigError
    from autoscaler.controller import Controller
    from autoscaler.reconcile.deps import Deps, ProviderEntry, ProviderRegistry, Settings

    def controller(firewall: str) -> Controller:
        provider = GcpProvider(_config(gce, firewall=firewall))
        deps = SimpleNamespace(
            providers=ProviderRegistry({"gcp": ProviderEntry(provider)}),
            settings=Settings(cluster_id="fw-start"),
        )
        return Controller(deps=cast(Deps, deps), live=cast(LiveCatalog, None))

    with pytest.raises(
        ConfigError,
        match=r"^providers.gcp: checking the firewall rules .* "
        r"create one: gcloud compute firewall-rules create ",
    ):
        await controller("check").preflight()
    await controller("manage").preflight()  # manage mode makes its rule on first launch
    assert firewall_rule_name("fw-start") not in gce.firewalls


async def test_a_suspended_vm_reads_stopped_and_start_resumes_it(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    instance = await provider.launch(make_request(GcpHarness(gce), cluster_id="c-gcp-susp"))
    gce.settle()
    zone, name = instance.instance_id.split("/")
    gce.suspend(zone, name)  # suspended by someone else (GCE keeps its memory on disk)

    assert (await provider.describe(instance.instance_id)).state is InstanceState.STOPPED
    await provider.stop(instance.instance_id)  # already at rest: nothing asked of GCE
    assert gce.instances[(zone, name)]["status"] == "SUSPENDED"

    started = await provider.start(instance.instance_id)

    assert started.state is InstanceState.PENDING
    gce.settle()
    assert (await provider.describe(instance.instance_id)).state is InstanceState.RUNNING


async def test_a_start_in_a_stocked_out_zone_is_insufficient_capacity(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    instance = await provider.launch(make_request(GcpHarness(gce), cluster_id="c-gcp-ice"))
    gce.settle()
    await provider.stop(instance.instance_id)
    gce.settle()
    gce.fail_starts("capacity")

    with pytest.raises(InsufficientCapacity, match=f"starting {instance.instance_id}"):
        await provider.start(instance.instance_id)

    assert (await provider.describe(instance.instance_id)).state is InstanceState.STOPPED
    gce.fail_starts(None)
    await provider.start(instance.instance_id)  # the same machine, once the zone has room
    gce.settle()
    assert (await provider.describe(instance.instance_id)).state is InstanceState.RUNNING


async def test_stop_of_a_vm_still_provisioning_is_transient(gce: FakeGceServer) -> None:
    provider = GcpProvider(_config(gce))
    instance = await provider.launch(make_request(GcpHarness(gce), cluster_id="c-gcp-early"))

    with pytest.raises(Transient, match="still starting"):
        await provider.stop(instance.instance_id)

    zone, name = instance.instance_id.split("/")
    assert gce.instances[(zone, name)]["status"] == "PROVISIONING"
