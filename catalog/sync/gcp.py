"""GCP offers: machine and accelerator types from Compute Engine, prices from Cloud Billing.

Compute Engine (google-cloud-compute, REST transport; the client is synchronous, so it runs
in a worker thread): aggregated lists of machine types and accelerator types, kept for
the configured regions. Machine types with built-in GPUs (G2, A2, A3, A4) are offers as
they are; N1 takes GPUs as attachments, so every N1 size x attachable GPU x count that
the zone sells becomes an offer (label ``accelerator_type``).

Cloud Billing Catalog API (REST over httpx): the SKUs of the Compute Engine service. GCP
prices a VM's cores, its memory and its GPUs apart; an offer's price is their total, on
demand and (from the "Preemptible" SKUs) spot. An offer whose parts are not all priced
is left out rather than under-priced.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import Credentials
from google.cloud import compute_v1

from catalog.gpus import gpu_from_gcp
from catalog.model import Offer, ProviderName
from catalog.sync.base import RetryPolicy, SyncProgress, call_with_retry

COMPUTE_SERVICE_ID = "6F81-5844-456A"
BILLING_ENDPOINT = "https://cloudbilling.googleapis.com"
FIXED_GPU_FAMILIES = ("g2", "a2", "a3", "a4")
N1_SIZES = {"n1-standard-4": 1, "n1-standard-8": 1, "n1-standard-16": 2, "n1-standard-32": 4}
N1_ACCELERATORS = ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p100", "nvidia-tesla-p4")
# Billing SKU descriptions name GPUs in prose; the first pattern that matches wins, so the
# more specific names come first ("A100 80GB" before "A100").
GPU_SKU_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), accelerator)
    for pattern, accelerator in (
        (r"\bA100 80GB\b", "nvidia-a100-80gb"),
        (r"\bA100\b", "nvidia-tesla-a100"),
        (r"\bH100 80GB (Plus|Mega)\b|\bH100 Mega\b", "nvidia-h100-mega-80gb"),
        (r"\bH100\b", "nvidia-h100-80gb"),
        (r"\bH200\b", "nvidia-h200-141gb"),
        (r"\bGB200\b", "nvidia-gb200"),
        (r"\bB200\b", "nvidia-b200"),
        (r"\bRTX PRO 6000\b", "nvidia-rtx-pro-6000"),
        (r"\bL4\b", "nvidia-l4"),
        (r"\bT4\b", "nvidia-tesla-t4"),
        (r"\bV100\b", "nvidia-tesla-v100"),
        (r"\bP100\b", "nvidia-tesla-p100"),
        (r"\bP4\b", "nvidia-tesla-p4"),
    )
)
VM_SKU = re.compile(r"^(?:Spot Preemptible )?(N1 Predefined|G2|A2|A3|A4) Instance (Core|Ram)\b")
VM_SKU_FAMILY = {"n1": "N1 Predefined", "g2": "G2", "a2": "A2", "a3": "A3", "a4": "A4"}
EXCLUDED_SKU_WORDS = (
    "commitment",
    "committed",
    "reserved",
    "reservation",
    "sole tenancy",
    "custom",
    "dws",
    "calendar",
    "flex",
    "virtual workstation",
    "extended",
)


@dataclass(frozen=True, slots=True)
class GcpSyncConfig:
    """Where and how to fetch GCP offers. ``compute_endpoint`` and ``billing_endpoint``
    override the public APIs (tests use local fakes)."""

    project: str
    regions: tuple[str, ...]
    credentials: Credentials | None = None
    compute_endpoint: str | None = None
    billing_endpoint: str = BILLING_ENDPOINT
    billing_api_key: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class _MachineType:
    zone: str
    name: str
    vcpus: float
    memory_gib: float
    accelerators: tuple[tuple[str, int], ...]


_PriceKey = tuple[str, str, str, bool]  # (kind, family or accelerator, region, spot)


def is_throttling(exc: BaseException) -> bool:
    """Whether a Google or Billing error says "slow down" rather than "no"."""
    if isinstance(exc, google_exceptions.TooManyRequests | google_exceptions.ServiceUnavailable):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (429, 503)
    return isinstance(exc, httpx.TransportError)


async def fetch_gcp(config: GcpSyncConfig, *, progress: SyncProgress) -> list[Offer]:
    """Every GPU offer in ``config.regions``, priced from the Billing catalog."""
    progress.start("gcp compute", total=2)
    machine_types = await call_with_retry(
        "gcp aggregated machineTypes",
        lambda: asyncio.to_thread(_list_machine_types, config),
        policy=config.retry,
        is_throttling=is_throttling,
    )
    progress.advance("gcp compute")
    accelerators = await call_with_retry(
        "gcp aggregated acceleratorTypes",
        lambda: asyncio.to_thread(_list_accelerator_types, config),
        policy=config.retry,
        is_throttling=is_throttling,
    )
    progress.advance("gcp compute")
    prices = await fetch_billing_prices(config, progress=progress)
    offers: list[Offer] = []
    for region in config.regions:
        task = f"gcp {region}"
        in_region = [m for m in machine_types if _region_of(m.zone) == region]
        progress.start(task, total=max(len(in_region), 1))
        for machine in in_region:
            offers.extend(_offers_for(machine, accelerators=accelerators, prices=prices))
            progress.advance(task)
    return offers


def _region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def _client_kwargs(config: GcpSyncConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"transport": "rest"}
    if config.credentials is not None:
        kwargs["credentials"] = config.credentials
    if config.compute_endpoint:
        kwargs["client_options"] = {"api_endpoint": config.compute_endpoint}
    return kwargs


def _wanted_machine(name: str) -> bool:
    return name.split("-")[0] in FIXED_GPU_FAMILIES or name in N1_SIZES


def _list_machine_types(config: GcpSyncConfig) -> list[_MachineType]:
    client = compute_v1.MachineTypesClient(**_client_kwargs(config))
    request = compute_v1.AggregatedListMachineTypesRequest(
        project=config.project, filter='name eq "(g2|a2|a3|a4|n1-standard)-.*"'
    )
    regions = set(config.regions)
    found: list[_MachineType] = []
    for scope, scoped in client.aggregated_list(request=request):
        for machine in scoped.machine_types:
            zone = machine.zone.rsplit("/", 1)[-1] or scope.rsplit("/", 1)[-1]
            if _region_of(zone) not in regions or not _wanted_machine(machine.name):
                continue
            found.append(
                _MachineType(
                    zone=zone,
                    name=machine.name,
                    vcpus=float(machine.guest_cpus),
                    memory_gib=round(machine.memory_mb / 1024, 2),
                    accelerators=tuple(
                        (a.guest_accelerator_type, int(a.guest_accelerator_count))
                        for a in machine.accelerators
                    ),
                )
            )
    return found


def _list_accelerator_types(config: GcpSyncConfig) -> dict[str, dict[str, int]]:
    """zone -> accelerator type -> most cards per instance."""
    client = compute_v1.AcceleratorTypesClient(**_client_kwargs(config))
    request = compute_v1.AggregatedListAcceleratorTypesRequest(project=config.project)
    regions = set(config.regions)
    found: dict[str, dict[str, int]] = {}
    for scope, scoped in client.aggregated_list(request=request):
        for accelerator in scoped.accelerator_types:
            zone = accelerator.zone.rsplit("/", 1)[-1] or scope.rsplit("/", 1)[-1]
            if _region_of(zone) in regions:
                cards = int(accelerator.maximum_cards_per_instance or 8)
                found.setdefault(zone, {})[accelerator.name] = cards
    return found


def _offers_for(
    machine: _MachineType,
    *,
    accelerators: Mapping[str, Mapping[str, int]],
    prices: Mapping[_PriceKey, float],
) -> list[Offer]:
    if machine.accelerators:
        accelerator, count = machine.accelerators[0]
        offer = _price_offer(machine, accelerator=accelerator, count=count, prices=prices)
        return [] if offer is None else [offer]
    if machine.name not in N1_SIZES:
        return []
    count = N1_SIZES[machine.name]
    offers = []
    for accelerator, most in sorted(accelerators.get(machine.zone, {}).items()):
        if accelerator in N1_ACCELERATORS and count <= most:
            offer = _price_offer(
                machine, accelerator=accelerator, count=count, prices=prices, attached=True
            )
            if offer is not None:
                offers.append(offer)
    return offers


def _price_offer(
    machine: _MachineType,
    *,
    accelerator: str,
    count: int,
    prices: Mapping[_PriceKey, float],
    attached: bool = False,
) -> Offer | None:
    gpu = gpu_from_gcp(accelerator)
    family = VM_SKU_FAMILY.get(machine.name.split("-")[0])
    if gpu is None or family is None:
        return None
    region = _region_of(machine.zone)

    def total(spot: bool) -> float | None:
        parts = (
            prices.get(("core", family, region, spot)),
            prices.get(("ram", family, region, spot)),
            prices.get(("gpu", accelerator, region, spot)),
        )
        if any(part is None for part in parts):
            return None
        core, ram, per_gpu = (float(part or 0.0) for part in parts)
        return round(core * machine.vcpus + ram * machine.memory_gib + per_gpu * count, 6)

    on_demand = total(False)
    if on_demand is None:
        return None
    labels: tuple[tuple[str, str], ...] = (("accelerator_type", accelerator),) if attached else ()
    return Offer(
        provider=ProviderName.GCP,
        region=region,
        zone=machine.zone,
        instance_type=machine.name,
        gpu=gpu.display_name,
        gpu_count=count,
        vcpus=machine.vcpus,
        memory_gib=machine.memory_gib,
        on_demand_usd_per_hour=on_demand,
        spot_usd_per_hour=total(True),
        labels=labels,
    )


async def fetch_billing_prices(
    config: GcpSyncConfig, *, progress: SyncProgress
) -> dict[_PriceKey, float]:
    """Unit prices from the Compute Engine SKUs: per core-hour, GiB-hour and GPU-hour."""
    progress.start("gcp billing", total=1)
    prices: dict[_PriceKey, float] = {}
    params: dict[str, str] = {"currencyCode": "USD", "pageSize": "5000"}
    if config.billing_api_key:
        params["key"] = config.billing_api_key
    path = f"/v1/services/{COMPUTE_SERVICE_ID}/skus"
    async with httpx.AsyncClient(base_url=config.billing_endpoint, timeout=60) as client:
        token = ""
        while True:
            page_params = {**params, **({"pageToken": token} if token else {})}

            async def get_page(page_params: dict[str, str] = page_params) -> dict[str, Any]:
                response = await client.get(path, params=page_params)
                response.raise_for_status()
                body: dict[str, Any] = response.json()
                return body

            page = await call_with_retry(
                "gcp billing skus", get_page, policy=config.retry, is_throttling=is_throttling
            )
            for key, price in parse_skus(page.get("skus", [])):
                prices.setdefault(key, price)
            progress.advance("gcp billing", 0)
            token = page.get("nextPageToken", "")
            if not token:
                break
    progress.advance("gcp billing")
    return prices


def parse_skus(skus: Iterable[Mapping[str, Any]]) -> list[tuple[_PriceKey, float]]:
    """(kind, family or accelerator, region, spot) -> unit price, for the SKUs we price with."""
    found: list[tuple[_PriceKey, float]] = []
    for sku in skus:
        description = str(sku.get("description", ""))
        usage = sku.get("category", {}).get("usageType")
        if usage not in ("OnDemand", "Preemptible"):
            continue
        if any(word in description.casefold() for word in EXCLUDED_SKU_WORDS):
            continue
        subject = _sku_subject(sku, description)
        price = _unit_price(sku)
        if subject is None or price is None:
            continue
        kind, name = subject
        for region in sku.get("serviceRegions", []):
            found.append(((kind, name, str(region), usage == "Preemptible"), price))
    return found


def _sku_subject(sku: Mapping[str, Any], description: str) -> tuple[str, str] | None:
    group = sku.get("category", {}).get("resourceGroup")
    if group == "GPU" or " GPU " in f" {description} ":
        for pattern, accelerator in GPU_SKU_PATTERNS:
            if pattern.search(description):
                return "gpu", accelerator
        return None
    match = VM_SKU.match(description)
    if match is None:
        return None
    return ("core" if match.group(2) == "Core" else "ram"), match.group(1)


def _unit_price(sku: Mapping[str, Any]) -> float | None:
    for info in sku.get("pricingInfo", [])[:1]:
        rates = info.get("pricingExpression", {}).get("tieredRates", [])
        if rates:
            unit = rates[-1].get("unitPrice", {})
            return int(unit.get("units", "0") or 0) + int(unit.get("nanos", 0) or 0) / 1e9
    return None
