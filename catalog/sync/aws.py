"""AWS offers through aioboto3.

Per region: DescribeInstanceTypes (the GPU types, from GpuInfo), DescribeInstanceTypeOfferings
per availability zone, DescribeSpotPriceHistory (the latest Linux spot price per zone), and
the Pricing API's GetProducts for on-demand Linux prices (the Pricing API answers from
us-east-1 for every region). Each service's endpoint can be overridden (``endpoints``:
``ec2``, ``ec2_spot``, ``pricing``), which is how tests point it at local servers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aioboto3
from botocore.exceptions import ClientError

from catalog.gpus import gpu_from_aws
from catalog.model import Offer, ProviderName
from catalog.sync.base import RetryPolicy, SyncProgress, call_with_retry

if TYPE_CHECKING:
    from types_aiobotocore_ec2.client import EC2Client
    from types_aiobotocore_pricing.client import PricingClient

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "SlowDown",
    }
)
GPU_FAMILIES = (
    "g3",
    "g4dn",
    "g5",
    "g5g",
    "g6",
    "g6e",
    "gr6",
    "p3",
    "p3dn",
    "p4d",
    "p4de",
    "p5",
    "p5e",
    "p5en",
    "p6-b200",
    "p6e-gb200",
)
_CHUNK = 100  # EC2 filter values and InstanceTypes lists stay well under AWS's limits


@dataclass(frozen=True, slots=True)
class AwsSyncConfig:
    """Where and how to fetch AWS offers."""

    regions: tuple[str, ...]
    endpoints: Mapping[str, str] = field(default_factory=dict)
    pricing_region: str = "us-east-1"
    families: tuple[str, ...] = GPU_FAMILIES
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class _GpuType:
    instance_type: str
    gpu: str
    gpu_count: int
    vcpus: float
    memory_gib: float


def is_throttling(exc: BaseException) -> bool:
    """Whether an AWS error says "slow down" (worth retrying) rather than "no"."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in THROTTLING_CODES
    return False


async def fetch_aws(config: AwsSyncConfig, *, progress: SyncProgress) -> list[Offer]:
    """Every GPU offer in ``config.regions``, with on-demand and spot prices."""
    session = aioboto3.Session()
    offers: list[Offer] = []
    for region in config.regions:
        offers.extend(await _fetch_region(session, config=config, region=region, progress=progress))
    return offers


async def _fetch_region(
    session: aioboto3.Session, *, config: AwsSyncConfig, region: str, progress: SyncProgress
) -> list[Offer]:
    task = f"aws {region}"
    progress.start(task, total=4)
    ec2_url = config.endpoints.get("ec2")
    spot_url = config.endpoints.get("ec2_spot", ec2_url)
    async with session.client("ec2", region_name=region, endpoint_url=ec2_url) as ec2:
        types = await _gpu_types(ec2, config=config, region=region)
        progress.advance(task)
        zones = await _offerings(ec2, config=config, region=region, types=list(types))
        progress.advance(task)
    async with session.client("ec2", region_name=region, endpoint_url=spot_url) as ec2_spot:
        spot = await _spot_prices(ec2_spot, config=config, region=region, types=list(types))
        progress.advance(task)
    async with session.client(
        "pricing", region_name=config.pricing_region, endpoint_url=config.endpoints.get("pricing")
    ) as pricing:
        on_demand = await _on_demand_prices(pricing, config=config, region=region, types=set(types))
        progress.advance(task)
    offers = []
    for instance_type, zone in sorted(zones):
        price = on_demand.get(instance_type)
        if price is None:
            continue  # not sold on demand here (capacity blocks only): not an offer we can buy
        info = types[instance_type]
        offers.append(
            Offer(
                provider=ProviderName.AWS,
                region=region,
                zone=zone,
                instance_type=instance_type,
                gpu=info.gpu,
                gpu_count=info.gpu_count,
                vcpus=info.vcpus,
                memory_gib=info.memory_gib,
                on_demand_usd_per_hour=price,
                spot_usd_per_hour=spot.get((instance_type, zone)),
            )
        )
    return offers


async def _pages(
    method: Callable[..., Awaitable[Any]],
    *,
    action: str,
    config: AwsSyncConfig,
    **kwargs: Any,
) -> AsyncIterator[Mapping[str, Any]]:
    """Every page of a paginated AWS call, each fetched with throttling retries."""
    token: str | None = None
    while True:
        page_kwargs = {**kwargs, "NextToken": token} if token else kwargs
        page: Mapping[str, Any] = await call_with_retry(
            action,
            functools.partial(method, **page_kwargs),
            policy=config.retry,
            is_throttling=is_throttling,
        )
        yield page
        token = page.get("NextToken")
        if not token:
            return


async def _gpu_types(ec2: EC2Client, *, config: AwsSyncConfig, region: str) -> dict[str, _GpuType]:
    found: dict[str, _GpuType] = {}
    async for page in _pages(
        ec2.describe_instance_types,
        action=f"aws {region} DescribeInstanceTypes",
        config=config,
        MaxResults=100,
        Filters=[{"Name": "instance-type", "Values": [f"{f}.*" for f in config.families]}],
    ):
        for item in page.get("InstanceTypes", []):
            parsed = _parse_gpu_type(item)
            if parsed is not None:
                found[parsed.instance_type] = parsed
    return found


def _parse_gpu_type(item: Mapping[str, Any]) -> _GpuType | None:
    gpus = item.get("GpuInfo", {}).get("Gpus", [])
    if not gpus:
        return None
    first = gpus[0]
    if first.get("Manufacturer") != "NVIDIA":
        return None
    gpu = gpu_from_aws(
        first["Name"], memory_mib=int(first.get("MemoryInfo", {}).get("SizeInMiB", 0))
    )
    if gpu is None:
        return None
    return _GpuType(
        instance_type=item["InstanceType"],
        gpu=gpu.display_name,
        gpu_count=sum(int(g.get("Count", 1)) for g in gpus),
        vcpus=float(item["VCpuInfo"]["DefaultVCpus"]),
        memory_gib=round(item["MemoryInfo"]["SizeInMiB"] / 1024, 2),
    )


def _chunks(items: Sequence[str]) -> list[list[str]]:
    ordered = sorted(items)
    return [ordered[i : i + _CHUNK] for i in range(0, len(ordered), _CHUNK)]


async def _offerings(
    ec2: EC2Client, *, config: AwsSyncConfig, region: str, types: list[str]
) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for chunk in _chunks(types):
        async for page in _pages(
            ec2.describe_instance_type_offerings,
            action=f"aws {region} DescribeInstanceTypeOfferings",
            config=config,
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": chunk}],
        ):
            for item in page.get("InstanceTypeOfferings", []):
                found.add((item["InstanceType"], item["Location"]))
    return found


async def _spot_prices(
    ec2: EC2Client, *, config: AwsSyncConfig, region: str, types: list[str]
) -> dict[tuple[str, str], float]:
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    now = datetime.now(UTC)  # StartTime=now asks for the price in force now, per zone
    for chunk in _chunks(types):
        async for page in _pages(
            ec2.describe_spot_price_history,
            action=f"aws {region} DescribeSpotPriceHistory",
            config=config,
            InstanceTypes=chunk,
            ProductDescriptions=["Linux/UNIX"],
            StartTime=now,
        ):
            for item in page.get("SpotPriceHistory", []):
                key = (item["InstanceType"], item["AvailabilityZone"])
                stamp = item["Timestamp"]
                if key not in latest or stamp > latest[key][0]:
                    latest[key] = (stamp, float(item["SpotPrice"]))
    return {key: price for key, (_, price) in latest.items()}


def _pricing_filters(region: str) -> list[dict[str, str]]:
    wanted = {
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
    }
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in wanted.items()]


async def _on_demand_prices(
    pricing: PricingClient, *, config: AwsSyncConfig, region: str, types: set[str]
) -> dict[str, float]:
    prices: dict[str, float] = {}
    async for page in _pages(
        pricing.get_products,
        action=f"aws {region} GetProducts",
        config=config,
        ServiceCode="AmazonEC2",
        Filters=_pricing_filters(region),
        MaxResults=100,
    ):
        for document in page.get("PriceList", []):
            parsed = parse_price_list_item(document)
            if parsed is not None and parsed[0] in types:
                instance_type, price = parsed
                # Several products can match (license models, market options); the
                # cheapest positive one is the plain on-demand Linux price.
                prices[instance_type] = min(price, prices.get(instance_type, price))
    return prices


def parse_price_list_item(document: str | Mapping[str, Any]) -> tuple[str, float] | None:
    """(instance type, USD per hour) from one Pricing API price list entry, if it has one."""
    item = json.loads(document) if isinstance(document, str) else document
    attributes = item.get("product", {}).get("attributes", {})
    instance_type = attributes.get("instanceType")
    if not instance_type or attributes.get("marketoption", "OnDemand") != "OnDemand":
        return None
    for term in item.get("terms", {}).get("OnDemand", {}).values():
        for dimension in term.get("priceDimensions", {}).values():
            usd = float(dimension.get("pricePerUnit", {}).get("USD", "0"))
            if usd > 0 and dimension.get("unit", "Hrs") == "Hrs":
                return instance_type, usd
    return None
