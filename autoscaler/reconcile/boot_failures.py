"""Replicas that fail to boot: each reported once, and the workload's launches backed off.

A replica has failed to boot when it is closed, was never ready, and its ``last_error``
starts with :data:`autoscaler.reconcile.liveness.BOOT_FAILED`: its instance or local
engine process ended on its own before it was ready (liveness: ``the engine process
exited with status 1; its output is in …``), its startup script reported failure (the
boot callback), or its private worker could not start it or saw it exit (the worker
heartbeat).

Each one gets one ``boot_failed`` decision, which ``describe``, the API and the SDK show
as the workload's last error until a replica is ready after it, and one warning line.
The workload then launches again no sooner than ``tick_sec`` after its first failed boot
in a row, the wait doubling per further failure up to ``quarantine_max_sec``; a ready
replica ends the series. A spec whose engine cannot start on this machine so costs a
few log lines with growing gaps, not a relaunch, a line and a traceback per pass.

The series lives in the controller's memory: after a restart the first launch is
immediate again, and failures closed before the restart are not reported twice (only
rows closed since this controller's first pass are read).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.reconcile.deps import BootBackoff, Deps, log
from autoscaler.reconcile.ledger import Facts, failed_boots_closed_since, record_decision
from autoscaler.reconcile.liveness import BOOT_FAILED
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase, phase_of

LOOK_BACK = timedelta(hours=1)
"""How far back closed rows are read for failed boots not yet reported."""


def reported_since(deps: Deps, *, now: datetime) -> datetime:
    """From when closed rows are read for failed boots not yet reported."""
    return max(deps.memory.started_at or now, now - LOOK_BACK)


async def failed_boots_of(
    session: AsyncSession, workload_ids: Sequence[int], *, since: datetime
) -> dict[int, list[LedgerRow]]:
    """The failed boots closed at or after ``since`` of these workloads, by workload,
    oldest first: what :func:`report_failed_boots` reads, for a pass's workloads in one
    query instead of one each."""
    found: dict[int, list[LedgerRow]] = {wid: [] for wid in workload_ids}
    for row in await failed_boots_closed_since(
        session, workload_ids, since=since, marker=BOOT_FAILED
    ):
        found[row.workload_id].append(row)
    return found


async def report_failed_boots(
    deps: Deps,
    session: AsyncSession,
    *,
    workload: Workload,
    now: datetime,
    read: Sequence[LedgerRow] | None = None,
    rows: Sequence[LedgerRow] = (),
) -> None:
    """One ``boot_failed`` decision and one warning per failed boot not yet reported;
    each lengthens the workload's wait before its next launch. ``read``: its failed
    boots as the pass read them (:func:`failed_boots_of`; ``None``: read here), to which
    those of ``rows`` (its rows as its step read them) that closed since are added."""
    memory = deps.memory
    since = reported_since(deps, now=now)
    if read is None:
        found = await failed_boots_closed_since(
            session, [workload.id], since=since, marker=BOOT_FAILED
        )
    else:
        found = sorted(
            {r.launch_id: r for r in [*read, *(r for r in rows if _failed(r, since))]}.values(),
            key=lambda r: (r.terminated_confirmed_at or since, r.launch_id),
        )
    fresh = [r for r in found if r.launch_id not in memory.boots_reported]
    for row in fresh:
        memory.boots_reported.add(row.launch_id)
        wait = _back_off(deps, workload_id=workload.id, now=now)
        error = (row.last_error or "").removeprefix(BOOT_FAILED)
        where = f"worker {row.worker_id}" if row.worker_id else row.offer_key
        failures = memory.boot_backoff[workload.id].failures
        reason = (
            f"replica {row.launch_id} on {where} failed to start: {error}; "
            f"{failures} failed boot{'s' if failures != 1 else ''} in a row, "
            f"next launch in {wait:g}s"
        )
        record_decision(
            session,
            workload_id=workload.id,
            at=now,
            kind="boot_failed",
            reason=reason,
            inputs={"launch_id": row.launch_id, "offer": row.offer_key, "worker": row.worker_id},
            result={"error": error, "failures": failures, "next_launch_in_sec": wait},
            acted=False,
        )
        deps.metrics.reconcile_errors.labels(workload.project, workload.slug).inc()
        log.warning("%s/%s: %s", workload.project, workload.slug, reason)
    if fresh:
        await session.commit()


def _failed(row: LedgerRow, since: datetime) -> bool:
    """``failed_boots_closed_since``'s condition, on a row in memory."""
    closed = row.terminated_confirmed_at
    return (
        closed is not None
        and closed >= since
        and row.ready_at is None
        and (row.last_error or "").startswith(BOOT_FAILED)
    )


def _back_off(deps: Deps, *, workload_id: int, now: datetime) -> float:
    previous = deps.memory.boot_backoff.get(workload_id)
    failures = 1 if previous is None else previous.failures + 1
    settings = deps.settings
    wait = float(min(settings.quarantine_max_sec, settings.tick_sec * 2 ** (failures - 1)))
    deps.memory.boot_backoff[workload_id] = BootBackoff(
        failures=failures, retry_at=now + timedelta(seconds=wait)
    )
    return wait


def launch_hold(
    deps: Deps, *, workload_id: int, rows: Sequence[Facts], now: datetime
) -> float | None:
    """Seconds the workload must still wait before launching after failed boots
    (``None``: it may launch now). A ready replica ends the series."""
    if any(phase_of(r) is Phase.READY for r in rows):
        deps.memory.boot_backoff.pop(workload_id, None)
        return None
    backoff = deps.memory.boot_backoff.get(workload_id)
    if backoff is None or now >= backoff.retry_at:
        return None
    return (backoff.retry_at - now).total_seconds()
