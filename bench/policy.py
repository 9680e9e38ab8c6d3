"""Our policy against the baselines and the oracle on the bundled traces.

Runs every policy (``autoscaler.sim.run.POLICY_NAMES``) on ``azure2023_code.csv``,
``azure2023_conv.csv`` and ``mooncake_synthetic.csv`` at the rate scales in
:data:`RATE_SCALES` (the trace overlaid on itself, time axis kept; chosen so that the
peaks need several replicas), with and without spot, and prints one table: SLO
attainment, cost, and cost over the oracle's cost. The oracle's row carries its plan's
attainment when replayed in the simulator (``autoscaler.sim.oracle``: the plan is
repaired until that replay meets the SLO), its shape, its relaxed cost and the rounds
of repair. A ``static-N`` row follows the baselines: the smallest fixed fleet that meets
the SLO, found by replaying 1, 2, ... replicas (:func:`cheapest_static`), the best
static fleet in hindsight.

    .venv/bin/python -m bench.policy [--seed N] [--traces DIR] [--json FILE] [--check-oracle]
        [--rate-scale X] [--scenarios all|hours|days] [--spot both|no|yes]

Beside the hour traces it replays the day-long diurnal scenarios of :data:`DAYS`: a day
of the Azure 2024 conversation week's request rate drawn as a non-homogeneous Poisson
process (token lengths from the 2023 conversation trace), replayed as drawn.

The workload is :data:`WORKLOAD`: Llama-3.1-8B, 128k context, 1-64 replicas on L40S,
A100 80GB or H100, $400/h ceiling, TTFT target 1 s; the same defaults for every trace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

from autoscaler.sim.oracle import OraclePlan
from autoscaler.sim.policies import static_policy
from autoscaler.sim.profile import load_rate_profile, poisson_trace
from autoscaler.sim.report import ColdStarts, RunReport
from autoscaler.sim.run import (
    ATTAINMENT_TARGET,
    POLICY_NAMES,
    Prepared,
    RateMode,
    Scenario,
    policies,
    prepare,
    replay_oracle,
    run_policy,
)
from autoscaler.sim.trace import TraceRequest, load_trace
from autoscaler.sim.workload import sim_workload
from autoscaler.spec import WorkloadSpec
from catalog.model import Offer
from catalog.snapshot import load_catalog

RATE_SCALES: dict[str, float] = {
    "azure2023_code.csv": 2.0,
    "azure2023_conv.csv": 2.0,
    "mooncake_synthetic.csv": 1.0,
}
"""Request-rate multipliers, applied by overlaying the trace on itself (``RateMode.OVERLAY``):
the time axis stays real, so three-minute boots weigh against the trace as in production.
At these scales the peaks need several replicas (conv 4-5 L40S, code 5-15 L40S in its
bursts, Mooncake 4-10 H100) and every trace keeps its real length (about an hour; Mooncake
17 minutes)."""

DAY_PROFILE = "azure2024_conv_week_rate_digitized.csv"
"""The week of Azure 2024 conversation request rates (``traces/README.md``)."""

DAYS: dict[str, tuple[int, float, str]] = {
    "azure2024_conv day 1": (1, 8.0, "azure2023_conv.csv"),
}
"""Day-long diurnal scenarios: (day of :data:`DAY_PROFILE`, peak req/s, token source).
Day 1 is Monday 2024-05-13; at a peak of 8 req/s its quietest bin is about 4 req/s and
the day draws about 477,000 requests, token pairs from the 2023 conversation trace. The
peak needs several replicas (three to four L40S), the trough two. Drawn with the run's
seed (``autoscaler.sim.profile.poisson_trace``); replayed as drawn (rate scale 1)."""

WARM_ROWS = ("ours-warm", "ours-pool")
"""Our controller with a warm pool (``autoscaler.sim.run.WARM_POOLS``), beside the rows
above on every scenario, measured against the oracle with warm pools (``oracle-warm``)."""

ZERO_TRACE = "azure2023_conv.csv"
ZERO_ON_S, ZERO_EVERY_S, ZERO_KEEP = 60.0, 600.0, 3
"""The scale-from-zero scenario: every third request of the first minute of every ten
of the conversation trace (six waves of about 105 requests, 1.8 req/s, which one L40S
carries; silence between), replayed on the
workload with ``min_workers: 0`` and a 120 s ``scale_to_zero_timeout_sec``, so the fleet
goes to zero after each wave and the next wave's first requests wait for a replica."""

ZERO_ROWS = ("ours", "ours-sleep1", "ours-stop1", "ours-warm")
"""Rows of the scale-from-zero scenario: fresh machines, one sleeping engine, one
stopped machine, the automatic pool; each row's scale-from-zero TTFT is split by the
start path of the replica that served the request."""

ZERO_POLICY = {"min_workers": 0, "scale_to_zero": True, "scale_to_zero_timeout_sec": 120}

WORKLOAD = {
    "name": "Policy benchmark",
    "slug": "policy-bench",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "command": "--max-model-len 131072",
    "execution_policy": "autoscaling",
    "execution_policy_config": {
        "min_workers": 1,
        "max_workers": 64,
        "max_hourly_cost_usd": 400,
        "upper_allowed_latency_sec": 1.0,
        "lower_allowed_latency_sec": 0.2,
        "workers": {
            "source": "cloud",
            "cloud_pool": {
                "gpu_pool": ["NVIDIA L40S", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
            },
        },
    },
}


def cheapest_static(
    prepared: Prepared, *, most: int = 64, known: tuple[int, RunReport] | None = None
) -> RunReport | None:
    """The smallest fixed fleet whose replay meets the SLO: the best static fleet in
    hindsight (its size is chosen knowing the whole trace), a yardstick for what holding
    capacity through every burst costs. ``None`` if ``most`` replicas do not.

    From one replica up; given ``known``, a ``static-N`` run that met the SLO (static-peak
    on a day), from ``N - 1`` down until a fleet misses: on a day every try is a full
    day's replay, and the answer is a little below the peak's fleet, not near one."""
    if known is not None and known[1].slo_attainment >= ATTAINMENT_TARGET:
        best = known[1]
        for count in range(known[0] - 1, 0, -1):
            report = _static_run(prepared, count)
            if report.slo_attainment < ATTAINMENT_TARGET:
                break
            best = report
        return best
    for count in range(1, most + 1):
        report = _static_run(prepared, count)
        if report.slo_attainment >= ATTAINMENT_TARGET:
            return report
    return None


def _static_run(prepared: Prepared, count: int) -> RunReport:
    name = f"static-{count}"
    return run_policy(prepared, static_policy(prepared.workload.spec, replicas=count, name=name))


def _share(plan: OraclePlan) -> str:
    return "-" if plan.replayed is None else f"{plan.replayed.attainment:.2%}"


def _cold(cold: dict[str, ColdStarts]) -> str:
    """Scale-from-zero TTFT p95 by the path that served (``-`` when no request waited)."""
    if not cold:
        return ""
    parts = []
    for path, c in sorted(cold.items()):
        p95 = "-" if c.ttft_p95_s is None else f"{c.ttft_p95_s:.1f}s"
        parts.append(f"{path} {p95} ({c.requests})")
    return "  from zero p95: " + ", ".join(parts)


def _row(name: str, scale: float, spot: bool, report: RunReport) -> dict[str, object]:
    """Print one policy's line of the table; its JSON row."""
    p99 = report.ttft_p99_s
    ratio = report.cost_vs_oracle
    warm = ""
    if report.parks or report.resumes:
        resumes = "+".join(f"{n} {k}" for k, n in sorted(report.resumes.items())) or "0"
        warm = f"  {report.parks} parks, resumes {resumes}, parked ${report.parked_usd:.2f}"
    print(
        f"{name:<24} {scale:>3g} {'yes' if spot else 'no':<4} {report.policy:<13} "
        f"{report.slo_attainment:>7.2%} {report.flat_attainment:>7.2%} "
        f"{'-' if p99 is None else f'{p99:.2f}s':>9} {report.cost_usd:>8.2f} "
        f"{'-' if ratio is None else f'{ratio:.2f}':>7}{warm}{_cold(report.cold)}",
        flush=True,
    )
    return report.to_json(detail=False)


def zero_trace(requests: list[TraceRequest]) -> list[TraceRequest]:
    """Every :data:`ZERO_KEEP`-th request of the first :data:`ZERO_ON_S` of every
    :data:`ZERO_EVERY_S`."""
    return [r for r in requests if r.arrival_s % ZERO_EVERY_S < ZERO_ON_S][::ZERO_KEEP]


def _scale_from_zero(
    traces: Path, *, offers: Sequence[Offer], seed: int
) -> list[dict[str, object]]:
    """The scale-from-zero scenario (:data:`ZERO_TRACE`), on demand, no oracle: each
    row's TTFT of requests that arrived with no replica ready, by start path."""
    data = json.loads(json.dumps(WORKLOAD))
    data["execution_policy_config"].update(ZERO_POLICY)
    workload = sim_workload(WorkloadSpec.model_validate(data))
    name = f"{ZERO_TRACE.removesuffix('.csv')} waves"
    prepared = prepare(
        Scenario(
            workload=workload,
            offers=offers,
            requests=zero_trace(load_trace(traces / ZERO_TRACE)),
            trace_name=name,
            rate_scale=1.0,
            rate_mode=RateMode.OVERLAY,
            seed=seed,
            allow_spot=False,
        ),
        with_oracle=False,
    )
    return [_row(name, 1.0, False, run_policy(prepared, p)) for p in policies(prepared, ZERO_ROWS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traces", type=Path, default=Path(__file__).parent.parent / "traces")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=None,
        help="one rate scale for every trace instead of RATE_SCALES (a robustness check)",
    )
    parser.add_argument(
        "--scenarios",
        choices=["all", "hours", "days", "zero"],
        default="all",
        help="the hour traces (RATE_SCALES), the day-long scenarios (DAYS), both and the "
        "scale-from-zero scenario (all), or that one alone (zero)",
    )
    parser.add_argument(
        "--spot",
        choices=["both", "no", "yes"],
        default="both",
        help="each scenario on demand and with spot (both), or only one of them",
    )
    parser.add_argument(
        "--check-oracle",
        action="store_true",
        help="also print the full report of the oracle's replay (oracle-replay rows)",
    )
    args = parser.parse_args()
    workload = sim_workload(WorkloadSpec.model_validate(WORKLOAD))
    offers = load_catalog().offers
    rows: list[dict[str, object]] = []
    started = time.perf_counter()
    header = (
        f"{'trace':<24} {'x':>3} {'spot':<4} {'policy':<13} {'SLO':>7} {'flat':>7} "
        f"{'p99 TTFT':>9} {'cost $':>8} {'/oracle':>7}"
    )
    print(header)
    print("-" * len(header))
    scenarios: list[tuple[str, float, list[TraceRequest]]] = []
    if args.scenarios in ("all", "hours"):
        for name, scale in RATE_SCALES.items():
            scenarios.append((name, args.rate_scale or scale, load_trace(args.traces / name)))
    if args.scenarios in ("all", "days"):
        profile = load_rate_profile(args.traces / DAY_PROFILE)
        for name, (day_index, peak_rps, tokens) in DAYS.items():
            drawn = poisson_trace(
                profile.day(day_index).with_peak(peak_rps),
                load_trace(args.traces / tokens),
                seed=args.seed,
            )
            scenarios.append((name, 1.0, drawn))
    for name, scale, requests in scenarios:
        for spot in {"both": (False, True), "no": (False,), "yes": (True,)}[args.spot]:
            prepared = prepare(
                Scenario(
                    workload=workload,
                    offers=offers,
                    requests=requests,
                    trace_name=name,
                    rate_scale=scale,
                    rate_mode=RateMode.OVERLAY,
                    seed=args.seed,
                    allow_spot=spot,
                ),
                with_warm=True,
            )
            oracle = prepared.oracle
            replayed = oracle.replayed
            attained = "-" if replayed is None else f"{replayed.attainment:.2%}"
            print(
                f"{name:<24} {scale:>3g} {'yes' if spot else 'no':<4} {'oracle':<13} "
                f"{attained:>7} {'':>7} {'':>9} {oracle.cost_usd:>8.2f} {1.0:>7.2f}  "
                f"{oracle.offer.gpu_count} x {oracle.offer.gpu}, peak {max(oracle.fleet)}; "
                f"relaxed ${oracle.relaxed_cost_usd or oracle.cost_usd:.2f}, "
                f"{oracle.repair_rounds} repair round(s)"
                + ("" if oracle.meets_slo else "; its replay MISSES the SLO"),
                flush=True,
            )
            rows.append(
                {
                    "policy": "oracle",
                    "trace": name,
                    "rate_scale": scale,
                    "spot": spot,
                    "cost_usd": oracle.cost_usd,
                    "relaxed_cost_usd": oracle.relaxed_cost_usd,
                    "replayed_slo_attainment": None if replayed is None else replayed.attainment,
                    "replayed_billed_usd": None if replayed is None else replayed.billed_usd,
                    "meets_slo": oracle.meets_slo,
                    "repair_rounds": oracle.repair_rounds,
                    "offer": oracle.offer.key,
                    "fleet": list(oracle.fleet),
                }
            )
            is_day = name in DAYS
            made = policies(prepared, POLICY_NAMES)
            peak_count = next((p.bounds()[0] for p in made if p.name == "static-peak"), None)
            reports = [run_policy(prepared, p) for p in made]
            peak_report = next((r for r in reports if r.policy == "static-peak"), None)
            known = None
            if is_day and peak_report is not None and peak_count is not None:
                known = (peak_count, peak_report)
            best = cheapest_static(prepared, known=known)
            checks = [replay_oracle] if args.check_oracle else []
            extra = [best] if best is not None else []
            for report in itertools.chain(reports, extra, (check(prepared) for check in checks)):
                rows.append(_row(name, scale, spot, report))
            warm = prepared.warm_plan
            if warm is not None:
                print(
                    f"{name:<24} {scale:>3g} {'yes' if spot else 'no':<4} {'oracle-warm':<13} "
                    f"{_share(warm):>7} {'':>7} {'':>9} {warm.cost_usd:>8.2f} "
                    f"{warm.cost_usd / oracle.cost_usd:>7.2f}  {warm.stops} gap(s) bridged "
                    f"by a stopped machine, {warm.launches} fresh launch(es), "
                    f"{warm.repair_rounds} repair round(s)"
                    + ("" if warm.meets_slo else "; its replay MISSES the SLO"),
                    flush=True,
                )
                rows.append(
                    {
                        "policy": "oracle-warm",
                        "trace": name,
                        "rate_scale": scale,
                        "spot": spot,
                        "cost_usd": warm.cost_usd,
                        "stops": warm.stops,
                        "launches": warm.launches,
                        "meets_slo": warm.meets_slo,
                        "replayed_slo_attainment": (
                            None if warm.replayed is None else warm.replayed.attainment
                        ),
                    }
                )
            for policy in policies(prepared, WARM_ROWS):
                rows.append(_row(name, scale, spot, run_policy(prepared, policy)))
    if args.scenarios in ("all", "zero"):
        rows.extend(_scale_from_zero(args.traces, offers=offers, seed=args.seed))
    print(f"\n{len(rows)} runs in {time.perf_counter() - started:.0f} s (seed {args.seed})")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
