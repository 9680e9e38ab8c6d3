"""The boot callback: what a cloud instance's startup script calls (``providers.bootstrap``).

* ``GET /v1/boot/{launch_id}/secrets`` answers ``NAME=VALUE`` lines (Docker env-file
  format): the replica's engine key when its engine takes one, and the Hugging Face token:
  the stored secret the workload's ``hf_token_secret`` names, else the controller's when
  it has one (the file ``hf_token_file`` of the configuration, else ``$HF_TOKEN``); never
  a value from the workload spec itself.
* ``GET /v1/boot/{launch_id}/group`` answers a replica group member's part:
  ``{"role": "leader" | "worker", "size": N, "leader_address": "10.0.0.5" | null}``, the
  leader's address once its machine is launched: its private address as the provider
  reported it (its engine URL's host where the provider reported none); a worker's
  startup script polls it to join the leader's Ray cluster. 404 for a machine of its own.
* ``POST /v1/boot/{launch_id}/status`` takes ``{"launch_id", "state": "ready" | "failed"
  | "interrupted", "reason"}``. ``failed`` stores ``last_error`` (``boot failed: …``),
  and the liveness reconciler terminates the instance and skips its offer for a while.
  ``ready`` wakes the controller, whose own health check (with the engine key) sets
  ``ready_at``; the instance's word alone never makes a replica serve. From a replica
  group's worker it is the worker's check-in (its role started against the leader) and
  sets ``joined_at``: the leader is ready only once every worker has checked in and its
  own engine answers.
  ``interrupted`` is a spot interruption notice: ``last_error`` records it
  (``spot notice: …``) and ``reclaim_at`` its reclaim time (EC2's action time, else the
  provider's lead, ``providers.base.reclaim_time``). A serving replica keeps serving while
  ``decide.plan.heed_spot_notice`` allows (until its replacement serves, at most until
  30 s before the reclaim); one whose reclaim is closer, or not known, is marked
  draining at once, so the gateway stops routing new requests to it while those in
  flight finish. The controller, woken, launches the replacement, skips the offer's spot
  market for a while, starts the drain when due and terminates a replica that was still
  booting (``autoscaler.reconcile.workload``).

The bearer token is per instance: HMAC-SHA256 of the launch id keyed by the replica's
engine key (:func:`autoscaler.reconcile.provisioner.boot_token`), derived again here, so
nothing new is stored. Answers: a wrong or missing token 401, an unknown launch 404, a
launch being terminated or gone 410. Secret values are never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from autoscaler.api.deps import Session, State
from autoscaler.api.errors import ApiError
from autoscaler.decide.plan import Drain, ReplicaPhase, heed_spot_notice
from autoscaler.reconcile.liveness import BOOT_FAILED
from autoscaler.reconcile.provisioner import boot_token
from autoscaler.store.models import Instance, Workload
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from autoscaler.store.secrets import hf_token_of
from providers.base import reclaim_time
from providers.engines import ENGINE_KEY_SECRET, HF_TOKEN_SECRET, engine_for

log = logging.getLogger("autoscaler.api.boot")

router = APIRouter(prefix="/v1/boot", tags=["boot"])

MAX_REASON_CHARS = 2000


@dataclass(frozen=True, slots=True)
class BootSecrets:
    """Where the Hugging Face token comes from: ``hf_token_file`` when configured (read
    on every call, so a rotated file takes effect), else ``$HF_TOKEN``."""

    hf_token_file: Path | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    def hf_token(self) -> str | None:
        if self.hf_token_file is None:
            return self.environ.get(HF_TOKEN_SECRET) or None
        try:
            token = self.hf_token_file.read_text().strip()
        except OSError as exc:
            raise ApiError(
                503,
                "secrets_unavailable",
                f"the controller cannot read hf_token_file {self.hf_token_file}: {exc.strerror}",
            ) from None
        return token or None


def configure_boot(app: FastAPI, secrets: BootSecrets) -> None:
    """Use ``secrets`` for the boot callback of ``app`` (default: ``$HF_TOKEN``)."""
    app.state.boot_secrets = secrets


def _secrets_source(request: Request) -> BootSecrets:
    found = getattr(request.app.state, "boot_secrets", None)
    return found if isinstance(found, BootSecrets) else BootSecrets()


class BootStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    launch_id: str = Field(max_length=64)
    state: Literal["ready", "failed", "interrupted"]
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


async def _launch(
    launch_id: str, s: Session, authorization: Annotated[str | None, Header()] = None
) -> Instance:
    """The ledger row of ``launch_id``, once the caller proved it is that instance."""
    row = await s.get(Instance, launch_id)
    if row is None:
        raise ApiError(404, "launch_not_found", f"no launch {launch_id!r}")
    header = authorization or ""
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    expected = boot_token(launch_id=launch_id, engine_key=row.engine_key) if row.engine_key else ""
    if not given or not expected or not hmac.compare_digest(given, expected):
        raise ApiError(
            401,
            "unauthorized",
            f"missing or wrong boot token for launch {launch_id!r}",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if phase_of(row) in (Phase.TERMINATING, Phase.TERMINATED):
        raise ApiError(410, "launch_gone", f"launch {launch_id!r} is {phase_of(row).value}")
    return row


Launch = Annotated[Instance, Depends(_launch)]


@router.get("/{launch_id}/secrets", response_class=PlainTextResponse)
async def secrets(
    row: Launch, s: Session, source: Annotated[BootSecrets, Depends(_secrets_source)]
) -> PlainTextResponse:
    workload = await s.get(Workload, row.workload_id)
    backend = str((workload.spec if workload else {}).get("backend", "vllm"))
    values = {
        ENGINE_KEY_SECRET: row.engine_key if _takes_key(backend) else None,
        HF_TOKEN_SECRET: await hf_token_of(s, workload) or source.hf_token(),
    }
    lines = [f"{name}={value}" for name, value in values.items() if _env_safe(name, value)]
    log.info("boot %s: secrets fetched (%s)", row.launch_id, ", ".join(sorted(values)))
    return PlainTextResponse(
        "".join(f"{line}\n" for line in lines), headers={"Cache-Control": "no-store"}
    )


@router.get("/{launch_id}/group")
async def group(row: Launch, s: Session) -> dict[str, Any]:
    if row.group_id is None:
        raise ApiError(404, "not_a_group", f"launch {row.launch_id} is not in a replica group")
    leader = await s.get(Instance, row.group_id)
    address = None
    if leader is not None and leader.instance_id is not None:
        address = leader.private_address or (leader.url and urlsplit(leader.url).hostname)
    return {"role": row.group_role, "size": row.group_size, "leader_address": address or None}


@router.post("/{launch_id}/status", status_code=202)
async def status(row: Launch, body: BootStatus, s: Session, state: State) -> dict[str, Any]:
    if body.launch_id != row.launch_id:
        raise ApiError(
            422,
            "launch_mismatch",
            f"the body's launch_id {body.launch_id!r} is not the path's {row.launch_id!r}",
        )
    if body.state == "failed":
        reason = body.reason.strip() or "the startup script failed without a reason"
        row.last_error = f"{BOOT_FAILED}{reason}"
        log.warning("boot %s of %s failed: %s", row.launch_id, row.workload_slug, reason)
    elif body.state == "interrupted":
        reason = body.reason.strip() or "the provider will reclaim this spot instance"
        now = state.now()
        reclaim_at = reclaim_time(reason, provider=row.provider, noticed_at=now)
        row.last_error = f"{SPOT_NOTICE}{reason}"
        row.reclaim_at = reclaim_at
        phase = ReplicaPhase(phase_of(row).value)
        notice = heed_spot_notice(
            row.launch_id, phase, reason=reason, now=now, reclaim_at=reclaim_at
        )
        if isinstance(notice, Drain):
            # The gateway stops routing to it now; one that may serve on does until the
            # controller drains it (``decide.plan.heed_spot_notice``).
            row.drain_requested_at = now
        log.warning("spot notice for %s of %s: %s", row.launch_id, row.workload_slug, reason)
    else:
        if row.group_role == "worker":
            row.joined_at = row.joined_at or state.now()
        log.info("boot %s of %s reports ready", row.launch_id, row.workload_slug)
    await s.commit()  # before the wake-up: the gateway and controller read the store
    state.on_change()  # the controller checks health, or terminates, on its next pass now
    return {"launch_id": row.launch_id, "state": body.state, "phase": phase_of(row).value}


def _takes_key(backend: str) -> bool:
    try:
        return engine_for(backend).api_key
    except ValueError:
        return True


def _env_safe(name: str, value: str | None) -> bool:
    """A value an env file can carry (one line); others are left out, and said so."""
    if not value:
        return False
    if "\n" in value or "\r" in value:
        log.warning("secret %s holds a line break and is not sent to instances", name)
        return False
    return True
