"""``autoscaler controller``: the controller role apart from the API and gateway."""

from __future__ import annotations

from pathlib import Path

import click

from autoscaler.cli.serve import (
    log_options,
    refuse_taken_ports,
    schedule_offset_option,
    setup_logging,
)
from autoscaler.paths import default_data_dir


def register(group: click.Group) -> None:
    group.add_command(controller)
    group.add_command(cluster_group)


@click.command()
@click.option(
    "--db",
    "database_url",
    envvar="AUTOSCALER_DB",
    help="SQLAlchemy async URL of the shared store; default SQLite in the data dir.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Controller configuration (YAML): providers, fleet ceiling, cluster id.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    show_default="$AUTOSCALER_DATA_DIR or ~/.local/share/autoscaler",
)
@click.option("--dry-run", is_flag=True, help="Compute and log decisions; buy nothing.")
@click.option(
    "--gateway-url",
    envvar="AUTOSCALER_GATEWAY_URL",
    help="Read TTFT and load signals from this gateway (GET /internal/signals).",
)
@click.option(
    "--gateway-token",
    envvar="AUTOSCALER_ADMIN_TOKEN",
    hidden=True,
    help="Deprecated: a token on a command line is visible in the process list.",
)
@click.option(
    "--gateway-token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="AUTOSCALER_ADMIN_TOKEN_FILE",
    help="A file holding the admin token for the gateway's signals (else $AUTOSCALER_ADMIN_TOKEN).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option(
    "--metrics-port", default=9464, show_default=True, help="Prometheus /metrics (0: off)."
)
@log_options
@schedule_offset_option
def controller(
    database_url: str | None,
    config_path: Path | None,
    data_dir: Path,
    dry_run: bool,
    gateway_url: str | None,
    gateway_token: str | None,
    gateway_token_file: Path | None,
    metrics_host: str,
    metrics_port: int,
    log_level: str,
    log_format: str,
    schedule_offset: float | None,
) -> None:
    """Run the controller alone: reconcile workloads against the providers.

    Several controllers may share one PostgreSQL store: one leads (an advisory lock) and
    the others stand by, or, with sharding.enabled in the config, each reconciles its
    share of the workloads (shard leases that move when a controller dies).
    """
    from autoscaler.config import ConfigError, load_config
    from autoscaler.controller import ControllerOptions, serve_controller
    from autoscaler.store.db import sqlite_url
    from autoscaler.uvloop import run_async

    setup_logging(log_level, log_format)
    try:
        config = load_config(config_path)
        if schedule_offset is not None:
            config = config.with_schedule_offset(schedule_offset)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if gateway_token_file is not None:
        gateway_token = gateway_token_file.read_text().strip()
    if gateway_url and not gateway_token:
        raise click.UsageError(
            "--gateway-url needs the admin token: $AUTOSCALER_ADMIN_TOKEN or --gateway-token-file"
        )
    refuse_taken_ports(metrics_host, {"--metrics-port": metrics_port})
    options = ControllerOptions(
        database_url=database_url or sqlite_url(data_dir),
        data_dir=data_dir,
        dry_run=dry_run,
        gateway_url=gateway_url,
        gateway_token=gateway_token,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
    )
    try:
        run_async(serve_controller(config, options))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("cluster")
def cluster_group() -> None:
    """The cloud resources a cluster holds besides its instances."""


@cluster_group.command("release")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The controller configuration naming the cluster and its providers.",
)
def release(config_path: Path) -> None:
    """Delete what the providers made for the cluster besides instances (the GCP
    firewall rule). Refused while any instance of the cluster still exists: delete the
    workloads and let the controller terminate their replicas first."""
    from autoscaler.config import ConfigError, load_config
    from autoscaler.uvloop import run_async
    from providers.errors import ProviderError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if config.providers.gcp is None:
        click.echo(f"cluster {config.cluster_id}: nothing to release (no provider made any)")
        return
    from providers.gcp import GcpProvider

    provider = GcpProvider(config.providers.gcp.provider_config())
    try:
        released = run_async(provider.release_cluster(config.cluster_id))
    except ProviderError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        provider.close()
    for what in released or ["nothing left to release"]:
        click.echo(f"cluster {config.cluster_id}: gcp {what}" + (" deleted" if released else ""))
