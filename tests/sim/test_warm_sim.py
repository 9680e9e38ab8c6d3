"""Warm pools in the simulator: a scale-down parks the replica (asleep, then stopped),
later bursts resume it by the fastest path, the bill counts a stopped machine at its
disk's price, and a scale-from-zero from a stopped machine waits for the machine's
start, not for a fresh boot."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.sim.gateway import Outcome
from autoscaler.sim.oracle import WarmCosts, bridge_gaps, hold_or_relaunch
from autoscaler.sim.policies import ControllerPolicy
from autoscaler.sim.report import build_report
from autoscaler.sim.trace import TraceRequest
from autoscaler.sim.warm import stopped_usd_per_hour, wake_seconds
from autoscaler.sim.workload import SimWorkload, SloRule, load_workload
from autoscaler.sim.world import DEMAND_INTERVAL_S, START, WAKE, CloudSettings, World
from autoscaler.spec import WarmPoolSpec
from catalog.model import Offer
from tests.sim.conftest import WORKLOAD_YAML

BOOT_S = 180.0
START_S = 75.0
EXACT = CloudSettings(
    boot_median_s=BOOT_S,
    boot_sigma=1e-9,
    stockout_probability=0.0,
    spot_interruptions_per_hour=0.0,
    start_median_s=START_S,
    start_sigma=1e-9,
)

B_AT, C_AT = 200.0, 1200.0
"""Burst B comes while the replica sleeps; burst C after its sleep's hold, once stopped."""


@pytest.fixture(scope="module")
def warm_workload(tmp_path_factory: pytest.TempPathFactory) -> SimWorkload:
    text = WORKLOAD_YAML.replace("min_workers: 1", "min_workers: 0") + (
        "  scale_to_zero: true\n  scale_to_zero_timeout_sec: 60\n  warm_pool: auto\n"
    )
    path = tmp_path_factory.mktemp("warm") / "workload.yaml"
    path.write_text(text, encoding="utf-8")
    return load_workload(path)


def _burst(at: float, count: int = 10) -> list[TraceRequest]:
    return [TraceRequest(at + k, 200, 10) for k in range(count)]


def test_a_scale_down_parks_and_later_bursts_wake_then_start_it(
    warm_workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    requests = [*_burst(0.0), *_burst(B_AT), *_burst(C_AT)]
    world = World(
        workload=warm_workload,
        offers=offers,
        policy=ControllerPolicy(spec=warm_workload.spec),
        requests=requests,
        seed=0,
        cloud=EXACT,
        allow_spot=False,
        initial_replicas=1,
    )
    outcomes = world.run()
    kinds = [e.kind for e in outcomes.events]
    # One machine all along: bought before the trace, parked twice, resumed twice.
    assert kinds.count("launch") == 1
    assert "terminate" not in kinds
    assert outcomes.resumes == {WAKE: 1, START: 1}
    parks = [e for e in outcomes.events if e.kind == "park"]
    assert [e.detail.split(":")[0].split()[1] for e in parks] == [
        "sleeping",  # scaled to zero after burst A: asleep
        "sleeping",  # again after burst B
        "stopped",  # its sleep outlived the hold: stopped
    ]
    resumes = [e for e in outcomes.events if e.kind == "resume"]
    # The gateway wakes the controller at once (a pass a second at most).
    assert B_AT <= resumes[0].t <= B_AT + DEMAND_INTERVAL_S and WAKE in resumes[0].detail
    assert C_AT <= resumes[1].t <= C_AT + DEMAND_INTERVAL_S and START in resumes[1].detail

    # Every request is served; those that found no replica ready are split by path.
    records = outcomes.records
    assert all(r.outcome is Outcome.SERVED for r in records)
    b = [r for r in records if B_AT <= r.arrival_s < B_AT + 10]
    c = [r for r in records if r.arrival_s >= C_AT]
    assert b[0].cold_path == WAKE and c[0].cold_path == START
    offer = next(r.offer for r in world.replicas.values())
    wake = wake_seconds(weights_bytes=warm_workload.params_b * 2e9, offer=offer, level=1)
    # The wait is the wake (or the start) and at most the gateway's second.
    slack = DEMAND_INTERVAL_S + 0.1
    assert b[0].ttft_s is not None and wake <= b[0].ttft_s <= wake + slack
    # From a stopped machine: the start (75 s), never a fresh boot.
    assert c[0].ttft_s is not None and START_S <= c[0].ttft_s <= START_S + slack
    assert c[0].ttft_s < BOOT_S
    assert outcomes.start_times[START] == [pytest.approx(START_S)]
    assert outcomes.start_times[WAKE] == [pytest.approx(wake)]
    assert world.start_times().start_s == pytest.approx(START_S)

    # The bill: the machine's price from time 0 to the end, except while it was
    # stopped (from the stop's completion to its start), when its disk is billed.
    price, disk = offer.price(spot=False), stopped_usd_per_hour(offer)
    stopped_at = next(
        e.t for e in outcomes.events if e.kind == "parked" and e.detail.endswith("stopped")
    )
    stopped = resumes[1].t - stopped_at
    assert stopped > 0
    expected = (price * (outcomes.end_s - stopped) + disk * stopped) / 3600.0
    assert outcomes.cost_usd == pytest.approx(expected, rel=1e-9)
    # Of which parked: asleep at the full price from each park to the resume, stopping
    # at the full price, stopped at the disk's.
    asleep = (resumes[0].t - parks[0].t) + (parks[2].t - parks[1].t)
    stopping = stopped_at - parks[2].t
    parked = (price * (asleep + stopping) + disk * stopped) / 3600.0
    assert outcomes.parked_usd == pytest.approx(parked, rel=1e-9)
    assert outcomes.gpu_hours == pytest.approx((outcomes.end_s - stopped) / 3600.0, rel=1e-9)

    report = build_report(
        outcomes=outcomes,
        slo=SloRule(target_s=1.0, fastest=warm_workload.profile(offer)),
        policy="ours",
        trace="bursts",
        rate_scale=1.0,
        seed=0,
        spot=False,
        oracle_cost_usd=None,
    )
    assert report.parks == 3 and report.resumes == {WAKE: 1, START: 1}
    assert report.cold[START].requests >= 1 and report.cold[WAKE].requests >= 1
    p95 = report.cold[START].ttft_p95_s
    assert p95 is not None and START_S <= p95 < BOOT_S
    assert "warm pool" in report.summary() and "scale from zero" in report.summary()


def test_without_a_warm_pool_the_same_bursts_pay_fresh_boots(
    warm_workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    config = warm_workload.autoscaling
    assert config is not None
    spec = warm_workload.spec.model_copy(
        update={"execution_policy_config": config.model_copy(update={"warm_pool": None})}
    )
    cold = replace(warm_workload, spec=spec)
    world = World(
        workload=cold,
        offers=offers,
        policy=ControllerPolicy(spec=spec),
        requests=[*_burst(0.0), *_burst(C_AT)],
        seed=0,
        cloud=EXACT,
        allow_spot=False,
        initial_replicas=1,
    )
    outcomes = world.run()
    assert outcomes.resumes == {} and outcomes.parked_usd == 0.0
    first = next(r for r in outcomes.records if r.arrival_s >= C_AT)
    assert first.cold_path == "fresh"
    assert first.ttft_s is not None and first.ttft_s >= BOOT_S


def test_the_oracle_stops_a_machine_through_a_gap_when_cheaper() -> None:
    warm = WarmCosts(stop_s=30.0, start_s=75.0, stopped_usd_per_hour=0.02)
    need = [1, 0, 0, 0, 0, 1]  # a four-minute gap
    fleet, launches = hold_or_relaunch(need, slot_s=60.0, boot_s=180.0)
    assert (fleet, launches) == ([1, 0, 0, 0, 0, 1], 1)  # relaunch beats a 240 s hold
    bridged = bridge_gaps(need, slot_s=60.0, boot_s=180.0, warm=warm, usd_per_hour=2.0)
    assert bridged.launches == 0 and bridged.stops == 1
    assert bridged.stopped_s == pytest.approx(240.0 - 105.0)
    # A two-minute gap: 105 s at the price and 15 s at the disk's beats holding 120 s.
    short = bridge_gaps([1, 0, 0, 1], slot_s=60.0, boot_s=180.0, warm=warm, usd_per_hour=2.0)
    assert short.stops == 1 and short.fleet == [1, 0, 0, 1]
    # A one-minute gap is shorter than a stop and a start: held.
    held = bridge_gaps([1, 0, 1], slot_s=60.0, boot_s=180.0, warm=warm, usd_per_hour=2.0)
    assert held.stops == 0 and held.fleet == [1, 1, 1]


def test_a_refill_is_neither_ready_nor_booting_in_the_timeline(
    warm_workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    config = warm_workload.autoscaling
    assert config is not None
    pool = config.model_copy(update={"warm_pool": WarmPoolSpec(stopped=1)})
    spec = warm_workload.spec.model_copy(update={"execution_policy_config": pool})
    pooled = replace(warm_workload, spec=spec)
    world = World(
        workload=pooled,
        offers=offers,
        policy=ControllerPolicy(spec=spec),
        requests=_burst(C_AT),
        seed=0,
        cloud=EXACT,
        allow_spot=False,
        initial_replicas=0,
    )
    outcomes = world.run()
    # Before the burst the pool's refill is bought, booted and stopped; it served nothing.
    before = [s for s in outcomes.timeline if s.t < C_AT]
    assert any(s.parked == 1 for s in before)
    assert all(s.ready == 0 and s.booting == 0 for s in before)
