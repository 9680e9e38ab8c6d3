"""Read side of the ledger and the decisions log, for the API and ``describe``."""

from __future__ import annotations

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
