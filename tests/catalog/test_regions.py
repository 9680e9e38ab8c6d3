"""Regions as users name them: macro regions cover their continent's cloud regions on
every provider, and a name that is neither is refused with what is allowed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.query import OfferRequest, RejectReason, select_offers
from catalog.regions import (
    MACRO_REGIONS,
    REGION_PATTERN,
    RegionSet,
    UnknownRegionError,
    macro_region_of,
    normalise_region,
)
from catalog.snapshot import load_bundled


@pytest.mark.parametrize(
    ("macro", "inside", "outside"),
    [
        (
            "US",
            ["us-east-1", "us-west-2", "us-central1", "us-east5"],
            ["ca-central-1", "eu-west-1"],
        ),
        ("EU", ["eu-west-1", "eu-central-1", "europe-west4"], ["us-east-1", "me-central1"]),
        ("CANADA", ["ca-central-1", "northamerica-northeast2"], ["us-east-1", "europe-west1"]),
        (
            "ASIA",
            ["ap-northeast-1", "ap-southeast-1", "asia-east1", "asia-southeast1"],
            ["ap-southeast-2", "australia-southeast1", "me-west1"],
        ),
    ],
)
def test_a_macro_region_admits_its_continent_on_both_clouds(
    macro: str, inside: list[str], outside: list[str]
) -> None:
    regions = RegionSet.of([normalise_region(macro.lower())])
    assert all(regions.admits(r) for r in inside)
    assert not any(regions.admits(r) for r in outside)


def test_on_the_bundled_catalog_each_macro_region_finds_offers_of_its_own_only() -> None:
    offers = load_bundled().offers
    for macro in MACRO_REGIONS:
        if macro == "CANADA":
            continue  # the bundled snapshot prices no Canadian region
        selection = select_offers(offers, OfferRequest(regions=(macro,)))
        assert selection.feasible, macro
        assert {macro_region_of(c.offer.region) for c in selection.feasible} == {macro}
        refused = [r for r in selection.rejected if r.reason is RejectReason.REGION]
        assert refused and all(f"not in {macro}" in r.detail for r in refused)


def test_cloud_region_names_still_match_exactly() -> None:
    selection = select_offers(load_bundled().offers, OfferRequest(regions=("us-central1",)))
    assert {c.offer.region for c in selection.feasible} == {"us-central1"}


@pytest.mark.parametrize("name", ["MOON", "us", "Europe", "us-east", "us-gov-west-1", ""])
def test_a_name_that_is_no_region_is_refused_with_the_allowed_forms(name: str) -> None:
    if name == "us":  # a macro region in any case is fine
        assert normalise_region(name) == "US"
        return
    with pytest.raises(UnknownRegionError, match="us-east-1 \\(AWS\\) or us-central1 \\(GCP\\)"):
        normalise_region(name)


@given(st.from_regex(REGION_PATTERN))
def test_the_published_pattern_admits_exactly_what_is_accepted(name: str) -> None:
    assert normalise_region(name)


@given(st.text(alphabet="usUSeEaAt-12\n ", max_size=10))
def test_a_name_the_pattern_refuses_is_refused(name: str) -> None:
    if re.search(REGION_PATTERN, name) is None:
        with pytest.raises(UnknownRegionError):
            normalise_region(name)
    else:
        assert normalise_region(name)


@given(st.sampled_from(sorted({o.region for o in load_bundled().offers})))
def test_every_region_the_catalog_sells_is_a_valid_name_in_at_most_one_macro(region: str) -> None:
    assert normalise_region(region) == region
    owners = [m for m in MACRO_REGIONS if RegionSet.of([m]).admits(region)]
    assert len(owners) <= 1
    assert owners == ([macro_region_of(region)] if macro_region_of(region) else [])
