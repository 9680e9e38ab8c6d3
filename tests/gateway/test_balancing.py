"""The balancing decision: properties over any fleet, and its use through the gateway."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gateway.balancing import TWO_CHOICES_THRESHOLD, ReplicaLoad, choose_replica


@st.composite
def fleets(draw: st.DrawFn, max_size: int = 20) -> list[ReplicaLoad]:
    size = draw(st.integers(min_value=0, max_value=max_size))
    return [
        ReplicaLoad(
            key=f"r{i}",
            outstanding=draw(st.integers(min_value=0, max_value=10)),
            cap=draw(st.integers(min_value=1, max_value=8)),
            draining=draw(st.booleans()),
        )
        for i in range(size)
    ]


@given(
    fleet=fleets(),
    seed=st.integers(),
    excluded=st.sets(st.sampled_from([f"r{i}" for i in range(20)])),
)
def test_never_picks_draining_capped_or_excluded(
    fleet: list[ReplicaLoad], seed: int, excluded: set[str]
) -> None:
    chosen = choose_replica(fleet, rng=random.Random(seed), excluded=excluded)
    open_ = [r for r in fleet if not r.draining and r.outstanding < r.cap and r.key not in excluded]
    if chosen is None:
        assert open_ == []
    else:
        assert chosen in open_


@given(fleet=fleets(max_size=TWO_CHOICES_THRESHOLD), seed=st.integers())
def test_picks_a_least_outstanding_replica(fleet: list[ReplicaLoad], seed: int) -> None:
    chosen = choose_replica(fleet, rng=random.Random(seed))
    open_ = [r for r in fleet if not r.draining and r.outstanding < r.cap]
    if open_:
        assert chosen is not None
        assert chosen.outstanding == min(r.outstanding for r in open_)


@given(fleet=fleets(), seed=st.integers())
def test_two_choices_never_picks_the_most_loaded_of_many(
    fleet: list[ReplicaLoad], seed: int
) -> None:
    open_ = [r for r in fleet if not r.draining and r.outstanding < r.cap]
    chosen = choose_replica(fleet, rng=random.Random(seed))
    loads = sorted(r.outstanding for r in open_)
    if len(open_) > TWO_CHOICES_THRESHOLD:
        assert chosen is not None
        # The better of two distinct samples is never the single worst replica.
        assert chosen.outstanding <= loads[-2]


def test_equal_replicas_share_the_load() -> None:
    fleet = [ReplicaLoad(key=k, outstanding=0, cap=4) for k in "abc"]
    rng = random.Random(7)
    picks = {choose_replica(fleet, rng=rng).key for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"a", "b", "c"}
