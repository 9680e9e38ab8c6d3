"""A pass's launches in one batch: decide in memory, one commit for every intent, the
provider calls at once, one commit for every result.

A workload stepped in full (``reconcile.workload``) costs a dozen store round trips
when it launches: its workload and rows read again, the intent and its commit, the
instance and its commit. Most workloads a pass steps because their spec changed plan
one launch and nothing else, from facts the pass has already read (``reconcile.fleet``).
:func:`launch_batch` takes those out of the pass's queue before the full steps:

1. **Which.** A queued workload whose facts changed since its last step
   (``changes``, rule 1) and for which nothing but the decision could have work:
   live, not quarantined, not backing off after failed boots, none read this pass,
   runnable, no warm pool, not allowed spot machines (its step reads their measured
   interruption rate from the store), every replica settled as far as its facts and
   the provider's list tell and every probed engine answering as its phase says
   (``changes``, rule 4:
   sync, intent resolution, group and park settlement, health checks and spot notices
   would find nothing). Its pure step (``decide.step.step``) runs on those facts, with
   the fleet's spend counting every launch decided before it in the batch; a plan of
   exactly one launch of one machine placed on an offer is batched, anything else is
   left to the full step (and a step that raises too, which reports it).
2. **Intents.** Every batched workload's scale decision, launch decision and intent
   row in one transaction (two ``INSERT`` statements, each executed for many rows),
   committed before any provider hears of them; a workload applied again or deleted
   since the pass read it is left to its full step (its row is read ``FOR SHARE`` in
   that transaction, so no change slips in before the commit). Under a fleet ceiling the pass's
   total (``ledger.FleetSpend``) is held from the first decision through the last
   result, and moved by the intents when they commit: the ceiling is checked against
   the same total a SUM would give, as in the full step. If the transaction fails, the
   batch is given up: nothing of it was written (or, were the commit's answer lost,
   its intents are pending rows that a full step resolves by launch id) and every one
   of its workloads is stepped in full in the same pass.
3. **Calls.** The launches go to the providers :data:`CALLS_AT_ONCE` at a time, each
   within its workload's share of the pass (``Settings.workload_share_sec``) and none
   past the pass's budget (``Settings.pass_budget_sec``, counted from the pass's
   start): a call not started by then is not made, its intent left to the next pass,
   which is due at once. A pass whose budget is spent before its batch batches
   nothing (its full steps stop at the budget).
4. **Results.** The instances, transient errors and refusals (the row closed on the
   provider's word, a ``launch_failed`` decision) in one transaction; if it fails,
   each row in a transaction of its own, so one row's failure costs only that row,
   which stays a pending intent resolved by launch id next pass (as after a crash).

One workload's failure stays its own: a step or provider call that raises leaves its
workload quarantined as a failed full step is (its intent pending), a call cut at its
share leaves its intent pending, and a provider's refusal closes only its row.

Store round trips: the batch's two transactions (a locking read of its workloads, two
multi-row inserts; one multi-row update), whatever its size, where the full steps took
a dozen per workload. PostgreSQL only (``loop.steps_at_once``:
SQLite steps one workload at a time), one controller alone (with several, a launch
reserves its place under the fleet ceiling in the store: ``provisioner.admit``), and
not in dry-run mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import JSON, Table, bindparam, insert, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import configure_mappers

from autoscaler.admission import runnable_problems
from autoscaler.decide.inputs import SignalsRead
from autoscaler.decide.placement import Placement
from autoscaler.decide.plan import Launch
from autoscaler.decide.step import Step, timeouts_of
from autoscaler.decide.warm import warm_policy_of
from autoscaler.reconcile.boot_failures import launch_hold
from autoscaler.reconcile.changes import (
    forget_step,
    health_as_left,
    load_specs,
    needs_step,
    probe,
    record_step,
    replica_needs_step,
    spec_of,
    step_on_facts,
)
from autoscaler.reconcile.deps import Deps, log
from autoscaler.reconcile.fleet import Fleet, WorkloadFacts, in_keys
from autoscaler.reconcile.ledger import Facts, FleetSpend
from autoscaler.reconcile.observe import Observation
from autoscaler.reconcile.provisioner import (
    call_launch,
    intent_values,
    launch_disk_gib,
    launch_entry,
    launch_request,
    launch_retry,
    mark_unavailable,
    new_launch_id,
    refuse,
)
from autoscaler.reconcile.workload import (
    avoid_slow_offers,
    due_after,
    export_refusals,
    export_workload,
    on_spot,
    remember_scale,
    scale_entry,
    signals_for,
)
from autoscaler.spec import WorkloadSpec
from autoscaler.store.models import Decision, Workload
from autoscaler.store.models import Instance as LedgerRow
from providers.base import ProviderError, Transient

_INSTANCES = cast(Table, LedgerRow.__table__)
_DECISIONS = cast(Table, Decision.__table__)

CALLS_AT_ONCE = 16
"""Provider launch calls of a batch in flight at once."""

_RESULT_COLUMNS = (
    "instance_id",
    "launched_at",
    "url",
    "private_address",
    "engine",
    "engine_reason",
    "last_error",
    "terminated_confirmed_at",
)
"""The columns a launch's outcome writes on its row."""


@dataclass(slots=True)
class _Launch:
    """One batched workload: its step, the intent row (not attached to a session) and
    what its provider call left."""

    workload: WorkloadFacts
    spec: WorkloadSpec
    result: Step
    row: LedgerRow
    entries: list[dict[str, Any]]
    """The decisions written with the intent: its scale decision (if logged) and launch."""
    closing: dict[str, Any] | None = None
    """The ``launch_failed`` decision of a launch the provider refused."""
    changed: bool = False
    """The call changed the row (an instance, an error, a refusal)."""
    cut: bool = False
    late: bool = False
    """Not called: the pass's budget was spent before its turn (``cut`` too)."""
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Batched:
    """What :func:`launch_batch` left: the workloads still to step in full, the seconds
    until each batched one's timer (``None``: none), and the workloads whose call raised
    (quarantined by the caller, as a failed step)."""

    rest: tuple[WorkloadFacts, ...]
    after: Mapping[int, float | None] = field(default_factory=dict)
    failed: Sequence[tuple[WorkloadFacts, Exception]] = ()


async def launch_batch(
    deps: Deps,
    due: Sequence[WorkloadFacts],
    *,
    snapshot: Fleet,
    observed: Observation,
    signals: SignalsRead,
    fleet: FleetSpend | None,
    boots: Mapping[int, Sequence[LedgerRow]],
    now: datetime,
    started: float | None = None,
) -> Batched:
    """Launch the queued workloads whose step is one launch in one batch (see the module
    docstring); the rest are left to their full steps. ``started``: the pass's start
    (``time.perf_counter``), from which its budget counts (``None``: from now)."""
    if deps.shards is not None or deps.settings.dry_run or not due:
        return Batched(rest=tuple(due))
    started = time.perf_counter() if started is None else started
    if _budget_left(deps, started) <= 0:
        return Batched(rest=tuple(due))
    candidates = [w for w in due if _may_batch(deps, w, observed=observed, boots=boots, now=now)]
    if not candidates:
        return Batched(rest=tuple(due))
    await load_specs(deps, candidates)
    specs = {w.id: spec for w in candidates if (spec := _runnable_spec(deps, w)) is not None}
    candidates = [w for w in candidates if w.id in specs]
    answers = await probe(deps, candidates)
    candidates = [w for w in candidates if health_as_left(w, answers)]
    if not candidates:
        return Batched(rest=tuple(due))
    lock = fleet.lock if fleet is not None else asyncio.Lock()
    async with lock:
        launches = await _decide(
            deps,
            [(w, specs[w.id]) for w in candidates],
            snapshot=snapshot,
            signals=signals,
            fleet=fleet,
            now=now,
        )
        written = await _write_intents(deps, launches, fleet=fleet) if launches else None
        if not written:
            return Batched(rest=tuple(due))
        launches = written
        await _call(deps, launches, started=started, now=now)
        await _write_results(deps, launches, fleet=fleet)
    batched = {b.workload.id for b in launches}
    after: dict[int, float | None] = {}
    failed: list[tuple[WorkloadFacts, Exception]] = []
    if any(b.late for b in launches):
        deps.metrics.pass_overruns.labels("pass").inc()
        log.warning(
            "reconcile pass over its %gs budget: %d launches of its batch are made in the "
            "next pass",
            deps.settings.pass_budget_sec,
            sum(b.late for b in launches),
        )
    for b in launches:
        outcome = _settle(deps, b, now=now)
        if isinstance(outcome, Exception):
            failed.append((b.workload, outcome))
        else:
            after[b.workload.id] = outcome
    return Batched(rest=tuple(w for w in due if w.id not in batched), after=after, failed=failed)


def _budget_left(deps: Deps, started: float) -> float:
    """Seconds of the pass's budget left."""
    return deps.settings.pass_budget_sec - (time.perf_counter() - started)


def _may_batch(
    deps: Deps,
    w: WorkloadFacts,
    *,
    observed: Observation,
    boots: Mapping[int, Sequence[LedgerRow]],
    now: datetime,
) -> bool:
    """Whether only ``w``'s decision can have work (its facts alone: rules 1 and 4 of
    ``changes``); the spec and the health probes are checked after."""
    memory = deps.memory
    if w.deleted or w.id in memory.failures or w.id in memory.unrunnable or boots.get(w.id):
        return False
    if needs_step(deps, w, observed=observed, now=now) != "new or changed":
        return False
    if replica_needs_step(deps, w, observed=observed) is not None:
        return False
    return launch_hold(deps, workload_id=w.id, rows=w.rows, now=now) is None


def _runnable_spec(deps: Deps, w: WorkloadFacts) -> WorkloadSpec | None:
    """Its spec, when its step reads nothing but the pass's facts: runnable, no warm
    pool (start times), no spot machines (the measured interruption rate)."""
    spec = spec_of(deps, w)
    if spec is None or warm_policy_of(spec) is not None or on_spot(spec):
        return None
    return None if runnable_problems(spec) else spec


async def _decide(
    deps: Deps,
    candidates: Sequence[tuple[WorkloadFacts, WorkloadSpec]],
    *,
    snapshot: Fleet,
    signals: SignalsRead,
    fleet: FleetSpend | None,
    now: datetime,
) -> list[_Launch]:
    """Each candidate's pure step, in order, each counting the launches decided before
    it against the fleet's total; the ones whose plan is one launch of one machine."""
    settings = deps.settings
    total = 0.0
    if settings.fleet_max_hourly_cost_usd is not None and fleet is not None:
        if fleet.usd_per_hour is None:
            async with deps.sessions() as s:
                total = await fleet.total(s)
        else:
            total = fleet.usd_per_hour
    launches: list[_Launch] = []
    for w, spec in candidates:
        try:
            planned = _plan(
                deps, w, spec=spec, snapshot=snapshot, signals=signals, total=total, now=now
            )
        except Exception:  # its full step runs it again and reports the failure
            log.debug("%s/%s: its step raised: stepped in full", w.project, w.slug, exc_info=True)
            continue
        if planned is not None:
            launches.append(planned)
            total += planned.row.hourly_usd
    return launches


def _plan(
    deps: Deps,
    w: WorkloadFacts,
    *,
    spec: WorkloadSpec,
    snapshot: Fleet,
    signals: SignalsRead,
    total: float,
    now: datetime,
) -> _Launch | None:
    avoid_slow_offers(deps, rows=w.rows, timeouts=timeouts_of(spec), now=now)
    measured = signals_for((w.project, w.slug), signals, last_request_at=w.last_request_at)
    result = step_on_facts(
        deps, w, spec=spec, measured=measured, fleet=snapshot, fleet_usd_per_hour=total, now=now
    )
    plan = result.plan
    placement = result.placement
    if plan.refusals or len(plan.actions) != 1 or not isinstance(plan.actions[0], Launch):
        return None
    if not _one_machine(placement):
        return None
    assert placement is not None
    launch = plan.actions[0]
    values = intent_values(
        w,
        spec,
        placement=placement,
        launch_id=new_launch_id(),
        now=now,
        disk_gib=launch_disk_gib(deps, placement),
    )
    values["prefill"] = launch.prefill
    row = _detached_row(values)
    scale = scale_entry(
        deps,
        workload_id=w.id,
        decision=result.decision,
        rows=w.rows,
        warm=None,
        signal=measured.signals,
        inputs=result.inputs,
        now=now,
    )
    entries = [] if scale is None else [scale]
    entries.append(launch_entry(row, placement=placement, reason=launch.reason, now=now))
    return _Launch(workload=w, spec=spec, result=result, row=row, entries=entries)


def _one_machine(placement: Placement | None) -> bool:
    return (
        placement is not None
        and placement.found
        and placement.offer is not None
        and placement.group_size == 1
    )


async def _write_intents(
    deps: Deps, launches: Sequence[_Launch], *, fleet: FleetSpend | None
) -> list[_Launch] | None:
    """Every intent and its decisions in one transaction, for the workloads whose row is
    still the one the pass read (locked against a change until the commit; one applied
    again or deleted since is stepped in full instead); those written, ``None`` if it failed. Then
    what their steps' decisions leave in memory, and the fleet's total moved by them."""
    try:
        async with deps.sessions() as s:
            unchanged = await _still_as_read(s, [b.workload for b in launches])
            written = [b for b in launches if b.workload.id in unchanged]
            if written:
                await s.execute(insert(_INSTANCES), _intent_params([b.row for b in written]))
                await s.execute(insert(_DECISIONS), [e for b in written for e in b.entries])
            await s.commit()
    except Exception as exc:  # written or not, the full steps find out from the store
        if fleet is not None:
            fleet.forget()
        log.warning(
            "writing a batch of %d launch intents failed (%s): each workload is stepped in full",
            len(launches),
            exc,
        )
        return None
    memory = deps.memory
    for b in written:
        memory.scale[b.workload.id] = b.result.decision.memory
        remember_scale(deps, workload_id=b.workload.id, decision=b.result.decision)
        if fleet is not None:
            fleet.moved(b.row.hourly_usd)
    return written


async def _still_as_read(s: AsyncSession, workloads: Sequence[WorkloadFacts]) -> set[int]:
    """The ids of these workloads whose row is as the pass read it (live, same spec),
    each locked ``FOR SHARE`` until the transaction ends: one query, its ids one array
    parameter on PostgreSQL (``fleet.in_keys``). O(len(workloads))."""
    read = {w.id: (w.generation, w.spec_hash) for w in workloads}
    found = await s.execute(
        select(Workload.id, Workload.generation, Workload.spec_hash)
        .where(
            in_keys(Workload.id, list(read), s.get_bind().dialect.name),
            Workload.deleted_at.is_(None),
        )
        .with_for_update(read=True)
    )
    return {wid for wid, generation, spec_hash in found if read[wid] == (generation, spec_hash)}


_COLUMNS = tuple(c.key for c in _INSTANCES.columns)
_UNSET = dict.fromkeys(_COLUMNS)


def _detached_row(values: Mapping[str, Any]) -> LedgerRow:
    """An intent row in no session, its columns ``values`` and the others ``None`` (as
    the ORM reads a column never set): the row's state made once and its attributes
    written as values, not set one by one through the ORM's instrumentation (its
    constructor's events cost more than the rest of the row). Later writes to it (the
    instance, an error) go through the instrumentation as on any row. O(columns)."""
    configure_mappers()  # as the constructor would (a few microseconds once done)
    row = _ROWS.new_instance()
    vars(row).update(_UNSET, **values)
    return row


_ROWS = inspect(LedgerRow).class_manager
"""The ORM's manager of ledger rows: makes a row and its state without its constructor."""


_COLUMN_VALUES = itemgetter(*_COLUMNS)

_ALWAYS_WRITTEN = frozenset(
    c.key
    for c in _INSTANCES.columns
    if c.default is not None or c.server_default is not None or isinstance(c.type, JSON)
)
"""The columns an intent insert names even where every row leaves them ``None``: one
with a default would take it if left out, and a JSON one holds JSON ``null`` for
``None`` where left out it holds SQL ``NULL``."""


def _intent_params(rows: Sequence[LedgerRow]) -> list[dict[str, Any]]:
    """The intents' column values, read from :func:`_detached_row`s (which hold every
    column), not through the ORM's attribute instrumentation. A column every row
    leaves ``None`` is left out (SQL ``NULL`` is what the insert writes there either
    way, and no bind processor runs on it), except those of :data:`_ALWAYS_WRITTEN`.
    O(rows x columns)."""
    if not rows:
        return []
    table = zip(*(_COLUMN_VALUES(vars(row)) for row in rows), strict=True)  # by column
    kept = [
        (column, values)
        for column, values in zip(_COLUMNS, table, strict=True)
        if column in _ALWAYS_WRITTEN or values.count(None) < len(values)
    ]
    columns = [column for column, _ in kept]
    return [dict(zip(columns, row, strict=True)) for row in zip(*(v for _, v in kept), strict=True)]


async def _call(deps: Deps, launches: Sequence[_Launch], *, started: float, now: datetime) -> None:
    """The provider calls, :data:`CALLS_AT_ONCE` at a time, each within its share of the
    pass and all within the pass's budget, counted from its start (one cut, or not made
    once the budget is spent, leaves its intent pending)."""
    slots = asyncio.Semaphore(CALLS_AT_ONCE)
    loop = asyncio.get_running_loop()
    settings = deps.settings
    last = loop.time() + _budget_left(deps, started)  # none waits past the pass's budget

    async def one(b: _Launch) -> None:
        async with slots:
            if loop.time() >= last:
                b.cut = b.late = True
                return
            try:
                async with asyncio.timeout_at(min(loop.time() + settings.workload_share_sec, last)):
                    await _launch(deps, b, now=now)
            except TimeoutError:
                b.cut = True
            except Exception as exc:  # isolated: its intent stays pending
                b.error = exc

    await asyncio.gather(*(one(b) for b in launches))


async def _launch(deps: Deps, b: _Launch, *, now: datetime) -> None:
    row = b.row
    request = launch_request(deps, row=row, spec=b.spec, rank=0)
    if isinstance(request, str):
        b.closing, b.changed = refuse(deps, row=row, now=now, error=request), True
        return
    try:
        await call_launch(deps, row=row, request=request, now=now)
    except Transient as exc:
        launch_retry(deps, row=row, error=exc, now=now)
    except ProviderError as exc:
        mark_unavailable(deps, row=row, now=now)
        b.closing = refuse(deps, row=row, now=now, error=str(exc), error_type=exc)
        log.warning("launch %s failed: %s", row.launch_id, exc)
    b.changed = True


async def _write_results(
    deps: Deps, launches: Sequence[_Launch], *, fleet: FleetSpend | None
) -> None:
    """The calls' outcomes in one transaction, else each in its own."""
    changed = [b for b in launches if b.changed]
    if not changed:
        return
    try:
        await _store_results(deps, changed)
    except Exception as exc:
        log.warning(
            "writing a batch of %d launch results failed (%s): each on its own", len(changed), exc
        )
        written = []
        for b in changed:
            try:
                await _store_results(deps, [b])
            except Exception as one:  # its intent stays pending: resolved by launch id
                log.warning(
                    "recording launch %s failed: %s; resolved next pass", b.row.launch_id, one
                )
                b.closing = None
            else:
                written.append(b)
        changed = written
    if fleet is not None:
        for b in changed:
            if b.closing is not None:
                fleet.moved(-b.row.hourly_usd)


async def _store_results(deps: Deps, launches: Sequence[_Launch]) -> None:
    table = _INSTANCES
    params = [
        {"b_launch_id": b.row.launch_id, **{c: getattr(b.row, c) for c in _RESULT_COLUMNS}}
        for b in launches
    ]
    closing = [b.closing for b in launches if b.closing is not None]
    async with deps.sessions() as s:
        await s.execute(update(table).where(table.c.launch_id == bindparam("b_launch_id")), params)
        if closing:
            await s.execute(insert(_DECISIONS), closing)
        await s.commit()


def _settle(deps: Deps, b: _Launch, *, now: datetime) -> float | Exception | None:
    """What the batch leaves of one workload, as its full step would: its gauges and the
    memory of its step; the seconds until its timer, or the exception its call raised."""
    w = b.workload
    forget_step(deps, w.id)  # stepped in full next pass unless recorded below
    if b.error is not None:
        deps.memory.last_desired.pop(w.id, None)
        return b.error
    if b.late:
        return 0.0  # its intent is launched in the next pass (``resolve_intent``)
    if b.cut:
        deps.memory.last_desired.pop(w.id, None)
        deps.metrics.pass_overruns.labels("workload").inc()
        log.warning(
            "launching for %s/%s took more than its %gs share of the pass: its intent "
            "is resolved in the next pass",
            w.project,
            w.slug,
            deps.settings.workload_share_sec,
        )
        return 0.0
    labels = (w.project, w.slug)
    decision, plan = b.result.decision, b.result.plan
    rows: list[Facts] = [*w.rows]
    if b.row.terminated_confirmed_at is None:
        rows.append(b.row)
    export_refusals(deps, labels=labels, plan=plan)
    export_workload(deps, labels=labels, spec=b.spec, rows=rows, desired=decision.desired)
    after = due_after(plan, decision, now=now)
    record_step(deps, w, quiet=False, after=after, now=now)
    return after
