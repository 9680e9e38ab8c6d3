"""Server roles: ``autoscaler run`` (all in one process) and the roles apart."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import click

from autoscaler.paths import default_data_dir


def register(group: click.Group) -> None:
    group.add_command(run)
    group.add_command(gateway)


EXIT_PORT_IN_USE = 3
"""The exit status of a server role whose port is taken (one line says which)."""


def log_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--log-level`` and ``--log-format`` for a server role (``autoscaler.logs``)."""
    command = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        envvar="AUTOSCALER_LOG_FORMAT",
        help="Log lines as timestamped text or one JSON object per line.",
    )(command)
    return click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        envvar="AUTOSCALER_LOG_LEVEL",
    )(command)


def _offset(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from autoscaler.config import parse_offset

    try:
        return parse_offset(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def schedule_offset_option(command: Callable[..., None]) -> Callable[..., None]:
    """``--schedule-offset`` for the roles that run the controller."""
    return click.option(
        "--schedule-offset",
        metavar="OFFSET",
        default=None,
        callback=_offset,
        help="Read schedules this far ahead of the wall clock (+9h, -30m, 1h30m, seconds) "
        "to rehearse one; replicas are bought as the shifted schedule says. Overrides the "
        "config's schedule_offset_sec. Printed at start; not for production.",
    )(command)


def _workers(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise click.BadParameter(
            f"{value!r}: expected a count of at least 1, or 'auto' (one per core)"
        )
    return count


def workers_option(
    name: str, help_text: str
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A gateway worker count: ``N`` processes sharing the port, or ``auto`` (one per core)."""
    return click.option(
        name, "gateway_workers", metavar="N|auto", default=None, callback=_workers, help=help_text
    )


def setup_logging(level: str, fmt: str) -> None:
    """Logging for a server role; and every file the role creates (state, the catalog
    snapshot, local engines' files) is its owner's alone (umask 077)."""
    from autoscaler.logs import configure_logging

    os.umask(0o077)
    configure_logging(level=level, fmt="json" if fmt == "json" else "text")


def refuse_taken_ports(host: str, ports: dict[str, int]) -> None:
    """Exit with :data:`EXIT_PORT_IN_USE` and one line when a port is taken (before any
    state is touched, so no admin token is made for a service that cannot start)."""
    from autoscaler.service import port_in_use

    for what, port in ports.items():
        if port and port_in_use(host, port):
            click.echo(
                f"autoscaler: {host}:{port} is already in use ({what}); stop what holds it "
                "or choose another port",
                err=True,
            )
            sys.exit(EXIT_PORT_IN_USE)


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
@log_options
@click.option(
    "--engine",
    type=click.Choice(["auto", "sim", "vllm"]),
    default=None,
    help="What local replicas run: real vLLM where installed and the model is here "
    "(auto, the default), engine-sim (sim), or vLLM or fail (vllm). Overrides the config.",
)
@schedule_offset_option
@workers_option(
    "--gateway-workers",
    "Serve the gateway port with N processes (SO_REUSEPORT), or one per core (auto); "
    "overrides the config's gateway_workers (default 1: in this process).",
)
def run(
    host: str,
    api_port: int,
    gateway_port: int,
    database_url: str | None,
    data_dir: Path,
    config_path: Path | None,
    dry_run: bool,
    log_level: str,
    log_format: str,
    engine: Literal["auto", "sim", "vllm"] | None,
    schedule_offset: float | None,
    gateway_workers: int | Literal["auto"] | None,
) -> None:
    """Run every role in one process: management API, controller, gateway, local worker.

    SIGTERM or Ctrl-C stops it within 40 s whatever it is doing: servers stop accepting,
    the pass in flight gets 10 s to finish before it is cancelled, this machine's engines
    are stopped; a second signal stops it at once.
    """
    from autoscaler.config import ConfigError, load_config
    from autoscaler.service import RunSettings, run_all
    from autoscaler.uvloop import run_async
    from gateway.workers import WorkerPoolFailed

    setup_logging(log_level, log_format)
    try:
        config = load_config(config_path)  # a bad file fails here, naming its key
        if schedule_offset is not None:
            config.with_schedule_offset(schedule_offset)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    refuse_taken_ports(host, {"--api-port": api_port, "--gateway-port": gateway_port})
    settings = RunSettings(
        host=host,
        api_port=api_port,
        gateway_port=gateway_port,
        data_dir=data_dir,
        database_url=database_url,
        config_path=config_path,
        dry_run=dry_run,
        engine=engine,
        schedule_offset_sec=schedule_offset,
        gateway_workers=gateway_workers,
    )
    try:
        run_async(run_all(settings))
    except (ConfigError, WorkerPoolFailed) as exc:
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
@log_options
@workers_option(
    "--workers",
    "Serve the port with N processes (SO_REUSEPORT), or one per core (auto). Default 1.",
)
def gateway(
    host: str,
    port: int,
    database_url: str,
    log_level: str,
    log_format: str,
    gateway_workers: int | Literal["auto"] | None,
) -> None:
    """Run the gateway alone; routes and keys come from the shared store."""
    from autoscaler.uvloop import run_async
    from gateway.app import serve_gateway
    from gateway.workers import WorkerPoolFailed, resolve_workers

    setup_logging(log_level, log_format)
    refuse_taken_ports(host, {"--port": port})
    workers = resolve_workers(gateway_workers or 1)
    try:
        run_async(serve_gateway(database_url=database_url, host=host, port=port, workers=workers))
    except WorkerPoolFailed as exc:
        raise click.ClickException(str(exc)) from None
