"""Warm pools in the ledger: replicas parked (engine asleep, machine stopped) and resumed.

The plan (``decide.plan``) says which replica to park or resume; this module carries it
out with the same rules as launches and terminations: the request is on record before
the engine or the provider hears of it, and nothing is marked done before they confirm.

* **Park, asleep**: ``park_mode`` ``sleeping`` and ``park_requested_at`` are written (the
  gateway stops routing to it at once: a routing column), the engine is asked to sleep,
  and ``parked_at`` is set once the engine says it sleeps. It keeps its price: the
  machine runs.
* **Park, stopped**: ``park_mode`` ``stopped`` and ``park_requested_at`` are written, the
  provider is asked to stop the machine, and ``parked_at`` is set only when the provider
  shows it ``STOPPED``; then ``hourly_usd`` becomes the stopped machine's disk price
  (``stopped_usd_per_hour``, recorded at launch) and ``running_usd_per_hour`` keeps the
  running one. A stopped machine is ours: its disks count against every ceiling, it is
  never an orphan, and it is terminated like any machine.
* **Resume**: the park facts are cleared, ``resumed_at`` set and ``ready_at`` cleared (it
  is booting again, its liveness timeout counting from the resume) and, for a stopped
  machine, ``hourly_usd`` is its running price again: all on record before the engine is
  woken or the provider starts the machine. A started machine may come back with a new
  address (its URL is read again from the provider); a woken engine is checked awake
  before the health check may make it ready (a sleeping vLLM answers ``/health``).
* **Crash safety**: every step is level-based. Each pass :func:`settle_parks` reads the
  ledger and the provider's or engine's truth: a park not confirmed is asked again (a
  stop or a sleep is idempotent) or confirmed; a resume whose machine is still stopped is
  started again, one whose engine still sleeps is woken again. A parked machine the
  provider shows running (started in a console) is billed at its running price again and
  stopped again. A park neither confirmed
  nor under way (a machine not stopping, an engine not asleep) after
  ``scaling_down_timeout_sec`` is given up: the replica is terminated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.decide.plan import Timeouts
from autoscaler.decide.warm import ParkMode
from autoscaler.reconcile.deps import Deps, log
from autoscaler.reconcile.ledger import Facts, park_mode_of, record_decision
from autoscaler.reconcile.observe import Observation, count_provider_error
from autoscaler.reconcile.provisioner import admit
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from providers.base import Instance, InstanceState, InsufficientCapacity, NotFound, ProviderError
from providers.engine_sleep import EngineSleepError


async def park(
    deps: Deps,
    s: AsyncSession,
    *,
    row: LedgerRow,
    mode: ParkMode,
    reason: str,
    sleep_level: int,
    now: datetime,
) -> None:
    """Ask for the park on record, then of the engine or the provider (see the module
    docstring); confirmed here when they answer at once, else in a later pass."""
    if deps.settings.dry_run:
        return
    before = phase_of(row)
    row.park_mode = mode.value
    row.park_requested_at = now
    row.parked_at = None
    parked_price = row.stopped_usd_per_hour if mode is ParkMode.STOPPED else row.hourly_usd
    record_decision(
        s,
        workload_id=row.workload_id,
        at=now,
        kind="park",
        reason=reason,
        inputs={"launch_id": row.launch_id, "phase": before.value, "mode": mode.value},
        result={"launch_id": row.launch_id, "mode": mode.value, "usd_per_hour": parked_price},
        cost_delta=(parked_price or 0.0) - row.hourly_usd,
    )
    await s.commit()  # on record (and off the routes) before the engine or provider hears
    deps.notify_change()
    await _ask_park(deps, s, row=row, sleep_level=sleep_level, now=now)


async def resume(
    deps: Deps,
    s: AsyncSession,
    *,
    workload: Workload,
    row: LedgerRow,
    reason: str,
    port: int,
    now: datetime,
) -> bool:
    """Put the resume on record, then wake the engine or start the machine. False when
    the machine cannot start now (no capacity in its zone): the caller terminates it.
    With several controllers, the price it adds back is reserved under the fleet
    ceiling first (``provisioner.admit``: ``LaunchRefused`` otherwise)."""
    if deps.settings.dry_run:
        return True
    mode = park_mode_of(row) or ParkMode.STOPPED
    parked_price = row.hourly_usd
    running = row.running_usd_per_hour
    if running is not None:
        await admit(deps, s, workload=workload, usd_per_hour=running - parked_price)
        row.hourly_usd = running
        row.running_usd_per_hour = None
    row.park_requested_at = None
    row.parked_at = None
    row.drain_requested_at = None
    row.ready_at = None
    row.resumed_at = now
    _note(row, None)
    if mode is ParkMode.STOPPED:
        # Its address may change at the start: read again from the provider (here, or by
        # the sync should the controller die between the start and reading it).
        row.url = None
    record_decision(
        s,
        workload_id=row.workload_id,
        at=now,
        kind="resume",
        reason=reason,
        inputs={"launch_id": row.launch_id, "phase": "parked", "mode": mode.value},
        result={"launch_id": row.launch_id, "usd_per_hour": row.hourly_usd},
        cost_delta=row.hourly_usd - parked_price,
    )
    await s.commit()  # its running price counts before the machine or engine runs again
    deps.metrics.resumes.labels(row.provider, mode.value).inc()
    return await _ask_resume(deps, s, row=row, mode=mode, port=port)


async def settle_parks(
    deps: Deps,
    s: AsyncSession,
    *,
    rows: Sequence[LedgerRow],
    observed: Observation,
    timeouts: Timeouts,
    sleep_level: int,
    port: int,
    now: datetime,
) -> tuple[list[LedgerRow], set[str]]:
    """Carry on the parks and resumes of earlier passes (or of a controller that died
    between asking and confirming). Returns the replicas to terminate (a park never
    confirmed, a machine that cannot start) and the resumed replicas whose engine still
    sleeps (not to be made ready this pass)."""
    give_up: list[LedgerRow] = []
    asleep: set[str] = set()
    if deps.settings.dry_run:
        return give_up, asleep
    for row in rows:
        phase = phase_of(row)
        mode = park_mode_of(row)
        if phase is Phase.PARKING and mode is not None:
            seen = _observed(observed, row) if mode is ParkMode.STOPPED else None
            if seen is not None and seen.state is InstanceState.STOPPED:
                _confirm_stopped(deps, row, now=now)
                continue
            if seen is not None and (seen.state.is_gone or seen.state.is_stopped):
                continue  # gone: the sync closes it; stopping: confirmed once stopped
            waited = (now - (row.park_requested_at or now)).total_seconds()
            if waited >= timeouts.scaling_down_sec:
                _note(
                    row,
                    f"park not confirmed: {mode.value} asked {waited:.0f}s ago and not under "
                    f"way (scaling_down_timeout_sec {timeouts.scaling_down_sec:g})",
                )
                give_up.append(row)
                continue
            await _ask_park(deps, s, row=row, sleep_level=sleep_level, now=now)
        elif phase is Phase.PARKED and mode is ParkMode.STOPPED:
            seen = _observed(observed, row)
            if seen is not None and seen.state in _RUNNING:
                _unconfirm_stopped(deps, s, row, seen=seen, now=now)
                await _ask_park(deps, s, row=row, sleep_level=sleep_level, now=now)
        elif phase is Phase.BOOTING and row.resumed_at is not None and row.park_mode:
            resumed = ParkMode(row.park_mode)
            if resumed is ParkMode.SLEEPING:
                if not await _wake(deps, row):
                    asleep.add(row.launch_id)
                continue
            seen = _observed(observed, row)
            stopped = seen is not None and seen.state is InstanceState.STOPPED
            if stopped and not await _ask_resume(deps, s, row=row, mode=resumed, port=port):
                give_up.append(row)
    if s.dirty or s.new:  # nothing to settle: no commit (a round trip) either
        await s.commit()
    return give_up, asleep


def _observed(observed: Observation, row: LedgerRow) -> Instance | None:
    if row.instance_id is None or not observed.knows(row.provider):
        return None
    return observed.by_provider[row.provider].get(row.instance_id)


_RUNNING = frozenset({InstanceState.PENDING, InstanceState.RUNNING})


def _unconfirm_stopped(
    deps: Deps, s: AsyncSession, row: LedgerRow, *, seen: Instance, now: datetime
) -> None:
    """A parked machine the provider shows running again (started outside the controller,
    in a console): it bills its running price, so the ledger counts that price again and
    the park is asked anew, confirmed once the provider shows it stopped."""
    stopped_price = row.hourly_usd
    if row.running_usd_per_hour is not None:
        row.hourly_usd = row.running_usd_per_hour
        row.running_usd_per_hour = None
    row.parked_at = None
    row.park_requested_at = now
    _note(row, f"parked machine shows {seen.state.value}: stopped again")
    record_decision(
        s,
        workload_id=row.workload_id,
        at=now,
        kind="park",
        reason=f"its stopped machine shows {seen.state.value} (started outside the "
        "controller): billed running until it shows stopped again",
        inputs={"launch_id": row.launch_id, "phase": "parked", "state": seen.state.value},
        result={"launch_id": row.launch_id, "mode": "stopped", "usd_per_hour": row.hourly_usd},
        cost_delta=row.hourly_usd - stopped_price,
    )
    log.warning(
        "replica %s of %s: its stopped machine shows %s; stopping it again",
        row.launch_id,
        row.workload_slug,
        seen.state.value,
    )


async def _ask_park(
    deps: Deps, s: AsyncSession, *, row: LedgerRow, sleep_level: int, now: datetime
) -> None:
    mode = park_mode_of(row)
    if mode is ParkMode.SLEEPING:
        await _sleep(deps, row, level=sleep_level, now=now)
    elif mode is ParkMode.STOPPED:
        await _stop(deps, row, now=now)
    await s.commit()


async def _sleep(deps: Deps, row: LedgerRow, *, level: int, now: datetime) -> None:
    """Ask the engine to sleep unless it already does; parked once it says it sleeps."""
    if row.url is None:
        return
    try:
        if not await deps.sleeper.is_sleeping(url=row.url, engine_key=row.engine_key):
            await deps.sleeper.sleep(url=row.url, level=level, engine_key=row.engine_key)
        asleep = await deps.sleeper.is_sleeping(url=row.url, engine_key=row.engine_key)
    except EngineSleepError as exc:
        _note(row, str(exc))
        log.warning("replica %s of %s: %s", row.launch_id, row.workload_slug, exc)
        return
    if asleep:
        row.parked_at = now
        _note(row, None)
        deps.metrics.parks.labels(row.provider, ParkMode.SLEEPING.value).inc()
        log.info("replica %s of %s asleep", row.launch_id, row.workload_slug)


async def _stop(deps: Deps, row: LedgerRow, *, now: datetime) -> None:
    """Ask the provider to stop the machine (idempotent); parked once it shows stopped."""
    entry = deps.providers.get(row.provider)
    if entry is None or row.instance_id is None:
        return
    try:
        await entry.provider.stop(row.instance_id)
        seen = await entry.provider.describe(row.instance_id)
    except NotFound:
        return  # gone: the sync confirms it from the provider's list
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="stop", error=exc)
        _note(row, str(exc))
        log.warning("stopping %s: %s", row.instance_id, exc)
        return
    if seen.state is InstanceState.STOPPED:
        _confirm_stopped(deps, row, now=now)


def _confirm_stopped(deps: Deps, row: LedgerRow, *, now: datetime) -> None:
    """The provider shows the machine stopped: parked, billed for its disks from now."""
    if row.parked_at is not None:
        return
    row.parked_at = now
    _note(row, None)
    if row.stopped_usd_per_hour is not None and row.running_usd_per_hour is None:
        row.running_usd_per_hour = row.hourly_usd
        row.hourly_usd = row.stopped_usd_per_hour
    deps.metrics.parks.labels(row.provider, ParkMode.STOPPED.value).inc()
    log.info(
        "replica %s of %s stopped: $%.4g/h (its disks)",
        row.launch_id,
        row.workload_slug,
        row.hourly_usd,
    )


async def _ask_resume(
    deps: Deps, s: AsyncSession, *, row: LedgerRow, mode: ParkMode, port: int
) -> bool:
    if mode is ParkMode.SLEEPING:
        await _wake(deps, row)
        return True
    entry = deps.providers.get(row.provider)
    if entry is None or row.instance_id is None:
        return True
    try:
        started = await entry.provider.start(row.instance_id)
    except InsufficientCapacity as exc:
        count_provider_error(deps, provider=row.provider, operation="start", error=exc)
        _note(row, f"start refused: {exc}")
        await s.commit()
        return False
    except NotFound:
        return True  # gone: the sync confirms it from the provider's list
    except ProviderError as exc:  # a machine still stopping: started again next pass
        count_provider_error(deps, provider=row.provider, operation="start", error=exc)
        _note(row, str(exc))
        await s.commit()
        return True
    # A public address is released at stop: read it again (``None`` until the machine
    # has one; the sync learns it then).
    row.url = entry.engine_url(started, port=port)
    row.private_address = started.private_address or row.private_address
    await s.commit()
    return True


async def _wake(deps: Deps, row: LedgerRow) -> bool:
    """Wake the engine (a no-op if awake); whether it is awake. A wake that outlasts the
    pass's wait goes on (``Deps.wakes``), and later passes learn how it went instead of
    waking it again."""
    url = row.url
    if url is None:
        return False
    try:
        return await deps.wakes.wake(
            row.launch_id, lambda: deps.sleeper.wake(url=url, engine_key=row.engine_key)
        )
    except EngineSleepError as exc:
        _note(row, str(exc))
        log.warning("replica %s of %s: %s", row.launch_id, row.workload_slug, exc)
        return False


def export_parked(deps: Deps, *, labels: tuple[str, str], rows: Sequence[Facts]) -> None:
    """The workload's parked replicas by mode (confirmed parks only): O(rows)."""
    m = deps.metrics
    gauges = m.workload(*labels)
    parked = Counter(r.park_mode for r in rows if phase_of(r) is Phase.PARKED)
    for mode in ParkMode:
        gauges.child(m.parked, mode.value).set(parked[mode.value])


def _note(row: LedgerRow, error: str | None) -> None:
    """Record (or clear) what went wrong with ``row``'s park, sleep, stop or start, unless
    its ``last_error`` holds a spot notice: that is kept until the warned machine is
    released (``liveness.spot_notices`` reads it there), whatever its park does meanwhile."""
    if not (row.last_error or "").startswith(SPOT_NOTICE):
        row.last_error = error
