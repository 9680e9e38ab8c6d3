"""Server roles: ``autoscaler run`` (all in one process) and the roles apart."""

from __future__ import annotations

from pathlib import Path

import click

from autoscaler.paths import default_data_dir


def register(group: click.Group) -> None:
    group.add_command(run)
    group.add_command(gateway)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--api-port", default=8001, show_default=True, help="Management API port.")
@click.option("--gateway-port", default=8000, show_default=True, help="Gateway (data plane) port.")
@click.option(
    "--db",
    "database_url",
    envvar="AUTOSCALER_DB",
    help="SQLAlchemy async URL; default SQLite in the data dir.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    show_default="$AUTOSCALER_DATA_DIR or ~/.local/share/autoscaler",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Controller configuration (YAML).",
)
@click.option("--dry-run", is_flag=True, help="Compute and log decisions; buy nothing.")
def run(
    host: str,
    api_port: int,
    gateway_port: int,
    database_url: str | None,
    data_dir: Path,
    config_path: Path | None,
    dry_run: bool,
) -> None:
    """Run every role in one process: management API, controller, gateway, local worker."""
    from autoscaler.config import ConfigError, load_config
    from autoscaler.service import RunSettings, run_all
    from autoscaler.uvloop import run_async

    try:
        load_config(config_path)  # a bad file fails here, naming its key, before serving
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    settings = RunSettings(
        host=host,
        api_port=api_port,
        gateway_port=gateway_port,
        data_dir=data_dir,
        database_url=database_url,
        config_path=config_path,
        dry_run=dry_run,
    )
    try:
        run_async(run_all(settings))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, help="Gateway port.")
@click.option(
    "--db",
    "database_url",
    envvar="AUTOSCALER_DB",
    required=True,
    help="The shared store, e.g. postgresql+asyncpg://user@host/db.",
)
def gateway(host: str, port: int, database_url: str) -> None:
    """Run the gateway alone; routes and keys come from the shared store."""
    from autoscaler.uvloop import run_async
    from gateway.app import serve_gateway

    run_async(serve_gateway(database_url=database_url, host=host, port=port))
