"""Which routes changed since the gateway last looked: the ``route_changes`` log.

Database triggers append a row for every change the gateway routes on (a replica's
readiness, address, key, drain or termination; a workload's spec, name or deletion; a
placing decision; a key, logged with no workload). Each refresh reads the rows past the
last id seen, and the gateway reloads those workloads alone: a refresh with nothing
changed is one indexed query, and one with ``k`` changed workloads costs O(k) rows, not
O(fleet) (:class:`RouteFeed`).

**Ids that commit late.** On PostgreSQL a transaction takes its id when it writes and is
seen when it commits, so id 101 can be visible before id 100. An id missing below the
highest seen is a *hole*, looked for again on every refresh until it appears or
:attr:`RouteFeed.hole_wait_sec` passes (a rolled-back transaction leaves a hole for ever;
a writer's transaction never lasts that long: the controller's share per workload is
seconds). SQLite has one writer at a time and leaves no holes.

**A full reload** happens at start, every :attr:`RouteFeed.resync_sec` as a safety net,
and whenever the log cannot say what changed (more rows than :attr:`RouteFeed.max_rows`,
or more holes than it tracks).

**Pruning.** After a full reload the gateway deletes the rows it had seen
:attr:`RouteFeed.prune_after_sec` ago: every gateway refreshes every second, so each has
read them long before, and one that stalled that long reloads whole at its next refresh
(its resync is overdue).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.store.models import RouteChange

#: How far below the highest id a full reload looks for holes.
HOLE_LOOKBACK = 1_000
#: Holes tracked at most; more and the next refresh reloads whole.
MAX_HOLES = 10_000


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the last look: these workloads' routes, and the keys."""

    workload_ids: frozenset[int]
    keys: bool

    @property
    def empty(self) -> bool:
        return not self.workload_ids and not self.keys


@dataclass(slots=True)
class RouteFeed:
    """The gateway's position in the change log. Not thread-safe; the gateway calls it
    under its refresh lock."""

    resync_sec: float = 120.0
    hole_wait_sec: float = 60.0
    prune_after_sec: float = 600.0
    max_rows: int = 20_000
    seen: int | None = None
    """The highest id read; ``None`` before the first full reload."""
    holes: dict[int, float] = field(default_factory=dict)
    """Ids below ``seen`` not read yet, with when each was first missed."""
    full_at: float | None = None
    marks: deque[tuple[float, int]] = field(default_factory=deque)
    """(time, ``seen``) at each full reload: what may be pruned later."""

    def full_due(self, now: float) -> bool:
        return self.seen is None or self.full_at is None or now - self.full_at >= self.resync_sec

    async def begin_full(self, session: AsyncSession, now: float) -> None:
        """Take the log's position before a full reload reads the tables, so that nothing
        committed after the read began is lost: it is read again, which is harmless."""
        top = await session.scalar(select(func.max(RouteChange.id)))
        seen = int(top or 0)
        present = set(
            await session.scalars(
                select(RouteChange.id).where(RouteChange.id > seen - HOLE_LOOKBACK)
            )
        )
        # Ids missing between the oldest and the newest rows looked at may belong to
        # transactions not committed yet. (Below the oldest are pruned rows, or ones too
        # old to be in flight.)
        low = min(present, default=seen)
        self.holes = dict.fromkeys(set(range(low + 1, seen + 1)) - present, now)
        self.seen = seen
        self.full_at = now
        self.marks.append((now, seen))

    async def read(self, session: AsyncSession, now: float) -> Changes | None:
        """The changes since the last look, or ``None`` when only a full reload can say
        (the caller then reloads whole, which calls :meth:`begin_full`)."""
        assert self.seen is not None, "begin_full first"
        self.holes = {i: t for i, t in self.holes.items() if now - t < self.hole_wait_sec}
        query = select(RouteChange.id, RouteChange.workload_id).where(
            or_(RouteChange.id > self.seen, RouteChange.id.in_(list(self.holes)))
            if self.holes
            else RouteChange.id > self.seen
        )
        rows = (await session.execute(query.order_by(RouteChange.id).limit(self.max_rows))).all()
        if len(rows) >= self.max_rows:
            return None
        return self._absorb(((int(i), w) for i, w in rows), now=now)

    def _absorb(self, rows: Iterable[tuple[int, int | None]], *, now: float) -> Changes | None:
        assert self.seen is not None
        ids: set[int] = set()
        keys = False
        top = self.seen
        got: set[int] = set()
        for change_id, workload_id in rows:
            got.add(change_id)
            self.holes.pop(change_id, None)
            top = max(top, change_id)
            if workload_id is None:
                keys = True
            else:
                ids.add(workload_id)
        for missing in range(self.seen + 1, top):
            if missing not in got:
                self.holes[missing] = now
        self.seen = top
        if len(self.holes) > MAX_HOLES:
            return None
        return Changes(workload_ids=frozenset(ids), keys=keys)

    def prune_due(self, now: float) -> bool:
        """Whether rows seen :attr:`prune_after_sec` ago are waiting to be pruned."""
        return bool(self.marks) and now - self.marks[0][0] >= self.prune_after_sec

    async def prune(self, session: AsyncSession, now: float) -> int:
        """Delete the rows seen at least :attr:`prune_after_sec` ago; the count deleted.
        The caller commits."""
        upto: int | None = None
        while self.prune_due(now):
            upto = self.marks.popleft()[1]
        if upto is None:
            return 0
        result = await session.execute(delete(RouteChange).where(RouteChange.id <= upto))
        return int(getattr(result, "rowcount", 0) or 0)
