"""A stable fleet moves its dearest replica to a markedly cheaper offer, one at a time,
make before break (``decide.step``'s replacement on a cheaper offer)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from autoscaler.decide.inputs import Measured, TokenMix
from autoscaler.decide.placement import unavailable_key
from autoscaler.decide.plan import Drain, Launch, ReplicaPhase, ReplicaView
from autoscaler.decide.scaling import ScaleMemory
from autoscaler.decide.signals import Signals
from autoscaler.decide.step import (
    REBALANCE_MIN_AGE_SEC,
    ReplicaState,
    Step,
    StepKnobs,
    WorkloadView,
    step,
)
from catalog.query import Market
from tests.reconcile.world import A10G, L40S, autoscaling

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
SPOT = L40S.spot_usd_per_hour or 0.0


def _replica(
    launch_id: str,
    *,
    phase: ReplicaPhase = ReplicaPhase.READY,
    spot: bool = False,
    usd: float | None = None,
    ready_ago_s: float = 1800.0,
) -> ReplicaState:
    price = usd if usd is not None else (SPOT if spot else L40S.on_demand_usd_per_hour)
    ready = phase is ReplicaPhase.READY or phase is ReplicaPhase.DRAINING
    return ReplicaState(
        view=ReplicaView(
            launch_id=launch_id,
            phase=phase,
            generation=1,
            offer_key=L40S.key,
            usd_per_hour=price,
            intent_at=NOW - timedelta(seconds=ready_ago_s + 180 if ready else 60),
            ready_at=NOW - timedelta(seconds=ready_ago_s) if ready else None,
            drain_requested_at=NOW if phase is ReplicaPhase.DRAINING else None,
            in_flight=0,
        ),
        zone=L40S.zone,
        shape=(L40S.gpu, L40S.gpu_count),
        spot=spot,
    )


def _step(
    replicas: list[ReplicaState],
    *,
    count: int | None = None,
    memory: ScaleMemory | None = None,
    unavailable: dict[str, datetime] | None = None,
    now: datetime = NOW,
    **policy: Any,
) -> Step:
    config: dict[str, Any] = {"allow_spot_instances": True, "min_workers": 1}
    config.update(policy)
    view = WorkloadView(
        spec=autoscaling("bot", **config),
        generation=1,
        replicas=replicas,
        measured=Measured(signals=Signals(last_request_at=now)),
        offers=(L40S,),
    )
    return step(
        view,
        memory=memory or ScaleMemory(),
        unavailable=unavailable or {},
        now=now,
        knobs=StepKnobs(),
        count=None if count is None else (count, f"{count} wanted"),
    )


def _kinds(result: Step) -> list[tuple[str, str | None]]:
    return [(type(a).__name__, getattr(a, "launch_id", None)) for a in result.plan.actions]


def test_a_stable_fleet_buys_one_replacement_on_the_cheaper_market_then_drains_the_dear_one() -> (
    None
):
    dear, cheap = _replica("dear"), _replica("cheap", spot=True)
    first = _step([dear, cheap], count=2)

    assert _kinds(first) == [("Launch", None)]
    assert first.placement is not None and first.placement.market is Market.SPOT
    assert first.decision.desired == 3
    assert first.decision.reason.startswith(
        "replace 1 x NVIDIA L40S on-demand at $1.86/h with NVIDIA L40S spot at $0.74/h: "
        "saves $1.12/h; overlap ~240 s costs $0.05"
    )
    assert first.plan.refusals == ()

    # It boots: nothing more is bought, nothing is drained.
    booting = _replica("new", phase=ReplicaPhase.BOOTING, spot=True)
    later = NOW + timedelta(seconds=60)
    second = _step([dear, cheap, booting], count=2, memory=first.decision.memory, now=later)
    assert _kinds(second) == []
    assert second.decision.desired == 3

    # Ready: the fleet is one above its count and the dearest replica drains.
    ready = _replica("new", spot=True, ready_ago_s=10)
    third = _step([dear, cheap, ready], count=2, memory=second.decision.memory, now=later)
    assert _kinds(third) == [("Drain", "dear")]
    assert third.decision.desired == 2
    assert third.decision.memory.rebalance is None


def test_the_autoscaling_rules_hold_the_replacement_and_let_the_dear_one_go() -> None:
    dear = _replica("dear")
    first = _step([dear])  # no traffic: held at min_workers 1
    assert _kinds(first) == [("Launch", None)]
    booting = _replica("new", phase=ReplicaPhase.BOOTING, spot=True)
    second = _step([dear, booting], memory=first.decision.memory)
    assert _kinds(second) == []
    third = _step([dear, _replica("new", spot=True, ready_ago_s=5)], memory=second.decision.memory)
    assert _kinds(third) == [("Drain", "dear")]


def test_no_replacement_while_a_replica_boots_or_drains() -> None:
    booting = _replica("b", phase=ReplicaPhase.BOOTING)
    assert _kinds(_step([_replica("dear"), booting], count=2)) == []
    draining = _replica("d", phase=ReplicaPhase.DRAINING, spot=True)
    assert _kinds(_step([_replica("dear"), draining], count=1)) == [("Terminate", "d")]


def test_no_replacement_when_a_scale_decision_is_pending() -> None:
    assert _kinds(_step([_replica("dear")], count=3)) == [("Launch", None), ("Launch", None)]
    assert all("replace" not in a.reason for a in _step([_replica("dear")], count=3).plan.launches)
    assert [type(a) for a in _step([_replica("dear"), _replica("x")], count=1).plan.actions] == [
        Drain
    ]


def test_no_replacement_the_ceiling_would_not_hold_during_the_overlap() -> None:
    # $1.86 + $0.74 = $2.60 > $2.50: the dear replica stays, and nothing is refused.
    result = _step([_replica("dear")], count=1, max_hourly_cost_usd=2.5)
    assert _kinds(result) == []
    assert result.plan.refusals == ()
    assert _kinds(_step([_replica("dear")], count=1, max_hourly_cost_usd=2.7)) == [("Launch", None)]


def test_no_replacement_at_max_workers() -> None:
    assert _kinds(_step([_replica("dear"), _replica("b")], count=2, max_workers=2)) == []
    assert _kinds(_step([_replica("dear"), _replica("b")], count=2, max_workers=3)) == [
        ("Launch", None)
    ]


def test_no_replacement_for_a_small_difference() -> None:
    # The spot offer is 15% cheaper than this replica: under the 20% margin.
    assert _kinds(_step([_replica("dear", usd=SPOT / 0.85)], count=1)) == []
    assert _kinds(_step([_replica("dear", usd=SPOT / 0.75)], count=1)) == [("Launch", None)]
    # A replica no dearer than the offer is never replaced.
    assert _kinds(_step([_replica("cheap", spot=True)], count=1)) == []


def test_no_replacement_of_a_young_replica_or_while_a_market_is_unavailable() -> None:
    young = _replica("dear", ready_ago_s=REBALANCE_MIN_AGE_SEC - 1)
    assert _kinds(_step([young], count=1)) == []
    marked = {unavailable_key(L40S, Market.SPOT): NOW + timedelta(seconds=1)}
    assert _kinds(_step([_replica("dear")], count=1, unavailable=marked)) == []
    expired = {unavailable_key(L40S, Market.SPOT): NOW}
    assert _kinds(_step([_replica("dear")], count=1, unavailable=expired)) == [("Launch", None)]


def test_never_more_than_one_replacement_in_flight() -> None:
    dears = [_replica("a"), _replica("b"), _replica("c")]
    first = _step(dears, count=3)
    assert _kinds(first) == [("Launch", None)]
    booting = _replica("new", phase=ReplicaPhase.BOOTING, spot=True)
    second = _step([*dears, booting], count=3, memory=first.decision.memory)
    assert _kinds(second) == []
    # Without the memory (a restart), the booting one is a surplus: nothing more is bought.
    assert not _step([*dears, booting], count=3).plan.launches
    # Once it serves, one dear replica drains; the next waits for a stable fleet.
    ready = _replica("new", spot=True, ready_ago_s=5)
    third = _step([*dears, ready], count=3, memory=second.decision.memory)
    assert [type(a) for a in third.plan.actions] == [Drain]
    draining = replace(dears[0], view=replace(dears[0].view, phase=ReplicaPhase.DRAINING))
    fourth = _step([draining, *dears[1:], ready], count=3, memory=third.decision.memory)
    assert not any(isinstance(a, Launch) for a in fourth.plan.actions)


def test_a_replacement_lost_while_booting_ends_it() -> None:
    dear = _replica("dear")
    first = _step([dear], count=1)
    # The replacement was reclaimed before it was ready: the fleet is back to one.
    second = _step([dear], count=1, memory=first.decision.memory)
    assert second.decision.memory.rebalance is None
    assert second.decision.desired == 1


def _stand_in(launch_id: str) -> ReplicaState:
    """A replica of another GPU, bought on demand while the fleet's own market was out."""
    r = _replica(launch_id, usd=A10G.on_demand_usd_per_hour)
    return replace(r, shape=(A10G.gpu, A10G.gpu_count), view=replace(r.view, offer_key=A10G.key))


def test_a_stand_in_of_another_gpu_is_not_swapped_for_one_of_less_capacity() -> None:
    fleet = [_replica("a", spot=True), _replica("b", spot=True), _stand_in("c")]
    assert _kinds(_step(fleet, count=3)) == []


def test_a_replica_of_a_shape_short_of_the_prompts_tail_is_replaced_then_drained() -> None:
    """A fleet placed before any prompt was measured sits on 2 x L4 machines, which
    prefill about 91% of code prompts within the 1 s target. Once the gateway's
    histogram shows the tail, the stable fleet buys one replica of a shape that serves
    it (make before break), and drains the misfit when that one is ready, cheaper or
    not: the reason is the SLO, not the price."""
    from catalog.snapshot import load_catalog
    from tests.decide.test_placement import _code_prompts

    prompts, histogram = _code_prompts()
    mix = TokenMix(
        input_tokens=sum(prompts) / len(prompts),
        output_tokens=28.0,
        input_scv=0.93,
        input_histogram=histogram,
    )
    pool = ["NVIDIA L4", "NVIDIA A10G", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    spec = autoscaling(
        "code",
        max_workers=8,
        max_hourly_cost_usd=100.0,
        upper_allowed_latency_sec=1.0,
        lower_allowed_latency_sec=0.2,
        workers={"source": "cloud", "cloud_pool": {"gpu_pool": pool}},
    )
    l4x2 = next(o for o in load_catalog().offers if o.instance_type == "g2-standard-24")

    def l4(launch_id: str) -> ReplicaState:
        state = _replica(launch_id, usd=l4x2.on_demand_usd_per_hour)
        return replace(
            state,
            view=replace(state.view, offer_key=l4x2.key),
            zone=l4x2.zone,
            shape=(l4x2.gpu, l4x2.gpu_count),
        )

    def run(replicas: list[ReplicaState], memory: ScaleMemory, now: datetime) -> Step:
        view = WorkloadView(
            spec=spec,
            generation=1,
            replicas=replicas,
            measured=Measured(signals=Signals(last_request_at=now), token_mix=mix),
            offers=load_catalog().offers,
        )
        return step(
            view, memory=memory, unavailable={}, now=now, knobs=StepKnobs(), count=(2, "2 wanted")
        )

    first = run([l4("a"), l4("b")], ScaleMemory(), NOW)
    assert _kinds(first) == [("Launch", None)]
    chosen = first.placement
    assert chosen is not None and chosen.offer is not None
    assert ("NVIDIA L4", 2) in chosen.short_of_tail
    assert (chosen.offer.gpu, chosen.offer.gpu_count) not in chosen.short_of_tail
    assert first.decision.reason.startswith(
        "replace a (2 x NVIDIA L4 prefills too few of the measured prompts within the TTFT "
        f"target) with {chosen.offer.gpu_count} x {chosen.offer.gpu}"
    )

    # Ready: the misfit is drained, not the dearest (the new replica costs more).
    new = replace(
        _replica("new", usd=chosen.usd_per_hour, ready_ago_s=10),
        shape=(chosen.offer.gpu, chosen.offer.gpu_count),
    )
    assert chosen.usd_per_hour > l4x2.on_demand_usd_per_hour
    later = NOW + timedelta(seconds=240)
    done = run([l4("a"), l4("b"), new], first.decision.memory, later)
    assert _kinds(done) == [("Drain", "a")]
    assert done.decision.reason == (
        "replacement ready: 3 -> 2, a, of a shape short of the prompts' tail, drained"
    )
    # The other misfit goes the same way once the fleet is stable again.
    again = run([l4("b"), new], done.decision.memory, later + timedelta(seconds=60))
    assert again.decision.desired == 3 and _kinds(again) == [("Launch", None)]
