"""JSON shapes the API answers with, built from store rows. Secrets never appear here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from autoscaler.decide.warm import start_sample
from autoscaler.store.models import Decision, Instance, Token, Workload, WorkloadSignals
from autoscaler.store.phase import Phase, desired_phase_of, phase_of
from providers.engines import masked_command


class DataKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=200)


class TokenCreate(DataKeyCreate):
    pass


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def workload_view(row: Workload) -> dict[str, Any]:
    return {
        "project": row.project,
        "slug": row.slug,
        "name": row.name,
        "generation": row.generation,
        "spec": row.spec,
        "spec_hash": row.spec_hash,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "deleted_at": _iso(row.deleted_at),
    }


def token_view(token: Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "kind": token.kind,
        "prefix": token.prefix,
        "name": token.name,
        "project": token.project,
        "workload": token.workload_slug,
        "created_at": _iso(token.created_at),
        "revoked_at": _iso(token.revoked_at),
    }


def instance_view(
    row: Instance, now: datetime, *, workload_deleted: bool = False
) -> dict[str, Any]:
    """One replica. ``phase`` and ``actual_phase`` are the same word (what has happened);
    ``desired_phase`` is what the controller wants of it; ``command`` is the engine's
    command line with every secret masked (``None`` for replicas launched before the
    service recorded it). ``park_mode``: how a parking or parked replica waits (after a
    resume, the path it came back by); ``hourly_usd`` is a stopped machine's disks, with
    ``running_usd_per_hour`` its price running."""
    return {
        "launch_id": row.launch_id,
        "phase": phase_of(row).value,
        "desired_phase": desired_phase_of(row, workload_deleted=workload_deleted).value,
        "actual_phase": phase_of(row).value,
        "provider": row.provider,
        "instance_id": row.instance_id,
        "offer": row.offer_key,
        "instance_type": row.instance_type,
        "zone": row.zone,
        "gpu": row.gpu,
        "gpu_count": row.gpu_count,
        "spot": row.spot,
        "hourly_usd": row.hourly_usd,
        "url": row.url,
        "generation": row.spec_generation,
        "age_sec": round((now - row.intent_at).total_seconds(), 1),
        "intent_at": _iso(row.intent_at),
        "ready_at": _iso(row.ready_at),
        "terminated_confirmed_at": _iso(row.terminated_confirmed_at),
        "last_error": row.last_error,
        "engine": row.engine,
        "engine_reason": row.engine_reason,
        "command": None if row.engine_command is None else masked_command(row.engine_command),
        "group": row.group_id,
        "role": row.group_role,
        "park_mode": row.park_mode,
        "parked_at": _iso(row.parked_at),
        "resumed_at": _iso(row.resumed_at),
        "running_usd_per_hour": row.running_usd_per_hour,
        "prefill": row.prefill,
        "start": _start_view(row),
    }


def _start_view(row: Instance) -> dict[str, Any] | None:
    """How the replica last became ready and how long it took (``decide.warm``):
    ``launch`` (intent to ready), ``start`` (a stopped machine started) or ``wake``."""
    sample = start_sample(
        offer_key=row.offer_key,
        intent_at=row.intent_at,
        ready_at=row.ready_at,
        resumed_at=row.resumed_at,
        resumed_from=row.park_mode if row.park_requested_at is None else None,
    )
    if sample is None:
        return None
    return {"path": sample.path.value, "seconds": round(sample.seconds, 1)}


def signals_view(row: WorkloadSignals | None) -> dict[str, Any]:
    """The latest measurement (``autoscaler.reconcile.measure.summary``), if any."""
    if row is None:
        return {"at": None, "gateway": None, "engines": None}
    return {"at": _iso(row.at), **row.data}


def decision_view(row: Decision) -> dict[str, Any]:
    return {
        "at": _iso(row.at),
        "kind": row.kind,
        "reason": row.reason,
        "acted": row.acted,
        "cost_delta_usd_per_hour": row.cost_delta_usd_per_hour,
        "inputs": row.inputs,
        "result": row.result,
    }


FAILURE_KINDS = ("refused", "invalid_spec", "launch_failed", "boot_failed")
"""Decisions whose reason is a workload's last error until a replica is ready after it."""


def workload_status(
    row: Workload,
    *,
    instances: list[Instance],
    latest: dict[str, Decision],
    gateway_url: str | None,
) -> dict[str, Any]:
    """What a user asks of a workload: how many replicas are wanted and ready, its
    phase, where to call it, and the last thing that went wrong (derived from the ledger
    and the decisions log; nothing of it is stored).

    Phases: ``deleting``; ``pending`` (no decision yet); ``ready`` (as many ready as
    desired); ``scaling`` (fewer, and replicas on their way); ``blocked`` (fewer, none on
    the way, and the controller's newest word is a refusal or a spec that cannot run);
    ``idle`` (none wanted: scaled to zero or outside its schedule).
    """
    # A replica group counts once, by its leader (the member the gateway routes to).
    phases = [phase_of(i) for i in instances if i.group_role != "worker"]
    ready = phases.count(Phase.READY)
    starting = sum(p in (Phase.PENDING, Phase.BOOTING) for p in phases)
    scale = latest.get("scale")
    desired = None if scale is None else int(scale.result.get("desired", 0))
    last_ready = max((i.ready_at for i in instances if i.ready_at), default=None)
    failures = [d for k, d in latest.items() if k in FAILURE_KINDS]
    failure = max(failures, key=lambda d: d.id, default=None)
    if failure is not None and last_ready is not None and failure.at <= last_ready:
        failure = None
    launch = latest.get("launch")
    blocked = failure is not None and (launch is None or launch.id < failure.id)
    if row.deleted_at is not None:
        phase = "deleting"
    elif desired is None:
        phase = "blocked" if blocked else "pending"
    elif desired == 0 and ready == 0:
        phase = "idle"
    elif ready >= desired:
        phase = "ready"
    elif blocked and not starting:
        phase = "blocked"
    else:
        phase = "scaling"
    path = f"/endpoint/{row.project}/{row.slug}/v1"
    status: dict[str, Any] = {
        "phase": phase,
        "desired_phase": _desired_phase(row, desired),
        "actual_phase": _actual_phase(
            row, instances=instances, desired=desired, ready=ready, blocked=blocked
        ),
        "desired": desired,
        "ready": ready,
        "starting": starting,
        "endpoint": f"{gateway_url.rstrip('/')}{path}" if gateway_url else path,
        "last_error": None if failure is None else failure.reason,
        "last_error_at": None if failure is None else _iso(failure.at),
    }
    live = [i for i in instances if phase_of(i) is not Phase.TERMINATED]
    local = [i for i in live if i.provider == "local"]
    if any(i.provider == "simulated" for i in live):
        status["note"] = (
            "served by the simulated cloud: catalog offers at catalog prices, each machine "
            "an engine-sim process on this machine: no cloud instance is bought"
        )
    if local:
        status["note"] = (
            f"served by this machine's local provider standing in for the cloud "
            f"({local[0].gpu} x{local[0].gpu_count} at ${local[0].hourly_usd:g}/h as configured; "
            "engine-sim unless the local launcher runs a real engine): no cloud instance is bought"
        )
    return status


def _desired_phase(row: Workload, desired: int | None) -> str:
    """``deleted``; ``stopped`` (the controller wants no replica: scaled to zero or
    outside its schedule); else ``running``."""
    if row.deleted_at is not None:
        return "deleted"
    return "stopped" if desired == 0 else "running"


def _actual_phase(
    row: Workload, *, instances: list[Instance], desired: int | None, ready: int, blocked: bool
) -> str:
    """What a workload is doing, in the words of the distributed-inference API (see
    docs/architecture.md, "Status"): ``creating``, ``running``, ``updating``,
    ``scaling``, ``degraded``, ``failed``, ``stopping``, ``stopped``, ``deleting``,
    ``deleted``."""
    live = [i for i in instances if phase_of(i) is not Phase.TERMINATED]
    if row.deleted_at is not None:
        return "deleting" if live else "deleted"
    if desired == 0:
        return "stopping" if live else "stopped"
    wanted = 1 if desired is None else desired
    if ready >= wanted:
        stale = any(i.spec_generation < row.generation for i in live)
        return "updating" if stale else "running"
    starting = any(phase_of(i) in (Phase.PENDING, Phase.BOOTING) for i in live)
    if ready == 0:
        return "failed" if blocked and not starting else "creating"
    if any(i.spec_generation < row.generation for i in live):
        return "updating"
    return "scaling" if starting else "degraded"
