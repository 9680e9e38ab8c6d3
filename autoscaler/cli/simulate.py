"""``autoscaler simulate``: replay a request trace against a policy on a simulated cloud."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("simulate")
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV of arrival_s,input_tokens,output_tokens (see traces/README.md).",
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
    workload_path: Path,
    rate_scale: float,
    rate_mode: str,
    ttft_slo: float | None,
    seed: int,
    policy: str,
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
    """
    from autoscaler.sim.run import RateMode, Scenario, policies, prepare, run_policy
    from autoscaler.sim.trace import TraceError, load_trace
    from autoscaler.sim.workload import WorkloadFileError, load_workload
    from catalog.snapshot import load_catalog

    if not rate_scale > 0:
        raise click.BadParameter(f"must be > 0, got {rate_scale}", param_hint="--rate-scale")
    if ttft_slo is not None and not ttft_slo > 0:
        raise click.BadParameter(f"must be > 0 seconds, got {ttft_slo}", param_hint="--ttft-slo")
    try:
        requests = load_trace(trace_path)
        workload = load_workload(workload_path)
    except (TraceError, WorkloadFileError) as exc:
        raise click.ClickException(str(exc)) from None
    auto = workload.autoscaling
    allow_spot = spot if spot is not None else bool(auto and auto.allow_spot_instances)
    scenario = Scenario(
        workload=workload,
        offers=load_catalog().offers,
        requests=requests,
        trace_name=trace_path.name,
        rate_scale=rate_scale,
        rate_mode=RateMode(rate_mode),
        ttft_slo_s=ttft_slo,
        seed=seed,
        allow_spot=allow_spot,
    )
    try:
        prepared = prepare(scenario)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    report = run_policy(prepared, policies(prepared, [policy])[0])
    click.echo(report.summary())
    oracle = prepared.oracle
    click.echo(
        f"  oracle              ${oracle.cost_usd:.2f} on {oracle.offer.key} "
        f"({'spot' if oracle.spot else 'on-demand'}), peak {max(oracle.fleet, default=0)} replicas"
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
        }
        report_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        click.echo(f"report: {report_path}")
    if plot_path is not None:
        from autoscaler.sim.plot import plot_timeline

        ceiling = auto.max_hourly_cost_usd if auto else None
        plot_timeline(report, plot_path, ceiling_usd_per_hour=ceiling)
        click.echo(f"plot: {plot_path}")


def register(group: click.Group) -> None:
    """Add the ``simulate`` command to ``group``."""
    group.add_command(command)
