"""Read side of the ledger and the decisions log, for the API and ``describe``."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.store.models import Decision, Instance


async def instances_of(session: AsyncSession, workload_id: int) -> list[Instance]:
    """Every ledger row of a workload, newest first, terminated ones included."""
    return list(
        await session.scalars(
            select(Instance)
            .where(Instance.workload_id == workload_id)
            .order_by(Instance.intent_at.desc(), Instance.launch_id)
        )
    )


async def recent_decisions(
    session: AsyncSession, workload_id: int, *, limit: int
) -> list[Decision]:
    return list(
        await session.scalars(
            select(Decision)
            .where(Decision.workload_id == workload_id)
            .order_by(Decision.at.desc(), Decision.id.desc())
            .limit(limit)
        )
    )


async def latest_decisions(
    session: AsyncSession, workload_id: int, *, kinds: Collection[str]
) -> dict[str, Decision]:
    """The newest decision of each of ``kinds`` for a workload (kinds never taken absent)."""
    found: dict[str, Decision] = {}
    for kind in kinds:
        row = await session.scalar(
            select(Decision)
            .where(Decision.workload_id == workload_id, Decision.kind == kind)
            .order_by(Decision.id.desc())
            .limit(1)
        )
        if row is not None:
            found[kind] = row
    return found


BLOCKING_KINDS = ("refused", "invalid_spec")
"""Decisions that mean the controller cannot start a replica of the workload now."""

PLACING_KINDS = ("launch", *BLOCKING_KINDS)

BLOCK_FRESH_SEC = 360.0
"""How long a refusal stands for "cannot be placed now" without being logged again. The
controller logs a refusal that persists again every ``refusal_log_interval_sec`` (300 s
by default); a refusal older than this, with no launch since, is no longer current."""


async def placement_blocks(
    session: AsyncSession, *, now: datetime, workload_ids: Collection[int] | None = None
) -> dict[int, str]:
    """Workloads (all, or those of ``workload_ids``) that have no open replica and whose
    newest placing decision (launch, refusal, a spec that cannot run), made within
    :data:`BLOCK_FRESH_SEC`, is a refusal: the reason, by workload id."""
    since = now - timedelta(seconds=BLOCK_FRESH_SEC)
    query = (
        select(Decision)
        .where(Decision.kind.in_(PLACING_KINDS), Decision.at >= since)
        .order_by(Decision.id)
    )
    if workload_ids is not None:
        query = query.where(Decision.workload_id.in_(workload_ids))
    rows = await session.scalars(query)
    newest: dict[int, Decision] = {}
    for row in rows:
        newest[row.workload_id] = row
    blocked = {w: d.reason for w, d in newest.items() if d.kind in BLOCKING_KINDS}
    if not blocked:
        return {}
    open_ids = set(
        await session.scalars(
            select(Instance.workload_id).where(
                Instance.workload_id.in_(blocked), Instance.terminated_confirmed_at.is_(None)
            )
        )
    )
    return {w: reason for w, reason in blocked.items() if w not in open_ids}
