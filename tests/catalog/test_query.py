"""Offer selection: constraints, reasons, ordering; properties checked with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.cuda import cuda_supports
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import Offer, ProviderName
from catalog.query import Market, OfferRequest, RejectReason, select_offers
from catalog.snapshot import load_bundled

GPUS = (
    "Tesla T4",
    "Tesla V100-SXM2-16GB",
    "NVIDIA L4",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 80GB HBM3",
    "NVIDIA B200",
)
REGIONS = ("us-east-1", "eu-west-1", "us-central1")
PROVIDERS = (ProviderName.AWS, ProviderName.GCP, ProviderName.PRIVATE)


def make_offer(
    *,
    zone: str = "us-east-1a",
    instance_type: str = "x.large",
    gpu: str = "NVIDIA L4",
    count: int = 1,
    on_demand: float = 1.0,
    spot: float | None = None,
    provider: ProviderName = ProviderName.AWS,
    region: str = "us-east-1",
) -> Offer:
    return Offer(
        provider=provider,
        region=region,
        zone=zone,
        instance_type=instance_type,
        gpu=gpu,
        gpu_count=count,
        vcpus=8,
        memory_gib=32,
        on_demand_usd_per_hour=on_demand,
        spot_usd_per_hour=spot,
    )


def test_a100_80gb_under_45_dollars_lists_real_offers_cheapest_first() -> None:
    selection = select_offers(
        load_bundled().offers, OfferRequest(gpus=("NVIDIA A100-SXM4-80GB",), max_usd_per_hour=45)
    )
    prices = [c.usd_per_hour for c in selection.feasible]
    assert prices == sorted(prices)
    assert {c.offer.instance_type for c in selection.feasible} >= {
        "p4de.24xlarge",
        "a2-ultragpu-1g",
    }
    assert all(c.offer.gpu == "NVIDIA A100-SXM4-80GB" for c in selection.feasible)
    reasons = {r.reason for r in selection.rejected}
    assert RejectReason.GPU in reasons
    assert RejectReason.OVER_CEILING in reasons  # the 8-GPU a2-ultragpu-8g elsewhere


def test_cuda_13_never_selects_a_v100() -> None:
    selection = select_offers(load_bundled().offers, OfferRequest(cuda_versions=("13.0",)))
    assert selection.feasible
    assert all(c.offer.gpu != "Tesla V100-SXM2-16GB" for c in selection.feasible)
    v100 = [r for r in selection.rejected if r.offer.gpu == "Tesla V100-SXM2-16GB"]
    assert v100
    assert all(r.reason is RejectReason.CUDA for r in v100)


def test_spot_allowed_prices_at_spot_where_sold_and_exposes_both() -> None:
    with_spot = make_offer(zone="a", on_demand=3.0, spot=1.0)
    without = make_offer(zone="b", on_demand=2.0)
    selection = select_offers([with_spot, without], OfferRequest(spot=True))
    assert [(c.offer.zone, c.market, c.usd_per_hour) for c in selection.feasible] == [
        ("a", Market.SPOT, 1.0),
        ("b", Market.ON_DEMAND, 2.0),
    ]
    assert selection.feasible[0].on_demand_usd_per_hour == 3.0
    on_demand = select_offers([with_spot, without], OfferRequest())
    assert [c.offer.zone for c in on_demand.feasible] == ["b", "a"]


def test_ties_are_broken_by_offer_key_whatever_the_input_order() -> None:
    offers = [make_offer(zone=z, on_demand=1.0) for z in ("c", "a", "b")]
    for order in (offers, offers[::-1]):
        zones = [c.offer.zone for c in select_offers(order, OfferRequest()).feasible]
        assert zones == ["a", "b", "c"]


def test_each_rejection_names_its_reason() -> None:
    offers = [
        make_offer(zone="gcp", provider=ProviderName.GCP, region="us-central1"),
        make_offer(zone="eu", region="eu-west-1"),
        make_offer(zone="small", gpu="Tesla T4"),
        make_offer(zone="busy"),
        make_offer(zone="dear", on_demand=9.0),
        make_offer(zone="ok"),
    ]
    request = OfferRequest(
        providers=(ProviderName.AWS,),
        regions=("us-east-1",),
        min_vram_gib=20,
        max_usd_per_hour=5,
        unavailable=frozenset({"aws/busy/x.large"}),
    )
    selection = select_offers(offers, request)
    assert [c.offer.zone for c in selection.feasible] == ["ok"]
    assert {r.offer.zone: r.reason for r in selection.rejected} == {
        "gcp": RejectReason.PROVIDER,
        "eu": RejectReason.REGION,
        "small": RejectReason.VRAM,
        "busy": RejectReason.UNAVAILABLE,
        "dear": RejectReason.OVER_CEILING,
    }
    dear = next(r for r in selection.rejected if r.offer.zone == "dear")
    assert "$9.0000/h on-demand > ceiling $5/h" in dear.detail
    details = {r.offer.zone: r.detail for r in selection.rejected}
    assert details["gcp"] == "provider gcp not in aws"
    assert details["eu"] == "region eu-west-1 not in us-east-1"
    assert details["small"] == "15 GiB of GPU memory, need 20"
    assert details["busy"] == "marked unavailable (no capacity recently)"


def test_request_canonicalises_gpu_names_and_rejects_bad_input() -> None:
    assert OfferRequest(gpus=("a100-80gb", "A100-80GB")).gpus == ("NVIDIA A100-SXM4-80GB",)
    with pytest.raises(UnknownGpuError, match="did you mean 'NVIDIA A100-SXM4-80GB'"):
        OfferRequest(gpus=("NVIDIA A100-SXM-80GB",))
    with pytest.raises(ValueError, match=r"unknown CUDA version '9\.9'"):
        OfferRequest(cuda_versions=("9.9",))
    with pytest.raises(ValueError, match="max_usd_per_hour must be a positive number"):
        OfferRequest(max_usd_per_hour=0)


offer_strategy = st.builds(
    make_offer,
    zone=st.sampled_from(("z1", "z2", "z3")),
    instance_type=st.sampled_from(("a", "b", "c", "d")),
    gpu=st.sampled_from(GPUS),
    count=st.sampled_from((1, 2, 4, 8)),
    on_demand=st.floats(0.1, 100, allow_nan=False),
    spot=st.none() | st.floats(0.05, 100, allow_nan=False),
    provider=st.sampled_from(PROVIDERS),
    region=st.sampled_from(REGIONS),
)
request_strategy = st.builds(
    OfferRequest,
    gpus=st.lists(st.sampled_from(GPUS), max_size=3).map(tuple),
    min_vram_gib=st.none() | st.floats(1, 700),
    gpu_count=st.none() | st.sampled_from((1, 2, 4, 8)),
    providers=st.lists(st.sampled_from(PROVIDERS), max_size=2).map(tuple),
    regions=st.lists(st.sampled_from(REGIONS), max_size=2).map(tuple),
    spot=st.booleans(),
    max_usd_per_hour=st.none() | st.floats(0.5, 120),
    cuda_versions=st.lists(
        st.sampled_from(("11.8", "12.4", "12.8", "13.0", "13.1")), max_size=2
    ).map(tuple),
    unavailable=st.frozensets(st.sampled_from(("aws/z1/a", "gcp/z2/b", "private/z3/c"))),
)


def oracle_feasible(offer: Offer, request: OfferRequest) -> bool:
    """An independent statement of the constraints (GPU side of CUDA only for private)."""
    gpu = resolve_gpu(offer.gpu)
    price = offer.on_demand_usd_per_hour
    if request.spot and offer.spot_usd_per_hour is not None:
        price = offer.spot_usd_per_hour
    cuda_ok = not request.cuda_versions or any(cuda_supports(gpu, v) for v in request.cuda_versions)
    return all(
        (
            not request.providers or offer.provider in request.providers,
            not request.regions or offer.region in request.regions,
            not request.gpus or offer.gpu in request.gpus,
            request.gpu_count is None or offer.gpu_count == request.gpu_count,
            request.min_vram_gib is None or gpu.vram_gib * offer.gpu_count >= request.min_vram_gib,
            cuda_ok,
            offer.key not in request.unavailable,
            request.max_usd_per_hour is None or price <= request.max_usd_per_hour,
        )
    )


@settings(max_examples=150, deadline=None)
@given(offers=st.lists(offer_strategy, max_size=25), request=request_strategy)
def test_selection_properties(offers: list[Offer], request: OfferRequest) -> None:
    selection = select_offers(offers, request)
    assert len(selection.feasible) + len(selection.rejected) == len(offers)
    for candidate in selection.feasible:  # every offer returned satisfies every constraint
        assert oracle_feasible(candidate.offer, request)
    for rejection in selection.rejected:  # nothing feasible is missed, bar a missing image
        if oracle_feasible(rejection.offer, request):
            assert rejection.reason is RejectReason.CUDA
            assert "machine image" in rejection.detail
    prices = [c.usd_per_hour for c in selection.feasible]
    assert prices == sorted(prices)
    assert select_offers(list(reversed(offers)), request).feasible == selection.feasible
    # Without an explanation: the same offers and reasons, and no text built.
    quiet = select_offers(offers, request, explain=False)
    assert quiet.feasible == selection.feasible
    assert [(r.offer, r.reason) for r in quiet.rejected] == [
        (r.offer, r.reason) for r in selection.rejected
    ]
    assert all(r.detail == "" for r in quiet.rejected)
    assert all(r.detail for r in selection.rejected)
