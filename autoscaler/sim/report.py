"""What a run reports: requests served, SLO attainment, TTFT percentiles, cost, events."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from autoscaler.sim.gateway import Outcome
from autoscaler.sim.workload import SloRule
from autoscaler.sim.world import Outcomes


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in (0, 1]) of sorted ``values``."""
    if not values:
        return None
    return values[max(math.ceil(q * len(values)) - 1, 0)]


@dataclass(frozen=True, slots=True)
class ColdStarts:
    """Scale-from-zero requests served by one start path: how many, and their TTFT."""

    requests: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None


@dataclass(frozen=True, slots=True)
class RunReport:
    """One policy's run on one trace."""

    policy: str
    trace: str
    rate_scale: float
    seed: int
    spot: bool
    ttft_target_s: float
    requests: int
    served: int
    refused_too_long: int
    rejected_503: int
    cut: int
    slo_attainment: float
    """Share of requests (refused ones excepted) with TTFT <= max(target, 1.5 x prefill)."""
    flat_attainment: float
    """Share of requests (refused ones excepted) with TTFT <= target."""
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    cost_usd: float
    gpu_hours: float
    duration_s: float
    scale_events: dict[str, int]
    oracle_cost_usd: float | None = None
    rate_mode: str = "compress"
    """How the rate was scaled: ``overlay`` (trace laid over itself) or ``compress``."""
    routing: str = "prefix"
    """The gateway's balancing (``autoscaler.sim.prefix.Routing``)."""
    prefix_hit_rate: float = 0.0
    """Share of prompt tokens the engines found in their prefix caches."""
    tpot_p50_s: float | None = None
    tpot_mean_s: float | None = None
    """Time per output token after the first, over served requests of two or more."""
    hot_spot_requests: float = 0.0
    """Highest per-minute ratio of the busiest replica's mean outstanding requests to the
    fleet mean (``autoscaler.sim.prefix.HotSpotMeter``)."""
    hot_spot_work: float = 0.0
    """The same for outstanding prefill work (prompt tokens awaiting their first token)."""
    parked_usd: float = 0.0
    """Of ``cost_usd``, what parked replicas cost (asleep: the machine; stopped: its disk)."""
    parks: int = 0
    resumes: dict[str, int] = field(default_factory=dict)
    """Resumes by path (``wake``: a sleeping engine; ``start``: a stopped machine)."""
    start_p50_s: dict[str, float] = field(default_factory=dict)
    """Median seconds from asking to ready per start path (``fresh``, ``start``,
    ``wake``), over the boots of the run."""
    cold: dict[str, ColdStarts] = field(default_factory=dict)
    """Requests that arrived with no replica ready (scale from zero), by the start path of
    the replica that served them (``unserved``: never served)."""
    timeline: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cost_vs_oracle(self) -> float | None:
        if not self.oracle_cost_usd:
            return None
        return self.cost_usd / self.oracle_cost_usd

    def to_json(self, *, detail: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["cost_vs_oracle"] = self.cost_vs_oracle
        if not detail:
            data.pop("timeline")
            data.pop("events")
        return data

    def summary(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        ratio = self.cost_vs_oracle
        events = ", ".join(f"{n} {k}" for k, n in sorted(self.scale_events.items())) or "none"
        lines = [
            f"policy {self.policy} on {self.trace} at {self.rate_scale:g}x the request rate "
            f"({self._scaling()}), spot {'allowed' if self.spot else 'off'}, "
            f"seed {self.seed}",
            f"  requests served     {self.served} of {self.requests} "
            f"({self.refused_too_long} refused: longer than the model's context; "
            f"{self.rejected_503} rejected 503; {self.cut} cut by a lost replica)",
            f"  SLO attainment      {self.slo_attainment:.2%} within max({self.ttft_target_s:g}s, "
            f"1.5 x prefill); flat {self.flat_attainment:.2%} within {self.ttft_target_s:g}s",
            f"  TTFT p50/p95/p99    {ms(self.ttft_p50_s)} / {ms(self.ttft_p95_s)} / "
            f"{ms(self.ttft_p99_s)}",
            f"  cost                ${self.cost_usd:.2f} over {self.duration_s / 60:.1f} min"
            + (
                "" if ratio is None else f" ({ratio:.2f}x the oracle's ${self.oracle_cost_usd:.2f})"
            ),
            f"  GPU-hours           {self.gpu_hours:.2f}",
            f"  routing             {self.routing}: prefix cache hits "
            f"{self.prefix_hit_rate:.1%} of prompt tokens; TPOT p50 {ms(self.tpot_p50_s)}, "
            f"mean {ms(self.tpot_mean_s)}; busiest replica / fleet mean per minute: "
            f"{self.hot_spot_requests:.2f}x requests, {self.hot_spot_work:.2f}x work",
            f"  scale events        {events}",
        ]
        if self.parks or self.resumes or self.parked_usd:
            resumes = ", ".join(f"{n} {k}" for k, n in sorted(self.resumes.items())) or "none"
            lines.append(
                f"  warm pool           {self.parks} parks, resumes: {resumes}; parked "
                f"replicas cost ${self.parked_usd:.2f} of the ${self.cost_usd:.2f}"
            )
        if self.start_p50_s:
            starts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.start_p50_s.items()))
            lines.append(f"  start p50           {starts}")
        if self.cold:
            cold = "; ".join(
                f"{path}: {c.requests} requests, TTFT p95 "
                + ("-" if c.ttft_p95_s is None else f"{c.ttft_p95_s:.2f} s")
                for path, c in sorted(self.cold.items())
            )
            lines.append(f"  scale from zero     {cold}")
        return "\n".join(lines)

    def _scaling(self) -> str:
        if self.rate_mode == "overlay":
            return f"trace overlaid {self.rate_scale:g}x on its own time axis"
        return f"time compressed {self.rate_scale:g}x"


def build_report(
    *,
    outcomes: Outcomes,
    slo: SloRule,
    policy: str,
    trace: str,
    rate_scale: float,
    seed: int,
    spot: bool,
    oracle_cost_usd: float | None,
    rate_mode: str = "compress",
    routing: str = "prefix",
) -> RunReport:
    records = outcomes.records
    counted = [r for r in records if r.outcome is not Outcome.REFUSED]
    ttfts = sorted(r.ttft_s for r in counted if r.ttft_s is not None)
    bounds = slo.bounds()
    met = sum(1 for r in counted if r.ttft_s is not None and r.ttft_s <= bounds[r.input_tokens])
    flat = sum(1 for r in counted if r.ttft_s is not None and r.ttft_s <= slo.target_s)
    kinds = Counter(e.kind for e in outcomes.events)
    tpots = sorted(r.tpot_s for r in records if not math.isnan(r.tpot_s))
    by_path: dict[str, list[float]] = {}
    counts: Counter[str] = Counter()
    for r in counted:
        if r.cold_path is not None:
            counts[r.cold_path] += 1
            if r.ttft_s is not None:
                by_path.setdefault(r.cold_path, []).append(r.ttft_s)
    cold = {
        path: ColdStarts(
            requests=n,
            ttft_p50_s=percentile(sorted(by_path.get(path, [])), 0.50),
            ttft_p95_s=percentile(sorted(by_path.get(path, [])), 0.95),
        )
        for path, n in counts.items()
    }
    starts = {
        path: percentile(times, 0.50) for path, times in outcomes.start_times.items() if times
    }
    return RunReport(
        policy=policy,
        trace=trace,
        rate_scale=rate_scale,
        seed=seed,
        spot=spot,
        ttft_target_s=slo.target_s,
        requests=len(records),
        served=sum(1 for r in records if r.outcome in (Outcome.SERVED, Outcome.CUT)),
        refused_too_long=len(records) - len(counted),
        rejected_503=sum(1 for r in records if r.outcome is Outcome.REJECTED),
        cut=sum(1 for r in records if r.outcome is Outcome.CUT),
        slo_attainment=met / len(counted) if counted else 1.0,
        flat_attainment=flat / len(counted) if counted else 1.0,
        ttft_p50_s=percentile(ttfts, 0.50),
        ttft_p95_s=percentile(ttfts, 0.95),
        ttft_p99_s=percentile(ttfts, 0.99),
        cost_usd=outcomes.cost_usd,
        gpu_hours=outcomes.gpu_hours,
        duration_s=outcomes.end_s,
        scale_events=dict(kinds),
        oracle_cost_usd=oracle_cost_usd,
        rate_mode=rate_mode,
        routing=routing,
        prefix_hit_rate=(
            outcomes.prefix_hits_tokens / outcomes.prefix_queries_tokens
            if outcomes.prefix_queries_tokens
            else 0.0
        ),
        tpot_p50_s=percentile(tpots, 0.50),
        tpot_mean_s=sum(tpots) / len(tpots) if tpots else None,
        hot_spot_requests=outcomes.hot_spot_requests,
        hot_spot_work=outcomes.hot_spot_work,
        parked_usd=outcomes.parked_usd,
        parks=kinds.get("park", 0),
        resumes=dict(outcomes.resumes),
        start_p50_s={k: v for k, v in starts.items() if v is not None},
        cold=cold,
        timeline=[asdict(s) for s in outcomes.timeline],
        events=[asdict(e) for e in outcomes.events],
    )
