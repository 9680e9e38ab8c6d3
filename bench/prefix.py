"""Prefix-aware routing against prefix-blind least work, side by side, one run.

Two scenarios, each replayed twice with the same policy (the shipped controller,
``ours``), seed and simulated cloud, once per gateway routing
(``autoscaler.sim.prefix.Routing``); engines cache prompt prefixes either way:

* **Mooncake**: ``traces/mooncake_synthetic.jsonl`` as published (its ``hash_ids``),
  at its own rate (3,993 requests over 17 minutes, mean prompt 15k tokens).
* **Conversation**: the first :data:`CONVERSATION_SECONDS` of Azure's 2023 conversation
  trace laid out as multi-turn sessions with shared system prompts
  (``autoscaler.sim.sessions``: the trace has no prompt contents, so the sharing is a
  stated model, not a measurement).

Then, to separate what routing does from what the cheaper fleet does, a fixed fleet
(``static-N``, ``N`` the least-work run's mean fleet size, rounded up) is replayed under
both routings: the same replicas, so any TPOT change there is the router's. Last, per
routing, the smallest fixed fleet that meets the SLO (``bench.policy.cheapest_static``,
sized knowing the whole trace): how many replicas the cache saves when no controller
dynamics (boots, scale-down windows) stand in the way.

Printed per run: prefix-cache hit rate (share of prompt tokens found cached), cost,
SLO attainment, TPOT (p50 and mean), and the hot-spot ratio (the highest per-minute
ratio of the busiest replica's mean outstanding requests, and prefill work, to the
fleet's mean); then the prefix run over the least-work run for each scenario, and the
issue's bar: at equal or better attainment at least 25 % lower cost, TPOT no more than
5 % worse, the busiest replica within 1.3x the mean in every minute.

    .venv/bin/python -m bench.prefix [--seed N] [--conversation-seconds S] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from autoscaler.sim.policies import static_policy
from autoscaler.sim.prefix import Routing
from autoscaler.sim.report import RunReport
from autoscaler.sim.run import Prepared, RateMode, Scenario, policies, prepare, run_policy
from autoscaler.sim.sessions import conversation_sessions
from autoscaler.sim.trace import TraceRequest, load_trace
from autoscaler.sim.workload import SimWorkload, sim_workload
from autoscaler.spec import WorkloadSpec
from bench.policy import WORKLOAD, cheapest_static
from catalog.snapshot import load_catalog

TRACES = Path(__file__).parent.parent / "traces"

CONVERSATION_SECONDS = 1800.0
"""The conversation scenario's slice of the hour-long trace (about 9,000 requests)."""

COST_CUT = 0.25
TPOT_SLACK = 0.05
HOT_SPOT_FACTOR = 1.3


@dataclass(frozen=True, slots=True)
class Pair:
    """One scenario's runs under both routings."""

    scenario: str
    blind: RunReport
    aware: RunReport

    @property
    def cost_ratio(self) -> float:
        return self.aware.cost_usd / self.blind.cost_usd if self.blind.cost_usd else math.nan

    @property
    def tpot_ratio(self) -> float:
        return _ratio(self.aware.tpot_mean_s, self.blind.tpot_mean_s)


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def scenarios(
    *, seed: int, conversation_s: float, workload: SimWorkload
) -> dict[str, list[TraceRequest]]:
    conv = [r for r in load_trace(TRACES / "azure2023_conv.csv") if r.arrival_s < conversation_s]
    return {
        "mooncake (hash_ids)": load_trace(TRACES / "mooncake_synthetic.jsonl"),
        f"conversation sessions ({conversation_s / 60:.0f} min)": conversation_sessions(
            conv, seed=seed, max_context_tokens=workload.max_context_tokens
        ),
    }


def _prepare(
    workload: SimWorkload, requests: list[TraceRequest], name: str, *, seed: int, routing: Routing
) -> Prepared:
    return prepare(
        Scenario(
            workload=workload,
            offers=load_catalog().offers,
            requests=requests,
            trace_name=name,
            rate_mode=RateMode.OVERLAY,
            seed=seed,
            routing=routing,
        )
    )


def run_pair(
    workload: SimWorkload, requests: list[TraceRequest], name: str, *, seed: int
) -> tuple[Pair, Pair, Pair | None]:
    """The scenario under ``ours`` with both routings, then a fixed fleet with both, then
    the smallest fixed fleet meeting the SLO under each (``None`` if either has none)."""
    prepared = {r: _prepare(workload, requests, name, seed=seed, routing=r) for r in Routing}
    ours = {r: run_policy(p, policies(p, ["ours"])[0]) for r, p in prepared.items()}
    blind = ours[Routing.LEAST_WORK]
    size = max(1, math.ceil(blind.gpu_hours / max(blind.duration_s / 3600.0, 1e-9)))
    fixed = {
        r: run_policy(p, static_policy(p.workload.spec, replicas=size, name=f"static-{size}"))
        for r, p in prepared.items()
    }
    hindsight = {r: cheapest_static(p, most=32) for r, p in prepared.items()}
    blind_best, aware_best = hindsight[Routing.LEAST_WORK], hindsight[Routing.PREFIX]
    return (
        Pair(name, ours[Routing.LEAST_WORK], ours[Routing.PREFIX]),
        Pair(name, fixed[Routing.LEAST_WORK], fixed[Routing.PREFIX]),
        None if blind_best is None or aware_best is None else Pair(name, blind_best, aware_best),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _row(report: RunReport) -> str:
    return (
        f"  {report.policy:<10} {report.routing:<10} {report.prefix_hit_rate:>7.1%} "
        f"{report.cost_usd:>9.2f} {report.slo_attainment:>8.2%} "
        f"{_ms(report.tpot_p50_s):>8} {_ms(report.tpot_mean_s):>9} "
        f"{report.hot_spot_requests:>8.2f}x {report.hot_spot_work:>8.2f}x "
        f"{_ms(report.ttft_p50_s):>8} {_ms(report.ttft_p95_s):>8}"
    )


HEADER = (
    f"  {'policy':<10} {'routing':<10} {'hits':>7} {'cost $':>9} {'attain':>8} "
    f"{'TPOT p50':>8} {'TPOT mean':>9} {'hot req':>9} {'hot work':>9} "
    f"{'TTFT p50':>8} {'TTFT p95':>8}   (times in ms)"
)


def verdict(pair: Pair) -> list[str]:
    """The issue's bar for one scenario's ``ours`` pair, each clause with its numbers."""
    a, b = pair.aware, pair.blind
    cut = 1.0 - pair.cost_ratio
    tpot = pair.tpot_ratio - 1.0
    return [
        f"  cost {cut:+.1%} lower (bar: >= {COST_CUT:.0%}) "
        f"-> {'met' if cut >= COST_CUT else 'NOT met'}",
        f"  attainment {a.slo_attainment:.2%} vs {b.slo_attainment:.2%} "
        f"-> {'met' if a.slo_attainment >= b.slo_attainment else 'NOT met'}",
        f"  TPOT mean {tpot:+.1%} (bar: <= +{TPOT_SLACK:.0%}) "
        f"-> {'met' if tpot <= TPOT_SLACK else 'NOT met'}",
        f"  busiest/mean outstanding requests, worst minute {a.hot_spot_requests:.2f}x, "
        f"prefill work {a.hot_spot_work:.2f}x (bar: <= {HOT_SPOT_FACTOR}x) "
        f"-> requests {'met' if a.hot_spot_requests <= HOT_SPOT_FACTOR else 'NOT met'}, "
        f"work {'met' if a.hot_spot_work <= HOT_SPOT_FACTOR else 'NOT met'}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conversation-seconds", type=float, default=CONVERSATION_SECONDS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    workload = sim_workload(WorkloadSpec.model_validate(WORKLOAD))
    started = time.perf_counter()
    results: list[dict[str, object]] = []
    for name, requests in scenarios(
        seed=args.seed, conversation_s=args.conversation_seconds, workload=workload
    ).items():
        ours, fixed, best = run_pair(workload, requests, name, seed=args.seed)
        print(f"{name}: {len(requests)} requests, seed {args.seed}")
        print(HEADER)
        pairs = [ours, fixed] if best is None else [ours, fixed, best]
        for pair in pairs:
            print(_row(pair.blind))
            print(_row(pair.aware))
        print(
            f"  prefix / least-work: ours cost {ours.cost_ratio:.2f}x, TPOT mean "
            f"{ours.tpot_ratio:.2f}x; {fixed.blind.policy} TPOT mean {fixed.tpot_ratio:.2f}x"
            + (
                ""
                if best is None
                else f"; smallest fleet meeting the SLO {best.blind.policy} vs "
                f"{best.aware.policy} (cost {best.cost_ratio:.2f}x)"
            )
        )
        print("\n".join(verdict(ours)))
        print()
        results += [
            {"scenario": name, **r.to_json(detail=False)}
            for pair in pairs
            for r in (pair.blind, pair.aware)
        ]
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
