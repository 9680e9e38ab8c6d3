"""AWS EC2 through aioboto3.

One ``RunInstances`` per launch, with the launch id as ``ClientToken`` (so a retried or
repeated launch never buys a second machine) and the request's tags on the instance and
its volumes. Spot is a one-time request that terminates on interruption. The image is
the Deep Learning Base OSS NVIDIA driver AMI (its driver serves every CUDA 12 pin),
resolved through its SSM public parameter unless the configuration maps the CUDA pin to
an AMI. The engine port is open only to the gateway's CIDR, through one security group
per cluster that is created on first use and reused after.

A member of a replica group (its request carries the ``autoscaler:group`` tag) is
launched into a ``cluster`` placement group, so the group's machines sit close on the
network for the tensor and pipeline traffic between them: one placement group per
cluster, zone and instance type (``autoscaler-{cluster}-{zone}-{instance type}``), created
on first use and reused by every group of that shape, so nothing is left to delete when
a group ends (EC2 keeps a placement group free of charge, and the number per region is
limited).

Stop and start (a warm pool of stopped machines): ``StopInstances`` keeps the instance
and its gp3 root volume (billed by the GB-month while stopped, see
:mod:`catalog.storage`); ``StartInstances`` boots it again in its zone, with the same
instance id, tags, private address and disk, and a new public address. A spot instance
cannot be stopped: EC2 stops spot instances only when a persistent spot request launched
them, and ours are one-time requests ("Stop a Spot Instance", EC2 User Guide,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/using-spot-instances-request.html),
so ``stop`` refuses one with :class:`Terminal` before asking. An instance's
``launched_at`` is EC2's ``LaunchTime``, which is the last start.

Credentials, region defaults and ``AWS_ENDPOINT_URL`` come from the standard AWS
environment. botocore's own retries are off: retries happen here, with tenacity, and only
for calls that are safe to repeat (describes, terminations, and ``RunInstances`` because
of its ``ClientToken``).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import aioboto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from catalog.model import ProviderName
from providers.aws_config import AwsConfig
from providers.base import (
    CLUSTER_TAG,
    GROUP_TAG,
    LAUNCH_ID_TAG,
    Clock,
    Instance,
    InstanceState,
    InsufficientCapacity,
    LaunchRequest,
    NotFound,
    ProviderError,
    QuotaExceeded,
    SpotInterruption,
    SystemClock,
    Terminal,
    Transient,
    pick_for_launch,
    utc,
)
from providers.errors import Throttled, retried_in_the_call

if TYPE_CHECKING:
    from types_aiobotocore_ec2.client import EC2Client
    from types_aiobotocore_ec2.type_defs import FilterTypeDef, InstanceTypeDef

T = TypeVar("T")

SPOT_INTERRUPTION_CODE = "Server.SpotInstanceTermination"
USER_DATA_LIMIT_BYTES = 16 * 1024

_CAPACITY_CODES = frozenset(
    {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity"}
)
_QUOTA_CODES = frozenset(
    {
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "InsufficientFreeAddressesInSubnet",
    }
)
_THROTTLE_CODES = frozenset(
    {"RequestLimitExceeded", "Throttling", "ThrottlingException", "ServiceUnavailable"}
)
_NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
_STATE_CODES = frozenset({"IncorrectInstanceState", "IncorrectState"})
"""The instance is between states (stopping a pending one, starting a stopping one)."""

_STATES = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "shutting-down": InstanceState.SHUTTING_DOWN,
    "stopping": InstanceState.STOPPING,
    # A stopped instance still exists (and its volumes cost money): not gone.
    "stopped": InstanceState.STOPPED,
    "terminated": InstanceState.TERMINATED,
}


def translate(error: Exception, action: str, *, retry_after: float = 5.0) -> ProviderError:
    """The provider error for a botocore error; raise it ``from error``."""
    if not isinstance(error, ClientError):
        return Transient(action, f"{type(error).__name__}: {error}", retry_after=retry_after)
    details = error.response.get("Error", {})
    code = details.get("Code", "Unknown")
    detail = f"{code}: {details.get('Message', '')}".rstrip(": ")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _CAPACITY_CODES:
        return InsufficientCapacity(action, detail)
    if code in _QUOTA_CODES:
        return QuotaExceeded(action, detail)
    if code in _NOT_FOUND_CODES:
        return NotFound(action, detail)
    if code in _THROTTLE_CODES:
        return Throttled(action, detail, retry_after=retry_after)
    if code in _STATE_CODES or status >= 500:
        return Transient(action, detail, retry_after=retry_after)
    return Terminal(action, detail)


def _tag_list(tags: Mapping[str, str]) -> builtins.list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _client_token(launch_id: str) -> str:
    # EC2 accepts at most 64 ASCII characters; longer launch ids are hashed, stably.
    if len(launch_id) <= 64 and launch_id.isascii():
        return launch_id
    return hashlib.sha256(launch_id.encode()).hexdigest()[:64]


_SESSION: list[aioboto3.Session] = []


INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"


def interruption_warning(body: str) -> tuple[str, str] | None:
    """(instance id, reason) from an EventBridge event in an SQS message body, or
    ``None`` for anything that is not a spot interruption warning."""
    try:
        event = json.loads(body)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("detail-type") != INTERRUPTION_WARNING:
        return None
    detail = event.get("detail")
    if not isinstance(detail, dict) or not detail.get("instance-id"):
        return None
    what = detail.get("instance-action", "terminate")
    reason = f"{INTERRUPTION_WARNING} (SQS): {what} at {event.get('time', 'an unknown time')}"
    return str(detail["instance-id"]), reason


def _queue_region(url: str) -> str | None:
    """The region of an AWS queue URL (``https://sqs.us-east-1.amazonaws.com/…``)."""
    match = re.match(r"^https://sqs\.([a-z0-9-]+)\.amazonaws\.com/", url)
    return match.group(1) if match else None


def _shared_session() -> aioboto3.Session:
    """One session per process: it caches botocore's service models, which are slow to load."""
    if not _SESSION:
        _SESSION.append(aioboto3.Session())
    return _SESSION[0]


class AwsProvider:
    """A :class:`providers.base.Provider` (and spot interruption source) for EC2."""

    name = "aws"

    def __init__(
        self,
        config: AwsConfig | None = None,
        *,
        session: aioboto3.Session | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config or AwsConfig()
        self._session = session or _shared_session()
        self._clock = clock or SystemClock()
        self._groups: dict[tuple[str, str], str] = {}
        self._placement_groups: set[str] = set()

    # The protocol.

    async def launch(self, request: LaunchRequest) -> Instance:
        action = request.action
        region = request.offer.region
        async with self._ec2(region) as ec2:
            params = await self._run_params(ec2, request, region=region)
            response = await self._retrying(action, lambda: ec2.run_instances(**params))
        return self._instance(response["Instances"][0], region=region)

    async def terminate(self, instance_id: str) -> None:
        action = f"terminating {instance_id}"
        for region in self.config.regions:
            async with self._ec2(region) as ec2:
                try:
                    await self._retrying(
                        action, partial(ec2.terminate_instances, InstanceIds=[instance_id])
                    )
                    return
                except NotFound:
                    continue

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        filters: builtins.list[FilterTypeDef] = [
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster_id]}
        ]
        return await self._find(filters, action=f"listing instances of cluster {cluster_id}")

    async def stop(self, instance_id: str) -> None:
        action = f"stopping {instance_id}"
        instance, region = await self._locate(instance_id, action=action)
        state = instance.state
        if state.is_gone or state is InstanceState.SHUTTING_DOWN:
            raise NotFound(action, f"the instance is {state.value}: nothing to keep")
        if state.is_stopped:
            return
        if instance.spot:
            raise Terminal(
                action,
                "a spot instance cannot be stopped: EC2 stops only those a persistent spot "
                "request launched, and this one is a one-time request; terminate it instead",
            )
        async with self._ec2(region) as ec2:
            await self._retrying(action, partial(ec2.stop_instances, InstanceIds=[instance_id]))

    async def start(self, instance_id: str) -> Instance:
        action = f"starting {instance_id}"
        instance, region = await self._locate(instance_id, action=action)
        state = instance.state
        if state.is_gone or state is InstanceState.SHUTTING_DOWN:
            raise NotFound(action, f"the instance is {state.value}")
        if state in (InstanceState.PENDING, InstanceState.RUNNING):
            return instance
        if state is InstanceState.STOPPING:
            raise Transient(
                action,
                "the instance is still stopping",
                retry_after=self.config.throttle_retry_after,
            )
        async with self._ec2(region) as ec2:
            await self._retrying(action, partial(ec2.start_instances, InstanceIds=[instance_id]))
        started, _ = await self._locate(instance_id, action=action)
        return started

    async def describe(self, instance_id: str) -> Instance:
        instance, _ = await self._locate(instance_id, action=f"describing {instance_id}")
        return instance

    async def _locate(self, instance_id: str, *, action: str) -> tuple[Instance, str]:
        """The instance and the region it lives in; :class:`NotFound` when none has it."""
        for region in self.config.regions:
            async with self._ec2(region) as ec2:
                try:
                    response = await self._retrying(
                        action, partial(ec2.describe_instances, InstanceIds=[instance_id])
                    )
                except NotFound:
                    continue
            for reservation in response["Reservations"]:
                for raw in reservation.get("Instances", []):
                    return self._instance(raw, region=region), region
        raise NotFound(action, f"no instance in {', '.join(self.config.regions)}")

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        filters: builtins.list[FilterTypeDef] = [
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster_id]},
            {"Name": f"tag:{LAUNCH_ID_TAG}", "Values": [launch_id]},
        ]
        found = await self._find(filters, action=f"finding launch {launch_id} of {cluster_id}")
        return pick_for_launch(found)

    async def interruptions(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        now = utc(self._clock.now())
        return [
            SpotInterruption(
                instance_id=i.instance_id,
                launch_id=i.launch_id,
                zone=i.zone,
                instance_type=i.instance_type,
                noticed_at=now,
            )
            for i in await self.list(cluster_id)
            if i.state is InstanceState.INTERRUPTED
        ]

    async def spot_notices(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        """The cluster's instances named by EC2 Spot Instance Interruption Warnings in the
        interruption queue (none without one). Every message read is deleted: the caller
        acts on the notices in the same pass, and the instance's own metadata watcher
        reports the same warning, so a notice lost to a crash here is not the only one."""
        url = self.config.interruption_queue_url
        if url is None:
            return []
        action = f"reading EC2 interruption warnings from {url}"
        warned: dict[str, str] = {}
        async with self._session.client(
            "sqs",  # type: ignore[call-overload]
            region_name=_queue_region(url) or self.config.regions[0],
            endpoint_url=self.config.sqs_endpoint_url,
            config=BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
        ) as sqs:
            for _ in range(10):  # at most 100 messages a pass
                got = await self._call(
                    action,
                    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0),
                )
                messages = got.get("Messages", [])
                if not messages:
                    break
                for message in messages:
                    warning = interruption_warning(message.get("Body", ""))
                    if warning is not None:
                        warned[warning[0]] = warning[1]
                entries = [
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ]
                await self._call(action, sqs.delete_message_batch(QueueUrl=url, Entries=entries))
        if not warned:
            return []
        now = utc(self._clock.now())
        return [
            SpotInterruption(
                instance_id=i.instance_id,
                launch_id=i.launch_id,
                zone=i.zone,
                instance_type=i.instance_type,
                noticed_at=now,
                reason=warned[i.instance_id],
            )
            for i in await self.list(cluster_id)
            if i.instance_id in warned and not i.state.is_gone
        ]

    # Launch parameters.

    async def _run_params(
        self, ec2: EC2Client, request: LaunchRequest, *, region: str
    ) -> dict[str, Any]:
        action = request.action
        offer = request.offer
        subnet = self.config.subnets.get(offer.zone)
        group = self.config.security_group_id or await self._cluster_group(
            ec2, request, region=region, subnet=subnet
        )
        tags = {**request.tags, "Name": f"{request.workload}-{request.launch_id}"}
        params: dict[str, Any] = {
            "ImageId": await self._image(request, region=region),
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": _client_token(request.client_token),
            "Placement": {"AvailabilityZone": offer.zone},
            "SecurityGroupIds": [group],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": _tag_list(tags)},
                {"ResourceType": "volume", "Tags": _tag_list(tags)},
            ],
            "BlockDeviceMappings": [
                {
                    "DeviceName": "/dev/sda1",
                    "Ebs": {
                        "VolumeSize": self.config.root_volume_gib,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if subnet is not None:
            params["SubnetId"] = subnet
        if GROUP_TAG in request.tags:
            params["Placement"]["GroupName"] = await self._placement_group(ec2, request)
        if request.spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        script = request.boot.startup_script
        if script:
            if len(script.encode()) > USER_DATA_LIMIT_BYTES:
                raise Terminal(action, f"startup script exceeds EC2's {USER_DATA_LIMIT_BYTES} B")
            params["UserData"] = script  # botocore base64-encodes it
        return params

    async def _image(self, request: LaunchRequest, *, region: str) -> str:
        pin = request.boot.cuda_version
        overrides = self.config.ami_overrides
        override = overrides.get(pin) if pin else None
        if override or "default" in overrides:
            return override or overrides["default"]
        action = f"{request.action}: resolving AMI {self.config.ami_parameter}"
        async with self._client("ssm", region) as ssm:
            response = await self._retrying(
                action, lambda: ssm.get_parameter(Name=self.config.ami_parameter)
            )
        return str(response["Parameter"]["Value"])

    async def _cluster_group(
        self, ec2: EC2Client, request: LaunchRequest, *, region: str, subnet: str | None
    ) -> str:
        """The cluster's security group, created on first use, admitting the engine port."""
        action = f"{request.action}: preparing the security group"
        vpc = await self._vpc(ec2, subnet=subnet, action=action)
        name = f"autoscaler-{request.cluster_id}"
        cached = self._groups.get((region, name))
        group_id = cached or await self._ensure_group(
            ec2, name=name, vpc=vpc, request=request, action=action
        )
        self._groups[(region, name)] = group_id
        await self._admit(ec2, group_id=group_id, port=request.boot.port, action=action)
        return group_id

    async def _placement_group(self, ec2: EC2Client, request: LaunchRequest) -> str:
        """The cluster placement group for this shape in this zone, created on first use."""
        offer = request.offer
        name = f"autoscaler-{request.cluster_id}-{offer.zone}-{offer.instance_type}"
        name = re.sub(r"[^A-Za-z0-9-]", "-", name)[:255]
        action = f"{request.action}: preparing placement group {name}"
        if name in self._placement_groups:
            return name
        try:
            await ec2.create_placement_group(GroupName=name, Strategy="cluster")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "InvalidPlacementGroup.Duplicate":
                raise translate(error, action) from error
        self._placement_groups.add(name)
        return name

    async def _vpc(self, ec2: EC2Client, *, subnet: str | None, action: str) -> str:
        if subnet is not None:
            found = await self._call(action, ec2.describe_subnets(SubnetIds=[subnet]))
            return str(found["Subnets"][0]["VpcId"])
        vpcs = await self._call(
            action, ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
        )
        if not vpcs["Vpcs"]:
            raise Terminal(action, "no default VPC: configure a subnet for the zone")
        return str(vpcs["Vpcs"][0]["VpcId"])

    async def _ensure_group(
        self, ec2: EC2Client, *, name: str, vpc: str, request: LaunchRequest, action: str
    ) -> str:
        filters: builtins.list[FilterTypeDef] = [
            {"Name": "group-name", "Values": [name]},
            {"Name": "vpc-id", "Values": [vpc]},
        ]
        found = await self._call(action, ec2.describe_security_groups(Filters=filters))
        if found["SecurityGroups"]:
            return str(found["SecurityGroups"][0]["GroupId"])
        try:
            created = await ec2.create_security_group(
                GroupName=name,
                Description=f"autoscaler cluster {request.cluster_id}: engine port from gateway",
                VpcId=vpc,
                TagSpecifications=[
                    {
                        "ResourceType": "security-group",
                        "Tags": [{"Key": CLUSTER_TAG, "Value": request.cluster_id}],
                    }
                ],
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "InvalidGroup.Duplicate":
                raise translate(error, action) from error
            # Another controller created it between our look and our create.
            found = await self._call(action, ec2.describe_security_groups(Filters=filters))
            return str(found["SecurityGroups"][0]["GroupId"])
        return str(created["GroupId"])

    async def _admit(self, ec2: EC2Client, *, group_id: str, port: int, action: str) -> None:
        try:
            await ec2.authorize_security_group_ingress(
                GroupId=group_id,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": port,
                        "ToPort": port,
                        "IpRanges": [
                            {"CidrIp": self.config.gateway_cidr, "Description": "gateway"}
                        ],
                    }
                ],
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                raise translate(error, action) from error

    # Reading instances.

    async def _find(
        self, filters: builtins.list[FilterTypeDef], *, action: str
    ) -> builtins.list[Instance]:
        found: builtins.list[Instance] = []
        for region in self.config.regions:
            async with self._ec2(region) as ec2:
                pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)

                async def collect(pages: Any = pages) -> builtins.list[InstanceTypeDef]:
                    return [
                        raw
                        async for page in pages
                        for reservation in page["Reservations"]
                        for raw in reservation.get("Instances", [])
                    ]

                raws = await self._retrying(action, collect)
            found.extend(self._instance(raw, region=region) for raw in raws)
        return found

    def _instance(self, raw: InstanceTypeDef, *, region: str) -> Instance:
        tags = {tag["Key"]: tag["Value"] for tag in raw.get("Tags", [])}
        state = _STATES.get(raw.get("State", {}).get("Name", "pending"), InstanceState.PENDING)
        if (
            state is InstanceState.TERMINATED
            and raw.get("StateReason", {}).get("Code") == SPOT_INTERRUPTION_CODE
        ):
            state = InstanceState.INTERRUPTED
        launched = raw.get("LaunchTime") or datetime.now(tz=UTC)
        return Instance(
            provider=ProviderName.AWS,
            instance_id=raw["InstanceId"],
            launch_id=tags.get(LAUNCH_ID_TAG, ""),
            zone=raw.get("Placement", {}).get("AvailabilityZone", region),
            instance_type=raw.get("InstanceType", ""),
            state=state,
            spot=raw.get("InstanceLifecycle") == "spot",
            launched_at=launched if launched.tzinfo else launched.replace(tzinfo=UTC),
            tags=tags,
            private_address=raw.get("PrivateIpAddress"),
            public_address=raw.get("PublicIpAddress"),
        )

    # Plumbing.

    @asynccontextmanager
    async def _ec2(self, region: str) -> AsyncIterator[EC2Client]:
        async with self._client("ec2", region) as client:
            yield client

    def _client(self, service: str, region: str) -> Any:
        return self._session.client(
            service,  # type: ignore[call-overload]
            region_name=region,
            endpoint_url=self.config.endpoint_url,
            config=BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
        )

    async def _call(self, action: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (ClientError, BotoCoreError) as error:
            raise translate(error, action, retry_after=self.config.throttle_retry_after) from error

    async def _retrying(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run a call that is safe to repeat, retrying it while it fails transiently."""
        retrying = AsyncRetrying(  # throttling is not retried here: the caller records when
            retry=retry_if_exception(retried_in_the_call),
            stop=stop_after_attempt(self.config.max_attempts),
            wait=wait_exponential(multiplier=self.config.retry_wait_seconds, max=30),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._call(action, call())
        raise AssertionError("unreachable: tenacity reraises the last error")
