"""The balancing decision: properties over any fleet, and its use through the gateway."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from autoscaler.spec import TaskType
from gateway.balancing import (
    TWO_CHOICES_THRESHOLD,
    ReplicaLoad,
    choose_replica,
    request_work,
)
from gateway.dispatch import Dispatcher, DispatchLimits
from gateway.routes import Replica, WorkloadRef, WorkloadRoute
from gateway.signals import Metrics, Signals


@st.composite
def fleets(draw: st.DrawFn, max_size: int = 20) -> list[ReplicaLoad]:
    """Replicas whose work is the weight of prompts they hold, as the dispatcher keeps it."""
    size = draw(st.integers(min_value=0, max_value=max_size))
    fleet = []
    for i in range(size):
        prompts = draw(st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
        fleet.append(
            ReplicaLoad(
                key=f"r{i}",
                outstanding=len(prompts),
                cap=draw(st.integers(min_value=1, max_value=8)),
                draining=draw(st.booleans()),
                work=sum(request_work(p) for p in prompts),
            )
        )
    return fleet


def load(replica: ReplicaLoad) -> tuple[int, int]:
    return replica.work, replica.outstanding


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
def test_picks_a_least_outstanding_work_replica(fleet: list[ReplicaLoad], seed: int) -> None:
    chosen = choose_replica(fleet, rng=random.Random(seed))
    open_ = [r for r in fleet if not r.draining and r.outstanding < r.cap]
    if open_:
        assert chosen is not None
        assert load(chosen) == min(load(r) for r in open_)


@given(fleet=fleets(max_size=TWO_CHOICES_THRESHOLD), seed=st.integers())
def test_equal_prompts_mean_least_outstanding_requests(fleet: list[ReplicaLoad], seed: int) -> None:
    same = [replace(r, work=r.outstanding * request_work(500)) for r in fleet]
    chosen = choose_replica(same, rng=random.Random(seed))
    open_ = [r for r in same if not r.draining and r.outstanding < r.cap]
    if open_:
        assert chosen is not None
        assert chosen.outstanding == min(r.outstanding for r in open_)


@given(
    short=st.integers(min_value=0, max_value=200),
    long=st.integers(min_value=8000, max_value=120_000),
    others=st.integers(min_value=1, max_value=TWO_CHOICES_THRESHOLD - 1),
    seed=st.integers(),
)
def test_a_short_request_avoids_a_replica_prefilling_a_long_prompt(
    short: int, long: int, others: int, seed: int
) -> None:
    """One replica holds a single long prompt, the others a few short requests each:
    the next request goes to a replica with more requests but far less work."""
    busy = ReplicaLoad(key="busy", outstanding=1, cap=64, work=request_work(long))
    fleet = [busy] + [
        ReplicaLoad(key=f"r{i}", outstanding=3, cap=64, work=3 * request_work(short))
        for i in range(others)
    ]
    chosen = choose_replica(fleet, rng=random.Random(seed))
    assert chosen is not None
    assert chosen.key != "busy"


@given(
    works=st.lists(
        st.integers(min_value=1, max_value=40_000),
        min_size=TWO_CHOICES_THRESHOLD + 1,
        max_size=TWO_CHOICES_THRESHOLD + 40,
    ),
    seed=st.integers(),
)
def test_two_choices_never_picks_the_most_loaded_of_many(works: list[int], seed: int) -> None:
    fleet = [ReplicaLoad(key=f"r{i}", outstanding=1, cap=64, work=w) for i, w in enumerate(works)]
    chosen = choose_replica(fleet, rng=random.Random(seed))
    assert chosen is not None
    # The better of two distinct samples is never the single worst replica.
    assert load(chosen) <= sorted(load(r) for r in fleet)[-2]


def test_equal_replicas_share_the_load() -> None:
    fleet = [ReplicaLoad(key=k, outstanding=0, cap=4) for k in "abc"]
    rng = random.Random(7)
    picks = {choose_replica(fleet, rng=rng).key for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"a", "b", "c"}


def _dispatcher(keys: str) -> tuple[Dispatcher, WorkloadRef]:
    ref: WorkloadRef = ("p", "w")
    dispatcher = Dispatcher(
        limits=DispatchLimits(
            replica_concurrency_cap=64,
            max_queued_per_workload=8,
            queue_timeout_sec=1.0,
            cold_start_timeout_sec=lambda _: 1.0,
            cold_start_retry_after_sec=1.0,
            refused_cooldown_sec=1.0,
        ),
        signals=Signals(window_sec=60.0, metrics=Metrics()),
        on_cold_start=lambda _: None,
        rng=random.Random(0),
    )
    replicas = tuple(
        Replica(key=k, url=f"http://{k}", engine_key=None, draining=False) for k in keys
    )
    dispatcher.update(
        {
            ref: WorkloadRoute(
                ref=ref,
                workload_id=1,
                model="m",
                task_type=TaskType.TEXT2TEXT,
                replicas=replicas,
                last_request_at=None,
            )
        }
    )
    return dispatcher, ref


async def test_dispatcher_sends_short_prompts_past_a_replica_holding_a_long_one() -> None:
    """Through the gateway's dispatcher: a long prompt on one replica, two short ones on
    the other; the next short request joins the short ones. Once the long prompt's first
    token is back, its replica (one request against three) is the least loaded again."""
    dispatcher, ref = _dispatcher("ab")
    long = await dispatcher.acquire(ref, prompt_tokens=30_000)
    shorts = [await dispatcher.acquire(ref, prompt_tokens=100) for _ in range(2)]
    assert {s.replica.key for s in shorts} == {"ab".replace(long.replica.key, "")}
    third = await dispatcher.acquire(ref, prompt_tokens=100)
    assert third.replica.key != long.replica.key
    dispatcher.prefilled(long)
    after = await dispatcher.acquire(ref, prompt_tokens=100)
    assert after.replica.key == long.replica.key
    for lease in (long, *shorts, third, after):
        dispatcher.release(lease)
    # Every lease given back: both replicas are idle again and share the next two.
    again = [await dispatcher.acquire(ref, prompt_tokens=9) for _ in "ab"]
    assert {lease.replica.key for lease in again} == {"a", "b"}
