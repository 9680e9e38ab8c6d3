"""The fleet as one pass reads it: every workload and every open ledger row
(:func:`read_fleet`), kept between passes (:class:`FleetCache`) so that a pass reads only
the rows written since the last one, by their ``revision`` (migration 0015); the whole
fleet, in two batched queries, on the first pass and every ``Settings.resync_sec``.

The rows are read as plain values (:class:`RowFacts`), not as ORM objects: a pass over
10,000 workloads and 30,000 replicas read them whole in about a tenth of a second on
PostgreSQL here, where loading them as ORM rows took over a second. The columns are the
ones a workload's step reads (:mod:`autoscaler.reconcile.workload`); an engine key is
sealed at rest, so keys are read apart, only for rows this controller has not seen yet
(:func:`engine_keys`), and kept in memory (a row's key never changes).

Which of these workloads a pass steps is :mod:`autoscaler.reconcile.changes`' question.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Text,
    any_,
    bindparam,
    func,
    select,
    text,
    type_coerce,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase

_KEY_BATCH = 5_000  # launch ids per ``IN`` list

_K = TypeVar("_K")
_V = TypeVar("_V")

SLEEP_FLAG = "--enable-sleep-mode"
"""In a replica's recorded engine command: its engine booted able to sleep."""


class RowFacts(NamedTuple):
    """One open ledger row (not confirmed terminated), as a value. Its fields carry the
    ledger's names, so :func:`autoscaler.store.phase.phase_of` and
    :func:`autoscaler.reconcile.ledger.replica_views` read it as they read a row. A
    tuple, so that comparing a fleet's facts with the last pass's runs at C speed."""

    phase: Phase
    launch_id: str
    workload_id: int
    project: str
    workload_slug: str
    provider: str
    instance_id: str | None
    worker_id: str | None
    url: str | None
    spec_generation: int
    offer_key: str
    zone: str
    gpu: str
    gpu_count: int
    hourly_usd: float
    intent_at: datetime
    launched_at: datetime | None
    ready_at: datetime | None
    drain_requested_at: datetime | None
    terminate_requested_at: datetime | None
    last_error: str | None
    group_id: str | None
    group_role: str | None
    group_size: int | None
    joined_at: datetime | None
    park_mode: str | None
    park_requested_at: datetime | None
    parked_at: datetime | None
    resumed_at: datetime | None
    running_usd_per_hour: float | None
    stopped_usd_per_hour: float | None
    prefill: bool
    spot: bool
    """Bought on the spot market."""
    reclaim_at: datetime | None
    """When its provider reclaims the machine, as its spot notice said."""
    booted_to_sleep: bool
    """Its recorded engine command holds :data:`SLEEP_FLAG` (``ledger.can_sleep``)."""
    terminated_confirmed_at: datetime | None = None


class WorkloadFacts(NamedTuple):
    """One workload a pass considers (live, or deleted with rows still open): the
    columns of its row a step reads, and its open rows, oldest first. Two facts are equal
    exactly when nothing a step reads of the workload's row and rows changed."""

    id: int
    project: str
    slug: str
    generation: int
    spec_hash: str
    deleted: bool
    last_request_at: datetime | None
    rows: tuple[RowFacts, ...]


@dataclass(frozen=True, slots=True)
class Fleet:
    """What one pass read: the workloads by id (ascending) and the fleet's spend."""

    workloads: tuple[WorkloadFacts, ...]
    usd_per_hour: float
    """The hourly total of every open row (``ledger.fleet_usd_per_hour``) as read."""
    by_ref: Mapping[tuple[str, str], tuple[WorkloadFacts, ...]]
    """The workloads of each ``(project, slug)`` that has a deleted one: a live one and
    deleted predecessors (none held for the others: the pass's long-lived objects stay
    those of the facts)."""
    by_id: Mapping[int, WorkloadFacts] = field(default_factory=dict)
    changed: AbstractSet[int] | None = None
    """The workloads whose facts are not the last read's (new, changed or gone);
    ``None``: a full read, after which every workload is compared."""
    booting: AbstractSet[int] = frozenset()
    """The workloads with a booting replica whose engine URL is known."""
    by_instance: Mapping[str, int] = field(default_factory=dict)
    """The workload of each open row's instance, by instance id."""
    closed: tuple[str, ...] = ()
    """Launch ids of the rows this read found closed (an incremental read's only)."""

    def rows(self) -> Iterable[RowFacts]:
        for workload in self.workloads:
            yield from workload.rows

    def inherited_prices(self, workload: WorkloadFacts) -> list[float]:
        """Prices of open rows under a deleted workload of the same project and slug
        (``ledger.predecessor_prices``): O(those rows)."""
        return [
            r.hourly_usd
            for w in self.by_ref.get((workload.project, workload.slug), ())
            if w.id != workload.id
            for r in w.rows
        ]


class FleetCache:
    """The fleet as the last read left it, kept between passes, so that a pass reads
    only the rows written since (:func:`read_fleet`). Losing it (a restart, a failed
    pass) costs one full read.

    ``bound`` and ``pending``: the next read takes the rows whose ``revision`` is at
    least ``bound`` or one of ``pending`` (``bound`` ``None``: nothing read yet, the
    next read is a full one). A revision is set by a trigger on every write (migration
    0015): on PostgreSQL the writing transaction's id, on SQLite a counter.

    Transactions on PostgreSQL commit out of the order of their ids, so the highest
    revision read is no bound: a transaction with a lower id may commit after the read.
    Before its queries a read takes a snapshot's bounds (``txid_current_snapshot()``):
    ``xmax``, the first id not yet started, and the ids then in progress (``xip``).
    Every other transaction below ``xmax`` had ended, so its rows are in the read; the
    next read takes the rows at or above ``xmax`` and those of the transactions then in
    progress, whenever they commit. (The snapshot's ``xmin`` alone would do, but it is
    the whole cluster's: one long transaction in any database would make every pass
    read again every row written since it began.) A row committed between the bounds
    and the queries is read twice: harmless. SQLite has one writer at a time, so its
    counter, read before the rows, bounds them exactly (nothing pending)."""

    __slots__ = (
        "booting",
        "bound",
        "by_instance",
        "deleted",
        "facts",
        "pending",
        "rows",
        "spend",
        "unsorted",
        "workloads",
    )

    def __init__(self) -> None:
        self.bound: int | None = None
        self.pending: tuple[int, ...] = ()
        self.workloads: dict[int, WorkloadFacts] = {}
        """Each workload's row as read (:func:`_workload_of`: its facts, rows left out)."""
        self.rows: dict[int, dict[str, RowFacts]] = {}
        """Open rows by workload id, by launch id."""
        self.facts: dict[int, WorkloadFacts] = {}
        """The fleet's workloads (live, or deleted with open rows), by ascending id."""
        self.spend: dict[int, float] = {}
        self.booting: set[int] = set()
        self.by_instance: dict[str, int] = {}
        self.deleted: set[int] = set()
        self.unsorted = False


_STAMPS = (
    LedgerRow.intent_at,
    LedgerRow.launched_at,
    LedgerRow.ready_at,
    LedgerRow.drain_requested_at,
    LedgerRow.terminate_requested_at,
)


def _row_columns(postgres: bool) -> tuple[Any, ...]:
    """The row's columns in :class:`RowFacts`' order (its phase aside). PostgreSQL's
    driver hands ``timestamptz`` back as aware UTC datetimes already, so the timestamps
    skip the UTC conversion there (a third of the read's time at 30,000 rows)."""

    def stamp(column: Any) -> Any:
        return type_coerce(column, DateTime(timezone=True)) if postgres else column

    return (
        LedgerRow.launch_id,
        LedgerRow.workload_id,
        LedgerRow.project,
        LedgerRow.workload_slug,
        LedgerRow.provider,
        LedgerRow.instance_id,
        LedgerRow.worker_id,
        LedgerRow.url,
        LedgerRow.spec_generation,
        LedgerRow.offer_key,
        LedgerRow.zone,
        LedgerRow.gpu,
        LedgerRow.gpu_count,
        LedgerRow.hourly_usd,
        *(stamp(c) for c in _STAMPS),
        LedgerRow.last_error,
        LedgerRow.group_id,
        LedgerRow.group_role,
        LedgerRow.group_size,
        stamp(LedgerRow.joined_at),
        LedgerRow.park_mode,
        stamp(LedgerRow.park_requested_at),
        stamp(LedgerRow.parked_at),
        stamp(LedgerRow.resumed_at),
        LedgerRow.running_usd_per_hour,
        LedgerRow.stopped_usd_per_hour,
        LedgerRow.prefill,
        LedgerRow.spot,
        stamp(LedgerRow.reclaim_at),
    )


def _sleep_flag() -> ColumnElement[bool]:
    """Whether the row's recorded engine command holds :data:`SLEEP_FLAG`. The command is
    JSON; its text holds the flag as an element, quoted (not decoding the command)."""
    return func.coalesce(sql_cast(LedgerRow.engine_command, Text), "").contains(f'"{SLEEP_FLAG}"')


def _phase(values: Sequence[Any]) -> Phase:
    """``phase_of`` on a row's values (positions in :func:`_row_columns`)."""
    if values[18] is not None:
        return Phase.TERMINATING
    if values[26] is not None:
        return Phase.PARKED
    if values[25] is not None:
        return Phase.PARKING
    if values[17] is not None:
        return Phase.DRAINING
    if values[16] is not None:
        return Phase.READY
    if values[15] is not None:
        return Phase.BOOTING
    return Phase.PENDING


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (reference counting goes on).

    Reading the fleet makes a few objects per row that die within the read (the
    driver's records, the facts of rows that did not change): collected on the way,
    they would be moved to the collector's oldest generation, and at 30,000 rows a
    pass moved enough of them there to run a full collection of the whole heap almost
    every pass (0.1-0.2 s of CPU). The block only awaits the store's answer to two
    queries; a collection the block held back runs at the next allocation after it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def read_fleet(
    session: AsyncSession,
    *,
    previous: Callable[[int], WorkloadFacts | None] | None = None,
    sleep_flags: dict[str, bool] | None = None,
    cache: FleetCache | None = None,
) -> Fleet:
    """The fleet: every live workload, every deleted one with rows still open, and all
    open rows.

    With a ``cache`` that holds an earlier read, only the rows written since are read
    (one statement for the bound, two queries on the ``revision`` index): O(rows
    written since + the workloads they touch), and the fleet's tuple of workloads is
    made again from the cache at C speed (O(workloads), well under a millisecond at
    10,000). Without one, or with an empty one (filled here), everything is read: two
    queries, O(workloads + open rows).

    ``previous``: the facts an earlier pass read of a workload, by id. A workload whose
    facts equal those is given those very objects (and so is an unchanged row): an
    unchanged fleet's facts are the ones already held, compared in O(1) per row, and a
    pass makes no new long-lived objects for them.

    ``sleep_flags``: each row's :attr:`RowFacts.booted_to_sleep` by launch id, filled
    here for the rows not in it (one more query). A row's engine command is written with
    its intent and never changes: testing every row's in the fleet query each pass was
    the store's time spent for nothing."""
    with _collector_paused():
        return await _read_fleet(
            session,
            previous or _none,
            {} if sleep_flags is None else sleep_flags,
            FleetCache() if cache is None else cache,
        )


def _none(workload_id: int) -> WorkloadFacts | None:
    return None


def _workload_of(values: Sequence[Any]) -> WorkloadFacts:
    """A workload's row as read (:func:`_workload_columns`): its facts with no rows yet."""
    workload = WorkloadFacts._make((*values, ()))
    return workload._replace(deleted=bool(workload.deleted))


def _workload_columns(postgres: bool) -> tuple[Any, ...]:
    """The columns of :class:`WorkloadFacts` in its order, its rows aside."""
    return (
        Workload.id,
        Workload.project,
        Workload.slug,
        Workload.generation,
        Workload.spec_hash,
        Workload.deleted_at.is_not(None),
        type_coerce(Workload.last_request_at, DateTime(timezone=True))
        if postgres
        else Workload.last_request_at,
    )


async def _safe_bound(connection: AsyncConnection) -> tuple[int, tuple[int, ...]]:
    """The bounds of the next read (:class:`FleetCache`), read before this one's rows:
    the first revision it takes whole, and the revisions of writers still in progress."""
    if connection.dialect.name == "postgresql":
        found = await connection.execute(
            text(
                "SELECT txid_snapshot_xmax(s), ARRAY(SELECT txid_snapshot_xip(s)) "
                "FROM txid_current_snapshot() AS s"
            )
        )
        xmax, running = found.one()
        return int(xmax), tuple(int(x) for x in running)
    found = await connection.execute(text("SELECT value + 1 FROM fleet_revision WHERE id = 1"))
    return int(found.scalar_one()), ()


def _written_since(column: Any, cache: FleetCache) -> ColumnElement[bool]:
    """The rows of ``column``'s table written since the cache's last read."""
    since: ColumnElement[bool] = column >= cache.bound
    return since | column.in_(cache.pending) if cache.pending else since


async def _read_fleet(
    session: AsyncSession,
    previous: Callable[[int], WorkloadFacts | None],
    sleep_flags: dict[str, bool],
    cache: FleetCache,
) -> Fleet:
    connection = await session.connection()  # Core results: no ORM layer per row
    postgres = connection.dialect.name == "postgresql"
    full = cache.bound is None
    bound, pending = await _safe_bound(connection)
    # Not sorted by the store (at 30,000 rows its sort took half the query's time): each
    # workload's few rows are put in order here.
    columns = (*_row_columns(postgres), LedgerRow.terminated_confirmed_at.is_not(None))
    if full:
        rows_query = select(*columns).where(LedgerRow.terminated_confirmed_at.is_(None))
        still_open = select(LedgerRow.workload_id).where(
            LedgerRow.terminated_confirmed_at.is_(None)
        )
        workloads_query = select(*_workload_columns(postgres)).where(
            Workload.deleted_at.is_(None) | Workload.id.in_(still_open)
        )
    else:
        if postgres:
            # The rows written since the last pass are few by design, but a planner
            # without fresh statistics (a table autovacuum has not analyzed since the
            # fleet grew) estimates a third of the table and scans all of it: at 30,000
            # rows and their dead versions, 20-30 ms a query instead of well under one.
            # Index and bitmap scans only, for this transaction: the two reads by
            # revision and the lookups by key that follow them.
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
        rows_query = select(*columns).where(_written_since(LedgerRow.revision, cache))
        workloads_query = select(*_workload_columns(postgres)).where(
            _written_since(Workload.revision, cache)
        )
    read: Sequence[Sequence[Any]] = (await connection.execute(rows_query)).all()
    unknown = [values[0] for values in read if not values[-1] and values[0] not in sleep_flags]
    if unknown:
        flags = await _column_by_key(session, LedgerRow.launch_id, _sleep_flag(), unknown)
        sleep_flags.update((launch_id, bool(flag)) for launch_id, flag in flags.items())
    if full and len(sleep_flags) > len(read):  # rows closed since: their flags are forgotten
        open_ids = {values[0] for values in read}
        for gone in [launch_id for launch_id in sleep_flags if launch_id not in open_ids]:
            del sleep_flags[gone]
    touched: set[int] = set()
    closed: list[str] = []
    for values in read:
        launch_id, workload_id = values[0], values[1]
        touched.add(workload_id)
        rows = cache.rows.get(workload_id)
        was = None if rows is None else rows.get(launch_id)
        if was is not None and was.instance_id is not None:
            cache.by_instance.pop(was.instance_id, None)
        if values[-1]:  # closed
            if rows is not None and was is not None:
                del rows[launch_id]
            sleep_flags.pop(launch_id, None)
            closed.append(launch_id)
            continue
        row = RowFacts._make(
            (_phase(values), *values[:-1], sleep_flags.get(launch_id, False), None)
        )
        if rows is None:
            cache.rows[workload_id] = {launch_id: row}
        else:
            rows[launch_id] = row
        if row.instance_id is not None:
            cache.by_instance[row.instance_id] = workload_id
    for values in await connection.execute(workloads_query):
        workload = _workload_of(values)
        cache.workloads[workload.id] = workload
        touched.add(workload.id)
    missing = [wid for wid in touched if wid not in cache.workloads]
    if missing:  # rows of a workload not read yet (a deleted one's, say)
        for values in await connection.execute(
            select(*_workload_columns(postgres)).where(Workload.id.in_(missing))
        ):
            workload = _workload_of(values)
            cache.workloads[workload.id] = workload
    changed: set[int] = set()
    for wid in sorted(touched) if full else touched:
        if _refresh(cache, wid, previous):
            changed.add(wid)
    if cache.unsorted:
        cache.facts = dict(sorted(cache.facts.items()))
        cache.unsorted = False
    cache.bound, cache.pending = bound, pending
    return _fleet_of(cache, changed=None if full else changed, closed=tuple(closed))


def _refresh(cache: FleetCache, wid: int, previous: Callable[[int], WorkloadFacts | None]) -> bool:
    """Make workload ``wid``'s facts again from the cache after a read touched it:
    whether they changed. O(its rows)."""
    row = cache.workloads.get(wid)
    rows = cache.rows.get(wid)
    was = cache.facts.get(wid)
    if was is None:
        was = previous(wid)
    if row is None or (row.deleted and not rows):  # gone from the fleet
        cache.rows.pop(wid, None)
        cache.spend.pop(wid, None)
        cache.booting.discard(wid)
        cache.deleted.discard(wid)
        if row is not None:
            del cache.workloads[wid]
        return cache.facts.pop(wid, None) is not None
    facts = row._replace(
        rows=_in_order(list(rows.values()) if rows else None, () if was is None else was.rows)
    )
    if was is not None and was == facts:
        facts = was
    if wid not in cache.facts and cache.facts and wid < next(reversed(cache.facts)):
        cache.unsorted = True
    cache.facts[wid] = facts
    cache.spend[wid] = sum(r.hourly_usd for r in facts.rows)
    if any(r.phase is Phase.BOOTING and r.url is not None for r in facts.rows):
        cache.booting.add(wid)
    else:
        cache.booting.discard(wid)
    if row.deleted:
        cache.deleted.add(wid)
    else:
        cache.deleted.discard(wid)
    return facts is not was


def _fleet_of(cache: FleetCache, *, changed: set[int] | None, closed: tuple[str, ...]) -> Fleet:
    """The pass's fleet from the cache: O(workloads) at C speed, plus O(rows) of the
    deleted workloads."""
    # Only a deleted workload has rows another of its project and slug inherits.
    by_ref: dict[tuple[str, str], tuple[WorkloadFacts, ...]] = {}
    if cache.deleted:
        shared = {(cache.facts[i].project, cache.facts[i].slug) for i in cache.deleted}
        live = {
            (w.project, w.slug): w
            for w in cache.facts.values()
            if not w.deleted and (w.project, w.slug) in shared
        }
        for ref in shared:
            members = [cache.facts[i] for i in cache.deleted if cache.facts[i][1:3] == ref]
            if ref in live:
                members.append(live[ref])
            by_ref[ref] = tuple(sorted(members, key=attrgetter("id")))
    return Fleet(
        workloads=tuple(cache.facts.values()),
        usd_per_hour=sum(cache.spend.values()),
        by_ref=by_ref,
        by_id=cache.facts,
        changed=changed,
        booting=cache.booting,
        by_instance=cache.by_instance,
        closed=closed,
    )


_ROW_ORDER = attrgetter("intent_at", "launch_id")


def _in_order(rows: list[RowFacts] | None, held: tuple[RowFacts, ...]) -> tuple[RowFacts, ...]:
    """A workload's rows oldest first, each one ``held`` holds at its place when equal
    to it (``held`` itself when every one is): O(its rows)."""
    if not rows:
        return ()
    if len(rows) > 1:
        rows.sort(key=_ROW_ORDER)
    same = len(rows) == len(held)
    for index, row in enumerate(rows):
        if index < len(held) and held[index] == row:
            rows[index] = held[index]
        else:
            same = False
    return held if same else tuple(rows)


async def engine_keys(session: AsyncSession, launch_ids: Sequence[str]) -> dict[str, str | None]:
    """The engine key of each of these rows (unsealed): O(len(launch_ids))."""
    return await _column_by_key(session, LedgerRow.launch_id, LedgerRow.engine_key, launch_ids)


async def workload_specs(session: AsyncSession, ids: Sequence[int]) -> Mapping[int, object]:
    """The stored specs (JSON) of these workloads: O(len(ids))."""
    return await _column_by_key(session, Workload.id, Workload.spec, ids)


async def _column_by_key(
    session: AsyncSession,
    key: InstrumentedAttribute[_K],
    column: InstrumentedAttribute[_V] | ColumnElement[_V],
    keys: Sequence[_K],
) -> dict[_K, _V]:
    """``column`` of the rows whose ``key`` is in ``keys``, read in ``IN`` lists of
    :data:`_KEY_BATCH`: O(len(keys))."""
    found: dict[_K, _V] = {}
    dialect = session.get_bind().dialect.name
    for start in range(0, len(keys), _KEY_BATCH):
        chunk = list(keys[start : start + _KEY_BATCH])
        rows = await session.execute(select(key, column).where(in_keys(key, chunk, dialect)))
        found.update((k, v) for k, v in rows)
    return found


def in_keys(key: InstrumentedAttribute[_K], keys: list[_K], dialect: str) -> ColumnElement[bool]:
    """``key`` is one of ``keys``: on PostgreSQL ``key = ANY(:keys)``, one array
    parameter, so the statement is the same whatever the count and is not rendered
    again for each list (an ``IN`` list's parameters are); elsewhere ``key IN (...)``.
    The same rows either way. O(len(keys)) to bind."""
    if dialect == "postgresql":
        return key == any_(bindparam(None, keys, type_=ARRAY(key.type)))
    return key.in_(keys)
