"""The EC2 provider against moto's server over HTTP, behind a proxy that adds
ClientToken idempotency and injected capacity, quota and throttling errors."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest
from botocore.exceptions import ClientError
from moto.backends import get_backend
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.ec2.models.instances import StateReason
from moto.server import ThreadedMotoServer
from types_aiobotocore_ec2.client import EC2Client

from catalog.model import Offer, ProviderName
from providers.aws import SPOT_INTERRUPTION_CODE, AwsProvider, translate
from providers.aws_config import AwsConfig
from providers.base import (
    CLUSTER_TAG,
    GROUP_TAG,
    ROLE_TAG,
    InstanceState,
    InsufficientCapacity,
    NotFound,
    Provider,
    QuotaExceeded,
    SpotInterruptionSource,
    Terminal,
    Transient,
)
from providers.errors import Throttled
from tests.fakes.ec2_proxy import Ec2Proxy, FaultRule
from tests.providers.contract import (
    Capability,
    ErrorKind,
    ProviderContract,
    ProviderHarness,
    make_request,
)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

REGION = "us-east-1"
ZONE = "us-east-1a"
MOTO_AMI = "ami-785db401"
OFFER = Offer(
    provider=ProviderName.AWS,
    region=REGION,
    zone=ZONE,
    instance_type="g5.xlarge",
    gpu="NVIDIA A10G",
    gpu_count=1,
    vcpus=4,
    memory_gib=16,
    on_demand_usd_per_hour=1.006,
    spot_usd_per_hour=0.4024,
)


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def ec2(proxy: Ec2Proxy) -> AsyncIterator[EC2Client]:
    async with aioboto3.Session().client("ec2", region_name=REGION, endpoint_url=proxy.url) as c:
        yield c


def _config(proxy: Ec2Proxy, **overrides: object) -> AwsConfig:
    settings: dict[str, object] = {
        "regions": (REGION,),
        "endpoint_url": proxy.url,
        "gateway_cidr": "203.0.113.10/32",
        "ami_overrides": {"12.4": MOTO_AMI},
        "retry_wait_seconds": 0.01,
        "max_attempts": 3,
    }
    settings.update(overrides)
    return AwsConfig(**settings)  # type: ignore[arg-type]


def _moto_instance(instance_id: str) -> Any:
    backend = get_backend("ec2")[DEFAULT_ACCOUNT_ID][REGION]
    return backend.get_instance(instance_id)


class AwsHarness:
    offer = OFFER
    capabilities: frozenset[Capability] = frozenset({"capacity", "quota", "throttle", "preempt"})

    def __init__(self, proxy: Ec2Proxy) -> None:
        self.proxy = proxy

    def new_provider(self) -> Provider:
        return AwsProvider(_config(self.proxy))

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        self.proxy.fail(kind)

    async def preempt(self, instance_id: str) -> None:
        instance = _moto_instance(instance_id)
        instance.terminate()
        instance.state_reason = StateReason(
            f"{SPOT_INTERRUPTION_CODE}: Spot instance termination", SPOT_INTERRUPTION_CODE
        )

    async def settle(self) -> None:
        """moto starts instances running at once."""


class TestAwsContract(ProviderContract):
    @pytest.fixture
    def harness(self, proxy: Ec2Proxy) -> ProviderHarness:
        return AwsHarness(proxy)


def test_the_aws_provider_is_a_provider_with_spot_interruptions() -> None:
    provider = AwsProvider(AwsConfig())
    assert isinstance(provider, Provider)
    assert isinstance(provider, SpotInterruptionSource)


async def test_launch_tags_volumes_sets_user_data_and_buys_spot(
    proxy: Ec2Proxy, ec2: EC2Client
) -> None:
    provider = AwsProvider(_config(proxy))
    request = make_request(AwsHarness(proxy), cluster_id="c-aws-1", spot=True)

    instance = await provider.launch(request)

    volumes = await ec2.describe_volumes(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": ["c-aws-1"]}]
    )
    assert [a["InstanceId"] for v in volumes["Volumes"] for a in v["Attachments"]] == [
        instance.instance_id
    ]
    user_data = await ec2.describe_instance_attribute(
        InstanceId=instance.instance_id, Attribute="userData"
    )
    assert base64.b64decode(user_data["UserData"]["Value"]).decode() == (
        request.boot.startup_script
    )
    described = await ec2.describe_instances(InstanceIds=[instance.instance_id])
    raw = described["Reservations"][0]["Instances"][0]
    assert raw["ImageId"] == MOTO_AMI
    assert raw["InstanceLifecycle"] == "spot"
    assert instance.spot is True
    assert instance.private_address


async def test_the_cluster_security_group_admits_the_engine_port_from_the_gateway_only(
    proxy: Ec2Proxy, ec2: EC2Client
) -> None:
    provider = AwsProvider(_config(proxy))
    await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-sg"))
    await AwsProvider(_config(proxy)).launch(make_request(AwsHarness(proxy), cluster_id="c-aws-sg"))

    groups = await ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": ["autoscaler-c-aws-sg"]}]
    )
    assert len(groups["SecurityGroups"]) == 1
    rules = groups["SecurityGroups"][0]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], [i["CidrIp"] for i in r["IpRanges"]]) for r in rules] == [
        (8080, 8080, ["203.0.113.10/32"])
    ]


async def test_the_ami_comes_from_the_ssm_parameter_without_an_override(
    proxy: Ec2Proxy, moto_server: ThreadedMotoServer, ec2: EC2Client
) -> None:
    host, port = moto_server.get_host_and_port()
    async with aioboto3.Session().client(
        "ssm", region_name=REGION, endpoint_url=f"http://{host}:{port}"
    ) as ssm:
        await ssm.put_parameter(Name="/test/gpu-ami", Value="ami-1e749f67", Type="String")
    provider = AwsProvider(
        _config(proxy, ami_overrides={}, ami_parameter="/test/gpu-ami", endpoint_url=proxy.url)
    )

    instance = await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-ami"))

    described = await ec2.describe_instances(InstanceIds=[instance.instance_id])
    assert described["Reservations"][0]["Instances"][0]["ImageId"] == "ami-1e749f67"


async def test_a_missing_ami_parameter_is_terminal(proxy: Ec2Proxy) -> None:
    provider = AwsProvider(_config(proxy, ami_overrides={}, ami_parameter="/test/missing"))

    with pytest.raises(Terminal, match="resolving AMI /test/missing") as caught:
        await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-noami"))
    assert isinstance(caught.value.__cause__, ClientError)


async def test_a_throttle_is_raised_at_once_and_a_later_retry_buys_one_instance(
    proxy: Ec2Proxy,
) -> None:
    provider = AwsProvider(_config(proxy))
    proxy.fail("throttle", times=1)
    request = make_request(AwsHarness(proxy), cluster_id="c-aws-thr")

    with pytest.raises(Throttled) as caught:  # no sleep in the provider: the caller waits
        await provider.launch(request)
    assert proxy.run_instances_calls == 1
    assert caught.value.retry_after > 0

    instance = await provider.launch(request)  # the same launch id, later
    assert proxy.run_instances_calls == 2
    assert [i.instance_id for i in await provider.list("c-aws-thr")] == [instance.instance_id]


async def test_capacity_errors_are_not_retried(proxy: Ec2Proxy) -> None:
    provider = AwsProvider(_config(proxy))
    proxy.fail("capacity")

    with pytest.raises(InsufficientCapacity, match="InsufficientInstanceCapacity"):
        await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-ice"))

    assert proxy.run_instances_calls == 1


async def test_a_preempted_spot_instance_reads_as_interrupted(proxy: Ec2Proxy) -> None:
    harness = AwsHarness(proxy)
    provider = AwsProvider(_config(proxy))
    spot = await provider.launch(make_request(harness, cluster_id="c-aws-pre", spot=True))

    await harness.preempt(spot.instance_id)

    assert (await provider.describe(spot.instance_id)).state is InstanceState.INTERRUPTED


async def test_an_unknown_subnet_is_terminal_and_names_the_launch(proxy: Ec2Proxy) -> None:
    provider = AwsProvider(_config(proxy, subnets={ZONE: "subnet-0000dead"}))

    with pytest.raises(Terminal, match=r"launching g5\.xlarge in us-east-1a") as caught:
        await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-bad"))
    assert "InvalidSubnetID.NotFound" in str(caught.value)
    assert isinstance(caught.value.__cause__, ClientError)


async def test_describe_of_a_malformed_id_is_not_found(proxy: Ec2Proxy) -> None:
    with pytest.raises(NotFound, match="describing nonsense"):
        await AwsProvider(_config(proxy)).describe("nonsense")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "m"},
            "ResponseMetadata": {
                "HTTPStatusCode": status,
                "HTTPHeaders": {},
                "HostId": "",
                "RequestId": "r",
                "RetryAttempts": 0,
            },
        },
        "RunInstances",
    )


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("InsufficientInstanceCapacity", 500, InsufficientCapacity),
        ("InstanceLimitExceeded", 400, QuotaExceeded),
        ("VcpuLimitExceeded", 400, QuotaExceeded),
        ("MaxSpotInstanceCountExceeded", 400, QuotaExceeded),
        ("RequestLimitExceeded", 503, Throttled),
        ("InternalError", 500, Transient),
        ("Unsupported", 400, Terminal),
        ("InvalidParameterValue", 400, Terminal),
        ("IdempotentParameterMismatch", 400, Terminal),
        ("InvalidInstanceID.NotFound", 400, NotFound),
        ("IncorrectInstanceState", 400, Transient),
    ],
)
def test_ec2_error_codes_map_to_what_the_caller_should_do(
    code: str, status: int, expected: type[Exception]
) -> None:
    error = translate(_client_error(code, status), "launching g5.xlarge in us-east-1a for w")
    assert type(error) is expected
    assert str(error).startswith(f"launching g5.xlarge in us-east-1a for w: {code}")


async def test_a_replica_groups_members_go_into_one_cluster_placement_group(
    proxy: Ec2Proxy, ec2: EC2Client
) -> None:
    """Two members of a group (leader and worker), launched by two provider objects as
    two controllers would, share one cluster placement group; a lone replica uses none."""
    harness = AwsHarness(proxy)
    members = []
    for role in ("leader", "worker"):
        request = make_request(harness, cluster_id="c-aws-grp")
        tags = {**request.tags, GROUP_TAG: "ln-group-1", ROLE_TAG: role}
        members.append(
            await AwsProvider(_config(proxy)).launch(dataclasses.replace(request, tags=tags))
        )
    lone = await AwsProvider(_config(proxy)).launch(make_request(harness, cluster_id="c-aws-grp"))

    name = f"autoscaler-c-aws-grp-{ZONE}-{OFFER.instance_type}".replace(".", "-")
    placed = proxy.instance_placement_group
    assert [placed.get(m.instance_id) for m in members] == [name, name]
    assert lone.instance_id not in placed
    described = await ec2.describe_instances(InstanceIds=[m.instance_id for m in members])
    raw = {i["InstanceId"]: i for r in described["Reservations"] for i in r["Instances"]}
    roles = {
        m.instance_id: {t["Key"]: t["Value"] for t in raw[m.instance_id]["Tags"]} for m in members
    }
    assert [roles[m.instance_id][ROLE_TAG] for m in members] == ["leader", "worker"]
    assert {r[GROUP_TAG] for r in roles.values()} == {"ln-group-1"}
    groups = await ec2.describe_placement_groups(GroupNames=[name])
    [group] = groups["PlacementGroups"]
    assert (group["GroupName"], group["Strategy"]) == (name, "cluster")


async def test_a_stopped_instance_keeps_its_volume_and_address_and_starts_as_itself(
    proxy: Ec2Proxy, ec2: EC2Client
) -> None:
    provider = AwsProvider(_config(proxy))
    instance = await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-stop"))

    await provider.stop(instance.instance_id)

    described = await ec2.describe_instances(InstanceIds=[instance.instance_id])
    assert described["Reservations"][0]["Instances"][0]["State"]["Name"] == "stopped"
    volumes = await ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance.instance_id]}]
    )
    [volume] = volumes["Volumes"]
    assert (volume["Size"], volume["VolumeType"]) == (200, "gp3")  # what the stop bills
    started = await AwsProvider(_config(proxy)).start(instance.instance_id)
    assert started.instance_id == instance.instance_id
    assert started.private_address == instance.private_address
    assert started.state is InstanceState.RUNNING


async def test_a_start_without_capacity_is_insufficient_capacity_and_leaves_it_stopped(
    proxy: Ec2Proxy,
) -> None:
    provider = AwsProvider(_config(proxy))
    instance = await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-sice"))
    await provider.stop(instance.instance_id)
    proxy.inject(FaultRule("capacity", actions=frozenset({"StartInstances"}), times=1))

    with pytest.raises(InsufficientCapacity, match=f"starting {instance.instance_id}"):
        await provider.start(instance.instance_id)

    assert (await provider.describe(instance.instance_id)).state is InstanceState.STOPPED
    assert (await provider.start(instance.instance_id)).state is InstanceState.RUNNING


async def test_a_spot_instance_is_refused_before_ec2_is_asked(proxy: Ec2Proxy) -> None:
    provider = AwsProvider(_config(proxy))
    spot = await provider.launch(make_request(AwsHarness(proxy), cluster_id="c-aws-sst", spot=True))
    stops_before = proxy.counts.calls.get("StopInstances", 0)

    with pytest.raises(Terminal, match="one-time request"):
        await provider.stop(spot.instance_id)

    assert proxy.counts.calls.get("StopInstances", 0) == stops_before
