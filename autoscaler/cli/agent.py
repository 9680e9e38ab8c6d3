"""Private workers: ``autoscaler agent`` on a GPU box, ``autoscaler workers register|list``.

``autoscaler agent --controller URL --token TOKEN`` takes either a worker secret
(``ik_wrk_…``, from ``workers register``) or a control token (``ik_sdk_…``) with
``--project``, in which case it registers itself once and keeps the worker secret in
``--state-dir`` (mode 0600) for its next start.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from autoscaler.cli.output import emit, print_table
from autoscaler.cli.serve import log_options, setup_logging
from autoscaler.paths import default_data_dir

EXIT_API, EXIT_INPUT = 1, 2
RUNTIMES = ("auto", "docker", "process", "engine-sim")


def register(group: click.Group) -> None:
    group.add_command(agent)
    group.add_command(workers)


def _fail(message: str, *, code: int) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


# --- autoscaler agent -----------------------------------------------------------------


@click.command()
@click.option("--controller", required=True, envvar="AUTOSCALER_URL", help="Management API URL.")
@click.option(
    "--token",
    required=True,
    envvar="AUTOSCALER_WORKER_TOKEN",
    help="Worker secret (ik_wrk_…), or a control token (ik_sdk_…) with --project.",
)
@click.option("--project", "-p", envvar="AUTOSCALER_PROJECT", help="Project to register in.")
@click.option("--name", default="", help="Worker name when registering (default: its id).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: default_data_dir() / "agent",
    show_default="$AUTOSCALER_DATA_DIR/agent",
)
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="auto",
    show_default=True,
    help="How replicas run: docker containers, host processes, or engine-sim (demos).",
)
@click.option("--bind-host", default="0.0.0.0", show_default=True, help="Where engines listen.")
@click.option(
    "--advertise-host",
    default="127.0.0.1",
    show_default=True,
    help="How the gateway reaches this box's engines.",
)
@click.option("--heartbeat-seconds", type=float, default=10.0, show_default=True)
@click.option(
    "--time-scale", type=float, default=1.0, show_default=True, help="engine-sim speed-up."
)
@log_options
def agent(
    controller: str,
    token: str,
    project: str | None,
    name: str,
    state_dir: Path,
    runtime: str,
    bind_host: str,
    advertise_host: str,
    heartbeat_seconds: float,
    time_scale: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run this GPU box as a private worker: heartbeat, run the replicas assigned to it."""
    setup_logging(log_level, log_format)
    from providers.agent import Agent, AgentConfig, AgentError
    from providers.local import (
        DockerLauncher,
        EngineLauncher,
        EngineSimLauncher,
        HostProcessLauncher,
    )

    creds = asyncio.run(
        _credentials(controller, token, project=project, name=name, state_dir=state_dir)
    )
    chosen = _runtime(runtime)
    launchers: dict[str, EngineLauncher] = {
        "docker": DockerLauncher(),
        "process": HostProcessLauncher(),
        "engine-sim": EngineSimLauncher(time_scale=time_scale),
    }
    launcher = launchers[chosen]
    config = AgentConfig(
        controller_url=controller,
        worker_id=creds["worker_id"],
        secret=creds["secret"],
        state_dir=state_dir / "replicas",
        bind_host=bind_host,
        advertise_host=advertise_host,
        heartbeat_seconds=heartbeat_seconds,
    )
    click.echo(f"worker {config.worker_id} reporting to {controller} (runtime: {chosen})")
    try:
        from autoscaler.uvloop import run_async

        run_async(_serve(Agent(config, launcher=launcher)))
    except AgentError as exc:
        _fail(f"error: {exc}", code=EXIT_API)


async def _serve(running: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await running.run(stop)
    finally:
        await running.aclose()


def _runtime(choice: str) -> str:
    if choice != "auto":
        return choice
    docker = shutil.which("docker")
    if docker is None:
        return "process"
    try:
        works = subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return "docker" if works else "process"


async def _credentials(
    controller: str, token: str, *, project: str | None, name: str, state_dir: Path
) -> dict[str, str]:
    from providers.agent import register_worker, worker_id_from_secret

    worker_id = worker_id_from_secret(token)
    if worker_id is not None:
        return {"worker_id": worker_id, "secret": token}
    if not token.startswith("ik_sdk_"):
        _fail(
            "error: --token must be a worker secret (ik_wrk_…) or a control token (ik_sdk_…)",
            code=EXIT_INPUT,
        )
    saved = state_dir / "worker.json"
    if saved.exists():
        stored: dict[str, str] = json.loads(saved.read_text())
        return stored
    if not project:
        _fail("error: registering with a control token needs --project", code=EXIT_INPUT)
    try:
        creds = await register_worker(
            controller_url=controller, control_token=token, project=project, name=name
        )
    except httpx.HTTPError as exc:
        _fail(f"error: cannot register at {controller}: {exc}", code=EXIT_API)
    stored = {"worker_id": creds.worker_id, "secret": creds.secret}
    _save_credentials(saved, stored)
    click.echo(f"registered as {creds.worker_id}; credentials kept in {saved}")
    return stored


def _save_credentials(path: Path, creds: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(creds, handle)


# --- autoscaler workers ---------------------------------------------------------------

_url = click.option(
    "--url",
    envvar="AUTOSCALER_URL",
    default="http://127.0.0.1:8001",
    show_default=True,
    help="Management API.",
)
_project = click.option(
    "--project", "-p", envvar="AUTOSCALER_PROJECT", required=True, help="Project slug."
)


@click.group()
def workers() -> None:
    """Private GPU workers: register one, list them with their last heartbeat."""


def _call(method: str, url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    token = os.environ.get("AUTOSCALER_SDK_TOKEN", "")
    if not token:
        _fail(
            "error: no token: set AUTOSCALER_SDK_TOKEN (an ik_sdk_… control token)", code=EXIT_INPUT
        )
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )
    except httpx.TransportError as exc:
        _fail(f"error: cannot reach the management API at {url}: {exc}", code=EXIT_API)
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['message']} ({error['code']}, HTTP {response.status_code})"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}: {response.text[:200]}"
        _fail(f"error: {message}", code=EXIT_INPUT if response.status_code == 422 else EXIT_API)
    return response.json()


@workers.command(name="register")
@_url
@_project
@click.option("--name", default="", help="A name for the box (default: its id).")
@click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text")
def workers_register(url: str, project: str, name: str, output: str) -> None:
    """Register a worker; prints its id and secret (shown once)."""
    body = _call("POST", url, f"/v1/projects/{project}/workers", {"name": name})
    if output != "text":
        emit(body, output)
        return
    click.echo(f"worker {body['id']} registered in {project}.")
    click.echo("Secret (shown once; only its hash is stored):")
    click.echo(f"  autoscaler agent --controller {url} --token {body['secret']}")


@workers.command(name="list")
@_url
@_project
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
def workers_list(url: str, project: str, output: str) -> None:
    """Workers of a project, alive or lost, with their GPUs and last heartbeat."""
    items = _call("GET", url, f"/v1/projects/{project}/workers")["items"]
    if output != "table":
        emit(items, output)
        return
    rows = [
        [
            w["id"],
            w["name"],
            w["status"],
            w["last_heartbeat_at"] or "never",
            ", ".join(g["name"] for g in w["gpus"]) or "none",
            str(w["replicas"]),
        ]
        for w in items
    ]
    print_table(["ID", "NAME", "STATUS", "LAST HEARTBEAT", "GPUS", "REPLICAS"], rows)
