"""Workloads by slug: ensure (idempotent create-or-update), get, list, soft delete."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.spec import OnDrift, WorkloadSpec, spec_diff
from autoscaler.store.models import Base, Instance, Project, Workload


class EnsureAction(StrEnum):
    CREATED = "created"
    UNCHANGED = "unchanged"
    UPDATED = "updated"
    IGNORED = "ignored"  # drift found, on_drift=ignore: the stored spec stays


class DriftRefused(Exception):
    """``on_drift=fail`` and the stored spec differs from the given one."""

    def __init__(self, workload: Workload, diff: list[dict[str, Any]]) -> None:
        super().__init__(f"workload {workload.project}/{workload.slug} differs from the spec")
        self.workload = workload
        self.diff = diff


@dataclass(frozen=True, slots=True)
class EnsureResult:
    action: EnsureAction
    workload: Workload
    diff: list[dict[str, Any]] = field(default_factory=list)


async def ensure_project(session: AsyncSession, *, project: str, now: datetime) -> None:
    if await session.get(Project, project) is None:
        await _insert_once(session, Project(slug=project, created_at=now))


async def _insert_once(session: AsyncSession, row: Base) -> bool:
    """Insert ``row``; False (and nothing changed) when a concurrent writer got there first."""
    try:
        async with session.begin_nested():
            session.add(row)
            await session.flush()
    except IntegrityError:
        return False
    return True


async def get_workload(session: AsyncSession, *, project: str, slug: str) -> Workload | None:
    """The live (not deleted) workload with this slug."""
    return await session.scalar(
        select(Workload).where(
            Workload.project == project, Workload.slug == slug, Workload.deleted_at.is_(None)
        )
    )


async def list_workloads(session: AsyncSession, *, project: str) -> list[Workload]:
    return list(
        await session.scalars(
            select(Workload)
            .where(Workload.project == project, Workload.deleted_at.is_(None))
            .order_by(Workload.slug)
        )
    )


async def ensure_workload(
    session: AsyncSession,
    *,
    project: str,
    spec: WorkloadSpec,
    on_drift: OnDrift,
    now: datetime,
) -> EnsureResult:
    """Create the workload, or leave it, or change it, by its slug.

    The same spec is a no-op (generation kept). A changed spec is reconciled in place
    (generation + 1), refused (:class:`DriftRefused`) or ignored, per ``on_drift``.
    """
    await ensure_project(session, project=project, now=now)
    current = await get_workload(session, project=project, slug=spec.slug)
    if current is None:
        row = _new_workload(project=project, spec=spec, now=now)
        if await _insert_once(session, row):
            return EnsureResult(EnsureAction.CREATED, row)
        current = await get_workload(session, project=project, slug=spec.slug)
        assert current is not None, "the concurrent insert that won is visible"
    return await _update(session, current=current, spec=spec, on_drift=on_drift, now=now)


def _new_workload(*, project: str, spec: WorkloadSpec, now: datetime) -> Workload:
    return Workload(
        project=project,
        slug=spec.slug,
        name=spec.name,
        spec=spec.canonical(),
        spec_hash=spec.spec_hash(),
        generation=1,
        created_at=now,
        updated_at=now,
        deleted_at=None,
        last_request_at=None,
    )


async def _update(
    session: AsyncSession,
    *,
    current: Workload,
    spec: WorkloadSpec,
    on_drift: OnDrift,
    now: datetime,
) -> EnsureResult:
    canonical, digest = spec.canonical(), spec.spec_hash()
    if current.spec_hash == digest:
        return EnsureResult(EnsureAction.UNCHANGED, current)
    diff = spec_diff(current.spec, canonical)
    if on_drift is OnDrift.FAIL:
        raise DriftRefused(current, diff)
    if on_drift is OnDrift.IGNORE:
        return EnsureResult(EnsureAction.IGNORED, current, diff)
    in_place = _same_replicas(current.spec, spec)
    current.spec = canonical
    current.spec_hash = digest
    current.name = spec.name
    current.generation += 1
    current.updated_at = now
    if in_place:
        # Only counts, bounds or schedules changed: the replicas of the previous
        # generation already run this one, so they are adopted, not replaced.
        await session.execute(
            update(Instance)
            .where(
                Instance.workload_id == current.id,
                Instance.spec_generation == current.generation - 1,
                Instance.terminated_confirmed_at.is_(None),
            )
            .values(spec_generation=current.generation)
        )
    await session.flush()
    return EnsureResult(EnsureAction.UPDATED, current, diff)


def _same_replicas(stored: dict[str, Any], spec: WorkloadSpec) -> bool:
    """Whether replicas of the stored spec are replicas of ``spec`` (same identity)."""
    try:
        before = WorkloadSpec.model_validate(stored)
    except ValidationError:
        return False  # stored before a rule it breaks existed: roll, to be safe
    return before.replica_identity() == spec.replica_identity()


async def delete_workload(
    session: AsyncSession, *, project: str, slug: str, now: datetime
) -> Workload | None:
    """Mark the workload deleted; the controller drains and terminates its replicas."""
    row = await get_workload(session, project=project, slug=slug)
    if row is not None:
        row.deleted_at = now
        await session.flush()
    return row
