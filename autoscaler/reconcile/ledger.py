"""Ledger reads and writes the reconcilers share: open rows, views for the plan, the
decisions log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.decide.plan import ReplicaPhase, ReplicaView, counted_phase
from autoscaler.decide.scaling import FleetCounts
from autoscaler.decide.step import counts_of_phases, phase_counts
from autoscaler.decide.warm import ParkMode, StartSample, WarmPolicy, start_sample
from autoscaler.reconcile.deps import log
from autoscaler.reconcile.fleet import SLEEP_FLAG, RowFacts, in_keys
from autoscaler.store.models import Decision, Workload
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import phase_of, spot_warned

Facts = LedgerRow | RowFacts
"""A ledger row, or the same row read as a value by a pass (``reconcile.fleet``)."""


_EPSILON_USD = 1e-9  # as in decide.budget: a launch that fits exactly is not refused


async def open_rows(session: AsyncSession, workload_id: int) -> list[LedgerRow]:
    """The workload's rows not confirmed terminated, oldest first."""
    return list(
        await session.scalars(
            select(LedgerRow)
            .where(
                LedgerRow.workload_id == workload_id,
                LedgerRow.terminated_confirmed_at.is_(None),
            )
            .order_by(LedgerRow.intent_at, LedgerRow.launch_id)
        )
    )


async def failed_boots_closed_since(
    session: AsyncSession, workload_ids: Sequence[int], *, since: datetime, marker: str
) -> list[LedgerRow]:
    """These workloads' replicas closed at or after ``since`` that were never ready and
    whose ``last_error`` starts with ``marker`` (a failed boot), oldest first: by the
    ``workload_id`` index, at most 5,000 ids a query (``fleet.in_keys``)."""
    found: list[LedgerRow] = []
    dialect = session.get_bind().dialect.name
    for start in range(0, len(workload_ids), 5_000):
        found += await session.scalars(
            select(LedgerRow)
            .where(
                in_keys(LedgerRow.workload_id, list(workload_ids[start : start + 5_000]), dialect),
                LedgerRow.terminated_confirmed_at >= since,
                LedgerRow.ready_at.is_(None),
                LedgerRow.last_error.startswith(marker, autoescape=True),
            )
            .order_by(LedgerRow.terminated_confirmed_at, LedgerRow.launch_id)
        )
    return found


async def predecessor_prices(session: AsyncSession, workload: Workload) -> list[float]:
    """Hourly prices of instances still open under a deleted workload of the same project
    and slug: a slug deleted and applied again inherits their spend against its ceilings
    until the provider confirms them gone."""
    return list(
        await session.scalars(
            select(LedgerRow.hourly_usd).where(
                LedgerRow.project == workload.project,
                LedgerRow.workload_slug == workload.slug,
                LedgerRow.workload_id != workload.id,
                LedgerRow.terminated_confirmed_at.is_(None),
            )
        )
    )


async def fleet_usd_per_hour(session: AsyncSession) -> float:
    """Hourly total of every row not confirmed terminated (pending intents included)."""
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerRow.hourly_usd), 0.0)).where(
            LedgerRow.terminated_confirmed_at.is_(None)
        )
    )
    return float(total or 0.0)


async def workload_usd_per_hour(session: AsyncSession, workload_id: int) -> float:
    """Hourly total of one workload's rows not confirmed terminated: O(its rows), by the
    ``workload_id`` index."""
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerRow.hourly_usd), 0.0)).where(
            LedgerRow.workload_id == workload_id,
            LedgerRow.terminated_confirmed_at.is_(None),
        )
    )
    return float(total or 0.0)


FLEET_LOCK_ID = 7_264_003
"""The transaction-scoped advisory lock launches take on PostgreSQL to reserve their
place under the fleet ceiling (migrations use 7_264_001, the leader 7_264_002)."""


async def reserve_fleet(
    session: AsyncSession, *, usd_per_hour: float, ceiling: float
) -> str | None:
    """Reserve ``usd_per_hour`` under the fleet ceiling in ``session``'s transaction, or
    say why not (a refusal naming the fleet ceiling).

    Several controllers launching at once could each pass a check of the fleet's total
    read before the others' intents: here the check and the intent are one transaction,
    serialised by :data:`FLEET_LOCK_ID` (held until the caller commits the intent rows,
    which it adds after this returns ``None``), so the next launch's SUM counts them.
    PostgreSQL only. Cost: one O(open rows) SUM per launch."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": FLEET_LOCK_ID})
    total = await fleet_usd_per_hour(session)
    if total + usd_per_hour <= ceiling + _EPSILON_USD:
        return None
    return (
        f"launch refused: fleet ${total:,.2f}/h + ${usd_per_hour:,.2f}/h = "
        f"${total + usd_per_hour:,.2f}/h would exceed the fleet ceiling ${ceiling:,.2f}/h "
        "(reserved in the store across controllers)"
    )


@dataclass(slots=True)
class FleetSpend:
    """The fleet's hourly total (:func:`fleet_usd_per_hour`) within one pass, read from
    the store at most once per pass instead of once per workload.

    Each workload's step moves it by the change in that workload's own open rows
    (launches add their price, confirmed terminations take theirs off), so a launch
    decided later in the pass counts every dollar decided earlier in it: the fleet
    ceiling is checked against the same total a fresh SUM would give. After a step that
    failed or was cut part-way (its launches unknown) the total is read again on next use.

    Steps of one pass may run at once (``reconcile.loop.steps_at_once``): each holds
    :attr:`lock` from its read of the total through its launches and its last move, so
    a launch still counts every dollar decided before it; ``reconcile.workload`` says
    how a step's moves stay exact when another step read the total again meanwhile
    (:attr:`reads`).

    Cost per pass: one O(open rows) SUM, plus one after each failed step; O(1) per
    workload otherwise.
    """

    usd_per_hour: float | None = None
    """``None``: not read yet in this pass, or stale."""
    reads: int = 0
    """How many times the total was read from the store in this pass."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def total(self, session: AsyncSession) -> float:
        if self.usd_per_hour is None:
            self.usd_per_hour = await fleet_usd_per_hour(session)
            self.reads += 1
        return self.usd_per_hour

    def moved(self, delta_usd_per_hour: float) -> None:
        """One workload's open rows changed their hourly total by this much."""
        if self.usd_per_hour is not None:
            self.usd_per_hour += delta_usd_per_hour

    def forget(self) -> None:
        """A step's changes are unknown: read the total again on next use."""
        self.usd_per_hour = None


async def workloads_to_reconcile(session: AsyncSession) -> list[Workload]:
    """Live workloads, and deleted ones that still have rows to drain and terminate."""
    still_open = select(LedgerRow.workload_id).where(LedgerRow.terminated_confirmed_at.is_(None))
    return list(
        await session.scalars(
            select(Workload)
            .where(Workload.deleted_at.is_(None) | Workload.id.in_(still_open))
            .order_by(Workload.id)
        )
    )


def can_sleep(row: Facts) -> bool:
    """Whether the replica's engine booted able to sleep (a replica group never parks)."""
    if row.group_id is not None:
        return False
    if isinstance(row, RowFacts):
        return row.booted_to_sleep
    return SLEEP_FLAG in (row.engine_command or ())


def park_mode_of(row: Facts) -> ParkMode | None:
    """How a parking or parked replica waits (``None`` for any other phase)."""
    if row.park_requested_at is None or row.park_mode is None:
        return None
    return ParkMode(row.park_mode)


def start_sample_of(row: LedgerRow) -> StartSample | None:
    """The measured start of the row's last launch or resume (``decide.warm``)."""
    return start_sample(
        offer_key=row.offer_key,
        intent_at=row.intent_at,
        ready_at=row.ready_at,
        resumed_at=row.resumed_at,
        resumed_from=row.park_mode if row.park_requested_at is None else None,
    )


START_SAMPLES = 50
"""Replicas read for a workload's measured start times: its most recently ready."""


async def recent_start_samples(session: AsyncSession, workload_id: int) -> list[StartSample]:
    """The workload's measured starts (launch, start, wake to ready) of its
    :data:`START_SAMPLES` most recently ready replicas, closed ones included: one query
    by the ``workload_id`` index."""
    rows = await session.scalars(
        select(LedgerRow)
        .where(LedgerRow.workload_id == workload_id, LedgerRow.ready_at.is_not(None))
        .order_by(LedgerRow.ready_at.desc())
        .limit(START_SAMPLES)
    )
    return [sample for sample in map(start_sample_of, rows) if sample is not None]


def replica_view(row: Facts, *, in_flight: int) -> ReplicaView:
    """The plan's view of one ledger row. ``usd_per_hour`` is what the row costs now (a
    stopped machine's disks once the provider confirmed the stop), the price every
    ceiling counts; ``running_usd_per_hour`` its price running again. A replica whose
    spot notice is recorded is warned, with or without a reclaim time; a ready one is a
    draining one still serving (``decide.plan.counted_phase``): counted out, its drain
    not started."""
    warned = spot_warned(row)
    return ReplicaView(
        launch_id=row.launch_id,
        phase=counted_phase(ReplicaPhase(phase_of(row).value), warned=warned),
        generation=row.spec_generation,
        offer_key=row.offer_key,
        usd_per_hour=row.hourly_usd,
        intent_at=row.intent_at,
        ready_at=row.ready_at,
        drain_requested_at=row.drain_requested_at,
        in_flight=in_flight,
        park_mode=park_mode_of(row),
        parked_at=row.parked_at,
        resumed_at=row.resumed_at,
        running_usd_per_hour=row.running_usd_per_hour,
        stopped_usd_per_hour=row.stopped_usd_per_hour if row.group_id is None else None,
        can_sleep=can_sleep(row),
        prefill=row.prefill,
        warned=warned,
        reclaim_at=row.reclaim_at,
    )


def replica_views(
    rows: Sequence[LedgerRow] | Sequence[RowFacts], *, in_flight: int
) -> list[ReplicaView]:
    """One view per replica for the plan. A replica group is one replica: its leader,
    priced at every open member and holding as many machines (so the ceilings and
    ``max_instances`` count the whole group); workers whose
    leader is already closed are listed on their own (terminating, still paid for)."""
    members: dict[str, list[Facts]] = {}
    for r in rows:
        if r.group_id is not None:
            members.setdefault(r.group_id, []).append(r)
    views = []
    for r in rows:
        if r.group_id is None:
            views.append(replica_view(r, in_flight=in_flight))
        elif r.group_role == "leader":
            group = members[r.group_id]
            total = sum(m.hourly_usd for m in group)
            views.append(
                replace(
                    replica_view(r, in_flight=in_flight), usd_per_hour=total, machines=len(group)
                )
            )
        elif not any(m.group_role == "leader" for m in members[r.group_id]):
            views.append(replica_view(r, in_flight=0))
    return views


def fleet_counts(rows: Sequence[Facts], *, warm: WarmPolicy | None = None) -> FleetCounts:
    """Ready, booting and draining replicas as the step counts them
    (``decide.step.fleet_counts``): a warm pool refill (``warm``) is none of them.
    O(rows); without a warm pool no replica is a refill, and each row's phase is counted
    as :func:`replica_view` gives it (``decide.plan.counted_phase``) without making the
    views."""
    if warm is not None:
        views = [replica_view(r, in_flight=0) for r in rows if r.group_role != "worker"]
        return phase_counts(views, warm=warm)
    counted = [r for r in rows if r.group_role != "worker"]
    warned = [spot_warned(r) for r in counted]
    return counts_of_phases(
        [
            counted_phase(ReplicaPhase(phase_of(r).value), warned=w)
            for r, w in zip(counted, warned, strict=True)
        ],
        warned=warned,
    )


def record_decision(
    session: AsyncSession,
    *,
    workload_id: int,
    at: datetime,
    kind: str,
    reason: str,
    inputs: dict[str, Any],
    result: dict[str, Any],
    cost_delta: float = 0.0,
    acted: bool = True,
) -> None:
    session.add(
        Decision(
            **decision_values(
                workload_id=workload_id,
                at=at,
                kind=kind,
                reason=reason,
                inputs=inputs,
                result=result,
                cost_delta=cost_delta,
                acted=acted,
            )
        )
    )


def decision_values(
    *,
    workload_id: int,
    at: datetime,
    kind: str,
    reason: str,
    inputs: dict[str, Any],
    result: dict[str, Any],
    cost_delta: float = 0.0,
    acted: bool = True,
) -> dict[str, Any]:
    """A decision's row as column values (:func:`record_decision` adds it to a session;
    a pass's batch of launches inserts many at once: ``reconcile.batch``), and its log
    line when acted on."""
    if acted:  # one log line per decision acted on; refusals and dry runs log their own
        log.info("workload %d: %s: %s", workload_id, kind, reason)
    return {
        "workload_id": workload_id,
        "at": at,
        "kind": kind,
        "inputs": inputs,
        "result": result,
        "reason": reason,
        "cost_delta_usd_per_hour": cost_delta,
        "acted": acted,
    }
