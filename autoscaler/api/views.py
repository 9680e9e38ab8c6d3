"""JSON shapes the API answers with, built from store rows. Secrets never appear here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from autoscaler.store.models import Decision, Instance, Token, Workload
from autoscaler.store.phase import phase_of


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


def instance_view(row: Instance, now: datetime) -> dict[str, Any]:
    return {
        "launch_id": row.launch_id,
        "phase": phase_of(row).value,
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
    }


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
