"""Stored secrets: ``POST/GET /v1/projects/{p}/secrets``, ``PUT/DELETE …/secrets/{name}``.

A secret's value goes in and never comes back out of this API: the answers carry its
name and creation time only, and a refused body's problems never quote it. Workloads
refer to a secret by name (``hf_token_secret``); one in use cannot be deleted (409
``secret_in_use``, naming the workloads), but its value can be replaced (``PUT``: a
rotated token), which replicas read at their next boot.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from autoscaler.api.deps import Project, Session, State
from autoscaler.api.errors import ApiError
from autoscaler.spec import SECRET_NAME_PATTERN
from autoscaler.store import secrets, workloads
from autoscaler.store.models import Secret

router = APIRouter(tags=["secrets"])

SecretName = Annotated[str, Path(pattern=SECRET_NAME_PATTERN)]


class SecretCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    name: Annotated[str, Field(pattern=SECRET_NAME_PATTERN)]
    value: Annotated[
        str, Field(min_length=1, max_length=secrets.MAX_SECRET_CHARS, pattern=r"^[^\r\n]+$")
    ]
    """One line (it travels in an env file), at most 16 KiB."""


class SecretValue(BaseModel):
    """A secret's new value (``PUT …/secrets/{name}``)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    value: Annotated[
        str, Field(min_length=1, max_length=secrets.MAX_SECRET_CHARS, pattern=r"^[^\r\n]+$")
    ]
    """One line (it travels in an env file), at most 16 KiB."""


def secret_view(row: Secret) -> dict[str, Any]:
    return {"name": row.name, "created_at": row.created_at.isoformat()}


@router.post("/v1/projects/{project}/secrets", status_code=201)
async def create_secret(
    project: Project, body: SecretCreate, s: Session, state: State
) -> dict[str, Any]:
    """Store a secret; the answer names it, never shows it."""
    now = state.now()
    await workloads.ensure_project(s, project=project, now=now)
    try:
        row = await secrets.create_secret(
            s, project=project, name=body.name, value=body.value, now=now
        )
    except secrets.SecretExists:
        raise ApiError(
            409,
            "secret_exists",
            f"secret {body.name!r} is already stored in project {project!r}; replace its "
            f"value with PUT /v1/projects/{project}/secrets/{body.name} "
            "(autoscaler secrets create --replace)",
        ) from None
    view = secret_view(row)
    await s.commit()
    return view


@router.get("/v1/projects/{project}/secrets")
async def list_secrets(project: Project, s: Session) -> dict[str, Any]:
    """The project's secrets: names and creation times, never values."""
    return {"items": [secret_view(r) for r in await secrets.list_secrets(s, project=project)]}


@router.put("/v1/projects/{project}/secrets/{name}")
async def replace_secret(
    project: Project, name: SecretName, body: SecretValue, s: Session, state: State
) -> dict[str, Any]:
    """Replace a stored secret's value, also while workloads use it; the answer names it
    (``created_at`` is now), never shows it. Running replicas keep the value they booted
    with; replicas started from now on get the new one."""
    row = await secrets.replace_secret(
        s, project=project, name=name, value=body.value, now=state.now()
    )
    if row is None:
        raise ApiError(
            404,
            "secret_not_found",
            f"no secret {name!r} in project {project!r}; create it with POST "
            f"/v1/projects/{project}/secrets",
        )
    view = secret_view(row)
    await s.commit()
    return view


@router.delete("/v1/projects/{project}/secrets/{name}")
async def delete_secret(project: Project, name: SecretName, s: Session) -> dict[str, Any]:
    """Delete a secret no workload refers to."""
    try:
        deleted = await secrets.delete_secret(s, project=project, name=name)
    except secrets.SecretInUse as exc:
        raise ApiError(
            409,
            "secret_in_use",
            f"secret {name!r} is used by workload(s) {', '.join(exc.workloads)}: change their "
            "hf_token_secret first",
            details=[
                {
                    "path": "name",
                    "message": f"used by {', '.join(exc.workloads)}",
                    "value": name,
                    "workloads": exc.workloads,
                }
            ],
        ) from None
    if not deleted:
        raise ApiError(404, "secret_not_found", f"no secret {name!r} in project {project!r}")
    await s.commit()
    return {"name": name, "deleted": True}
