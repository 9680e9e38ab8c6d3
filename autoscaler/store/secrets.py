"""Stored secrets: values workloads refer to by name, sealed at rest
(:class:`~autoscaler.store.sealed.SealedText`).

A secret's value leaves the store only for a replica: the boot callback's env file, a
local or private-worker replica's environment (:func:`hf_token_of`). Everything else
(the API, the CLI, ``describe``, the logs) sees names and creation times.

A value is replaced in place (:func:`replace_secret`), also while workloads use it: a
leaked token is rotated without editing them. Replicas read it at boot, so running ones
keep the value they booted with; ``created_at`` becomes the time the new value was stored.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.store.models import Secret, Workload

MAX_SECRET_CHARS = 16 * 1024
"""The longest value a secret holds (a Hugging Face token is about 40 characters)."""


class SecretExists(Exception):
    """A secret of that name is already stored in the project."""


class SecretInUse(Exception):
    """Workloads refer to the secret; ``workloads`` names them."""

    def __init__(self, workloads: list[str]) -> None:
        super().__init__(", ".join(workloads))
        self.workloads = workloads


async def create_secret(
    session: AsyncSession, *, project: str, name: str, value: str, now: datetime
) -> Secret:
    """Store ``value`` as ``name``; :class:`SecretExists` when the name is taken (a value
    is replaced only by :func:`replace_secret`, so nothing is overwritten by accident)."""
    if await session.get(Secret, (project, name)) is not None:
        raise SecretExists(name)
    row = Secret(project=project, name=name, value=value, created_at=now)
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:  # made by another caller since the check
        raise SecretExists(name) from None
    return row


async def replace_secret(
    session: AsyncSession, *, project: str, name: str, value: str, now: datetime
) -> Secret | None:
    """Replace the value of ``name`` (whether or not workloads use it); ``None`` when
    there is none. ``created_at`` becomes ``now``: when the value now held was stored."""
    row = await session.get(Secret, (project, name))
    if row is None:
        return None
    row.value = value
    row.created_at = now
    await session.flush()
    return row


async def list_secrets(session: AsyncSession, *, project: str) -> list[Secret]:
    rows = await session.scalars(
        select(Secret).where(Secret.project == project).order_by(Secret.name)
    )
    return list(rows)


async def secret_names(session: AsyncSession, *, project: str) -> set[str]:
    return set(await session.scalars(select(Secret.name).where(Secret.project == project)))


async def workloads_using(session: AsyncSession, *, project: str, name: str) -> list[str]:
    """The slugs of the project's live workloads whose spec refers to ``name``."""
    rows = await session.scalars(
        select(Workload).where(Workload.project == project, Workload.deleted_at.is_(None))
    )
    return sorted(w.slug for w in rows if w.spec.get("hf_token_secret") == name)


async def delete_secret(session: AsyncSession, *, project: str, name: str) -> bool:
    """Delete ``name``; ``False`` when there is none, :class:`SecretInUse` while a
    workload refers to it."""
    row = await session.get(Secret, (project, name))
    if row is None:
        return False
    using = await workloads_using(session, project=project, name=name)
    if using:
        raise SecretInUse(using)
    await session.delete(row)
    return True


async def hf_token_of(session: AsyncSession, workload: Workload | None) -> str | None:
    """The Hugging Face token ``workload``'s spec refers to (``hf_token_secret``), or
    ``None`` when it names none or the secret is gone."""
    if workload is None:
        return None
    name = workload.spec.get("hf_token_secret")
    if not isinstance(name, str):
        return None
    row = await session.get(Secret, (workload.project, name))
    return None if row is None else row.value
