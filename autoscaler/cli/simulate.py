"""``autoscaler simulate``: replay a request trace against a policy on a simulated cloud."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from autoscaler.sim.trace import TraceRequest


@click.command("simulate")
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV of arrival_s,input_tokens,output_tokens, Mooncake's JSONL (timestamp, "
    "input_length, output_length, hash_ids; a .jsonl name), or a rate profile "
    "(t_start_min,t_end_min,...,rpm_calibrated) to draw a day or week from "
    "(see traces/README.md).",
)
@click.option(
    "--tokens",
    "tokens_path",
    default=None,
    type=click.Path(path_type=Path),
    help="For a rate profile: the request trace whose (prompt, completion) token pairs "
    "the drawn requests take [default: the 2023 trace of the same service beside the "
    "profile, azure2023_conv.csv for azure2024_conv_*].",
)
@click.option(
    "--day",
    default=None,
    type=int,
    help="For a rate profile: replay this day (0 is the profile's first 24 h) [default: 1, "
    "or the whole profile with --week].",
)
@click.option("--week", is_flag=True, default=False, help="For a rate profile: replay all of it.")
@click.option(
    "--peak-rps",
    default=None,
    type=float,
    help="For a rate profile: scale it so the replayed span's busiest bin is this many "
    "requests/s [default: the profile's own rate times --rate-scale].",
)
@click.option(
    "--workload",
    "workload_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The workload spec (YAML or JSON), as for autoscaler apply.",
)
@click.option(
    "--rate-scale",
    default=1.0,
    show_default=True,
    type=float,
    help="X times the request rate (see --rate-mode).",
)
@click.option(
    "--rate-mode",
    default="overlay",
    show_default=True,
    type=click.Choice(["overlay", "compress"]),
    help="How --rate-scale raises the rate: overlay lays the trace over itself shifted "
    "(its real length and shape, X times the callers; what the benchmark uses); compress "
    "divides arrival times by X (X times as fast, 1/X as long).",
)
@click.option(
    "--ttft-slo",
    default=None,
    type=float,
    help="TTFT target in seconds [default: the workload's upper_allowed_latency_sec].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--policy",
    default="ours",
    show_default=True,
    type=click.Choice(["ours", "static-peak", "static-mean", "skyserve-qps", "knative-kpa"]),
)
@click.option(
    "--routing",
    default="prefix",
    show_default=True,
    type=click.Choice(["prefix", "least-work"]),
    help="The gateway's balancing: prefix (prefix-cache aware, what the gateway ships) or "
    "least-work (prefix-blind). Engines cache prompt prefixes either way; a trace without "
    "hash_ids (a CSV) has none to share.",
)
@click.option(
    "--spot/--no-spot",
    default=None,
    help="Allow spot instances [default: the workload's allow_spot_instances].",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the JSON report here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the PNG timeline here.",
)
def command(
    trace_path: Path,
    tokens_path: Path | None,
    day: int | None,
    week: bool,
    peak_rps: float | None,
    workload_path: Path,
    rate_scale: float,
    rate_mode: str,
    ttft_slo: float | None,
    seed: int,
    policy: str,
    routing: str,
    spot: bool | None,
    report_path: Path | None,
    plot_path: Path | None,
) -> None:
    """Replay a request trace against a policy on a simulated cloud: cost and SLO attainment.

    The controller's own decisions (autoscaler.decide) drive simulated replicas with the
    engine-sim latency model, behind the gateway's balancing, on a simulated cloud with
    catalog prices, lognormal boot times (median 3 min), stock-outs and spot interruptions.
    --rate-scale X runs X times the request rate: by default (--rate-mode overlay) the
    trace is laid over itself and keeps its length; --rate-mode compress speeds it up.
    Given a rate profile, a day (or with --week all of it) is drawn as a non-homogeneous
    Poisson process at the profile's rate (scaled by --rate-scale or to --peak-rps),
    with token lengths from --tokens.
    """
    from autoscaler.sim.prefix import Routing
    from autoscaler.sim.profile import is_rate_profile
    from autoscaler.sim.run import RateMode, Scenario, compare_forked
    from autoscaler.sim.trace import TraceError, load_trace
    from autoscaler.sim.workload import WorkloadFileError, load_workload
    from catalog.snapshot import load_catalog

    if not rate_scale > 0:
        raise click.BadParameter(f"must be > 0, got {rate_scale}", param_hint="--rate-scale")
    if ttft_slo is not None and not ttft_slo > 0:
        raise click.BadParameter(f"must be > 0 seconds, got {ttft_slo}", param_hint="--ttft-slo")
    profile_only = (tokens_path, day, peak_rps)
    try:
        workload = load_workload(workload_path)
        if is_rate_profile(trace_path):
            requests, trace_label = _draw(
                trace_path,
                tokens_path=tokens_path,
                day=day,
                week=week,
                peak_rps=peak_rps,
                rate_scale=rate_scale,
                seed=seed,
            )
            rate_scale = 1.0  # applied to the profile's rate
        elif any(v is not None for v in profile_only) or week:
            raise click.UsageError(
                "--tokens, --day, --week and --peak-rps apply to a rate profile only; "
                f"{trace_path} is a request trace"
            )
        else:
            requests, trace_label = load_trace(trace_path), trace_path.name
    except (TraceError, WorkloadFileError) as exc:
        raise click.ClickException(str(exc)) from None
    auto = workload.autoscaling
    allow_spot = spot if spot is not None else bool(auto and auto.allow_spot_instances)
    scenario = Scenario(
        workload=workload,
        offers=load_catalog().offers,
        requests=requests,
        trace_name=trace_label,
        rate_scale=rate_scale,
        rate_mode=RateMode(rate_mode),
        ttft_slo_s=ttft_slo,
        seed=seed,
        allow_spot=allow_spot,
        routing=Routing(routing),
    )
    try:
        # The oracle is planned in a forked process while the policy replays here.
        prepared, (report,) = compare_forked(scenario, [policy])
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report.summary())
    # Our controller on a spec with a warm pool is measured against the oracle that may
    # stop machines too; every other policy against the oracle of fresh machines.
    warm = prepared.warm_plan if policy == "ours" else None
    oracle = warm or prepared.oracle
    stops = f", {oracle.stops} gap(s) bridged by a stopped machine" if warm else ""
    click.echo(
        f"  oracle              ${oracle.cost_usd:.2f} on {oracle.offer.key} "
        f"({'spot' if oracle.spot else 'on-demand'}), peak {max(oracle.fleet, default=0)} replicas"
        + stops
    )
    if report_path is not None:
        data = report.to_json()
        data["oracle"] = {
            "cost_usd": oracle.cost_usd,
            "offer": oracle.offer.key,
            "spot": oracle.spot,
            "slot_s": oracle.slot_s,
            "fleet": list(oracle.fleet),
            "gpu_hours": oracle.gpu_hours,
            "warm_pools": warm is not None,
            "stops": oracle.stops,
        }
        report_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        click.echo(f"report: {report_path}")
    if plot_path is not None:
        from autoscaler.sim.plot import plot_timeline

        ceiling = auto.max_hourly_cost_usd if auto else None
        plot_timeline(report, plot_path, ceiling_usd_per_hour=ceiling)
        click.echo(f"plot: {plot_path}")


def _draw(
    path: Path,
    *,
    tokens_path: Path | None,
    day: int | None,
    week: bool,
    peak_rps: float | None,
    rate_scale: float,
    seed: int,
) -> tuple[list[TraceRequest], str]:
    """A day (or the whole profile) drawn from the rate profile at ``path``, and its label."""
    from autoscaler.sim.profile import load_rate_profile, poisson_trace
    from autoscaler.sim.trace import load_trace

    if week and day is not None:
        raise click.UsageError("--day and --week exclude each other")
    if peak_rps is not None and not peak_rps > 0:
        raise click.BadParameter(f"must be > 0 requests/s, got {peak_rps}", param_hint="--peak-rps")
    profile = load_rate_profile(path)
    if not week:
        try:
            profile = profile.day(1 if day is None else day)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--day") from None
    profile = profile.with_peak(peak_rps) if peak_rps is not None else profile.scaled(rate_scale)
    tokens = tokens_path if tokens_path is not None else default_tokens(path)
    requests = poisson_trace(profile, load_trace(tokens), seed=seed)
    if not requests:
        raise click.ClickException(f"{path}: the profile's rate draws no requests")
    span = "week" if week else f"day {1 if day is None else day}"
    label = f"{path.name} {span}, peak {profile.peak_rps:.3g} req/s, tokens {tokens.name}"
    return requests, label


def default_tokens(profile_path: Path) -> Path:
    """The 2023 request trace of the same service beside a 2024 rate profile
    (``azure2024_conv_*`` -> ``azure2023_conv.csv``)."""
    parts = profile_path.name.split("_")
    if len(parts) >= 2 and parts[0].startswith("azure"):
        candidate = profile_path.parent / f"azure2023_{parts[1]}.csv"
        if candidate.exists():
            return candidate
    raise click.UsageError(
        f"no token source for {profile_path.name}: pass --tokens with a request trace"
    )


def register(group: click.Group) -> None:
    """Add the ``simulate`` command to ``group``."""
    group.add_command(command)
