"""Build the bundled snapshot (``offers.json``) from the price sources in ``sources/``.

Run ``python -m catalog.data.build``. Every offer carries a ``price`` label saying how
its figures were made: ``source`` (copied from a source row), ``derived`` (from source
unit prices: GCP VM + GPU rows, a family's per-vCPU and per-GiB rates, or the family's
spot/on-demand ratio) or ``extrapolated`` (a region or size the source does not cover,
priced from a US figure times a regional multiplier). ``NOTES`` says the same in words
and goes into the snapshot.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from catalog.gpus import resolve_gpu
from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot, write_snapshot

HERE = Path(__file__).parent
SOURCES = HERE / "sources"
TAKEN_AT = datetime(2025, 10, 1, tzinfo=UTC)
SOURCE = (
    "bundled: SkyPilot catalog v7 subset (skypilot-org/skypilot-catalog, Apache-2.0), "
    "extended by catalog/data/build.py"
)
NOTES: tuple[str, ...] = (
    "Prices in USD per hour; GCP offers are the total of the VM and its GPUs.",
    "label price=source: on-demand and spot copied from the SkyPilot v7 subset "
    "(catalog/data/sources). AWS P4/P5 on-demand figures predate AWS's June 2025 price "
    "cut and over-state today's price.",
    "label price=derived: AWS sizes absent from the subset use AWS's published us-east-1 "
    "list prices, with spot at the family's median spot/on-demand ratio in the subset; "
    "GCP VM prices come from the subset's per-vCPU and per-GiB rates (G2) or per-GPU VM "
    "rates (A2, A3), and GCP A3 Mega/Ultra and A4 VM parts are assumed equal to "
    "a3-highgpu-8g's VM part.",
    "label price=extrapolated: EU and Asia regions are not in the subset; their prices "
    "are the US figure times a regional multiplier (AWS: eu-west-1 1.12, eu-central-1 "
    "1.20, ap-northeast-1 1.35, ap-southeast-1 1.40; GCP: europe-west1/west4 1.10, "
    "asia-east1 1.16, asia-southeast1 1.23, asia-northeast1 1.29), approximated from "
    "the providers' T4 list prices; expect +-10%. Which families exist in those regions "
    "is assumed; `autoscaler catalog sync` records the real offerings.",
    "GCP A100-80GB and H100 GPU prices disagree across the subset's regions; the highest "
    "per-GPU figure is used everywhere (over-stating is the safe side of a cost ceiling).",
    "AWS zones: the subset's AZ IDs (use1-az1) are written as zone names by index "
    "(us-east-1a); the real ID-to-name mapping differs per account.",
    "Not covered: AWS p5.4xlarge, p5e.48xlarge and p6 (no price source); GCP a4x.",
)

AWS_REGION_FACTOR = {
    "eu-west-1": 1.12,
    "eu-central-1": 1.20,
    "ap-northeast-1": 1.35,
    "ap-southeast-1": 1.40,
}
AWS_EXTRA_REGIONS = {
    "eu-west-1": ("g4dn", "g5", "g6"),
    "eu-central-1": ("g4dn", "g5", "g6", "g6e", "p4d", "p5"),
    "ap-northeast-1": ("g4dn", "g5", "g6", "g6e", "p4d", "p5"),
    "ap-southeast-1": ("g4dn", "g5", "g6"),
}
# type: (gpu, count, vcpus, memory GiB, us-east-1 on-demand list price)
AWS_TYPES: dict[str, tuple[str, int, float, float, float]] = {
    "g4dn.xlarge": ("Tesla T4", 1, 4, 16, 0.526),
    "g4dn.2xlarge": ("Tesla T4", 1, 8, 32, 0.752),
    "g4dn.4xlarge": ("Tesla T4", 1, 16, 64, 1.204),
    "g4dn.8xlarge": ("Tesla T4", 1, 32, 128, 2.176),
    "g4dn.12xlarge": ("Tesla T4", 4, 48, 192, 3.912),
    "g4dn.16xlarge": ("Tesla T4", 1, 64, 256, 4.352),
    "g4dn.metal": ("Tesla T4", 8, 96, 384, 7.824),
    "g5.xlarge": ("NVIDIA A10G", 1, 4, 16, 1.006),
    "g5.2xlarge": ("NVIDIA A10G", 1, 8, 32, 1.212),
    "g5.4xlarge": ("NVIDIA A10G", 1, 16, 64, 1.624),
    "g5.8xlarge": ("NVIDIA A10G", 1, 32, 128, 2.448),
    "g5.16xlarge": ("NVIDIA A10G", 1, 64, 256, 4.096),
    "g5.12xlarge": ("NVIDIA A10G", 4, 48, 192, 5.672),
    "g5.24xlarge": ("NVIDIA A10G", 4, 96, 384, 8.144),
    "g5.48xlarge": ("NVIDIA A10G", 8, 192, 768, 16.288),
    "g6.xlarge": ("NVIDIA L4", 1, 4, 16, 0.8048),
    "g6.2xlarge": ("NVIDIA L4", 1, 8, 32, 0.9776),
    "g6.4xlarge": ("NVIDIA L4", 1, 16, 64, 1.3232),
    "g6.8xlarge": ("NVIDIA L4", 1, 32, 128, 2.0144),
    "g6.16xlarge": ("NVIDIA L4", 1, 64, 256, 3.3968),
    "g6.12xlarge": ("NVIDIA L4", 4, 48, 192, 4.6016),
    "g6.24xlarge": ("NVIDIA L4", 4, 96, 384, 6.6752),
    "g6.48xlarge": ("NVIDIA L4", 8, 192, 768, 13.3504),
    "g6e.xlarge": ("NVIDIA L40S", 1, 4, 32, 1.861),
    "g6e.2xlarge": ("NVIDIA L40S", 1, 8, 64, 2.24208),
    "g6e.4xlarge": ("NVIDIA L40S", 1, 16, 128, 3.00424),
    "g6e.8xlarge": ("NVIDIA L40S", 1, 32, 256, 4.52856),
    "g6e.16xlarge": ("NVIDIA L40S", 1, 64, 512, 7.57719),
    "g6e.12xlarge": ("NVIDIA L40S", 4, 48, 384, 10.49264),
    "g6e.24xlarge": ("NVIDIA L40S", 4, 96, 768, 15.06559),
    "g6e.48xlarge": ("NVIDIA L40S", 8, 192, 1536, 30.13118),
    "p4d.24xlarge": ("NVIDIA A100-SXM4-40GB", 8, 96, 1152, 32.7726),
    "p4de.24xlarge": ("NVIDIA A100-SXM4-80GB", 8, 96, 1152, 40.96575),
    "p5.48xlarge": ("NVIDIA H100 80GB HBM3", 8, 192, 2048, 98.32),
    "p5en.48xlarge": ("NVIDIA H200", 8, 192, 2048, 84.8),
}

GCP_REGION_FACTOR = {
    "europe-west1": 1.10,
    "europe-west4": 1.10,
    "asia-east1": 1.16,
    "asia-southeast1": 1.23,
    "asia-northeast1": 1.29,
}
GCP_US_DEFAULT_ZONES = {
    "us-central1": ("us-central1-a", "us-central1-b", "us-central1-c"),
    "us-east1": ("us-east1-b", "us-east1-c", "us-east1-d"),
    "us-east4": ("us-east4-a", "us-east4-b", "us-east4-c"),
    "us-east5": ("us-east5-a", "us-east5-b"),
    "us-west1": ("us-west1-a", "us-west1-b"),
    "us-west4": ("us-west4-a", "us-west4-b"),
}
GCP_GPU_REGIONS: dict[str, tuple[str, ...]] = {
    "T4": (
        "us-central1",
        "us-east1",
        "us-east4",
        "us-west1",
        "us-west4",
        "europe-west1",
        "europe-west4",
        "asia-east1",
        "asia-southeast1",
        "asia-northeast1",
    ),
    "V100": ("us-central1", "us-west1", "europe-west4", "asia-east1"),
    "L4": (
        "us-central1",
        "us-east1",
        "us-east4",
        "us-west1",
        "us-west4",
        "europe-west1",
        "europe-west4",
        "asia-east1",
        "asia-southeast1",
        "asia-northeast1",
    ),
    "A100": (
        "us-central1",
        "us-east1",
        "us-west1",
        "europe-west4",
        "asia-southeast1",
        "asia-northeast1",
    ),
    "A100-80GB": ("us-central1", "us-east4", "us-east5", "europe-west4", "asia-southeast1"),
    "H100": (
        "us-central1",
        "us-east4",
        "us-east5",
        "us-west1",
        "us-west4",
        "europe-west4",
        "asia-southeast1",
        "asia-northeast1",
    ),
    "H100-MEGA": ("us-central1", "us-east4", "europe-west4"),
    "H200": ("us-central1", "us-east4"),
    "B200": ("us-east4",),
}
GCP_GPU_NAME = {
    "T4": ("Tesla T4", "nvidia-tesla-t4"),
    "V100": ("Tesla V100-SXM2-16GB", "nvidia-tesla-v100"),
    "L4": ("NVIDIA L4", "nvidia-l4"),
    "A100": ("NVIDIA A100-SXM4-40GB", "nvidia-tesla-a100"),
    "A100-80GB": ("NVIDIA A100-SXM4-80GB", "nvidia-a100-80gb"),
    "H100": ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb"),
    "H100-MEGA": ("NVIDIA H100 80GB HBM3", "nvidia-h100-mega-80gb"),
    "H200": ("NVIDIA H200", "nvidia-h200-141gb"),
    "B200": ("NVIDIA B200", "nvidia-b200"),
}
# N1 takes GPUs as attachments: (machine type, vcpus, GiB, on-demand us-central1 list price).
GCP_N1: dict[str, tuple[float, float, float]] = {
    "n1-standard-4": (4, 15, 0.189999),
    "n1-standard-8": (8, 30, 0.379998),
    "n1-standard-16": (16, 60, 0.759996),
    "n1-standard-32": (32, 120, 1.519992),
}
GCP_N1_SPOT_RATIO = 0.21
GCP_N1_COMBOS = (
    ("n1-standard-4", "T4", 1),
    ("n1-standard-8", "T4", 1),
    ("n1-standard-16", "T4", 2),
    ("n1-standard-32", "T4", 4),
    ("n1-standard-8", "V100", 1),
    ("n1-standard-16", "V100", 2),
    ("n1-standard-32", "V100", 4),
)
# Fixed-GPU machine types: (gpu source name, count, vcpus, GiB, VM source type, VM units).
GCP_FIXED: dict[str, tuple[str, int, float, float, str, float]] = {
    "g2-standard-4": ("L4", 1, 4, 16, "g2", 0),
    "g2-standard-8": ("L4", 1, 8, 32, "g2", 0),
    "g2-standard-12": ("L4", 1, 12, 48, "g2", 0),
    "g2-standard-16": ("L4", 1, 16, 64, "g2", 0),
    "g2-standard-24": ("L4", 2, 24, 96, "g2", 0),
    "g2-standard-32": ("L4", 1, 32, 128, "g2", 0),
    "g2-standard-48": ("L4", 4, 48, 192, "g2", 0),
    "g2-standard-96": ("L4", 8, 96, 384, "g2", 0),
    "a2-highgpu-1g": ("A100", 1, 12, 85, "a2-highgpu-1g", 1),
    "a2-highgpu-2g": ("A100", 2, 24, 170, "a2-highgpu-1g", 2),
    "a2-highgpu-4g": ("A100", 4, 48, 340, "a2-highgpu-1g", 4),
    "a2-highgpu-8g": ("A100", 8, 96, 680, "a2-highgpu-1g", 8),
    "a2-ultragpu-1g": ("A100-80GB", 1, 12, 170, "a2-ultragpu-1g", 1),
    "a2-ultragpu-2g": ("A100-80GB", 2, 24, 340, "a2-ultragpu-1g", 2),
    "a2-ultragpu-4g": ("A100-80GB", 4, 48, 680, "a2-ultragpu-1g", 4),
    "a2-ultragpu-8g": ("A100-80GB", 8, 96, 1360, "a2-ultragpu-1g", 8),
    "a3-highgpu-1g": ("H100", 1, 26, 234, "a3-highgpu-1g", 1),
    "a3-highgpu-2g": ("H100", 2, 52, 468, "a3-highgpu-1g", 2),
    "a3-highgpu-4g": ("H100", 4, 104, 936, "a3-highgpu-1g", 4),
    "a3-highgpu-8g": ("H100", 8, 208, 1872, "a3-highgpu-1g", 8),
    "a3-megagpu-8g": ("H100-MEGA", 8, 208, 1872, "a3-highgpu-1g", 8),
    "a3-ultragpu-8g": ("H200", 8, 224, 2952, "a3-highgpu-1g", 8),
    "a4-highgpu-8g": ("B200", 8, 224, 3968, "a3-highgpu-1g", 8),
}


@dataclass(frozen=True, slots=True)
class _Price:
    on_demand: float
    spot: float | None


def _read(name: str) -> list[dict[str, str]]:
    with (SOURCES / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _aws_zone(region: str, az_id: str) -> str:
    index = int(az_id.rsplit("az", 1)[1]) - 1
    return f"{region}{'abcdefgh'[index]}"


def _aws_offer(*, region: str, zone: str, instance_type: str, price: _Price, origin: str) -> Offer:
    gpu, count, vcpus, memory, _ = AWS_TYPES[instance_type]
    return Offer(
        provider=ProviderName.AWS,
        region=region,
        zone=zone,
        instance_type=instance_type,
        gpu=resolve_gpu(gpu).display_name,
        gpu_count=count,
        vcpus=float(vcpus),
        memory_gib=float(memory),
        on_demand_usd_per_hour=round(price.on_demand, 5),
        spot_usd_per_hour=None if price.spot is None else round(price.spot, 5),
        labels=(("price", origin),),
    )


def build_aws() -> list[Offer]:
    rows = _read("aws_gpu_vms_subset.csv")
    offers: list[Offer] = []
    ratios: dict[str, list[float]] = defaultdict(list)
    zones: dict[str, set[str]] = defaultdict(set)
    sampled: set[tuple[str, str]] = set()
    for row in rows:
        region = row["Region"]
        zone = _aws_zone(region, row["AvailabilityZone"])
        spot = float(row["SpotPrice"]) if row["SpotPrice"] else None
        price = _Price(float(row["Price"]), spot)
        offers.append(
            _aws_offer(
                region=region,
                zone=zone,
                instance_type=row["InstanceType"],
                price=price,
                origin="source",
            )
        )
        family = row["InstanceType"].split(".")[0]
        if spot is not None:
            ratios[family].append(spot / price.on_demand)
        zones[region].add(zone)
        sampled.add((row["InstanceType"], region))
    family_ratio = {family: statistics.median(values) for family, values in ratios.items()}
    us_families = {"g4dn", "g5", "g6", "g6e"}
    for instance_type, (*_, list_price) in AWS_TYPES.items():
        family = instance_type.split(".")[0]
        ratio = family_ratio.get(family)
        for region in sorted(zones):
            if family in us_families and (instance_type, region) not in sampled:
                spot = None if ratio is None else list_price * ratio
                for zone in sorted(zones[region]):
                    offers.append(
                        _aws_offer(
                            region=region,
                            zone=zone,
                            instance_type=instance_type,
                            price=_Price(list_price, spot),
                            origin="derived",
                        )
                    )
        for region, families in AWS_EXTRA_REGIONS.items():
            if family not in families:
                continue
            factor = AWS_REGION_FACTOR[region]
            on_demand = list_price * factor
            spot = None if ratio is None else on_demand * ratio
            for letter in "abc":
                offers.append(
                    _aws_offer(
                        region=region,
                        zone=f"{region}{letter}",
                        instance_type=instance_type,
                        price=_Price(on_demand, spot),
                        origin="extrapolated",
                    )
                )
    return offers


@dataclass(frozen=True, slots=True)
class _GcpPrices:
    vm: dict[tuple[str, str], _Price]  # (machine type, region)
    gpu: dict[tuple[str, str], _Price]  # (gpu source name, region), per GPU
    gpu_zones: dict[tuple[str, str], tuple[str, ...]]
    gpu_max: dict[str, _Price]


def _gcp_prices() -> _GcpPrices:
    vm: dict[tuple[str, str], _Price] = {}
    gpu: dict[tuple[str, str], _Price] = {}
    zones: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in _read("gcp_gpu_vms_subset.csv"):
        spot = float(row["SpotPrice"]) if row["SpotPrice"] else None
        if row["InstanceType"]:
            vm[(row["InstanceType"], row["Region"])] = _Price(float(row["Price"]), spot)
            continue
        count = int(float(row["AcceleratorCount"]))
        name = row["AcceleratorName"]
        per_gpu = _Price(float(row["Price"]) / count, None if spot is None else spot / count)
        gpu.setdefault((name, row["Region"]), per_gpu)
        zones[(name, row["Region"])].add(row["AvailabilityZone"])
    gpu_max: dict[str, _Price] = {}
    for (name, _), price in gpu.items():
        best = gpu_max.get(name)
        if best is None or price.on_demand > best.on_demand:
            gpu_max[name] = price
    return _GcpPrices(
        vm=vm,
        gpu=gpu,
        gpu_zones={key: tuple(sorted(value)) for key, value in zones.items()},
        gpu_max=gpu_max,
    )


def _scaled(price: _Price, factor: float) -> _Price:
    return _Price(price.on_demand * factor, None if price.spot is None else price.spot * factor)


def _gcp_gpu_price(prices: _GcpPrices, name: str, region: str) -> tuple[_Price, str]:
    factor = GCP_REGION_FACTOR.get(region, 1.0)
    base_max = prices.gpu_max[name]
    if name in ("A100-80GB", "H100"):
        found = prices.gpu.get((name, region))
        spot = found.spot if found is not None else base_max.spot
        return _scaled(_Price(base_max.on_demand, spot), factor), (
            "derived" if factor == 1.0 else "extrapolated"
        )
    found = prices.gpu.get((name, region))
    if found is not None:
        return found, "source"
    base = prices.gpu.get((name, "us-central1")) or base_max
    return _scaled(base, factor), "derived" if factor == 1.0 else "extrapolated"


def _g2_vm(prices: _GcpPrices, *, vcpus: float, memory: float) -> _Price:
    # The subset's g2-standard-12 row is 12 vCPU x $0.024988 + 48 GiB x $0.002927.
    reference = prices.vm[("g2-standard-12", "us-central1")]
    on_demand = vcpus * 0.024988 + memory * 0.002927
    return _Price(
        on_demand,
        None if reference.spot is None else on_demand * reference.spot / reference.on_demand,
    )


def _gcp_zones(prices: _GcpPrices, name: str, region: str) -> tuple[str, ...]:
    known = prices.gpu_zones.get((name, region))
    if known:
        return known
    if region in GCP_US_DEFAULT_ZONES:
        return GCP_US_DEFAULT_ZONES[region][:2]
    return (f"{region}-a", f"{region}-b", f"{region}-c")


def _gcp_offer(
    *,
    zone: str,
    machine: str,
    gpu_name: str,
    count: int,
    vcpus: float,
    memory: float,
    price: _Price,
    origin: str,
    attached: bool,
) -> Offer:
    display, accelerator = GCP_GPU_NAME[gpu_name]
    labels: tuple[tuple[str, str], ...] = (("price", origin),)
    if attached:
        labels = (("accelerator_type", accelerator), *labels)
    return Offer(
        provider=ProviderName.GCP,
        region=zone.rsplit("-", 1)[0],
        zone=zone,
        instance_type=machine,
        gpu=display,
        gpu_count=count,
        vcpus=float(vcpus),
        memory_gib=float(memory),
        on_demand_usd_per_hour=round(price.on_demand, 5),
        spot_usd_per_hour=None if price.spot is None else round(price.spot, 5),
        labels=labels,
    )


def _worst(*origins: str) -> str:
    order = ("source", "derived", "extrapolated")
    return max(origins, key=order.index)


def build_gcp() -> list[Offer]:
    prices = _gcp_prices()
    offers: list[Offer] = []
    for machine, gpu_name, count in GCP_N1_COMBOS:
        vcpus, memory, vm_price = GCP_N1[machine]
        for region in GCP_GPU_REGIONS[gpu_name]:
            factor = GCP_REGION_FACTOR.get(region, 1.0)
            vm = _Price(vm_price * factor, vm_price * factor * GCP_N1_SPOT_RATIO)
            per_gpu, origin = _gcp_gpu_price(prices, gpu_name, region)
            total = _add(vm, per_gpu, count)
            for zone in _gcp_zones(prices, gpu_name, region):
                offers.append(
                    _gcp_offer(
                        zone=zone,
                        machine=machine,
                        gpu_name=gpu_name,
                        count=count,
                        vcpus=vcpus,
                        memory=memory,
                        price=total,
                        origin=_worst(origin, "derived"),
                        attached=True,
                    )
                )
    for machine, (gpu_name, count, vcpus, memory, vm_type, units) in GCP_FIXED.items():
        for region in GCP_GPU_REGIONS[gpu_name]:
            factor = GCP_REGION_FACTOR.get(region, 1.0)
            if vm_type == "g2":
                vm = _scaled(_g2_vm(prices, vcpus=vcpus, memory=memory), factor)
                vm_origin = "derived"
            else:
                found = prices.vm.get((vm_type, region))
                base = found or prices.vm[(vm_type, "us-central1")]
                vm = _Price(
                    base.on_demand * units, None if base.spot is None else base.spot * units
                )
                vm = vm if found else _scaled(vm, factor)
                exact = found is not None and units == 1 and machine == vm_type
                vm_origin = "source" if exact else "derived"
            per_gpu, gpu_origin = _gcp_gpu_price(prices, gpu_name, region)
            origin = _worst(vm_origin, gpu_origin, "extrapolated" if factor != 1.0 else "source")
            total = _add(vm, per_gpu, count)
            for zone in _gcp_zones(prices, gpu_name, region):
                offers.append(
                    _gcp_offer(
                        zone=zone,
                        machine=machine,
                        gpu_name=gpu_name,
                        count=count,
                        vcpus=vcpus,
                        memory=memory,
                        price=total,
                        origin=origin,
                        attached=False,
                    )
                )
    return offers


def _add(vm: _Price, per_gpu: _Price, count: int) -> _Price:
    spot = None
    if vm.spot is not None and per_gpu.spot is not None:
        spot = vm.spot + per_gpu.spot * count
    return _Price(vm.on_demand + per_gpu.on_demand * count, spot)


def build() -> Snapshot:
    offers = build_aws() + build_gcp()
    unique = {offer.key: offer for offer in offers}
    return Snapshot(offers=tuple(unique.values()), taken_at=TAKEN_AT, source=SOURCE, notes=NOTES)


def main() -> None:
    snapshot = build()
    write_snapshot(snapshot, HERE / "offers.json")
    print(f"wrote {len(snapshot.offers)} offers to {HERE / 'offers.json'}")


if __name__ == "__main__":
    main()
