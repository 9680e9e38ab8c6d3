"""The fleet as one pass reads it: every workload and every open ledger row, in two
batched queries (:func:`read_fleet`), whatever the fleet's size.

The rows are read as plain values (:class:`RowFacts`), not as ORM objects: a pass over
10,000 workloads and 30,000 replicas reads them in about a tenth of a second on
PostgreSQL here, where loading them as ORM rows took over a second. The columns are the
ones a workload's step reads (:mod:`autoscaler.reconcile.workload`); an engine key is
sealed at rest, so keys are read apart, only for rows this controller has not seen yet
(:func:`engine_keys`), and kept in memory (a row's key never changes).

Which of these workloads a pass steps is :mod:`autoscaler.reconcile.changes`' question.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import ColumnElement, DateTime, Text, func, select, type_coerce
from sqlalchemy import cast as sql_cast
from sqlalchemy.ext.asyncio import AsyncSession
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
) -> Fleet:
    """Every live workload, every deleted one with rows still open, and all open rows:
    two queries, O(workloads + open rows).

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
            session, previous or _none, {} if sleep_flags is None else sleep_flags
        )


def _none(workload_id: int) -> WorkloadFacts | None:
    return None


async def _read_fleet(
    session: AsyncSession,
    previous: Callable[[int], WorkloadFacts | None],
    sleep_flags: dict[str, bool],
) -> Fleet:
    connection = await session.connection()  # Core results: no ORM layer per row
    postgres = connection.dialect.name == "postgresql"
    # Not sorted by the store (at 30,000 rows its sort took half the query's time): each
    # workload's few rows are put in order here.
    found = await connection.execute(
        select(*_row_columns(postgres)).where(LedgerRow.terminated_confirmed_at.is_(None))
    )
    by_workload: dict[int, list[RowFacts]] = {}
    total = 0.0
    read: Sequence[Sequence[Any]] = found.all()  # fetched at once: not a call per row
    unknown = [values[0] for values in read if values[0] not in sleep_flags]
    if unknown:
        flags = await _column_by_key(session, LedgerRow.launch_id, _sleep_flag(), unknown)
        sleep_flags.update((launch_id, bool(flag)) for launch_id, flag in flags.items())
    if len(sleep_flags) > len(read):  # rows closed since: their flags are forgotten
        open_ids = {values[0] for values in read}
        for gone in [launch_id for launch_id in sleep_flags if launch_id not in open_ids]:
            del sleep_flags[gone]
    for values in read:
        row = RowFacts._make((_phase(values), *values, sleep_flags.get(values[0], False), None))
        total += row.hourly_usd
        rows = by_workload.get(row.workload_id)
        if rows is None:
            by_workload[row.workload_id] = [row]
        else:
            rows.append(row)
    still_open = select(LedgerRow.workload_id).where(LedgerRow.terminated_confirmed_at.is_(None))
    listed = await connection.execute(
        select(
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
        .where(Workload.deleted_at.is_(None) | Workload.id.in_(still_open))
        .order_by(Workload.id)
    )
    workloads: list[WorkloadFacts] = []
    for wid, project, slug, generation, spec_hash, deleted, last_request_at in listed:
        was = previous(wid)
        facts = WorkloadFacts(
            id=wid,
            project=project,
            slug=slug,
            generation=generation,
            spec_hash=spec_hash,
            deleted=bool(deleted),
            last_request_at=last_request_at,
            rows=_in_order(by_workload.get(wid), () if was is None else was.rows),
        )
        workloads.append(was if was is not None and was == facts else facts)
    # Only a deleted workload has rows another of its project and slug inherits.
    shared = {(w.project, w.slug) for w in workloads if w.deleted}
    by_ref: dict[tuple[str, str], tuple[WorkloadFacts, ...]] = {}
    for w in workloads:
        if (w.project, w.slug) in shared:
            by_ref[(w.project, w.slug)] = (*by_ref.get((w.project, w.slug), ()), w)
    return Fleet(workloads=tuple(workloads), usd_per_hour=total, by_ref=by_ref)


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
    for start in range(0, len(keys), _KEY_BATCH):
        chunk = list(keys[start : start + _KEY_BATCH])
        rows = await session.execute(select(key, column).where(key.in_(chunk)))
        found.update((k, v) for k, v in rows)
    return found
