"""Placement: private workers first, cost per capacity, spot fallback, failures, spreading."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.decide.placement import (
    TAIL_SHARE,
    Placement,
    PlacementOption,
    choose_offer,
    place_replica,
    prompt_share_below,
    replica_capacity_rps,
    tail_shares,
    unavailable_key,
    worker_key,
)
from autoscaler.spec import WorkloadSpec
from catalog.model import Offer, ProviderName
from catalog.perf import serving_profile
from catalog.query import Market

NOW = datetime(2024, 6, 1, tzinfo=UTC)


def offer(
    gpu: str = "NVIDIA L4",
    *,
    price: float = 1.0,
    spot: float | None = None,
    zone: str = "us-east-1a",
    itype: str = "g6.xlarge",
    count: int = 1,
) -> Offer:
    return Offer(
        provider=ProviderName.AWS,
        region=zone[:-1],
        zone=zone,
        instance_type=itype,
        gpu=gpu,
        gpu_count=count,
        vcpus=8,
        memory_gib=32,
        on_demand_usd_per_hour=price,
        spot_usd_per_hour=spot,
    )


def spec(**config: Any) -> WorkloadSpec:
    base: dict[str, Any] = {"max_workers": 4, "max_hourly_cost_usd": 50.0}
    base.update(config)
    return WorkloadSpec.model_validate(
        {
            "name": "bot",
            "slug": "bot",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "execution_policy": "autoscaling",
            "execution_policy_config": base,
        }
    )


def test_cost_per_capacity_beats_raw_price() -> None:
    cheap_slow = offer("NVIDIA L4", price=0.80, itype="g6.xlarge")
    dear_fast = offer("NVIDIA H100 80GB HBM3", price=6.0, itype="p5.4xlarge")
    options = [
        PlacementOption(o, replica_capacity_rps(o, params_b=8.0)) for o in (cheap_slow, dear_fast)
    ]
    l4, h100 = (o.capacity_rps or 0 for o in options)
    assert 0.8 / l4 > 6.0 / h100  # the L4 is cheaper per hour, not per request
    chosen = choose_offer(options=options, allow_spot=False, unavailable={}, now=NOW)
    assert chosen.offer == dear_fast
    assert "lowest cost per capacity" in chosen.reason


def test_spot_when_allowed_and_on_demand_when_spot_just_failed() -> None:
    o = offer(price=1.0, spot=0.4)
    options = [PlacementOption(o, 2.0)]
    spot = choose_offer(options=options, allow_spot=True, unavailable={}, now=NOW)
    assert (spot.market, spot.usd_per_hour) == (Market.SPOT, 0.4)
    failed = {unavailable_key(o, Market.SPOT): NOW + timedelta(minutes=5)}
    fallback = choose_offer(options=options, allow_spot=True, unavailable=failed, now=NOW)
    assert (fallback.market, fallback.usd_per_hour) == (Market.ON_DEMAND, 1.0)
    assert "1 spot marked unavailable" in fallback.reason
    expired = {unavailable_key(o, Market.SPOT): NOW}
    again = choose_offer(options=options, allow_spot=True, unavailable=expired, now=NOW)
    assert again.market is Market.SPOT
    no_spot = choose_offer(options=options, allow_spot=False, unavailable={}, now=NOW)
    assert no_spot.market is Market.ON_DEMAND


def test_nothing_fits_says_why() -> None:
    o = offer(price=3.0)
    blocked = {unavailable_key(o, Market.ON_DEMAND): NOW + timedelta(minutes=1)}
    placement = choose_offer(
        options=[PlacementOption(o, 1.0)], allow_spot=False, unavailable=blocked, now=NOW
    )
    assert not placement.found
    assert placement.reason == "no offer fits: 1 on-demand marked unavailable"
    over = choose_offer(
        options=[PlacementOption(o, 1.0)],
        allow_spot=False,
        unavailable={},
        now=NOW,
        max_usd_per_hour=2.0,
    )
    assert "over the $2.00/h headroom" in over.reason


def test_equal_prices_spread_over_zones() -> None:
    a, b = offer(zone="us-east-1a"), offer(zone="us-east-1b")
    options = [PlacementOption(a, 1.0), PlacementOption(b, 1.0)]
    first = choose_offer(options=options, allow_spot=False, unavailable={}, now=NOW)
    assert first.offer == a
    second = choose_offer(
        options=options, allow_spot=False, unavailable={}, now=NOW, current_zones=["us-east-1a"]
    )
    assert second.offer == b


def test_private_workers_come_first_and_fill_evenly() -> None:
    s = spec(workers={"source": "private", "private_worker_ids": ["wrk_a", "wrk_b"]})
    placed = place_replica(
        spec=s,
        offers=[offer()],
        unavailable={},
        now=NOW,
        replicas_per_worker={"wrk_a": 1},
    )
    assert placed.worker_id == "wrk_b"
    assert placed.offer is None
    down = {worker_key("wrk_b"): NOW + timedelta(minutes=1)}
    placed = place_replica(spec=s, offers=[], unavailable=down, now=NOW)
    assert placed.worker_id == "wrk_a"


def test_catalog_placement_honours_the_pool_and_model_memory() -> None:
    s = spec(workers={"cloud_pool": {"gpu_pool": ["L4", "A10G"]}})
    offers = [
        offer("NVIDIA L4", price=0.8, itype="g6.xlarge"),
        offer("NVIDIA A10G", price=1.0, itype="g5.xlarge"),
        offer("NVIDIA H100 80GB HBM3", price=0.1, itype="p5.cheap"),  # not in the pool
    ]
    placed = place_replica(spec=s, offers=offers, unavailable={}, now=NOW, params_b=8.0)
    assert placed.offer is not None
    assert placed.offer.gpu in ("NVIDIA L4", "NVIDIA A10G")
    too_big = place_replica(spec=s, offers=offers, unavailable={}, now=NOW, model_memory_gib=60.0)
    assert not too_big.found
    assert "vram" in too_big.reason


GPUS = [
    "NVIDIA L4",
    "Tesla T4",
    "NVIDIA A10G",
    "NVIDIA L40S",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 80GB HBM3",
]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(GPUS), st.floats(0.2, 40.0), st.sampled_from([1, 2, 4])),
        min_size=1,
        max_size=8,
    )
)
def test_chosen_offer_has_the_lowest_cost_per_capacity(rows: list[tuple[str, float, int]]) -> None:
    offers = [
        offer(gpu, price=price, count=count, itype=f"t{i}")
        for i, (gpu, price, count) in enumerate(rows)
    ]
    options = [PlacementOption(o, replica_capacity_rps(o, params_b=8.0)) for o in offers]
    chosen = choose_offer(options=options, allow_spot=False, unavailable={}, now=NOW)
    fitting = [o for o in options if o.capacity_rps]
    if not fitting:  # an 8B model fits no T4
        assert not chosen.found
        assert "model does not fit" in chosen.reason
        return
    assert chosen.capacity_rps
    best = min(o.offer.on_demand_usd_per_hour / (o.capacity_rps or 1) for o in fitting)
    assert chosen.usd_per_hour / chosen.capacity_rps <= best * (1 + 1e-9)


def test_measured_long_prompts_rank_offers_too_slow_to_prefill_them_last() -> None:
    s = spec(workers={"cloud_pool": {"gpu_pool": ["NVIDIA L40S", "NVIDIA H100 80GB HBM3"]}})
    slow = offer("NVIDIA L40S", price=1.86, itype="g6e.xlarge")
    fast = offer("NVIDIA H100 80GB HBM3", price=12.2, itype="a3-highgpu-1g", zone="us-east-1b")
    short = place_replica(
        spec=s, offers=[slow, fast], unavailable={}, now=NOW, params_b=8.0, input_tokens=1200.0
    )
    assert short.offer == slow  # cheaper per capacity, and 0.1 s of prefill fits the target
    long = place_replica(
        spec=s, offers=[slow, fast], unavailable={}, now=NOW, params_b=8.0, input_tokens=15000.0
    )
    # 15k tokens: 1.3 s of prefill on the L40S, over half the 1 s target; 0.49 s on an H100.
    assert long.offer == fast
    # When nothing prefills it in time, the fastest is taken and the reason says so.
    huge = place_replica(
        spec=s, offers=[slow, fast], unavailable={}, now=NOW, params_b=8.0, input_tokens=60000.0
    )
    assert huge.offer == fast
    assert "the fastest was taken" in huge.reason


def test_capacity_is_bounded_by_the_gateways_concurrency_cap() -> None:
    s = spec(
        allow_spot_instances=True,
        workers={"cloud_pool": {"gpu_pool": ["NVIDIA L40S", "NVIDIA H100 80GB HBM3"]}},
    )
    l40s = offer("NVIDIA L40S", price=1.86, spot=0.59, itype="g6e.xlarge")
    h100 = offer("NVIDIA H100 80GB HBM3", price=12.2, spot=1.98, itype="a3-highgpu-1g")
    tokens_in, tokens_out = 1155.0, 211.0  # the Azure conversation trace's mean mix

    def place(cap: int) -> Placement:
        return place_replica(
            spec=s,
            offers=[l40s, h100],
            unavailable={},
            now=NOW,
            params_b=8.0,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            concurrency_cap=cap,
        )

    def capacity(o: Offer, cap: int) -> float | None:
        return replica_capacity_rps(
            o, params_b=8.0, input_tokens=tokens_in, output_tokens=tokens_out, concurrency_cap=cap
        )

    # The H100's KV cache could batch ~220 sequences, but the gateway never gives a replica
    # more than 64 at once: per usable capacity the L40S spot offer is the cheaper one.
    capped = place(64)
    assert capped.offer == l40s and capped.market is Market.SPOT
    assert capped.capacity_rps == capacity(l40s, 64)
    # A gateway run with a cap above the H100's batch makes the H100 the better buy.
    assert place(256).offer == h100
    narrow, wide = capacity(h100, 64), capacity(h100, 256)
    assert narrow is not None and wide is not None and narrow < wide


def test_a_concurrency_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="concurrency_cap"):
        place_replica(
            spec=spec(), offers=[offer()], unavailable={}, now=NOW, params_b=8.0, concurrency_cap=0
        )


def test_shape_is_judged_by_the_prompt_tail_it_serves_not_the_mean() -> None:
    """The code-day failure: Llama-3.1-8B, 1 s target, a pool of L4, A10G, A100-80GB and
    H100, code prompts (mean 2,048 tokens, spread 0.93 as measured on the 2023 code
    trace). Two L4s prefill the mean prompt in 0.36 s, under half the target, and are
    the cheapest per capacity; but the longest ~5 % of prompts take more than the 1 s
    target on them (7,400 tokens: 1.3 s), which one H100 would answer in time. With the
    measured spread, placement passes them over and says by how much."""
    from catalog.snapshot import load_catalog

    pool = ["NVIDIA L4", "NVIDIA A10G", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    s = spec(
        max_workers=8,
        max_hourly_cost_usd=100.0,
        upper_allowed_latency_sec=1.0,
        lower_allowed_latency_sec=0.2,
        workers={"source": "cloud", "cloud_pool": {"gpu_pool": pool}},
    )
    offers = load_catalog().offers
    mean_only = place_replica(
        spec=s,
        offers=offers,
        unavailable={},
        now=NOW,
        params_b=8.0,
        input_tokens=2048.0,
        output_tokens=28.0,
    )
    assert mean_only.offer is not None
    assert (mean_only.offer.gpu, mean_only.offer.gpu_count) == ("NVIDIA L4", 2)
    tail = place_replica(
        spec=s,
        offers=offers,
        unavailable={},
        now=NOW,
        params_b=8.0,
        input_tokens=2048.0,
        output_tokens=28.0,
        input_scv=0.93,
    )
    assert tail.offer is not None and tail.offer.gpu != "NVIDIA L4"
    shares = tail_shares(
        {
            ("NVIDIA L4", 2): serving_profile("NVIDIA L4", 2, 8.0, 2.0),
            (tail.offer.gpu, tail.offer.gpu_count): serving_profile(
                tail.offer.gpu, tail.offer.gpu_count, 8.0, 2.0
            ),
        },
        fastest=serving_profile("NVIDIA H100 80GB HBM3", 1, 8.0, 2.0),
        mean_tokens=2048.0,
        scv=0.93,
        target_s=1.0,
    )
    l4_share = shares[("NVIDIA L4", 2)]
    chosen_share = shares[(tail.offer.gpu, tail.offer.gpu_count)]
    assert l4_share < TAIL_SHARE <= chosen_share
    # The reason states the compared shares as computed.
    assert f"2 x NVIDIA L4 is cheaper per capacity but prefills only {l4_share:.2%}" in tail.reason
    assert f"(< {TAIL_SHARE:.2%} required; this one {chosen_share:.2%})" in tail.reason
    # Conversation prompts (mean 1,155, same spread) leave the cheap shapes' tail in time
    # or not as the numbers say: whatever is chosen serves the required share.
    conv = place_replica(
        spec=s,
        offers=offers,
        unavailable={},
        now=NOW,
        params_b=8.0,
        input_tokens=1155.0,
        output_tokens=211.0,
        input_scv=0.93,
    )
    assert conv.offer is not None
    assert "short of the" not in conv.reason


@given(
    tokens=st.integers(min_value=1, max_value=200_000),
    mean=st.floats(min_value=50.0, max_value=50_000.0),
    scv=st.floats(min_value=0.0, max_value=8.0),
)
def test_prompt_share_is_a_distribution(tokens: int, mean: float, scv: float) -> None:
    share = prompt_share_below(tokens, mean, scv)
    assert 0.0 <= share <= 1.0
    assert prompt_share_below(tokens + 1000, mean, scv) >= share


def test_the_fastest_shape_serves_every_prompt_a_slower_one_fewer() -> None:
    fastest = serving_profile("NVIDIA H100 80GB HBM3", 1, 8.0, 2.0)
    shares = tail_shares(
        {
            ("NVIDIA H100 80GB HBM3", 1): fastest,
            ("NVIDIA L4", 1): serving_profile("NVIDIA L4", 1, 8.0, 2.0),
        },
        fastest=fastest,
        mean_tokens=2048.0,
        scv=0.93,
        target_s=1.0,
    )
    assert shares[("NVIDIA H100 80GB HBM3", 1)] == 1.0
    # One L4 prefills ~3.8k tokens/s: prompts past ~3,800 tokens miss 1 s on it alone.
    assert shares[("NVIDIA L4", 1)] == pytest.approx(
        prompt_share_below(3780, 2048.0, 0.93), abs=0.01
    )


def _code_prompts() -> tuple[list[int], dict[int, int]]:
    """The bundled 2023 code trace's prompt lengths, and the gateway's histogram of them."""
    import csv
    from pathlib import Path

    from gateway.window import prompt_bucket

    path = Path(__file__).resolve().parents[2] / "traces" / "azure2023_code.csv"
    with path.open() as f:
        prompts = [int(row["input_tokens"]) for row in csv.DictReader(f)]
    histogram: dict[int, int] = {}
    for tokens in prompts:
        bucket = prompt_bucket(tokens)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    return prompts, histogram


def test_the_tail_rule_reads_the_measured_prompts_not_a_lognormal_guess() -> None:
    """The code trace's prompts stop at 7,437 tokens; a lognormal of the same mean and
    spread puts 1.5% of them beyond what 4 x L4 prefills within the SLO bound, so the
    model fails that shape although every measured prompt fits. With the gateway's
    histogram of the prompts, the share is read from the prompts themselves, as a lower
    bound of the true share (each prompt taken at its bucket's top)."""
    from statistics import mean, pvariance

    prompts, histogram = _code_prompts()
    m = mean(prompts)
    scv = pvariance(prompts) / m / m
    profiles = {
        ("NVIDIA L4", 4): serving_profile("NVIDIA L4", 4, 8.0, 2.0),
        ("NVIDIA L4", 2): serving_profile("NVIDIA L4", 2, 8.0, 2.0),
    }
    fastest = serving_profile("NVIDIA H100 80GB HBM3", 1, 8.0, 2.0)
    modelled = tail_shares(profiles, fastest=fastest, mean_tokens=m, scv=scv, target_s=1.0)
    measured = tail_shares(
        profiles, fastest=fastest, mean_tokens=m, scv=scv, target_s=1.0, histogram=histogram
    )

    def true_share(shape: tuple[str, int]) -> float:
        p = profiles[shape]
        ok = [
            t for t in prompts if p.prefill_seconds(t) <= max(1.0, 1.5 * fastest.prefill_seconds(t))
        ]
        return len(ok) / len(prompts)

    assert modelled[("NVIDIA L4", 4)] < TAIL_SHARE <= measured[("NVIDIA L4", 4)]
    for shape in profiles:
        assert measured[shape] <= true_share(shape) + 1e-9
    # Two L4s miss the prompts' tail either way (the trace says 91%, not the model's 95%).
    assert measured[("NVIDIA L4", 2)] < TAIL_SHARE
    # Too few prompts measured: the model decides, not two or three samples.
    few = dict.fromkeys(list(histogram)[:5], 1)
    assert (
        tail_shares(profiles, fastest=fastest, mean_tokens=m, scv=scv, target_s=1.0, histogram=few)
        == modelled
    )


def test_a_measured_load_is_placed_on_the_shape_whose_fleet_costs_least() -> None:
    """The code day's other failure: at 2-3 req/s, the H100 ($12.22/h, 14 req/s) is the
    cheapest per unit of capacity, but the load needs one replica of any shape that
    serves the tail, so a fleet of one 4 x L4 machine ($3.99/h) carries it for a third
    of the price. With the replicas each shape needs, placement prices the fleet; with a
    load of many replicas the order is the per-capacity one again."""
    from catalog.snapshot import load_catalog

    pool = ["NVIDIA L4", "NVIDIA A10G", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    s = spec(
        max_workers=64,
        max_hourly_cost_usd=400.0,
        upper_allowed_latency_sec=1.0,
        lower_allowed_latency_sec=0.2,
        workers={"source": "cloud", "cloud_pool": {"gpu_pool": pool}},
    )
    _, histogram = _code_prompts()
    offers = load_catalog().offers

    def place(rps: float | None) -> Placement:
        def needed(shape: tuple[str, int]) -> int:
            capacity = serving_profile(shape[0], shape[1], 8.0, 2.0, max_batch=64).capacity_rps(
                input_tokens=2048.0, output_tokens=28.0
            )
            return max(1, math.ceil(rps / capacity)) if rps is not None else 1

        return place_replica(
            spec=s,
            offers=offers,
            unavailable={},
            now=NOW,
            params_b=8.0,
            input_tokens=2048.0,
            output_tokens=28.0,
            input_scv=0.93,
            input_histogram=histogram,
            replicas_needed=None if rps is None else needed,
        )

    per_capacity = place(None)
    light = place(2.5)
    heavy = place(400.0)
    assert per_capacity.offer is not None and light.offer is not None and heavy.offer is not None
    assert per_capacity.offer.gpu == "NVIDIA H100 80GB HBM3"
    assert (light.offer.gpu, light.offer.gpu_count) == ("NVIDIA L4", 4)
    assert light.usd_per_hour < per_capacity.usd_per_hour / 2
    assert "lowest cost for the measured load: 1 replica(s) of it carry it" in light.reason
    # Many replicas' worth: the fleet's cost follows the cost per capacity.
    assert heavy.offer.gpu == "NVIDIA H100 80GB HBM3"
