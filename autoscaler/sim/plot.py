"""The run's timeline as a PNG: request rate, replicas by phase, TTFT p95 against the
target, and spend against the ceiling. Needs matplotlib (the ``sim`` extra)."""

from __future__ import annotations

from pathlib import Path

from autoscaler.sim.report import RunReport

LONG_RUN_H = 3.0
"""Runs longer than this many hours are drawn against hours, on a wider figure."""

CEILING_OFF_SCALE = 4.0
"""A spend ceiling more than this many times the highest spend is named in the legend
instead of drawn: drawn, it flattens a day's spend into a line along the axis."""


def plot_timeline(report: RunReport, path: Path, *, ceiling_usd_per_hour: float | None) -> None:
    """Write ``report``'s timeline to ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - the sim extra is installed by the gate
        raise RuntimeError("--plot needs matplotlib: pip install 'gpu-autoscaler[sim]'") from exc
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    rows = report.timeline
    span_h = rows[-1]["t"] / 3600.0 if rows else 0.0
    # Past a few hours the axis is in hours, the figure wider (up to 24 in: a week at
    # 100 dpi is 2,400 pixels for 60,000 samples), ticks on whole hours, lines thinner.
    long_run = span_h > LONG_RUN_H
    unit = 3600.0 if long_run else 60.0
    minutes = [row["t"] / unit for row in rows]
    width = min(max(10.0, span_h * 0.6), 24.0) if long_run else 10.0
    line = 0.6 if long_run else 1.5
    fig, axes = plt.subplots(4, 1, figsize=(width, 10), sharex=True)
    rate, fleet, ttft, spend = axes
    rate.plot(minutes, [row["request_rate"] for row in rows], color="tab:blue", linewidth=line)
    rate.set_ylabel("requests/s\n(60 s window)")
    rate.set_title(
        f"{report.policy} on {report.trace} at {report.rate_scale:g}x the request rate: "
        f"SLO {report.slo_attainment:.2%}, ${report.cost_usd:.2f}"
    )
    fleet.stackplot(
        minutes,
        [row["ready"] for row in rows],
        [row["booting"] for row in rows],
        [row["draining"] for row in rows],
        labels=["ready", "booting", "draining"],
        colors=["tab:green", "tab:orange", "tab:gray"],
        step="post",
    )
    fleet.step(
        minutes,
        [row["desired"] for row in rows],
        where="post",
        color="black",
        linewidth=0.8,
        label="desired",
    )
    fleet.set_ylabel("replicas")
    fleet.yaxis.set_major_locator(MaxNLocator(integer=True))
    fleet.legend(loc="upper left", fontsize="small")
    p95 = [row["ttft_p95_s"] if row["ttft_p95_s"] is not None else float("nan") for row in rows]
    ttft.plot(minutes, p95, color="tab:red", linewidth=line, label="TTFT p95 (60 s)")
    ttft.axhline(report.ttft_target_s, color="black", linestyle="--", label="target")
    ttft.set_yscale("log")
    ttft.set_ylabel("seconds")
    ttft.legend(loc="upper left", fontsize="small")
    spent = [row["usd_per_hour"] for row in rows]
    spend.step(minutes, spent, where="post", color="tab:purple", label="$/h")
    highest = max(spent, default=0.0)
    if ceiling_usd_per_hour is not None:
        if ceiling_usd_per_hour <= CEILING_OFF_SCALE * highest:
            spend.axhline(ceiling_usd_per_hour, color="black", linestyle="--", label="ceiling")
        else:
            spend.plot([], [], " ", label=f"ceiling ${ceiling_usd_per_hour:g}/h (off scale)")
            spend.set_ylim(0.0, highest * 1.15 if highest > 0 else 1.0)
    spend.set_ylabel("$/h")
    spend.set_xlabel("hours (simulated)" if long_run else "minutes (simulated)")
    if long_run:
        spend.xaxis.set_major_locator(MultipleLocator(2.0 if span_h <= 48 else 12.0))
        spend.xaxis.set_minor_locator(MultipleLocator(1.0 if span_h <= 48 else 6.0))
        for axis in axes:
            axis.grid(True, which="major", axis="x", linewidth=0.4, alpha=0.5)
    spend.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
