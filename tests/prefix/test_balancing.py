"""Prefix-aware balancing: the cache wins while load allows, never past the bound."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gateway.balancing import (
    HOT_SPOT_FACTOR,
    ReplicaLoad,
    choose_by_prefix,
    eligible,
    prefix_bound,
    request_work,
)


def _fleet(*outstanding: int, work: int = 0) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}", n, cap=64, work=work * n) for i, n in enumerate(outstanding)]


def test_an_idle_fleet_sends_a_known_prefix_to_the_replica_that_holds_it() -> None:
    fleet = _fleet(0, 0, 0, 0)
    for seed in range(20):
        chosen = choose_by_prefix(
            fleet, rng=random.Random(seed), prompt_tokens=8000, cached_tokens={"r2": 6000}
        )
        assert chosen is not None and chosen.key == "r2"


def test_an_unknown_prefix_goes_to_the_least_work() -> None:
    fleet = [ReplicaLoad("a", 1, 64, work=500), ReplicaLoad("b", 1, 64, work=100)]
    chosen = choose_by_prefix(fleet, rng=random.Random(0), prompt_tokens=800, cached_tokens={})
    assert chosen is not None and chosen.key == "b"


def test_the_warm_replica_loses_once_its_queue_outweighs_the_cache() -> None:
    fleet = [ReplicaLoad("warm", 2, 64, work=9000), ReplicaLoad("cold", 2, 64, work=0)]
    chosen = choose_by_prefix(
        fleet, rng=random.Random(0), prompt_tokens=4000, cached_tokens={"warm": 3000}
    )
    assert chosen is not None and chosen.key == "cold"


def test_a_warm_replica_past_the_bound_gets_no_more_of_its_prefix() -> None:
    # Four replicas, the warm one holding 5 of 8 outstanding requests: the mean after
    # one more is 9/4, the bound ceil(1.3 * 2.25) = 3, so the warm one is passed over
    # although its cache would make the request nearly free there.
    fleet = _fleet(5, 1, 1, 1)
    assert prefix_bound(fleet) == 3
    chosen = choose_by_prefix(
        fleet, rng=random.Random(0), prompt_tokens=8000, cached_tokens={"r0": 7999}
    )
    assert chosen is not None and chosen.key != "r0"


@st.composite
def fleets(draw: st.DrawFn) -> list[ReplicaLoad]:
    size = draw(st.integers(min_value=1, max_value=12))
    fleet = []
    for i in range(size):
        prompts = draw(st.lists(st.integers(min_value=0, max_value=8000), max_size=12))
        fleet.append(
            ReplicaLoad(
                key=f"r{i}",
                outstanding=len(prompts),
                cap=draw(st.integers(min_value=1, max_value=16)),
                draining=draw(st.booleans()),
                work=sum(request_work(p) for p in prompts),
            )
        )
    return fleet


@given(
    fleet=fleets(),
    prompt=st.integers(min_value=1, max_value=20000),
    cached=st.dictionaries(
        st.sampled_from([f"r{i}" for i in range(12)]), st.integers(0, 20000), max_size=12
    ),
    seed=st.integers(0, 1000),
)
def test_the_busiest_stays_within_the_factor_unless_least_work_chose_it(
    fleet: list[ReplicaLoad], prompt: int, cached: dict[str, int], seed: int
) -> None:
    chosen = choose_by_prefix(
        fleet, rng=random.Random(seed), prompt_tokens=prompt, cached_tokens=cached
    )
    candidates = eligible(fleet)
    if not candidates:
        assert chosen is None
        return
    assert chosen is not None and chosen in candidates
    bound = prefix_bound(candidates, factor=HOT_SPOT_FACTOR)
    least = min((r.work, r.outstanding) for r in candidates)
    # Either the cache chose a replica that stays within the factor of the mean, or the
    # choice is the prefix-blind least-work one.
    assert chosen.outstanding + 1 <= bound or (chosen.work, chosen.outstanding) == least
