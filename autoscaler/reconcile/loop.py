"""One reconcile pass over the fleet: :func:`reconcile_once`.

A pass reads the providers once, the gateway's signals once and the fleet's rows
written since the last pass (``reconcile.fleet``), chooses the workloads it considers
(:func:`workloads_this_pass`), and steps in full only those whose inputs changed or
whose timers fell due (``reconcile.changes``, which says why leaving the others alone
changes nothing; each is stepped in full at least every ``Settings.resync_sec``). The
orphan sweep runs last, when every intent of the pass is on record, at most every
``Settings.sweep_sec``.

The work of a pass is bounded, so that the API and the gateway sharing the event loop
keep answering and a stop signal is heard:

* **A share per workload.** One workload's step that runs past
  ``Settings.workload_share_sec`` (not counting the time it waits for another step's
  launches under a fleet ceiling) is cut (cancelled where it waits), counted in
  ``autoscaler_controller_pass_overruns_total{kind="workload"}`` and logged; being
  level-based, it carries on from the ledger in the next pass.
* **A budget per pass.** Once a pass has run ``Settings.pass_budget_sec``, the workloads
  not reached yet are left to the next pass, which is due at once and starts with them
  (``kind="pass"``). Workloads are taken in a rotating order, so none waits behind a
  slow one for ever.
* **Yields.** The loop hands control back to the event loop between workloads, and
  steps at most :data:`STEPS_AT_ONCE` workloads at once.

**Failures are isolated and quarantined.** Each step has its own session and
transaction: one that raises rolls back only its own uncommitted writes, and the
steps running beside it go on. A workload whose step raises is logged with
its traceback once, its error recorded once as a decision (``kind = error``, shown by
``autoscaler describe``), and retried with exponential backoff (``tick_sec`` doubling up
to ``Settings.quarantine_max_sec``); further failures are one log line each, with no
traceback. A deleted workload is torn down even when its step fails: its replicas are
drained and terminated without its spec (:func:`teardown_workload`).

**What a pass costs.** Reading: one ``list`` per provider, the fleet's rows written
since the last pass (a statement for the bound, two queries on the ``revision`` index,
O(rows written); the whole fleet, O(workloads + open rows), on the first pass, every
``Settings.resync_sec`` and after a pass that raised), one query for the engine keys
and specs not read yet. In memory: the providers' lists diffed with the last pass's
(O(instances listed)), the workloads whose facts changed, were queued last pass, fell
due or whose instances moved compared (``reconcile.changes``), a slice of the ready
replicas probed (each every ``changes.PROBE_EVERY`` passes, booting ones each pass),
an autoscaling workload's pure step, and the fleet's tuple of workloads and its total
made from the kept snapshot at C speed (O(workloads), under a millisecond at 10,000).
The orphan sweep (O(instances listed + open rows)) and the SUM behind the spend metric
run at most every ``Settings.sweep_sec`` (30 s); in between the metric is the total the
pass read. Then, for the
workloads stepped in full, one query for their failed boots, and for each a constant
number of round trips, plus a commit per action and one after each provider call
(``reconcile.workload``); a converged fleet steps none but the ones due for their
resync. On PostgreSQL :data:`STEPS_AT_ONCE` workloads are stepped at once, each in a
session of its own, so their round trips and provider calls overlap; on SQLite one at
a time. The fleet's spend for a fleet ceiling is the snapshot's total, moved by each
step, which holds it from its read through its launches (``ledger.FleetSpend``): under
a ceiling that part of the steps runs one at a time. Placement runs only for a
workload whose plan may launch or that has no replica to take its GPU shape from
(``decide.step.step``): O(feasible offers) to rank them for a workload whose placement
inputs are new in the pass, O(shapes + unavailable markets) for one whose inputs equal
an earlier one's (its key's replicas needed per shape and live unavailable markets; the
pass's ``decide.placement.PlacementMemo``, dropped at its start; the offers' index is
kept while the catalog load is the same).

**Several controllers.** Where they share the store (``autoscaler.reconcile.shards``),
a pass takes only the workloads of the shards this controller holds, skips one whose
lease lapsed during the pass, measures and records only those, and leaves a workload
whose launch found the lease gone (``LeaseLost``) to its new holder; the orphan sweep
runs on the holder of shard 0. The spot warnings a provider's queue gave this
controller are stored for the owner of their instance, and the pass reads every stored
one (``autoscaler.reconcile.notices``).

The caller sleeps between passes (``autoscaler.controller``), or the simulator advances
its clock: this module never sleeps and reads time only from ``deps.clock`` (and the
wall clock for the time a pass's work takes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from pydantic import ValidationError

from autoscaler.decide.inputs import SignalsRead
from autoscaler.reconcile.batch import launch_batch
from autoscaler.reconcile.boot_failures import failed_boots_of, reported_since
from autoscaler.reconcile.changes import forget_step, last_facts, record_step, work_for_pass
from autoscaler.reconcile.deps import Deps, Failure, LeaseLost, log
from autoscaler.reconcile.fleet import Fleet, FleetCache, WorkloadFacts, read_fleet
from autoscaler.reconcile.ledger import FleetSpend, fleet_usd_per_hour, record_decision
from autoscaler.reconcile.measure import record_measurements, with_engines
from autoscaler.reconcile.observe import Observation, observe
from autoscaler.reconcile.orphans import sweep_orphans
from autoscaler.reconcile.workload import STEP_SHARE, reconcile_workload, teardown_workload
from autoscaler.store.models import Instance as LedgerRow
from providers.base import utc


def workloads_this_pass(deps: Deps, fleet: Fleet) -> Sequence[WorkloadFacts]:
    """The workloads this controller's pass considers, by id: every live workload and
    every deleted one with rows still open, of the shards this controller holds (all of
    them, alone). The one place the set is chosen. O(workloads)."""
    if deps.shards is None:
        return fleet.workloads
    return [w for w in fleet.workloads if deps.owns(w.project, w.slug)]


async def reconcile_once(deps: Deps) -> float:
    """Reconcile the workloads whose inputs changed or whose timers fell due (as many as
    the pass budget allows); seconds until the next pass is due."""
    try:
        return await _reconcile_once(deps)
    except BaseException:  # in doubt: the next pass reads the fleet whole
        deps.memory.fleet = None
        raise


async def _reconcile_once(deps: Deps) -> float:
    started = time.perf_counter()
    now = utc(deps.clock.now())
    deps.memory.started_at = deps.memory.started_at or now
    observed = await observe(deps)
    signals, scraped = await _with_engines(deps, _owned(deps, await _signals(deps)), now=now)
    if scraped:
        try:
            await record_measurements(deps, signals, now=now)
        except Exception:
            log.exception("recording the measurements failed")
    memory = deps.memory
    memory.placements.next_pass()
    if memory.fleet is None or memory.fleet_full_at is None or now >= memory.fleet_full_at:
        memory.fleet = FleetCache()  # read whole: the first pass, and every resync_sec
        memory.fleet_full_at = now + timedelta(seconds=deps.settings.resync_sec)
    async with deps.sessions() as s:
        snapshot = await read_fleet(
            s, previous=last_facts(deps), sleep_flags=memory.sleep_flags, cache=memory.fleet
        )
        width = steps_at_once(s.get_bind().dialect.name)
    deps.metrics.fleet_usd.set(snapshot.usd_per_hour)  # as read; the SUM below every sweep_sec
    work = await work_for_pass(
        deps,
        workloads_this_pass(deps, snapshot),
        fleet=snapshot,
        observed=observed,
        signals=signals,
        now=now,
    )
    found: Sequence[WorkloadFacts] = work.due
    deps.metrics.pass_workloads.labels("stepped").set(len(found))
    deps.metrics.pass_workloads.labels("left_alone").set(work.left_alone)
    # The fleet's spend, under a fleet ceiling only: the snapshot's, moved by each step.
    fleet = (
        FleetSpend(snapshot.usd_per_hour)
        if deps.settings.fleet_max_hourly_cost_usd is not None
        else None
    )
    due = deps.settings.tick_sec
    if work.next_at is not None:
        due = min(due, max(0.0, (work.next_at - now).total_seconds()))
    boots: Mapping[int, Sequence[LedgerRow]] = {}
    if found:
        async with deps.sessions() as s:
            since = reported_since(deps, now=now)
            boots = await failed_boots_of(s, [w.id for w in found], since=since)
    queued = len(found)
    if found and width > 1:  # on PostgreSQL: one launch each, in one batch
        found, after = await _batch(
            deps,
            found,
            snapshot=snapshot,
            observed=observed,
            signals=signals,
            fleet=fleet,
            boots=boots,
            now=now,
            started=started,
        )
        if after is not None:
            due = min(due, max(after, 0.0))
    deps.metrics.pass_workloads.labels("batched").set(queued - len(found))
    slots = asyncio.Semaphore(width)
    steps: list[asyncio.Task[float | None]] = []

    async def stepped(workload: WorkloadFacts) -> float | None:
        try:
            return await _one(
                deps,
                workload,
                observed=observed,
                signals=signals,
                fleet=fleet,
                inherited=snapshot.inherited_prices(workload),
                failed_boots_read=boots.get(workload.id),
                now=now,
            )
        finally:
            slots.release()

    try:
        for index, workload in enumerate(_rotated(found, after=deps.memory.resume_after)):
            await slots.acquire()  # at most ``width`` steps at once
            if index and time.perf_counter() - started >= deps.settings.pass_budget_sec:
                slots.release()
                deps.memory.resume_after = _previous(found, workload)
                deps.metrics.pass_overruns.labels("pass").inc()
                log.warning(
                    "reconcile pass over its %gs budget: %s/%s and the workloads after it "
                    "continue in the next pass",
                    deps.settings.pass_budget_sec,
                    workload.project,
                    workload.slug,
                )
                due = 0.0
                break
            if not deps.owns(workload.project, workload.slug):
                slots.release()
                continue  # its shard's lease lapsed during the pass: another controller's now
            steps.append(asyncio.create_task(stepped(workload)))
            await asyncio.sleep(0)  # let the API and the gateway answer between workloads
        else:
            deps.memory.resume_after = None
        outcomes = await asyncio.gather(*steps, return_exceptions=True)
    finally:
        for task in steps:  # a pass stopped part-way stops its steps too
            task.cancel()
        # ... and ends after them: their sessions closed, none left running beside a
        # shutdown (no-op when they are done).
        await asyncio.gather(*steps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome  # not one workload's failure (``_one`` isolates those)
        if outcome is not None:
            due = min(due, max(outcome, 0.0))
    if memory.swept_at is None or (now - memory.swept_at).total_seconds() >= (
        deps.settings.sweep_sec
    ):
        if len(observed.by_provider) == len(deps.providers.entries):
            memory.swept_at = now  # else again next pass, for the providers that failed
        try:
            if deps.shards is None or deps.shards.fleet_duties:
                claims = {r.launch_id: r.instance_id for r in snapshot.rows()}
                await sweep_orphans(deps, observed=observed, now=now, claims=claims)
        except Exception:
            log.exception("orphan sweep failed")
        async with deps.sessions() as s:
            deps.metrics.fleet_usd.set(await fleet_usd_per_hour(s))
    deps.metrics.fleet_ceiling.set(deps.settings.fleet_max_hourly_cost_usd or 0)
    deps.metrics.reconcile_duration.observe(time.perf_counter() - started)
    deps.metrics.last_reconcile.set(deps.clock.now())
    return due


STEPS_AT_ONCE = 8
"""Workloads stepped at once in a pass on PostgreSQL: their store round trips, health
probes and provider calls overlap (each step has a session of its own, and the store's
pool holds 10 connections). Under a fleet ceiling, the part of a step from its read of
the fleet's total through its launches runs one step at a time (``ledger.FleetSpend``)."""


def steps_at_once(dialect: str) -> int:
    """How many workloads a pass steps at once: :data:`STEPS_AT_ONCE` on PostgreSQL,
    one at a time on SQLite (one writer at a time: of two write transactions begun by
    reads, one would fail rather than wait)."""
    return STEPS_AT_ONCE if dialect == "postgresql" else 1


async def _batch(
    deps: Deps,
    found: Sequence[WorkloadFacts],
    *,
    snapshot: Fleet,
    observed: Observation,
    signals: SignalsRead,
    fleet: FleetSpend | None,
    boots: Mapping[int, Sequence[LedgerRow]],
    now: datetime,
    started: float,
) -> tuple[Sequence[WorkloadFacts], float | None]:
    """The queued workloads whose step is one launch, launched in one batch
    (``reconcile.batch``); the ones left to step in full, and the earliest timer of the
    batched ones. A workload whose call raised is quarantined as a failed step is."""
    try:
        batched = await launch_batch(
            deps,
            found,
            snapshot=snapshot,
            observed=observed,
            signals=signals,
            fleet=fleet,
            boots=boots,
            now=now,
            started=started,
        )
    except Exception:  # not one workload's: each is stepped in full, reading the store
        log.exception("the pass's batch of launches failed: each workload is stepped in full")
        if fleet is not None:
            fleet.forget()
        return found, None
    for workload, error in batched.failed:
        if fleet is not None:
            fleet.forget()
        await _failed(deps, workload, error=error, now=now)
    afters = [a for a in batched.after.values() if a is not None]
    if batched.failed:
        afters.append(deps.settings.tick_sec)
    return batched.rest, min(afters) if afters else None


def _rotated(found: Sequence[WorkloadFacts], *, after: int | None) -> list[WorkloadFacts]:
    """``found`` (by id) starting after workload ``after``: where a cut pass stopped."""
    if after is None:
        return list(found)
    later = [w for w in found if w.id > after]
    return [*later, *(w for w in found if w.id <= after)]


def _previous(found: Sequence[WorkloadFacts], workload: WorkloadFacts) -> int | None:
    earlier = [w.id for w in found if w.id < workload.id]
    return earlier[-1] if earlier else None


async def _one(
    deps: Deps,
    workload: WorkloadFacts,
    *,
    observed: Observation,
    signals: SignalsRead,
    fleet: FleetSpend | None,
    inherited: Sequence[float] | None = None,
    failed_boots_read: Sequence[LedgerRow] | None = None,
    now: datetime,
) -> float | None:
    """One workload's step within its share of the pass; ``None`` on the usual tick.
    A step that failed, was cut or tore a workload down leaves ``fleet`` to be read again
    (and its scale decision to be logged again: it may not have been committed)."""
    forget_step(deps, workload.id)  # stepped in full again unless this step ends well
    failure = deps.memory.failures.get(workload.id)
    if failure is not None and now < failure.retry_at:
        if workload.deleted:
            await _teardown(deps, workload, observed=observed, now=now)
            if fleet is not None:
                fleet.forget()
        return (failure.retry_at - now).total_seconds()
    share = deps.settings.workload_share_sec
    scope: contextlib.AbstractContextManager[None] = (
        contextlib.nullcontext()
        if deps.shards is None
        else deps.shards.step_scope(workload.project, workload.slug)
    )
    try:
        # Its launches only under the lease it began under; its share does not count
        # the time it waits for the fleet's total (``workload.STEP_SHARE``).
        with scope:
            async with asyncio.timeout(share) as limit:
                pinned = STEP_SHARE.set(limit)
                try:
                    outcome = await reconcile_workload(
                        deps,
                        workload_id=workload.id,
                        observed=observed,
                        signals=signals,
                        fleet=fleet,
                        inherited=inherited,
                        failed_boots_read=failed_boots_read,
                        now=now,
                    )
                finally:
                    STEP_SHARE.reset(pinned)
    except LeaseLost as exc:  # another controller holds it now: nothing to retry here
        if fleet is not None:
            fleet.forget()
        log.info("%s/%s: %s; left to its new holder", workload.project, workload.slug, exc)
        return None
    except TimeoutError:
        deps.memory.last_desired.pop(workload.id, None)
        if fleet is not None:
            fleet.forget()
        deps.metrics.pass_overruns.labels("workload").inc()
        log.warning(
            "reconciling %s/%s took more than its %gs share of the pass: cut, continued "
            "in the next pass",
            workload.project,
            workload.slug,
            share,
        )
        return 0.0
    except Exception as exc:  # isolate: one workload never stalls the others
        deps.memory.last_desired.pop(workload.id, None)
        if fleet is not None:
            fleet.forget()
        await _failed(deps, workload, error=exc, now=now)
        if workload.deleted:
            await _teardown(deps, workload, observed=observed, now=now)
        return deps.settings.tick_sec
    if failure is not None:
        del deps.memory.failures[workload.id]
        deps.metrics.quarantined.labels(workload.project, workload.slug).set(0)
        log.info(
            "%s/%s reconciles again after %d failed attempt(s)",
            workload.project,
            workload.slug,
            failure.attempts,
        )
    record_step(
        deps,
        workload,
        quiet=outcome.quiet,
        after=outcome.after,
        start_times=outcome.start_times,
        spot_closed=outcome.spot_closed,
        now=now,
    )
    return outcome.after


async def _failed(deps: Deps, workload: WorkloadFacts, *, error: Exception, now: datetime) -> None:
    """Record a failure: the traceback and a decision the first time, one line after;
    the next try waits ``tick_sec`` doubled per failure, up to ``quarantine_max_sec``."""
    deps.metrics.reconcile_errors.labels(workload.project, workload.slug).inc()
    previous = deps.memory.failures.get(workload.id)
    attempts = 1 if previous is None else previous.attempts + 1
    settings = deps.settings
    backoff = min(settings.quarantine_max_sec, settings.tick_sec * 2 ** (attempts - 1))
    message = _one_line(error)
    deps.memory.failures[workload.id] = Failure(
        attempts=attempts, message=message, retry_at=now + timedelta(seconds=backoff)
    )
    deps.metrics.quarantined.labels(workload.project, workload.slug).set(1)
    ref = f"{workload.project}/{workload.slug}"
    if previous is not None and previous.message == message:
        log.warning(
            "reconciling %s failed again (attempt %d): %s; next try in %gs",
            ref,
            attempts,
            message,
            backoff,
        )
        return
    log.error(
        "reconciling %s failed; the other workloads go on; retried with backoff (next try in %gs)",
        ref,
        backoff,
        exc_info=error,
    )
    try:
        async with deps.sessions() as s:
            record_decision(
                s,
                workload_id=workload.id,
                at=now,
                kind="error",
                reason=f"the controller cannot reconcile this workload: {message}; "
                "retried with backoff",
                inputs={"attempts": attempts},
                result={"retry_in_sec": backoff},
                acted=False,
            )
            await s.commit()
    except Exception as exc:  # the store may be what fails; the log line has it
        log.warning("recording the failure of %s: %s", ref, exc)


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in error.errors(include_url=False)
        )
        return f"the stored spec is not valid: {problems}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}"


async def _teardown(
    deps: Deps, workload: WorkloadFacts, *, observed: Observation, now: datetime
) -> None:
    try:
        await asyncio.wait_for(
            teardown_workload(deps, workload_id=workload.id, observed=observed, now=now),
            timeout=deps.settings.workload_share_sec,
        )
    except Exception as exc:
        log.warning("tearing down deleted %s/%s: %s", workload.project, workload.slug, exc)


async def _with_engines(
    deps: Deps, signals: SignalsRead, *, now: datetime
) -> tuple[SignalsRead, bool]:
    try:
        return await with_engines(deps, signals, now=now)
    except Exception:  # the gateway's measurement alone still drives the pass
        log.exception("reading the engines' metrics failed")
        return signals, False


def _owned(deps: Deps, signals: SignalsRead) -> SignalsRead:
    """The signals of the workloads this controller acts on (every one, alone)."""
    if deps.shards is None:
        return signals
    owned = {ref: measured for ref, measured in signals.measured.items() if deps.owns(*ref)}
    return dataclasses.replace(signals, measured=owned)


async def _signals(deps: Deps) -> SignalsRead:
    try:
        read = await deps.signals.signals()
    except Exception as exc:  # the controller acts without them rather than not at all
        log.warning("reading the gateway's signals failed: %s", exc)
        # Nothing is known: no drain ends on it and no scale-down is decided on it.
        return SignalsRead(incomplete=f"reading the gateway's signals failed: {exc}")
    if read.incomplete is not None:
        log.warning("the gateway's signals were read in part: %s", read.incomplete)
    return read
