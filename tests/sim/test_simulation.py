"""The simulator: known answers, determinism, the SLO rule, the oracle, and the fact that
the controller's own decision code drives it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

import autoscaler.decide.scaling as scaling
from autoscaler.sim.policies import ConcurrencyPolicy, ControllerPolicy, static_policy
from autoscaler.sim.run import (
    Prepared,
    RateMode,
    Scenario,
    compare,
    compare_forked,
    policies,
    prepare,
    run_policy,
)
from autoscaler.sim.trace import TraceError, TraceRequest, load_trace, scale_rate
from autoscaler.sim.workload import SimWorkload, SloRule
from autoscaler.sim.world import World
from catalog.model import Offer
from catalog.perf import serving_profile
from gateway.window import SignalSnapshot
from tests.sim.conftest import CALM_CLOUD, constant, ramp, write_trace

TRACES = Path(__file__).resolve().parents[2] / "traces"


def _prepare(
    workload: SimWorkload,
    offers: tuple[Offer, ...],
    requests: list[TraceRequest],
    *,
    seed: int = 0,
    rate_scale: float = 1.0,
) -> Prepared:
    return prepare(
        Scenario(
            workload=workload,
            offers=offers,
            requests=requests,
            trace_name="test",
            rate_scale=rate_scale,
            seed=seed,
            cloud=CALM_CLOUD,
        )
    )


def test_static_fleet_on_constant_load_has_known_answers(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    prepared = _prepare(workload, offers, constant(rps=1.0, seconds=600))
    report = run_policy(prepared, static_policy(prepared.workload.spec, replicas=2, name="s2"))
    profile = serving_profile("NVIDIA H100 80GB HBM3", 1, workload.params_b)
    # One request a second on two idle H100s: every request is alone on its replica.
    assert report.served == 600
    assert report.slo_attainment == 1.0
    assert report.ttft_p50_s == pytest.approx(profile.prefill_seconds(200), rel=1e-6)
    assert report.ttft_p99_s == pytest.approx(profile.prefill_seconds(200), rel=1e-6)
    # Two replicas billed from time 0 to the last request's end, at the offer's price.
    price = prepared.offer.price(spot=False)
    assert report.cost_usd == pytest.approx(2 * price * report.duration_s / 3600, rel=1e-6)
    assert report.gpu_hours == pytest.approx(2 * report.duration_s / 3600, rel=1e-6)
    assert report.scale_events.get("scale-up", 0) == 0


def test_same_seed_same_report_and_other_seed_differs(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    requests = ramp(300)

    def run(seed: int) -> dict[str, object]:
        prepared = _prepare(workload, offers, requests, seed=seed)
        return run_policy(prepared, policies(prepared, ["ours"])[0]).to_json()

    first, again, other = run(7), run(7), run(8)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert first["events"] != other["events"]  # boot times are drawn from the seed


def test_the_oracle_planned_in_a_forked_process_gives_the_same_plan_and_reports(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    scenario = Scenario(
        workload=workload,
        offers=offers,
        requests=ramp(300),
        trace_name="test",
        seed=3,
        cloud=CALM_CLOUD,
    )
    prepared, reports = compare(scenario, ["ours", "static-mean"])
    forked, forked_reports = compare_forked(scenario, ["ours", "static-mean"])
    assert forked.oracle == prepared.oracle
    assert [json.dumps(r.to_json(), sort_keys=True) for r in forked_reports] == [
        json.dumps(r.to_json(), sort_keys=True) for r in reports
    ]
    assert forked_reports[0].cost_vs_oracle is not None


def test_slo_allows_long_prompts_their_prefill_time() -> None:
    fastest = serving_profile("NVIDIA H100 80GB HBM3", 1, 8.03)
    rule = SloRule(target_s=1.0, fastest=fastest)
    long_prompt = 60_000
    prefill = fastest.prefill_seconds(long_prompt)
    assert prefill > 1.0  # physically unmeetable under a flat 1 s target
    assert rule.bound_s(200) == 1.0
    assert rule.bound_s(long_prompt) == pytest.approx(1.5 * prefill)
    assert rule.met(ttft_s=1.4 * prefill, input_tokens=long_prompt)
    assert not rule.met(ttft_s=1.6 * prefill, input_tokens=long_prompt)
    assert not rule.met(ttft_s=1.2, input_tokens=200)


def test_requests_longer_than_the_context_are_refused_and_counted(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    requests = [TraceRequest(k * 1.0, 9000 if k % 10 == 0 else 300, 5) for k in range(100)]
    prepared = _prepare(workload, offers, requests)
    report = run_policy(prepared, static_policy(prepared.workload.spec, replicas=1, name="s1"))
    assert report.refused_too_long == 10  # 9,000 + 5 tokens > --max-model-len 8192
    assert report.served == 90
    assert report.slo_attainment == 1.0  # refused requests are reported, not counted


def test_oracle_never_costs_more_than_a_policy_that_meets_the_slo(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    prepared = _prepare(workload, offers, ramp())
    met = 0
    for count in range(1, 5):
        report = run_policy(
            prepared, static_policy(prepared.workload.spec, replicas=count, name=f"s{count}")
        )
        if report.slo_attainment >= 0.99:
            met += 1
            assert prepared.oracle.cost_usd <= report.cost_usd
    ours = run_policy(prepared, policies(prepared, ["ours"])[0])
    if ours.slo_attainment >= 0.99:
        assert prepared.oracle.cost_usd <= ours.cost_usd
    assert met >= 1  # the comparison above really happened
    assert max(prepared.oracle.fleet) >= 2  # and the ramp needs more than one replica


def test_a_change_in_the_controllers_decision_code_changes_the_simulation(
    workload: SimWorkload, offers: tuple[Offer, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = _prepare(workload, offers, ramp())

    def launches() -> int:
        policy = ControllerPolicy(spec=prepared.workload.spec)
        return run_policy(prepared, policy).scale_events.get("launch", 0)

    before = launches()
    assert before > 1  # the ramp makes our controller scale up
    # The controller's scale-up rules (TTFT and load), switched off in
    # autoscaler.decide.scaling itself.
    monkeypatch.setattr(scaling, "_up", lambda ctx, window_sec: None)
    monkeypatch.setattr(scaling, "_load_up", lambda ctx: None)
    assert launches() < before


def test_rate_scale_compresses_time() -> None:
    requests = [TraceRequest(0.0, 10, 1), TraceRequest(60.0, 10, 1)]
    assert [r.arrival_s for r in scale_rate(requests, 4.0)] == [0.0, 15.0]
    with pytest.raises(ValueError, match="rate scale"):
        scale_rate(requests, 0.0)


def test_bad_trace_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,input_tokens,output_tokens\n0,10,1\n1,ten,1\n", encoding="utf-8")
    with pytest.raises(TraceError, match=r"t\.csv:3"):
        load_trace(path)
    path.write_text("arrival_s,input_tokens,output_tokens\n5,10,1\n1,10,1\n", encoding="utf-8")
    with pytest.raises(TraceError, match="back in time"):
        load_trace(path)
    write_trace(path, [TraceRequest(10.0, 5, 5), TraceRequest(12.5, 6, 7)])
    assert load_trace(path) == [TraceRequest(0.0, 5, 5), TraceRequest(2.5, 6, 7)]


def test_costs_are_finite_and_timeline_covers_the_run(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    prepared = _prepare(workload, offers, ramp(300))
    report = run_policy(prepared, policies(prepared, ["knative-kpa"])[0])
    assert math.isfinite(report.cost_usd) and report.cost_usd > 0
    assert report.timeline[0]["t"] == 0.0
    assert report.timeline[-1]["t"] == pytest.approx(report.duration_s)


def test_the_simulated_gateway_answers_the_gateways_snapshot(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    prepared = _prepare(workload, offers, constant(rps=1.0, seconds=600))
    world = World(
        workload=prepared.workload,
        offers=prepared.offers,
        policy=static_policy(prepared.workload.spec, replicas=2, name="s2"),
        requests=prepared.requests,
        seed=0,
        cloud=CALM_CLOUD,
        allow_spot=False,
        initial_replicas=2,
    )
    world.run()
    t = world.t
    snapshot = world.gateway.snapshot(t)
    # The gateway's own contract: it survives the JSON the controller reads over HTTP.
    assert SignalSnapshot.from_json(snapshot.to_json()) == snapshot
    # Ten minutes of one request a second, all answered, 200 prompt tokens each.
    assert snapshot.window_sec == pytest.approx(min(t, 900.0))
    assert snapshot.requests_in_window == 600
    assert len(snapshot.ttft_samples) == 600
    assert snapshot.tokens is not None and snapshot.tokens.requests == 600
    assert snapshot.tokens.input_mean == 200 and snapshot.tokens.input_std == 0
    assert snapshot.in_flight == 0 and snapshot.replica_in_flight == {}
    # The controller's view is that snapshot, as the controller maps a real gateway's.
    view = world._view_now(t)
    assert view.measured.signals.request_rate == pytest.approx(600 / snapshot.window_sec)
    assert view.measured.token_mix is not None and view.measured.token_mix.input_tokens == 200


def test_per_worker_caps_the_simulated_replica_as_the_gateway_does(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    # Four requests a second, each taking longer than a second to generate: a replica
    # that takes one at a time makes the rest wait at the gateway.
    requests = constant(rps=4.0, seconds=60, tokens_out=200)
    capped_spec = workload.spec.model_copy(update={"per_worker": 1})
    capped_workload = dataclasses.replace(workload, spec=capped_spec)
    reports = []
    for w in (workload, capped_workload):
        prepared = _prepare(w, offers, requests)
        reports.append(
            run_policy(prepared, static_policy(prepared.workload.spec, replicas=1, name="one"))
        )
    free, capped = reports
    assert free.ttft_p99_s is not None and capped.ttft_p99_s is not None
    assert free.slo_attainment == 1.0
    assert capped.ttft_p99_s > 10 * free.ttft_p99_s
    assert capped.slo_attainment < free.slo_attainment


def test_baselines_and_oracle_size_a_per_worker_1_workload_by_its_cap(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    # Eight requests a second of 500 generated tokens: an H100 batching up to the
    # gateway's cap serves them on one replica; one request at a time needs many.
    requests = constant(rps=8.0, seconds=120, tokens_out=500)
    capped_spec = workload.spec.model_copy(update={"per_worker": 1})
    capped_workload = dataclasses.replace(workload, spec=capped_spec)
    free, capped = (_prepare(w, offers, requests) for w in (workload, capped_workload))
    assert capped.capacity_rps < free.capacity_rps
    baselines = ("static-peak", "static-mean", "knative-kpa")
    free_policies = policies(free, baselines)
    capped_policies = policies(capped, baselines)
    for free_static, capped_static in zip(free_policies[:2], capped_policies[:2], strict=True):
        assert capped_static.bounds()[0] > free_static.bounds()[0]
    free_kpa, capped_kpa = free_policies[2], capped_policies[2]
    assert isinstance(free_kpa, ConcurrencyPolicy) and isinstance(capped_kpa, ConcurrencyPolicy)
    assert free_kpa.target_concurrency == pytest.approx(64 * 0.7)
    assert capped_kpa.target_concurrency == pytest.approx(1 * 0.7)
    # The oracle plans one-at-a-time replicas too: more of them at the peak.
    assert max(capped.oracle.fleet) > max(free.oracle.fleet)


def test_a_bursty_trace_replays_to_the_figures_it_always_gave(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    # The first 20 minutes of the Azure code trace at twice its rate (bursts, SLO misses,
    # stock-outs, an oracle that needed repair), our controller and Knative's KPA: the
    # figures the simulator gave before its event loop, engine and oracle were made
    # faster, as they moved when the engine model gained chunked prefill (decodes ride
    # on the prompt chunks' steps: TPOT and TTFT lower, while the oracle's slot model
    # holds a fifth replica at the second peak). A change in them is a change in what
    # the simulator computes, not its speed.
    requests = [r for r in load_trace(TRACES / "azure2023_code.csv") if r.arrival_s < 1200]
    scenario = Scenario(
        workload=workload,
        offers=offers,
        requests=requests,
        trace_name="code",
        rate_scale=2.0,
        rate_mode=RateMode.OVERLAY,
        seed=0,
    )
    prepared, (ours, kpa) = compare(scenario, ["ours", "knative-kpa"])
    plan = prepared.oracle
    assert plan.offer.key == "gcp/us-central1-a/a3-highgpu-1g"
    assert plan.fleet == (1, 1, 1, 2, 4, 2, 2, 2, 2, 3, 2, 2, 2, 2, 5, 2, 2, 2, 2, 3)
    assert (plan.misses, plan.launches) == (22, 8)
    assert plan.cost_usd == pytest.approx(13.836058587718899, rel=1e-9)
    assert (ours.served, ours.rejected_503) == (7256, 0)
    assert ours.slo_attainment == pytest.approx(0.9304024255788313, rel=1e-12)
    assert ours.ttft_p95_s == pytest.approx(2.178130140812584, rel=1e-9)
    assert ours.ttft_p99_s == pytest.approx(6.176922402932689, rel=1e-9)
    assert ours.cost_usd == pytest.approx(20.73047304892171, rel=1e-9)
    assert ours.tpot_mean_s == pytest.approx(0.02883943422793038, rel=1e-9)
    assert dict(ours.scale_events) == {
        "launch": 7,
        "ready": 6,
        "scale-up": 3,
        "scale-down": 1,
        "drain": 3,
        "terminate": 3,
    }
    assert kpa.slo_attainment == pytest.approx(0.3755512679162073, rel=1e-12)
    assert kpa.ttft_p99_s == pytest.approx(22.11181254909485, rel=1e-9)
    assert kpa.cost_usd == pytest.approx(12.326454493652722, rel=1e-9)
    assert dict(kpa.scale_events) == {
        "launch": 21,
        "ready": 2,
        "scale-up": 18,
        "scale-down": 3,
        "terminate": 15,
        "stock-out": 2,
        "drain": 1,
    }
