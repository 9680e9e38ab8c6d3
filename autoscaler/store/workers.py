"""Private workers as the store knows them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.store.models import Worker


async def registered_ids(session: AsyncSession, *, project: str) -> set[str]:
    """The ids of the workers registered in ``project``."""
    return set(await session.scalars(select(Worker.id).where(Worker.project == project)))
