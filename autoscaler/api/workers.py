"""Private workers: registration, heartbeats and assignments (see docs/workers.md).

A user registers a GPU box with a control token and gets a ``wrk_…`` id and a worker
secret (``ik_wrk_…``, shown once, stored as a SHA-256 hash). The box's agent then
authenticates with that secret only: it heartbeats its GPUs and its replicas' states,
and reads its assignments. An assignment is an ``instances`` ledger row whose
``worker_id`` is the worker and whose termination is not yet confirmed.
"""

from __future__ import annotations

import hmac
import os
import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.api.deps import Project, Session, State
from autoscaler.api.errors import ApiError
from autoscaler.reconcile.ledger import can_sleep
from autoscaler.reconcile.liveness import BOOT_FAILED
from autoscaler.spec import WorkloadSpec
from autoscaler.store import workloads
from autoscaler.store.models import Instance, Worker, Workload
from autoscaler.store.secrets import hf_token_of
from autoscaler.store.tokens import hash_secret
from providers.agent import (
    HEARTBEAT_TIMEOUT,
    WORKER_SECRET_PREFIX,
    worker_id_from_secret,
    worker_is_lost,
)
from providers.engines import ENGINE_KEY_SECRET, HF_TOKEN_SECRET, CommandError, boot_spec

router = APIRouter(tags=["workers"])

WorkerId = Annotated[str, Path(pattern=r"^wrk_[0-9a-f]{16}$")]


class WorkerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=200)
    address: str | None = Field(default=None, max_length=300)


class GpuReport(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    memory_mib: int | None = None
    driver_version: str | None = None


ReplicaState = Literal["starting", "ready", "exited", "stopped", "failed"]


class ReplicaReport(BaseModel):
    model_config = ConfigDict(extra="ignore")
    launch_id: str
    state: ReplicaState
    address: str | None = Field(default=None, max_length=300)
    instance_id: str | None = Field(default=None, max_length=128)
    detail: str | None = Field(default=None, max_length=2000)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: list[GpuReport] = Field(default_factory=list)
    address: str | None = Field(default=None, max_length=300)
    replicas: list[ReplicaReport] = Field(default_factory=list)


# --- auth -----------------------------------------------------------------------------


async def _worker(
    worker_id: WorkerId, s: Session, authorization: Annotated[str | None, Header()] = None
) -> Worker:
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(
            401, "unauthorized", "missing bearer worker secret (ik_wrk_…)", headers=unauthorized
        )
    secret = authorization[7:].strip()
    worker = await s.get(Worker, worker_id)
    if (
        worker is None
        or worker_id_from_secret(secret) != worker_id
        or not hmac.compare_digest(worker.token_hash, hash_secret(secret))
    ):
        raise ApiError(
            401, "unauthorized", f"not the secret of worker {worker_id}", headers=unauthorized
        )
    return worker


AuthenticatedWorker = Annotated[Worker, Depends(_worker)]


# --- routes ---------------------------------------------------------------------------


@router.post("/v1/projects/{project}/workers", status_code=201)
async def register_worker(
    project: Project, s: Session, state: State, body: WorkerCreate | None = None
) -> dict[str, Any]:
    """Register a private worker; the secret in the answer is never shown again."""
    now = state.now()
    await workloads.ensure_project(s, project=project, now=now)
    hex_id = secrets.token_hex(8)
    secret = f"{WORKER_SECRET_PREFIX}{hex_id}_{secrets.token_urlsafe(32)}"
    worker = Worker(
        id=f"wrk_{hex_id}",
        project=project,
        name=(body.name if body else "") or f"wrk_{hex_id}",
        token_hash=hash_secret(secret),
        address=body.address if body else None,
        gpus={"gpus": []},
        registered_at=now,
        last_heartbeat_at=None,
    )
    s.add(worker)
    await s.flush()
    return {**worker_view(worker, now), "secret": secret}


@router.get("/v1/projects/{project}/workers")
async def list_workers(project: Project, s: Session, state: State) -> dict[str, Any]:
    now = state.now()
    rows = await s.scalars(
        select(Worker).where(Worker.project == project).order_by(Worker.registered_at, Worker.id)
    )
    items = []
    for worker in rows:
        view = worker_view(worker, now)
        view["replicas"] = len(await _assigned(s, worker.id))
        items.append(view)
    return {"items": items}


@router.post("/v1/workers/{worker_id}/heartbeat")
async def heartbeat(worker: AuthenticatedWorker, body: Heartbeat, s: Session, state: State) -> Any:
    now = state.now()
    worker.last_heartbeat_at = now
    worker.gpus = {"gpus": [gpu.model_dump() for gpu in body.gpus]}
    if body.address:
        worker.address = body.address
    assigned = {row.launch_id: row for row in await _assigned(s, worker.id)}
    changed = False
    for report in body.replicas:
        row = assigned.get(report.launch_id)
        if row is not None:
            changed = _apply(row, report, now) or changed
    if changed:
        state.on_change()
    return {"worker": worker_view(worker, now), "heartbeat_timeout_sec": _seconds()}


@router.get("/v1/workers/{worker_id}/assignments")
async def assignments(worker: AuthenticatedWorker, s: Session) -> dict[str, Any]:
    items = []
    for row in await _assigned(s, worker.id):
        workload = await s.get(Workload, row.workload_id)
        hf_token = await hf_token_of(s, workload) or os.environ.get(HF_TOKEN_SECRET)
        items.append(_assignment(row, workload, hf_token=hf_token))
    return {"worker_id": worker.id, "items": items}


# --- helpers --------------------------------------------------------------------------


def worker_view(worker: Worker, now: datetime) -> dict[str, Any]:
    lost = worker_is_lost(last_heartbeat_at=worker.last_heartbeat_at, now=now)
    return {
        "id": worker.id,
        "project": worker.project,
        "name": worker.name,
        "address": worker.address,
        "gpus": worker.gpus.get("gpus", []),
        "registered_at": worker.registered_at.isoformat(),
        "last_heartbeat_at": _iso(worker.last_heartbeat_at),
        "status": "lost" if lost else "alive",
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _seconds() -> float:
    return HEARTBEAT_TIMEOUT.total_seconds()


async def _assigned(s: AsyncSession, worker_id: str) -> list[Instance]:
    return list(
        await s.scalars(
            select(Instance)
            .where(Instance.worker_id == worker_id, Instance.terminated_confirmed_at.is_(None))
            .order_by(Instance.intent_at, Instance.launch_id)
        )
    )


def _apply(row: Instance, report: ReplicaReport, now: datetime) -> bool:
    """Record what the agent saw of one replica as facts on its ledger row."""
    before = (row.launched_at, row.ready_at, row.terminated_confirmed_at, row.url)
    if report.state in ("starting", "ready"):
        row.launched_at = row.launched_at or now
        row.instance_id = report.instance_id or row.instance_id
        if report.address:
            row.url = f"http://{report.address}"
        if report.state == "ready":
            row.ready_at = row.ready_at or now
    else:  # exited, stopped, failed: the process is gone, as the agent confirms
        row.terminated_confirmed_at = now
        if report.state != "stopped" or row.terminate_requested_at is None:
            row.last_error = f"{report.state} on the worker: {report.detail or 'no detail'}"
            if row.ready_at is None and row.terminate_requested_at is None:
                row.last_error = BOOT_FAILED + row.last_error  # reported by the controller
    return before != (row.launched_at, row.ready_at, row.terminated_confirmed_at, row.url)


def _assignment(
    row: Instance, workload: Workload | None, *, hf_token: str | None
) -> dict[str, Any]:
    """What the agent runs for ``row``; ``hf_token`` is the workload's stored secret
    (``hf_token_secret``), else the controller's ``$HF_TOKEN``."""
    item: dict[str, Any] = {
        "launch_id": row.launch_id,
        "project": row.project,
        "workload": row.workload_slug,
        "desired": "stopped" if row.terminate_requested_at is not None else "running",
        "boot": None,
        "secrets": {},
        "error": None,
    }
    if workload is None:
        item["error"] = f"workload {row.workload_slug!r} no longer exists"
        return item
    try:
        spec = WorkloadSpec.model_validate(workload.spec)
        boot = boot_spec(
            backend=spec.backend.value,
            model=spec.model,
            command=spec.engine_command,
            vllm_version=spec.vllm_version,
            task_type=spec.task_type.value,
            sleep_mode=can_sleep(row),  # as its intent recorded it (a warm pool's sleep)
        )
    except (CommandError, ValueError) as exc:
        item["error"] = str(exc)
        return item
    item["boot"] = {
        "image": boot.image,
        "command": list(boot.command),
        "port": boot.port,
        "health_path": boot.health_path,
        "model_id": boot.model_id,
        "env": dict(boot.env),
        "secret_env_names": list(boot.secret_env_names),
    }
    values = {ENGINE_KEY_SECRET: row.engine_key, HF_TOKEN_SECRET: hf_token}
    item["secrets"] = {
        name: value for name, value in values.items() if value and name in boot.secret_env_names
    }
    return item
