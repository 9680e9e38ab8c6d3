"""Spot interruption warnings shared through the store, for controllers sharing a fleet.

A provider's notice queue (EC2 Spot Instance Interruption Warnings that EventBridge puts
on an SQS queue) hands each message to one reader, and a message read is deleted. With
sharding (``autoscaler.reconcile.shards``) every controller reads the queue in its
pass, so a warning goes to whichever controller asks first, which holds the instance's
workload only one time in N. So, with sharding:

1. **The reader stores what it read.** :func:`share_notices`, in the pass's
   observation, inserts every warning it received into ``spot_notices`` (migration
   0013; a warning already stored is kept as it is) and reads the table back: the
   pass's notices are every stored one, its own included, so the owner acts in the
   same pass when it read the warning itself.
2. **The owner acts on it and deletes it.** The workload's step treats a stored warning
   for one of its open rows as the queue's own (``last_error = "spot notice: …"``, the
   replica drained or terminated and replaced, counted with ``source="queue"``) and
   deletes it in the same transaction (:func:`forget_notices`): a warning is recorded
   on its row once; one that arrives again (a queue delivers at least once) finds the
   row already noticed and is deleted. Another controller's pass reads the store within
   ``tick_sec`` (5 s) of the write, so the owner acts in its next pass at the latest,
   well inside the two minutes EC2 gives.
3. **A warning no row matches yet is kept, bounded.** One for an instance whose row no
   controller holds at the moment (its shard between holders, an intent whose instance
   id is not on record yet) stays until a step matches it, for at most
   :data:`NOTICE_KEEP_SEC` after it was stored, and the table keeps the newest
   :data:`NOTICES_KEPT` (an instance that no row will ever match, an orphan, is dropped
   that way).

A pass costs one read of the table (usually empty; at most :data:`NOTICES_KEPT` rows
and what the pass read), plus an insert when it read any and a delete when some expired
or overflowed; a store that fails them leaves the pass with the warnings it read
itself, as without sharding.

Without sharding nothing is stored: the one controller acts on what it reads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.reconcile.deps import Deps, log
from autoscaler.store.models import SpotNotice
from providers.base import SpotInterruption

NOTICE_KEEP_SEC = 300.0
"""How long a stored warning waits for a step to match it: past the two minutes EC2
gives, the machine is gone, and a shard moves to a new holder within 15 s."""

NOTICES_KEPT = 1000
"""The most warnings the table keeps (the newest): a pass reads at most 100 messages per
provider's queue."""


async def share_notices(
    deps: Deps,
    received: Mapping[str, tuple[str, SpotInterruption]],
    *,
    now: datetime,
    keep_sec: float = NOTICE_KEEP_SEC,
    kept: int = NOTICES_KEPT,
) -> dict[str, SpotInterruption]:
    """Store the warnings this pass read (instance id -> (provider, warning)), drop the
    expired ones and those beyond ``kept``, and return every stored warning by instance
    id. On a store error, the warnings this pass read, alone (as without sharding)."""
    expired = now - timedelta(seconds=keep_sec)
    try:
        async with deps.sessions() as s:
            if received:
                await s.execute(_insert_new(s, received, now=now))
            stored = list(
                await s.scalars(
                    select(SpotNotice).order_by(
                        SpotNotice.received_at.desc(), SpotNotice.instance_id
                    )
                )
            )
            live = [n for n in stored if n.received_at >= expired][:kept]
            if len(live) < len(stored):
                keep = {n.instance_id for n in live}
                await forget_notices(
                    s, [n.instance_id for n in stored if n.instance_id not in keep]
                )
            if received or len(live) < len(stored):
                await s.commit()
    except SQLAlchemyError as exc:
        log.warning("sharing the spot interruption warnings through the store failed: %s", exc)
        return {instance_id: notice for instance_id, (_, notice) in received.items()}
    return {n.instance_id: _interruption(n) for n in live}


async def forget_notices(s: AsyncSession, instance_ids: Collection[str]) -> None:
    """Delete the stored warnings of these instances (in ``s``'s transaction)."""
    if instance_ids:
        await s.execute(delete(SpotNotice).where(SpotNotice.instance_id.in_(instance_ids)))


def _insert_new(
    s: AsyncSession, received: Mapping[str, tuple[str, SpotInterruption]], *, now: datetime
) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` of the warnings read, in the store's dialect."""
    values = [
        {
            "instance_id": instance_id,
            "provider": provider,
            "launch_id": notice.launch_id,
            "zone": notice.zone,
            "instance_type": notice.instance_type,
            "reason": notice.reason,
            "noticed_at": notice.noticed_at,
            "received_at": now,
        }
        for instance_id, (provider, notice) in received.items()
    ]
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    return (
        dialect.insert(SpotNotice)
        .values(values)
        .on_conflict_do_nothing(index_elements=[SpotNotice.instance_id])
    )


def _interruption(row: SpotNotice) -> SpotInterruption:
    return SpotInterruption(
        instance_id=row.instance_id,
        launch_id=row.launch_id,
        zone=row.zone,
        instance_type=row.instance_type,
        noticed_at=row.noticed_at,
        reason=row.reason,
    )
