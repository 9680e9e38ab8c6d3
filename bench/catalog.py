"""Offer selection speed: a synthetic catalog of 10,000+ offers and the bundled one.

Run ``.venv/bin/python -m bench.catalog``; prints per-query median and p99 in ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from catalog.gpus import all_gpus
from catalog.model import Offer, ProviderName
from catalog.query import OfferRequest, select_offers
from catalog.snapshot import load_bundled

QUERIES: dict[str, OfferRequest] = {
    "any offer": OfferRequest(),
    "A100-80GB under $45/h": OfferRequest(gpus=("NVIDIA A100-SXM4-80GB",), max_usd_per_hour=45),
    "CUDA 13.0, spot, <= $10/h": OfferRequest(
        cuda_versions=("13.0",), spot=True, max_usd_per_hour=10
    ),
    ">= 80 GiB VRAM, 1 GPU, aws+gcp US": OfferRequest(
        min_vram_gib=80,
        gpu_count=1,
        providers=(ProviderName.AWS, ProviderName.GCP),
        regions=("us-east-1", "us-central1", "us-west-2"),
    ),
    "L4 or A10G, CUDA 12.8, 200 unavailable": OfferRequest(
        gpus=("NVIDIA L4", "NVIDIA A10G"), cuda_versions=("12.8",)
    ),
}


def synthetic(count: int, *, seed: int = 7) -> list[Offer]:
    rng = random.Random(seed)
    gpus = [g.display_name for g in all_gpus()]
    regions = [f"region-{i}" for i in range(40)]
    offers = []
    for i in range(count):
        region = rng.choice(regions)
        on_demand = round(rng.uniform(0.2, 100), 4)
        offers.append(
            Offer(
                provider=rng.choice((ProviderName.AWS, ProviderName.GCP)),
                region=region,
                zone=f"{region}-{rng.choice('abc')}",
                instance_type=f"type-{i}",
                gpu=rng.choice(gpus),
                gpu_count=rng.choice((1, 2, 4, 8)),
                vcpus=8,
                memory_gib=32,
                on_demand_usd_per_hour=on_demand,
                spot_usd_per_hour=round(on_demand * 0.4, 4) if rng.random() < 0.7 else None,
            )
        )
    return offers


def measure(offers: Sequence[Offer], request: OfferRequest, *, runs: int) -> tuple[float, float]:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        select_offers(offers, request)
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return statistics.median(timings), timings[min(len(timings) - 1, int(len(timings) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--offers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    catalogs = {"bundled": list(load_bundled().offers), "synthetic": synthetic(args.offers)}
    for name, offers in catalogs.items():
        unavailable = frozenset(o.key for o in offers[:: max(1, len(offers) // 200)])
        print(f"{name}: {len(offers)} offers, {args.runs} runs per query")
        for label, request in QUERIES.items():
            if "unavailable" in label:
                request = OfferRequest(
                    gpus=request.gpus, cuda_versions=request.cuda_versions, unavailable=unavailable
                )
            median, p99 = measure(offers, request, runs=args.runs)
            print(f"  {label:<40} median {median:7.2f} ms   p99 {p99:7.2f} ms")


if __name__ == "__main__":
    main()
