"""The worker agent: a private GPU box runs the replicas its controller assigns to it.

Each tick the agent reads its assignments (``GET /v1/workers/{id}/assignments``), starts
the replicas it should run and is not running, stops those the controller wants
stopped, checks each running replica's health path, and heartbeats its GPUs and every
replica's state (``POST /v1/workers/{id}/heartbeat``). Replicas are processes of a
:class:`~providers.local.LocalProvider` (engine containers through ``docker run`` where
docker works, the engine command on the host, or engine-sim), so an agent restarted
mid-flight finds its replicas again from the provider's state files.

The protocol is level-based: a lost heartbeat or a restart of either side is repaired
by the next tick. A worker that stops heartbeating for :data:`HEARTBEAT_TIMEOUT` counts
as lost, and so do its replicas (:func:`worker_is_lost`).

A private worker cannot be stopped the way a cloud machine is (:func:`refuse_stop`): the
box is the user's, the controller does not own its power, and stopping it would save the
user nothing we bill. A replica on it ends (desired ``stopped``: its process is ended
and forgotten) or keeps running; a warm pool on private workers is made of sleeping
engines, not stopped machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from catalog.model import ProviderName
from providers.base import BootSpec, InstanceState, LaunchRequest, Terminal, instance_tags
from providers.local import EngineLauncher, LocalProvider, offer_for_this_machine

__all__ = [
    "HEARTBEAT_TIMEOUT",
    "WORKER_SECRET_PREFIX",
    "Agent",
    "AgentConfig",
    "GpuInfo",
    "WorkerCredentials",
    "parse_nvidia_smi",
    "probe_gpus",
    "refuse_stop",
    "register_worker",
    "worker_id_from_secret",
    "worker_is_lost",
]

log = logging.getLogger(__name__)

WORKER_SECRET_PREFIX = "ik_wrk_"
HEARTBEAT_TIMEOUT = timedelta(seconds=30)


def worker_is_lost(
    *, last_heartbeat_at: datetime | None, now: datetime, timeout: timedelta = HEARTBEAT_TIMEOUT
) -> bool:
    """True when a worker (and so each of its replicas) counts as lost at ``now``.

    A worker never heard from is lost; one heard from exactly ``timeout`` ago is not yet.
    """
    return last_heartbeat_at is None or now - last_heartbeat_at > timeout


def refuse_stop(worker_id: str, *, launch_id: str | None = None) -> Terminal:
    """The error for a request to stop (park) a replica's machine on a private worker:
    not supported, ever (see the module docstring). Callers raise it; retrying cannot
    help, so it is :class:`Terminal`."""
    what = f"replica {launch_id} on worker {worker_id}" if launch_id else f"worker {worker_id}"
    return Terminal(
        f"stopping {what}",
        "a private worker is the user's own machine: the controller cannot stop it, and "
        "stopping it would save nothing; end the replica, or let its engine sleep",
    )


def worker_id_from_secret(secret: str) -> str | None:
    """The ``wrk_…`` id a worker secret (``ik_wrk_<16 hex>_<random>``) belongs to."""
    if not secret.startswith(WORKER_SECRET_PREFIX):
        return None
    hex_id, _, rest = secret[len(WORKER_SECRET_PREFIX) :].partition("_")
    if len(hex_id) != 16 or not rest or any(c not in "0123456789abcdef" for c in hex_id):
        return None
    return f"wrk_{hex_id}"


# --- GPUs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuInfo:
    name: str
    memory_mib: int | None
    driver_version: str | None


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,driver_version
    --format=csv,noheader,nounits`` output."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            continue
        memory = int(parts[1]) if parts[1].isdigit() else None
        gpus.append(GpuInfo(name=parts[0], memory_mib=memory, driver_version=parts[2] or None))
    return gpus


def probe_gpus(nvidia_smi: str = "nvidia-smi") -> list[GpuInfo]:
    """This machine's NVIDIA GPUs; none where ``nvidia-smi`` is missing or fails."""
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        done = subprocess.run(
            [nvidia_smi, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else []


# --- registration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerCredentials:
    worker_id: str
    secret: str = field(repr=False)


async def register_worker(
    *, controller_url: str, control_token: str, project: str, name: str = ""
) -> WorkerCredentials:
    """Register a worker in ``project`` with a control token (``ik_sdk_…``)."""
    async with httpx.AsyncClient(base_url=controller_url, timeout=30.0) as client:
        response = await client.post(
            f"/v1/projects/{project}/workers",
            json={"name": name},
            headers={"Authorization": f"Bearer {control_token}"},
        )
    body = _json_or_raise(response, action=f"registering a worker in project {project!r}")
    return WorkerCredentials(worker_id=body["id"], secret=body["secret"])


# --- the agent ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Where the agent reports, who it is, and how it runs replicas.

    ``bind_host`` is where engines listen; ``advertise_host`` is how the gateway reaches
    them (this box's address on the network the gateway is on).
    """

    controller_url: str
    worker_id: str
    secret: str = field(repr=False)
    state_dir: Path = Path("~/.local/share/autoscaler/agent")
    bind_host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    heartbeat_seconds: float = 10.0
    stop_grace_seconds: float = 30.0


@dataclass(slots=True)
class _Replica:
    launch_id: str
    instance_id: str
    health_path: str
    address: str
    ready: bool = False
    stopped: bool = False


class AgentError(RuntimeError):
    """The controller refused the agent (a bad secret, an unknown worker)."""


class Agent:
    """Runs one worker's assignments; call :meth:`tick` (or :meth:`run`)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        launcher: EngineLauncher,
        gpu_probe: Callable[[], list[GpuInfo]] = probe_gpus,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = config
        self._secrets: dict[str, Mapping[str, str]] = {}
        self._gpu_probe = gpu_probe
        self._gpus: list[GpuInfo] | None = None
        self._client = client or httpx.AsyncClient(timeout=30.0)
        self._owns_client = client is None
        self._provider = LocalProvider(
            state_dir=config.state_dir.expanduser(),
            launcher=launcher,
            secrets=self._secrets_for,
            host=config.bind_host,
            grace_seconds=config.stop_grace_seconds,
            provider_name=ProviderName.PRIVATE,
        )
        self._replicas: dict[str, _Replica] = {}
        self._failed: dict[str, str] = {}

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``heartbeat_seconds`` until ``stop`` is set; errors are retried."""
        while not stop.is_set():
            try:
                await self.tick()
            except AgentError:
                raise
            except (httpx.HTTPError, OSError) as exc:
                log.warning("agent tick failed, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.heartbeat_seconds)

    async def tick(self) -> list[dict[str, Any]]:
        """Converge on the assignments once and heartbeat; returns the replica reports."""
        items = await self._get_assignments()
        await self._recover()
        for item in items:
            await self._converge(item)
        reports = await self._observe()
        await self._heartbeat(reports)
        return reports

    async def stop_all(self) -> None:
        """Stop every replica this agent runs (on shutdown of the box, not of the agent)."""
        for replica in list(self._replicas.values()):
            await self._provider.terminate(replica.instance_id)

    # -- assignments ----------------------------------------------------------------

    async def _converge(self, item: Mapping[str, Any]) -> None:
        launch_id = str(item["launch_id"])
        replica = self._replicas.get(launch_id)
        if item["desired"] == "stopped":
            if replica is not None and not replica.stopped:
                await self._provider.terminate(replica.instance_id)
                replica.stopped = True
            elif replica is None:
                self._failed.setdefault(launch_id, "stopped before it started")
            return
        if replica is not None:
            if item.get("boot"):  # adopted after a restart: learn its health path again
                replica.health_path = str(item["boot"]["health_path"])
            return
        if launch_id in self._failed:
            return
        if item.get("error") or item.get("boot") is None:
            self._failed[launch_id] = str(item.get("error") or "the assignment has no boot spec")
            return
        await self._start(item)

    async def _start(self, item: Mapping[str, Any]) -> None:
        launch_id = str(item["launch_id"])
        boot = _boot(item["boot"])
        self._secrets[launch_id] = {str(k): str(v) for k, v in item.get("secrets", {}).items()}
        gpus = self._gpus or []
        request = LaunchRequest(
            offer=offer_for_this_machine(
                gpu=gpus[0].name if gpus else "NVIDIA A10G",
                gpu_count=max(1, len(gpus)),
                zone=self.config.worker_id,
            ),
            spot=False,
            boot=boot,
            launch_id=launch_id,
            tags=instance_tags(
                cluster_id=self.config.worker_id,
                project=str(item["project"]),
                workload=str(item["workload"]),
                launch_id=launch_id,
            ),
        )
        try:
            instance = await self._provider.launch(request)
        except Exception as exc:  # reported to the controller; the agent keeps serving
            self._failed[launch_id] = str(exc)
            return
        finally:
            self._secrets.pop(launch_id, None)
        self._track(instance.instance_id, launch_id, boot.health_path, instance.private_address)

    async def _secrets_for(self, request: LaunchRequest) -> Mapping[str, str]:
        return self._secrets.get(request.launch_id, {})

    async def _recover(self) -> None:
        """After a restart, adopt the replicas the provider's state files still know."""
        if self._replicas:
            return
        for instance in await self._provider.list(self.config.worker_id):
            if not instance.state.is_gone:
                self._track(
                    instance.instance_id, instance.launch_id, "/health", instance.private_address
                )

    def _track(self, instance_id: str, launch_id: str, health: str, address: str | None) -> None:
        port = (address or ":0").rsplit(":", 1)[1]
        self._replicas[launch_id] = _Replica(
            launch_id=launch_id,
            instance_id=instance_id,
            health_path=health,
            address=f"{self.config.advertise_host}:{port}",
        )

    # -- observation and heartbeat --------------------------------------------------

    async def _observe(self) -> list[dict[str, Any]]:
        reports = [
            {"launch_id": launch_id, "state": "failed", "detail": reason}
            for launch_id, reason in self._failed.items()
        ]
        for replica in self._replicas.values():
            reports.append(await self._report(replica))
        return reports

    async def _report(self, replica: _Replica) -> dict[str, Any]:
        instance = await self._provider.describe(replica.instance_id)
        report: dict[str, Any] = {
            "launch_id": replica.launch_id,
            "instance_id": replica.instance_id,
            "address": replica.address,
        }
        if instance.state is not InstanceState.RUNNING:
            if replica.stopped:
                return {**report, "state": "stopped", "detail": "stopped as assigned"}
            status = self._provider.exit_status(replica.instance_id)
            detail = "the engine process exited" + (
                f" with status {status}" if status is not None else ""
            )
            return {**report, "state": "exited", "detail": detail}
        replica.ready = await self._healthy(instance.private_address, replica.health_path)
        return {**report, "state": "ready" if replica.ready else "starting"}

    async def _healthy(self, address: str | None, path: str) -> bool:
        try:
            response = await self._client.get(f"http://{address}{path}", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _heartbeat(self, reports: list[dict[str, Any]]) -> None:
        if self._gpus is None:
            self._gpus = await asyncio.to_thread(self._gpu_probe)
        body = {
            "gpus": [
                {"name": g.name, "memory_mib": g.memory_mib, "driver_version": g.driver_version}
                for g in self._gpus
            ],
            "address": self.config.advertise_host,
            "replicas": reports,
        }
        response = await self._client.post(self._url("heartbeat"), json=body, headers=self._auth())
        _json_or_raise(response, action=f"heartbeating as {self.config.worker_id}")
        # Reported once: the controller has confirmed these as gone.
        for report in reports:
            if report["state"] in ("exited", "stopped", "failed"):
                self._replicas.pop(report["launch_id"], None)
                self._failed.pop(report["launch_id"], None)

    async def _get_assignments(self) -> list[dict[str, Any]]:
        response = await self._client.get(self._url("assignments"), headers=self._auth())
        body = _json_or_raise(response, action=f"reading assignments of {self.config.worker_id}")
        items: list[dict[str, Any]] = body["items"]
        return items

    def _url(self, what: str) -> str:
        return f"{self.config.controller_url.rstrip('/')}/v1/workers/{self.config.worker_id}/{what}"

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.secret}"}


def _boot(raw: Mapping[str, Any]) -> BootSpec:
    return BootSpec(
        image=str(raw["image"]),
        command=tuple(str(part) for part in raw["command"]),
        port=int(raw["port"]),
        health_path=str(raw["health_path"]),
        model_id=str(raw["model_id"]),
        env={str(k): str(v) for k, v in raw.get("env", {}).items()},
        secret_env_names=tuple(str(n) for n in raw.get("secret_env_names", ())),
    )


def _json_or_raise(response: httpx.Response, *, action: str) -> dict[str, Any]:
    if response.status_code in (401, 403, 404):
        raise AgentError(
            f"{action}: the controller answered {response.status_code}: {_message(response)}"
        )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
