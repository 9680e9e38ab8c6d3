"""One workload, one pass: observe its replicas, decide, carry the plan out.

The steps, in order:

1. **Sync** each launched row with what its provider shows (confirm gone, re-send a
   termination that did not take, learn the engine URL).
2. **Resolve** intents a crash or a transient failure left pending (by launch id).
3. **Health**: booting replicas that answer become ready; ready ones that stopped
   answering are terminated.
4. **Step** (``decide.step.step``, the step the trace simulator runs too): the ledger
   rows, the gateway's measurement and the fleet's spend become a ``WorkloadView``; the
   step returns the desired count (0 for a deleted workload), the first launch's
   placement within the budget headroom and the plan (liveness timeouts, drains, scale
   up/down, spec drift, budget).
5. **Act**: terminations and drains are written to the ledger before the provider is
   called; each launch is placed just before it is bought (``decide.step.place_next``)
   and goes through the provisioner (intent first); a launch the provider refused ends
   the pass's launches. Refusals are logged as decisions with ``acted = false`` and
   counted, never bought.

In dry-run mode steps 4's results are logged as decisions (``acted = false``) whenever
the plan changes, and nothing is bought, drained or terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.admission import runnable_problems
from autoscaler.decide.budget import BudgetLimits
from autoscaler.decide.inputs import DecisionInputs, Measured, SignalsRead
from autoscaler.decide.placement import Placement
from autoscaler.decide.plan import (
    Drain,
    Launch,
    Park,
    Plan,
    Refusal,
    ReplicaPhase,
    Resume,
    Terminate,
    Timeouts,
    heed_spot_notice,
    plan_actions,
    spot_drain_at,
)
from autoscaler.decide.scaling import FleetCounts, ScaleDecision, ScaleMemory
from autoscaler.decide.signals import Signals
from autoscaler.decide.spot_rate import PRIOR_SPOT_RATE, SpotLife, spot_rate
from autoscaler.decide.step import (
    ReplicaState,
    Step,
    WorkloadView,
    place_next,
    step,
    timeouts_of,
    unplaced_reason,
)
from autoscaler.decide.warm import (
    DEFAULT_START_TIMES,
    StartTimes,
    WarmPolicy,
    start_times_from,
    warm_policy_of,
)
from autoscaler.metrics import (
    REFUSAL_REASONS,
    ControllerMetrics,
    WorkloadGauges,
    refusal_reason,
)
from autoscaler.reconcile.boot_failures import launch_hold, report_failed_boots
from autoscaler.reconcile.deps import Deps, WorkloadRef, log
from autoscaler.reconcile.fleet import RowFacts
from autoscaler.reconcile.ledger import (
    Facts,
    FleetSpend,
    decision_values,
    fleet_counts,
    fleet_usd_per_hour,
    open_rows,
    predecessor_prices,
    recent_start_samples,
    record_decision,
    replica_view,
    replica_views,
    workload_usd_per_hour,
)
from autoscaler.reconcile.liveness import (
    NOTICED_PHASES,
    check_health,
    closed_spot_lives,
    failed_boots,
    open_spot_lives,
    settle_groups,
    spot_notices,
    sync_with_provider,
    terminate_instance,
)
from autoscaler.reconcile.notices import forget_notices
from autoscaler.reconcile.observe import Observation
from autoscaler.reconcile.park import export_parked, park, resume, settle_parks
from autoscaler.reconcile.provisioner import (
    LaunchRefused,
    launch_replica,
    mark_unavailable,
    resolve_intent,
)
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec, describe_errors
from autoscaler.store.models import Decision, Workload
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from providers.base import reclaim_time
from providers.engines import engine_for


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What one workload's step left: when it wants to run again, and whether its plan
    was empty (nothing to launch, drain or terminate, nothing refused), which is what
    lets a later pass leave it alone while nothing it reads changes
    (:mod:`autoscaler.reconcile.changes`)."""

    after: float | None = None
    """Seconds until a timer of its own falls due (``None``: none pending)."""
    quiet: bool = False
    start_times: StartTimes | None = None
    """The start times its warm pool was planned with (``None``: no warm pool)."""
    spot_closed: tuple[SpotLife, ...] | None = None
    """The closed spot machines its measured interruption rate read
    (``liveness.closed_spot_lives``; ``None``: it does not allow spot)."""


async def reconcile_workload(
    deps: Deps,
    *,
    workload_id: int,
    observed: Observation,
    signals: SignalsRead,
    now: datetime,
    fleet: FleetSpend | None = None,
    inherited: Sequence[float] | None = None,
    failed_boots_read: Sequence[LedgerRow] | None = None,
) -> StepOutcome:
    """One pass over one workload.

    ``fleet``: the pass's fleet spend, read under a fleet ceiling only (``None``: read
    here when there is a ceiling) and moved by this workload's change. ``inherited``:
    the prices of open rows under deleted workloads of its project and slug as the pass
    read them (``Fleet.inherited_prices``; ``None``: read here). A deleted workload
    only closes rows, so the pass's figure can only overstate what it inherits.
    ``failed_boots_read``: its failed boots as the pass read them
    (``boot_failures.failed_boots_of``; ``None``: read here).

    Store round trips: its workload and its open rows read (two), one commit of what the
    sync and the health checks changed (when they did), one of the scale decision with
    the step's first write (an intent, a termination) or at the end, and one after each
    provider call that changed a row; work O(its rows), plus O(offers) for placement
    when the plan may launch."""
    spend = _StepSpend(fleet)
    async with deps.sessions() as s, contextlib.AsyncExitStack() as region:
        workload = await s.get(Workload, workload_id)
        if workload is None:
            return StepOutcome()
        try:
            spec = WorkloadSpec.model_validate(workload.spec)
        except ValidationError as exc:
            await _report_unrunnable(
                deps, s, workload=workload, problems=describe_errors(exc), now=now
            )
            if workload.deleted_at is not None:  # a delete is carried out all the same
                await _tear_down(deps, s, workload=workload, observed=observed, now=now)
                if fleet is not None:
                    fleet.forget()
            return StepOutcome()
        engine = engine_for(spec.backend.value)
        rows = await open_rows(s, workload.id)
        held = rows
        prices = {r.launch_id: r.hourly_usd for r in rows}
        await sync_with_provider(deps, s, rows=rows, observed=observed, port=engine.port, now=now)
        await report_failed_boots(
            deps, s, workload=workload, now=now, read=failed_boots_read, rows=rows
        )
        for row in _still_open(rows):
            if row.worker_id is None and row.instance_id is None and _due(deps, row, now):
                await resolve_intent(deps, s, row=row, spec=spec, now=now)
        rows = _still_open(rows)
        await settle_groups(deps, s, rows=rows, now=now)
        warm = warm_policy_of(spec, deleted=workload.deleted_at is not None)
        sleep_level = warm.sleep_level if warm is not None else 1
        give_up, asleep = await settle_parks(
            deps,
            s,
            rows=rows,
            observed=observed,
            timeouts=timeouts_of(spec),
            sleep_level=sleep_level,
            port=engine.port,
            now=now,
        )
        for row in give_up:
            await _terminate(deps, s, row=row, reason=row.last_error or "park given up", now=now)
        dead = await check_health(
            deps, s, rows=rows, health_path=engine.health_path, now=now, skip=asleep
        )
        for row in dead:
            await _terminate(
                deps,
                s,
                row=row,
                reason=f"unhealthy: {engine.health_path} has not answered for "
                f"{deps.settings.unhealthy_grace_sec:g}s",
                now=now,
            )
        for row in failed_boots(rows):
            mark_unavailable(deps, row=row, now=now)
            await _terminate(deps, s, row=row, reason=row.last_error or "boot failed", now=now)
        queued = await _record_queued_notices(deps, s, rows=rows, observed=observed)
        await _heed_spot_notices(deps, s, workload=workload, rows=rows, queued=queued, now=now)
        rows = _still_open(rows)
        problems = [] if workload.deleted_at else [p.as_detail() for p in runnable_problems(spec)]
        if problems:
            await _report_unrunnable(deps, s, workload=workload, problems=problems, now=now)
            spend.closed(held)
            return StepOutcome()
        deps.memory.unrunnable.pop(workload.id, None)
        avoid_slow_offers(deps, rows=rows, timeouts=timeouts_of(spec), now=now)
        measured = signals_for(
            (workload.project, workload.slug), signals, last_request_at=workload.last_request_at
        )
        # From the fleet total's read to its last move, one step at a time (the pass may
        # step several workloads at once): a launch counts every one decided before it.
        await region.enter_async_context(_spend_region(fleet))
        spend.closed(held)  # the fleet total the step reads counts the rows open now
        held = rows
        spot_closed = await closed_spot_lives(s, workload.id, now=now) if on_spot(spec) else None
        view = WorkloadView(
            spec=spec,
            generation=workload.generation,
            replicas=replica_states(rows),
            measured=measured,
            offers=deps.offers(),
            deleted=workload.deleted_at is not None,
            inherited_usd_per_hour=(
                list(inherited) if inherited is not None else await predecessor_prices(s, workload)
            ),
            fleet_usd_per_hour=await _fleet_usd(deps, s, spend),
            start_times=(
                start_times_from(await recent_start_samples(s, workload.id))
                if warm is not None
                else None
            ),
            spot_rate=(
                spot_rate([*spot_closed, *open_spot_lives(rows)], now=now)
                if spot_closed is not None
                else PRIOR_SPOT_RATE
            ),
        )
        if on_spot(spec):
            deps.metrics.spot_rate.labels(workload.project, workload.slug).set(
                view.spot_rate.per_hour
            )
        knobs = deps.settings.knobs
        memory = deps.memory.scale.get(workload.id, ScaleMemory())
        result = step(
            view,
            memory=memory,
            unavailable=deps.memory.unavailable,
            now=now,
            knobs=knobs,
            memo=deps.memory.placements,
        )
        if not view.deleted:
            deps.memory.scale[workload.id] = result.decision.memory
        decision, plan = result.decision, result.plan
        # Before the launch hold: launches held after failed boots are work, so the
        # workload is stepped every pass until they go out (``changes``).
        quiet = not plan.actions and not plan.refusals
        hold = launch_hold(deps, workload_id=workload.id, rows=rows, now=now)
        if hold is not None:  # failed boots in a row: no launch before the backoff ends
            plan = dataclasses.replace(
                plan,
                actions=tuple(a for a in plan.actions if not isinstance(a, Launch)),
                # A 0 asks for more launches at once, which are held; other due times stand.
                requeue_after=hold if not plan.requeue_after else min(hold, plan.requeue_after),
            )
            result = dataclasses.replace(result, plan=plan)
        await _log_scale(
            deps,
            s,
            workload=workload,
            decision=decision,
            rows=rows,
            warm=warm,
            signal=measured.signals,
            inputs=result.inputs,
            now=now,
        )
        if deps.settings.dry_run:
            await _log_dry_run(deps, s, workload=workload, plan=plan, now=now)
        else:
            refused, bought = await _act(
                deps,
                s,
                workload=workload,
                spec=spec,
                rows=rows,
                view=view,
                result=result,
                port=engine.port,
                now=now,
            )
            plan = dataclasses.replace(plan, refusals=plan.refusals + refused)
            if bought and fleet is not None and fleet.usd_per_hour is not None:
                # New rows (a group's members too): this workload's total, read once.
                now_usd = await workload_usd_per_hour(s, workload.id)
                spend.moved(now_usd - sum(r.hourly_usd for r in held))
                held = []
        spend.closed(held)
        if fleet is not None and _repriced(prices, rows):
            fleet.forget()  # a park confirmed or a resume: read the total again
        await region.aclose()
        await _log_refusals(deps, s, workload=workload, plan=plan, now=now)
        await s.commit()  # the scale decision, where nothing after it committed
        left = _still_open(rows)
        if workload.deleted_at is not None and not left:
            deps.metrics.forget_workload(workload.project, workload.slug)
        else:
            _export(deps, workload=workload, spec=spec, rows=left, desired=decision.desired)
    quiet = quiet and not plan.refusals
    return StepOutcome(
        after=due_after(plan, decision, now=now),
        quiet=quiet,
        start_times=(view.start_times or DEFAULT_START_TIMES) if warm is not None else None,
        spot_closed=spot_closed,
    )


def on_spot(spec: WorkloadSpec) -> bool:
    """Whether the workload may buy spot machines (only then is its spot record read)."""
    policy = _autoscaling(spec)
    return policy is not None and policy.allow_spot_instances


def due_after(plan: Plan, decision: ScaleDecision, *, now: datetime) -> float | None:
    """Seconds until the step's nearest timer (a timeout of the plan, a change of the
    decision such as a schedule's), ``None`` when none is pending."""
    due = [plan.requeue_after] if plan.requeue_after is not None else []
    if decision.recheck_at is not None:
        due.append(max(0.0, (decision.recheck_at - now).total_seconds()))
    return min(due) if due else None


async def _fleet_usd(deps: Deps, s: AsyncSession, spend: _StepSpend) -> float:
    """The fleet's hourly total for the step: 0 without a fleet ceiling (no step reads
    it then), else the pass's running total (or a fresh SUM without one)."""
    if deps.settings.fleet_max_hourly_cost_usd is None:
        return 0.0
    total = await spend.total(s)
    return total if total is not None else await fleet_usd_per_hour(s)


class _StepSpend:
    """One step's moves of the pass's fleet total (``FleetSpend``), which other steps of
    the pass may move and read again meanwhile.

    A move is made only while the total is the one this step began with or read itself:
    once another step read it again from the store (after a step that failed or was cut),
    that read counts what this step had committed, so its moves are dropped and the
    total is read again before this step uses it (a replica this step closes later then
    counts until the next pass: the total errs high, never low)."""

    def __init__(self, fleet: FleetSpend | None) -> None:
        self.fleet = fleet
        self.read = fleet.reads if fleet is not None else 0

    def _current(self) -> bool:
        return self.fleet is not None and self.fleet.reads == self.read

    def moved(self, delta_usd_per_hour: float) -> None:
        if self.fleet is not None and self._current():
            self.fleet.moved(delta_usd_per_hour)

    def closed(self, held: Sequence[LedgerRow]) -> None:
        """Move the total by the rows of ``held`` (the workload's open rows the total
        counts) confirmed terminated since: O(its rows), no query."""
        self.moved(-sum(r.hourly_usd for r in held if r.terminated_confirmed_at is not None))

    async def total(self, s: AsyncSession) -> float | None:
        """The total for this step's decision (``None``: no pass total to read)."""
        if self.fleet is None:
            return None
        if not self._current():
            self.fleet.forget()  # read again: the store's total counts this step's rows
        total = await self.fleet.total(s)
        self.read = self.fleet.reads
        return total


STEP_SHARE: contextvars.ContextVar[asyncio.Timeout | None] = contextvars.ContextVar(
    "step_share", default=None
)
"""The running step's share of the pass (``loop``'s ``workload_share_sec``), which
stops while the step waits for the pass's fleet total: steps running at once wait for
each other there, and one step's launches must not use up another's share."""


@contextlib.asynccontextmanager
async def _spend_region(fleet: FleetSpend | None) -> AsyncIterator[None]:
    """Hold the pass's fleet total (``FleetSpend.lock``); a step that ends inside by an
    exception (its launches unknown) leaves it to be read again."""
    if fleet is None:
        yield
        return
    share = STEP_SHARE.get()
    loop = asyncio.get_running_loop()
    deadline = share.when() if share is not None else None
    waited_from = loop.time()
    if share is not None and fleet.lock.locked():
        share.reschedule(None)  # the wait is not this step's work
    await fleet.lock.acquire()
    if share is not None and deadline is not None:
        share.reschedule(deadline + (loop.time() - waited_from))
    try:
        yield
    except BaseException:
        fleet.forget()
        raise
    finally:
        fleet.lock.release()


def _repriced(prices: Mapping[str, float], rows: Sequence[LedgerRow]) -> bool:
    """Whether an open row's price changed in this pass (a machine confirmed stopped is
    billed for its disks, a resumed one at its running price again)."""
    return any(
        r.terminated_confirmed_at is None and prices.get(r.launch_id, r.hourly_usd) != r.hourly_usd
        for r in rows
    )


async def _report_unrunnable(
    deps: Deps,
    s: AsyncSession,
    *,
    workload: Workload,
    problems: Sequence[Mapping[str, Any]],
    now: datetime,
) -> None:
    """A stored spec the controller cannot run (stored before a check existed, or a
    catalog or engine table that changed since): one ``invalid_spec`` decision and one
    warning while it stays so, and nothing launched."""
    text = "; ".join(f"{p['path']}: {p['message']}" for p in problems)
    if deps.memory.unrunnable.get(workload.id) == text:
        return
    deps.memory.unrunnable[workload.id] = text
    deps.metrics.reconcile_errors.labels(workload.project, workload.slug).inc()
    record_decision(
        s,
        workload_id=workload.id,
        at=now,
        kind="invalid_spec",
        reason=f"generation {workload.generation} cannot run, nothing launched: {text}",
        inputs={"generation": workload.generation},
        result={"problems": list(problems)},
        acted=False,
    )
    await s.commit()
    log.warning("%s/%s: spec cannot run: %s", workload.project, workload.slug, text)


async def _record_queued_notices(
    deps: Deps, s: AsyncSession, *, rows: Sequence[LedgerRow], observed: Observation
) -> set[str]:
    """Record the warnings a provider's event queue gave for these rows, as the boot
    callback records an instance's own; the launch ids newly noticed this way. With
    sharding, the matched warnings leave the store in the same commit
    (``reconcile.notices``): each is recorded once, by the controller owning the row."""
    queued: set[str] = set()
    matched: list[str] = []
    for row in rows:
        notice = observed.notices.get(row.instance_id or "")
        if notice is None:
            continue
        matched.append(notice.instance_id)
        if (row.last_error or "").startswith(SPOT_NOTICE):
            continue
        if phase_of(row) in NOTICED_PHASES:
            reclaim_at = notice.reclaim_at or reclaim_time(
                notice.reason, provider=row.provider, noticed_at=notice.noticed_at
            )
            row.last_error = f"{SPOT_NOTICE}{notice.reason}"
            row.reclaim_at = reclaim_at
            queued.add(row.launch_id)
    if deps.shards is not None and matched:
        await forget_notices(s, matched)
        await s.commit()
    return queued


async def _heed_spot_notices(
    deps: Deps,
    s: AsyncSession,
    *,
    workload: Workload,
    rows: Sequence[LedgerRow],
    queued: set[str],
    now: datetime,
) -> None:
    """The provider will reclaim these instances: avoid their spot market, and (through
    the plan, which counts a warned replica as draining) replace them now. A ready one
    keeps serving until its drain is due (``decide.plan.heed_spot_notice``, which the
    simulator and the plan ask too): at the margin before its reclaim, at once when its
    reclaim time is not known; the plan drains it earlier once its replacement serves.
    One parked in a warm pool is terminated (confirmed by the provider as any other), so
    the plan refills the pool elsewhere instead of resuming a machine being reclaimed."""
    for row in spot_notices(rows):
        reason = row.last_error or "spot interruption notice"
        first = row.launch_id not in deps.memory.spot_noticed
        if first:
            deps.memory.spot_noticed.add(row.launch_id)
            mark_unavailable(deps, row=row, now=now)
            source = "queue" if row.launch_id in queued else "instance"
            deps.metrics.spot_notices.labels(row.provider, source).inc()
        phase = phase_of(row)
        reclaim_at = row.reclaim_at
        action = heed_spot_notice(
            row.launch_id, ReplicaPhase(phase.value), reason=reason, now=now, reclaim_at=reclaim_at
        )
        if isinstance(action, Terminate):
            await _terminate(deps, s, row=row, reason=action.reason, now=now)
            continue
        if isinstance(action, Drain) and not deps.settings.dry_run:
            row.drain_requested_at = now
            what = action.reason
        elif not first:
            continue
        elif phase is Phase.READY and reclaim_at is not None:
            drain_at = spot_drain_at(reclaim_at)
            what = f"{reason}; serves until {drain_at:%H:%M:%S} at the latest"
        else:
            what = reason
        record_decision(
            s,
            workload_id=workload.id,
            at=now,
            kind="drain",
            reason=f"{what}; replaced now, its spot market skipped for "
            f"{deps.settings.unavailable_sec:g}s",
            inputs={"launch_id": row.launch_id, "phase": phase.value, "spot": row.spot},
            result={"launch_id": row.launch_id},
        )
        await s.commit()
        deps.notify_change()


def _due(deps: Deps, row: LedgerRow, now: datetime) -> bool:
    """Whether a pending intent may be tried again: not before the provider's
    ``retry_after`` of its last transient failure (a time recorded per launch, that is
    per workload and market, instead of a sleep in the pass)."""
    retry_at = deps.memory.launch_retry_at.get(row.launch_id)
    if retry_at is None or now >= retry_at:
        deps.memory.launch_retry_at.pop(row.launch_id, None)
        return True
    return False


def _still_open(rows: Sequence[LedgerRow]) -> list[LedgerRow]:
    return [r for r in rows if r.terminated_confirmed_at is None]


def avoid_slow_offers(
    deps: Deps, *, rows: Sequence[Facts], timeouts: Timeouts, now: datetime
) -> None:
    """Mark the offers of replicas past their boot deadline unavailable before placing,
    so their replacements go elsewhere (the plan terminates them)."""
    for row in rows:
        starting = phase_of(row) in (Phase.PENDING, Phase.BOOTING)
        since = row.resumed_at or row.intent_at  # a resumed replica boots from its resume
        if starting and (now - since).total_seconds() >= timeouts.scaling_up_sec:
            mark_unavailable(deps, row=row, now=now)


def signals_for(
    ref: WorkloadRef,
    signals: SignalsRead,
    *,
    last_request_at: datetime | None,
) -> Measured:
    """The workload's measurement (``SignalsRead.of``: marked when the read was
    incomplete), with the last request the store knows of (the gateway records demand
    there) when that is later than the gateway's own."""
    measured = signals.of(ref)
    signal = measured.signals
    stored = last_request_at
    if stored is not None and (signal.last_request_at is None or stored > signal.last_request_at):
        signal = dataclasses.replace(signal, last_request_at=stored)
        measured = dataclasses.replace(measured, signals=signal)
    return measured


def replica_states(rows: Sequence[LedgerRow] | Sequence[RowFacts]) -> list[ReplicaState]:
    """One state per replica (a replica group is its leader, priced whole:
    ``ledger.replica_views``), with the leader row's zone, worker and GPUs."""
    by_id: dict[str, LedgerRow | RowFacts] = {r.launch_id: r for r in rows}
    states = []
    for view in replica_views(rows, in_flight=0):
        row = by_id[view.launch_id]
        states.append(
            ReplicaState(
                view=view,
                zone=row.zone or None,
                worker_id=row.worker_id,
                shape=(row.gpu, row.gpu_count) if row.gpu and row.gpu_count else None,
                spot=bool(row.spot),
            )
        )
    return states


def _autoscaling(spec: WorkloadSpec) -> AutoscalingPolicy | None:
    policy = spec.execution_policy_config
    return policy if isinstance(policy, AutoscalingPolicy) else None


async def _act(
    deps: Deps,
    s: AsyncSession,
    *,
    workload: Workload,
    spec: WorkloadSpec,
    rows: Sequence[LedgerRow],
    view: WorkloadView,
    result: Step,
    port: int,
    now: datetime,
) -> tuple[tuple[Refusal, ...], int]:
    """Carry the step's plan out: terminations and drains on record first, each launch
    placed just before it is bought (``decide.step.place_next``). A launch the provider
    refused ends the pass's launches: its market is marked unavailable and the next pass
    places elsewhere. Returns the launches refused here (a budget or placement refusal
    of a re-placed launch, or the fleet ceiling's reservation in the store where several
    controllers share it) and how many launches went to the provisioner."""
    by_id = {r.launch_id: r for r in rows}
    launched: list[Placement] = []
    for action in result.plan.actions:
        if isinstance(action, Terminate) and action.launch_id in by_id:
            row = by_id[action.launch_id]
            await _terminate(deps, s, row=row, reason=action.reason, now=now)
        elif isinstance(action, Drain) and action.launch_id in by_id:
            await _drain(deps, s, row=by_id[action.launch_id], reason=action.reason, now=now)
        elif isinstance(action, Park) and action.launch_id in by_id:
            level = result.warm.sleep_level if result.warm is not None else 1
            row = by_id[action.launch_id]
            await park(
                deps, s, row=row, mode=action.mode, reason=action.reason, sleep_level=level, now=now
            )
        elif isinstance(action, Resume) and action.launch_id in by_id:
            row = by_id[action.launch_id]
            try:
                started = await resume(
                    deps, s, workload=workload, row=row, reason=action.reason, port=port, now=now
                )
            except LaunchRefused as refused:  # another controller's launch took the room
                return (Refusal(refused.reason),), len(launched)
            if not started:
                mark_unavailable(deps, row=row, now=now)
                await _terminate(
                    deps, s, row=row, reason=row.last_error or "start refused", now=now
                )
        elif isinstance(action, Launch):
            placement = result.placement
            if launched or placement is None:
                placement = place_next(
                    view,
                    unavailable=deps.memory.unavailable,
                    now=now,
                    knobs=deps.settings.knobs,
                    launched=launched,
                    memo=deps.memory.placements,
                )
            if not placement.found:
                return (Refusal(unplaced_reason(placement, result.headroom)),), len(launched)
            try:
                outcome = await launch_replica(
                    deps,
                    s,
                    workload=workload,
                    spec=spec,
                    placement=placement,
                    reason=action.reason,
                    now=now,
                    prefill=action.prefill,
                )
            except LaunchRefused as refused:  # another controller's launch took the room
                return (Refusal(refused.reason),), len(launched)
            if not outcome.bought and outcome.error and outcome.row.terminated_confirmed_at:
                return (), len(launched) + 1  # its offer is marked unavailable: next pass
            launched.append(placement)
    return (), len(launched)


async def teardown_workload(
    deps: Deps, *, workload_id: int, observed: Observation, now: datetime
) -> None:
    """Drain and terminate a deleted workload's replicas without reading its spec: the
    way out for a workload whose stored spec the controller cannot reconcile (a delete
    must never leave a paid machine running). The gateway stopped routing to it at the
    delete, so a drain ends on the next pass; intents are looked up by launch id and
    closed when the provider has no such launch."""
    async with deps.sessions() as s:
        workload = await s.get(Workload, workload_id)
        if workload is None or workload.deleted_at is None:
            return
        await _tear_down(deps, s, workload=workload, observed=observed, now=now)


async def _tear_down(
    deps: Deps, s: AsyncSession, *, workload: Workload, observed: Observation, now: datetime
) -> None:
    rows = await open_rows(s, workload.id)
    port = _engine_port(workload.spec)
    await sync_with_provider(deps, s, rows=rows, observed=observed, port=port, now=now)
    for row in _still_open(rows):
        if row.worker_id is None and row.instance_id is None:
            row.terminate_requested_at = row.terminate_requested_at or now
            await resolve_intent(deps, s, row=row, spec=None, now=now)
    rows = _still_open(rows)
    for row in rows:  # deleted: a park under way is not waited for
        if phase_of(row) is Phase.PARKING and not deps.settings.dry_run:
            await _terminate(deps, s, row=row, reason="deleted: parking replica", now=now)
    plan = plan_actions(  # the gateway stopped routing to it when it was deleted
        desired=0,
        replicas=[replica_view(r, in_flight=0) for r in rows],
        spec_generation=workload.generation,
        timeouts=Timeouts(),
        limits=BudgetLimits(),
        launch_usd_per_hour=None,
        now=now,
    )
    by_id = {r.launch_id: r for r in rows}
    for action in plan.actions:
        if deps.settings.dry_run:
            break
        if isinstance(action, Terminate):
            reason = f"deleted: {action.reason}"
            await _terminate(deps, s, row=by_id[action.launch_id], reason=reason, now=now)
        elif isinstance(action, Drain):
            reason = "deleted: drain before terminating"
            await _drain(deps, s, row=by_id[action.launch_id], reason=reason, now=now)


def _engine_port(stored: Any) -> int:
    backend = stored.get("backend") if isinstance(stored, dict) else None
    try:
        return engine_for(str(backend or "vllm")).port
    except ValueError:  # an unknown engine in a spec stored by another route
        return engine_for("vllm").port


async def _drain(
    deps: Deps, s: AsyncSession, *, row: LedgerRow, reason: str, now: datetime
) -> None:
    row.drain_requested_at = now
    record_decision(
        s,
        workload_id=row.workload_id,
        at=now,
        kind="drain",
        reason=reason,
        inputs={"launch_id": row.launch_id, "phase": "ready"},
        result={"launch_id": row.launch_id},
    )
    await s.commit()
    deps.notify_change()


async def _terminate(
    deps: Deps, s: AsyncSession, *, row: LedgerRow, reason: str, now: datetime
) -> None:
    if deps.settings.dry_run:
        return
    row.terminate_requested_at = row.terminate_requested_at or now
    record_decision(
        s,
        workload_id=row.workload_id,
        at=now,
        kind="terminate",
        reason=reason,
        inputs={"launch_id": row.launch_id, "phase": phase_of(row).value},
        result={"launch_id": row.launch_id, "instance_id": row.instance_id},
        cost_delta=-row.hourly_usd,
    )
    await s.commit()  # the request is on record before the provider hears of it
    await terminate_instance(deps, row)
    await s.commit()
    deps.notify_change()


async def _log_scale(
    deps: Deps,
    s: AsyncSession,
    *,
    workload: Workload,
    decision: ScaleDecision,
    rows: Sequence[LedgerRow],
    warm: WarmPolicy | None,
    signal: Signals,
    inputs: DecisionInputs,
    now: datetime,
) -> None:
    values = scale_entry(
        deps,
        workload_id=workload.id,
        decision=decision,
        rows=rows,
        warm=warm,
        signal=signal,
        inputs=inputs,
        now=now,
    )
    remember_scale(deps, workload_id=workload.id, decision=decision)
    if values is not None:
        # Committed with the step's next write (before any provider call) or at its end.
        s.add(Decision(**values))


def scale_entry(
    deps: Deps,
    *,
    workload_id: int,
    decision: ScaleDecision,
    rows: Sequence[Facts],
    warm: WarmPolicy | None,
    signal: Signals,
    inputs: DecisionInputs,
    now: datetime,
) -> dict[str, Any] | None:
    """The scale decision to log (``ledger.decision_values``), or ``None`` when the
    count and its wait on incomplete signals are the ones last logged; changes nothing
    (:func:`remember_scale` records it as logged)."""
    memory = deps.memory
    starts_waiting = decision.waits is not None and workload_id not in memory.waiting_on_signals
    if memory.last_desired.get(workload_id) == decision.desired and not starts_waiting:
        return None
    counts = fleet_counts(rows, warm=warm)
    return decision_values(
        workload_id=workload_id,
        at=now,
        kind="scale",
        reason=("dry-run: " if deps.settings.dry_run else "") + decision.reason,
        inputs=_inputs(counts, signal, decision, inputs),
        result={"desired": decision.desired, "direction": decision.direction.value},
        acted=not deps.settings.dry_run,
    )


def remember_scale(deps: Deps, *, workload_id: int, decision: ScaleDecision) -> None:
    """The scale decision is logged (:func:`scale_entry`): its count and its wait."""
    memory = deps.memory
    if decision.waits is None:
        memory.waiting_on_signals.discard(workload_id)
    else:
        memory.waiting_on_signals.add(workload_id)
    memory.last_desired[workload_id] = decision.desired


def _inputs(
    counts: FleetCounts, signal: Signals, decision: ScaleDecision, inputs: DecisionInputs
) -> dict[str, Any]:
    capacity = inputs.capacity
    return {
        "ready": counts.ready,
        "booting": counts.booting,
        "draining": counts.draining,
        "ttft_up_s": decision.ttft_up_s,
        "ttft_down_s": decision.ttft_down_s,
        "request_rate": signal.request_rate,
        "in_flight": signal.in_flight,
        "queue_depth": signal.queue_depth,
        "last_request_at": signal.last_request_at.isoformat() if signal.last_request_at else None,
        "input_tokens": inputs.input_tokens,
        "output_tokens": inputs.output_tokens,
        "capacity": None if capacity is None else dataclasses.asdict(capacity),
        "capacity_gpu": None if inputs.shape is None else f"{inputs.shape[1]} x {inputs.shape[0]}",
    }


async def _log_refusals(
    deps: Deps, s: AsyncSession, *, workload: Workload, plan: Plan, now: datetime
) -> None:
    labels = (workload.project, workload.slug)
    reasons = export_refusals(deps, labels=labels, plan=plan)
    if not reasons:
        return
    label, text = next(iter(reasons.items()))
    last = deps.memory.last_refusal.get(workload.id)
    interval = deps.settings.refusal_log_interval_sec
    if last is not None and last[0] == label and (now - last[1]).total_seconds() < interval:
        return
    deps.memory.last_refusal[workload.id] = (label, now)
    deps.metrics.refused.labels(*labels, label).inc()
    record_decision(
        s,
        workload_id=workload.id,
        at=now,
        kind="refused",
        reason=text,
        inputs={"refusals": [r.reason for r in plan.refusals]},
        result={"launched": 0, "reason": label},
        acted=False,
    )
    await s.commit()
    log.warning("%s/%s: %s", workload.project, workload.slug, text)


def export_refusals(deps: Deps, *, labels: tuple[str, str], plan: Plan) -> dict[str, str]:
    """Set the workload's refusal gauges from its plan; its refusals by label."""
    reasons = {refusal_reason(r.reason): r.reason for r in plan.refusals}
    m = deps.metrics
    gauges = m.workload(*labels)
    for label in REFUSAL_REASONS:
        gauges.child(m.blocked, label).set(1 if label in reasons else 0)
    return reasons


async def _log_dry_run(
    deps: Deps, s: AsyncSession, *, workload: Workload, plan: Plan, now: datetime
) -> None:
    signature = tuple(f"{type(a).__name__}: {a.reason}" for a in plan.actions)
    if deps.memory.dry_run_plans.get(workload.id) == signature:
        return
    deps.memory.dry_run_plans[workload.id] = signature
    for action in plan.actions:
        record_decision(
            s,
            workload_id=workload.id,
            at=now,
            kind=type(action).__name__.lower(),
            reason=f"dry-run: {action.reason}",
            inputs={"launch_id": getattr(action, "launch_id", None)},
            result={"dry_run": True},
            acted=False,
        )
    await s.commit()


def _export(
    deps: Deps, *, workload: Workload, spec: WorkloadSpec, rows: Sequence[LedgerRow], desired: int
) -> None:
    export_workload(
        deps, labels=(workload.project, workload.slug), spec=spec, rows=rows, desired=desired
    )


def export_workload(
    deps: Deps,
    *,
    labels: tuple[str, str],
    spec: WorkloadSpec,
    rows: Sequence[Facts],
    desired: int,
) -> None:
    """The workload's gauges: replicas by phase, desired count, spend, bounds. O(rows),
    each gauge's child looked up once per workload (``metrics.WorkloadGauges``)."""
    m = deps.metrics
    gauges = m.workload(*labels)
    phases = Counter(phase_of(r) for r in rows)
    for phase in _EXPORTED_PHASES:
        gauges.child(m.replicas, phase.value).set(phases[phase])
    gauges.child(m.desired).set(desired)
    gauges.child(m.workload_usd).set(sum(r.hourly_usd for r in rows))
    export_parked(deps, labels=labels, rows=rows)
    m.workload_labels.set(*labels, spec.labels)
    policy = _autoscaling(spec)
    if policy is not None and policy.max_hourly_cost_usd is not None:
        gauges.child(m.workload_ceiling).set(policy.max_hourly_cost_usd)
    _export_bounds(m, gauges, spec=spec)


_EXPORTED_PHASES = tuple(phase for phase in Phase if phase is not Phase.TERMINATED)


def _export_bounds(m: ControllerMetrics, gauges: WorkloadGauges, *, spec: WorkloadSpec) -> None:
    """The workload's own targets, for alert rules and dashboards to compare against."""
    config = spec.execution_policy_config
    if isinstance(config, AutoscalingPolicy):
        gauges.child(m.ttft_target).set(config.upper_allowed_latency_sec)
        gauges.child(m.ttft_lower).set(config.lower_allowed_latency_sec)
        gauges.child(m.max_replicas).set(config.max_workers)
        return
    for gauge in (m.ttft_target, m.ttft_lower):
        gauges.remove(gauge)  # a policy changed away from autoscaling has no target
    gauges.child(m.max_replicas).set(config.replicas)
