"""Liveness: engines coming up, engines dying, instances confirmed gone.

* A booting replica whose engine answers its health path (with the replica's engine
  key) becomes ready: ``ready_at`` is set and the gateway told to reload its routes.
* A booting replica not ready within ``scaling_up_timeout_sec`` is terminated by the
  plan (``decide.plan``), and its offer marked unavailable for a while.
* A booting replica whose startup script reported failure (the boot callback records
  ``last_error`` starting with :data:`BOOT_FAILED`) is terminated at once, and its offer
  marked unavailable; a "ready" report only wakes the controller, whose own health
  check sets ``ready_at``. A replica whose instance ends on its own before it was ever
  ready (a local engine process that exits at once) gets such a ``last_error`` too, with
  how it ended where the provider knows; each is reported once
  (:mod:`autoscaler.reconcile.boot_failures`).
* A ready replica whose engine stops answering for ``unhealthy_grace_sec`` is
  terminated; one whose instance the provider reports gone is closed. The plan then
  launches a replacement.
* A spot interruption notice (the startup script's watcher reports the provider's
  warning through the boot callback, which records ``last_error`` starting with
  ``store.phase.SPOT_NOTICE`` and drains a serving replica at once) is heeded on the next
  pass (``autoscaler.reconcile.workload``): the offer's spot market is skipped for
  ``unavailable_sec``, a replica still booting is terminated, a serving one drained, one
  parked in a warm pool (an engine asleep on its spot machine) terminated instead of
  kept as a start path, and the plan launches the replacement (or refills the pool) in
  the same pass, budget permitting (the doomed replica's price counts until the
  provider confirms it gone).
* A replica asked to end whose instance still runs, boots, stops or is stopped is
  terminated again each pass until the provider shows it shutting down or gone: a
  stopped machine is not gone (it keeps, and bills, its disk). One that shows
  ``STOPPING`` (GCE's state of a VM being deleted, too) is asked again only
  :data:`TERMINATE_RESEND_SEC` after the last request.
* ``terminated_confirmed_at`` is set only on the provider's word: the instance shows
  as terminated (or interrupted), or a terminate call for it succeeded.

Absence is not confirmation. Clouds are eventually consistent: EC2 answers
``InvalidInstanceID.NotFound`` for a while after ``RunInstances`` returned the instance.
An instance that neither ``list`` nor ``describe`` shows is "not visible yet", and its row
stays open (its price still counts against every ceiling, so no replacement is bought).
Only once it has stayed invisible for ``visibility_grace_sec`` of this controller's
observation is it settled: looked up by its launch-id tag (found: adopted again), else
terminated by id, and the row is closed when that terminate call succeeds. If a
machine still existed unseen after all that, it carries the cluster's tags and the
orphan sweep terminates it once it shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.decide.spot_rate import SPOT_RATE_WINDOW_SEC, SpotLife, SpotRate, spot_rate
from autoscaler.reconcile.deps import Deps, log
from autoscaler.reconcile.ledger import Facts
from autoscaler.reconcile.observe import Observation, count_provider_error
from autoscaler.reconcile.provisioner import boots_from_script, mark_unavailable
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of, spot_warned
from providers.base import Instance, InstanceState, NotFound, ProviderError

BOOT_FAILED = "boot failed: "
"""How ``last_error`` starts when an instance's startup script reported failure."""


DIED = "died: "
"""How ``last_error`` starts when the provider showed a serving instance gone."""

TERMINATING = "; terminating: "
"""What follows a recorded spot notice in ``last_error`` when a terminate call failed
(the latest failure only: retries do not make it grow)."""


NOTICED_PHASES = frozenset(
    {Phase.PENDING, Phase.BOOTING, Phase.READY, Phase.DRAINING, Phase.PARKING, Phase.PARKED}
)
"""The phases in which a spot notice is heeded: every one not yet being terminated, a
warm pool's parked replicas included (``decide.plan.heed_spot_notice`` releases them)."""


def spot_notices(rows: Sequence[LedgerRow]) -> list[LedgerRow]:
    """Replicas not yet being terminated whose instance reported a spot interruption notice."""
    return [r for r in rows if phase_of(r) in NOTICED_PHASES and spot_warned(r)]


def interrupted(row: Facts) -> bool:
    """Whether the row's machine ended by a provider interruption: its spot notice was
    recorded, or the provider showed it interrupted (``_confirm_gone``)."""
    error = row.last_error or ""
    return error.startswith(SPOT_NOTICE) or (
        error.startswith(DIED) and f" is {InstanceState.INTERRUPTED.value} at " in error
    )


def spot_life(row: Facts) -> SpotLife | None:
    """A spot row's record for the measured interruption rate (``decide.spot_rate``):
    launched at ``launched_at``, exposed until the controller began to drain or
    terminate it or the provider confirmed it gone (``None``: not a spot machine, or
    never launched). The simulator keeps the same of its machines
    (``autoscaler.sim.world``)."""
    if not row.spot or row.launched_at is None:
        return None
    ends = [
        at
        for at in (row.drain_requested_at, row.terminate_requested_at, row.terminated_confirmed_at)
        if at is not None
    ]
    return SpotLife(
        started_at=row.launched_at,
        ended_at=min(ends) if ends else None,
        interrupted=interrupted(row),
    )


def open_spot_lives(rows: Iterable[Facts]) -> list[SpotLife]:
    """The records of the open rows among ``rows`` (not confirmed terminated)."""
    lives = (spot_life(r) for r in rows if r.terminated_confirmed_at is None)
    return [life for life in lives if life is not None]


async def closed_spot_lives(
    session: AsyncSession, workload_id: int, *, now: datetime
) -> tuple[SpotLife, ...]:
    """The records of the workload's spot rows confirmed terminated within
    ``decide.spot_rate``'s window: one query by the ``ix_instances_spot_record`` index.
    They change only when a row closes, which changes the workload's facts
    (``reconcile.changes``): a pass that leaves it alone measures its rate from these,
    as its last full step read them, and its open rows."""
    since = now - timedelta(seconds=SPOT_RATE_WINDOW_SEC)
    rows = await session.scalars(
        select(LedgerRow).where(
            LedgerRow.workload_id == workload_id,
            LedgerRow.spot.is_(True),
            LedgerRow.terminated_confirmed_at >= since,
            LedgerRow.launched_at.is_not(None),
        )
    )
    return tuple(life for life in map(spot_life, rows) if life is not None)


async def spot_record(session: AsyncSession, workload_id: int, *, now: datetime) -> SpotRate:
    """What the workload's spot machines showed within ``decide.spot_rate``'s window:
    its spot rows open or closed inside it, one query by the ``workload_id`` index."""
    since = now - timedelta(seconds=SPOT_RATE_WINDOW_SEC)
    rows = await session.scalars(
        select(LedgerRow).where(
            LedgerRow.workload_id == workload_id,
            LedgerRow.spot.is_(True),
            LedgerRow.launched_at.is_not(None),
            or_(
                LedgerRow.terminated_confirmed_at.is_(None),
                LedgerRow.terminated_confirmed_at >= since,
            ),
        )
    )
    lives = [life for life in map(spot_life, rows) if life is not None]
    return spot_rate(lives, now=now)


def failed_boots(rows: Sequence[LedgerRow]) -> list[LedgerRow]:
    """Booting replicas whose instance reported that its startup script failed."""
    return [
        r
        for r in rows
        if phase_of(r) is Phase.BOOTING and (r.last_error or "").startswith(BOOT_FAILED)
    ]


async def sync_with_provider(
    deps: Deps,
    session: AsyncSession,
    *,
    rows: Sequence[LedgerRow],
    observed: Observation,
    port: int,
    now: datetime,
) -> None:
    """Bring each launched row in line with what its provider shows."""
    for row in rows:
        if row.worker_id is not None or row.instance_id is None:
            continue
        if not observed.knows(row.provider):
            continue
        instance: Instance | None = observed.by_provider[row.provider].get(row.instance_id)
        if instance is None:
            described = await _describe(deps, row)
            if described is False:
                continue
            instance = described if isinstance(described, Instance) else None
        if instance is None:
            await _not_visible(deps, session, row=row, now=now)
            continue
        deps.memory.not_visible_since.pop(row.launch_id, None)
        if instance.state.is_gone:
            deps.memory.terminate_sent.pop(row.launch_id, None)
            _confirm_gone(row, instance, now=now)
            if instance.state is InstanceState.INTERRUPTED:
                mark_unavailable(deps, row=row, now=now)  # spot reclaimed: avoid it a while
        elif row.terminate_requested_at is not None and instance.state in _TERMINABLE:
            if not _deletion_under_way(deps, row, instance, now=now):
                deps.memory.terminate_sent[row.launch_id] = now
                await terminate_instance(deps, row)
        elif row.url is None:
            entry = deps.providers.get(row.provider)
            if entry is not None:
                row.url = entry.engine_url(instance, port=port)
    if session.dirty or session.new:  # nothing learnt: no commit (a round trip) either
        await session.commit()


_TERMINABLE = frozenset(
    {
        InstanceState.PENDING,
        InstanceState.RUNNING,
        InstanceState.STOPPING,
        InstanceState.STOPPED,
    }
)
"""States in which an instance asked to end is terminated (again): a stopped machine
too, since it stays (and bills its disk) until it is terminated; not one already
shutting down."""


TERMINATE_RESEND_SEC = 120.0
"""How long a machine asked to end that shows ``STOPPING`` is left alone before its
terminate is sent again. GCE shows a VM being deleted as ``STOPPING`` (``providers.gcp``),
and a delete sent while one is under way is answered with an error (400 "the resource
is not ready"; repeated, 403 ``rateLimitExceeded``), which would count a provider error
and set a misleading ``last_error`` each pass; a GCE deletion takes about a minute, so
two minutes lets it finish, and a
machine still stopping after that (a stop of ours that was under way, or a lost
request) is asked again."""


def _deletion_under_way(deps: Deps, row: LedgerRow, instance: Instance, *, now: datetime) -> bool:
    """Whether ``instance`` is ``STOPPING`` within :data:`TERMINATE_RESEND_SEC` of the
    last terminate asked for it (this controller's last call, else the row's request)."""
    if instance.state is not InstanceState.STOPPING or row.terminate_requested_at is None:
        return False
    sent = deps.memory.terminate_sent.get(row.launch_id, row.terminate_requested_at)
    last = max(sent, row.terminate_requested_at)
    return (now - last).total_seconds() < TERMINATE_RESEND_SEC


async def _describe(deps: Deps, row: LedgerRow) -> Instance | bool | None:
    """The instance, ``None`` when the provider says there is none, ``False`` when it did
    not answer (nothing is concluded then)."""
    entry = deps.providers.get(row.provider)
    if entry is None or row.instance_id is None:
        return False
    try:
        return await entry.provider.describe(row.instance_id)
    except NotFound:
        return None
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="describe", error=exc)
        return False


def not_visible_for(deps: Deps, *, launch_id: str, now: datetime) -> float:
    """Seconds this controller has seen no trace of the launch's instance (0 at first)."""
    since = deps.memory.not_visible_since.setdefault(launch_id, now)
    return max(0.0, (now - since).total_seconds())


async def _not_visible(deps: Deps, session: AsyncSession, *, row: LedgerRow, now: datetime) -> None:
    """Neither ``list`` nor ``describe`` shows the row's instance.

    Within ``visibility_grace_sec`` nothing is concluded. After it, the launch id is
    looked up by tag, and failing that the instance is terminated by id: the row is
    closed only when that call succeeds (a terminate is idempotent and succeeds for an
    instance already gone).
    """
    waited = not_visible_for(deps, launch_id=row.launch_id, now=now)
    grace = deps.settings.visibility_grace_sec
    if waited < grace:
        if waited == 0:
            log.info(
                "instance %s of %s not visible at the provider yet; nothing concluded for %gs",
                row.instance_id,
                row.launch_id,
                grace,
            )
        return
    entry = deps.providers.get(row.provider)
    if entry is None or row.instance_id is None or deps.settings.dry_run:
        return
    try:
        found = await entry.provider.find_by_launch_id(deps.settings.cluster_id, row.launch_id)
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="find", error=exc)
        return
    if found is not None:
        deps.memory.not_visible_since.pop(row.launch_id, None)
        row.instance_id = found.instance_id
        if found.state.is_gone:
            _confirm_gone(row, found, now=now)
        return
    if row.terminate_requested_at is None:
        row.terminate_requested_at = now
        row.last_error = (
            f"died: instance {row.instance_id} not visible at the provider for {waited:.0f}s"
        )
        log.warning("replica %s of %s %s", row.launch_id, row.workload_slug, row.last_error)
    await session.commit()  # the request is on record before the provider hears of it
    try:
        await entry.provider.terminate(row.instance_id)
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="terminate", error=exc)
        log.warning("terminating unseen %s: %s", row.instance_id, exc)
        return
    row.terminated_confirmed_at = now
    deps.memory.not_visible_since.pop(row.launch_id, None)
    log.info(
        "replica %s of %s closed: not visible for %.0fs and terminate %s accepted",
        row.launch_id,
        row.workload_slug,
        waited,
        row.instance_id,
    )


def _confirm_gone(row: LedgerRow, instance: Instance, *, now: datetime) -> None:
    row.terminated_confirmed_at = now
    if row.terminate_requested_at is not None:
        return
    if row.ready_at is None and instance.state is InstanceState.TERMINATED:
        # Ended on its own before it ever served: a failed boot, reported once with its
        # decision by ``autoscaler.reconcile.boot_failures``.
        row.last_error = BOOT_FAILED + (
            instance.ended_reason
            or f"instance {row.instance_id} is terminated at the provider before it was ready"
        )
        return
    row.last_error = f"{DIED}instance {row.instance_id} is {instance.state.value} at the provider"
    if instance.ended_reason:
        row.last_error += f" ({instance.ended_reason})"
    log.warning("replica %s of %s %s", row.launch_id, row.workload_slug, row.last_error)


async def terminate_instance(deps: Deps, row: LedgerRow) -> None:
    """Ask the provider to terminate the row's instance (idempotent); errors are counted
    and retried on the next pass, since ``terminate_requested_at`` stays set."""
    entry = deps.providers.get(row.provider)
    if entry is None or row.instance_id is None or row.worker_id is not None:
        return
    try:
        await entry.provider.terminate(row.instance_id)
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="terminate", error=exc)
        error = row.last_error or ""
        if error.startswith(SPOT_NOTICE):  # kept, once: the measured rate counts it
            notice = error.split(TERMINATING, 1)[0]
            row.last_error = f"{notice}{TERMINATING}{exc}"
        else:
            row.last_error = str(exc)
        log.warning("terminating %s: %s", row.instance_id, exc)


def _group_complete(deps: Deps, row: LedgerRow, rows: Sequence[LedgerRow]) -> bool:
    """Whether ``row``'s group has every member open, launched and not being ended, and
    every worker that boots from the startup script checked in (``joined_at``)."""
    if row.group_id is None:
        return True
    members = [r for r in rows if r.group_id == row.group_id]
    return len(members) == (row.group_size or 1) and all(
        m.launched_at is not None
        and m.terminate_requested_at is None
        and m.terminated_confirmed_at is None
        and (m.group_role != "worker" or m.joined_at is not None or not boots_from_script(deps, m))
        for m in members
    )


async def settle_groups(
    deps: Deps, session: AsyncSession, *, rows: Sequence[LedgerRow], now: datetime
) -> None:
    """Keep each replica group whole or end it whole.

    * A group whose leader is closed or being terminated: every other member is
      terminated (on record first, then the provider call).
    * A group that lost a member (closed, or being terminated) while its leader lives:
      the leader is drained when it serves (the gateway stops routing; the plan then
      terminates it and places a new group), terminated at once when it does not; its
      workers follow by the rule above.
    """
    groups: dict[str, list[LedgerRow]] = {}
    for r in rows:
        if r.group_id is not None and r.terminated_confirmed_at is None:
            groups.setdefault(r.group_id, []).append(r)
    ending: list[LedgerRow] = []
    for members in groups.values():
        leader = next((m for m in members if m.group_role == "leader"), None)
        size = members[0].group_size or 1
        if leader is None or leader.terminate_requested_at is not None:
            for m in members:
                if m.terminate_requested_at is None:
                    m.terminate_requested_at = now
                    m.last_error = "group ended: its leader is gone or being terminated"
                    ending.append(m)
            continue
        lost = len(members) < size or any(m.terminate_requested_at for m in members)
        if not lost or leader.drain_requested_at is not None:
            continue
        why = "group lost a member: the whole group is replaced"
        if leader.ready_at is None:
            leader.terminate_requested_at = now
            ending.append(leader)
        else:
            leader.drain_requested_at = now
        leader.last_error = why
        log.warning("replica %s of %s: %s", leader.launch_id, leader.workload_slug, why)
    if session.dirty or session.new:
        await session.commit()  # the requests are on record before the provider hears of them
    for m in ending:
        if m.instance_id is not None:
            await terminate_instance(deps, m)
    if ending:
        await session.commit()


async def check_health(
    deps: Deps,
    session: AsyncSession,
    *,
    rows: Sequence[LedgerRow],
    health_path: str,
    now: datetime,
    skip: Collection[str] = (),
) -> list[LedgerRow]:
    """Mark booting replicas ready when healthy; return ready ones unhealthy for too long.

    A replica group is asked through its leader only, and becomes ready only when every
    other member is launched, none is being terminated, and every worker booting from
    the startup script has reported its role started against the leader (the boot
    callback's ``ready``: ``joined_at``); the leader's engine answers only once every
    member joined it (vLLM's waits for the Ray cluster to count them, SGLang's for every
    rank). Its workers are marked ready with it. ``skip``: launch ids not to be made
    ready this pass (a resumed engine that still sleeps answers its health path)."""
    candidates = [
        r
        for r in rows
        if r.url is not None
        and r.launch_id not in skip
        and r.group_role != "worker"
        and phase_of(r) in (Phase.BOOTING, Phase.READY)
        and (phase_of(r) is Phase.READY or _group_complete(deps, r, rows))
    ]
    answers = await asyncio.gather(
        *(
            deps.health.healthy(url=r.url or "", health_path=health_path, engine_key=r.engine_key)
            for r in candidates
        )
    )
    dead: list[LedgerRow] = []
    changed = False
    for row, healthy in zip(candidates, answers, strict=True):
        if phase_of(row) is Phase.BOOTING:
            if healthy:
                row.ready_at = now
                for member in rows:  # the workers have joined the group that now serves
                    if member.group_id is not None and member.group_id == row.group_id:
                        member.ready_at = member.ready_at or now
                changed = True
                since = row.resumed_at or row.intent_at
                seconds = max(0.0, (now - since).total_seconds())
                if row.resumed_at is None:
                    deps.metrics.launch_to_ready.labels(row.provider).observe(seconds)
                else:
                    mode = row.park_mode or "stopped"
                    deps.metrics.resume_to_ready.labels(row.provider, mode).observe(seconds)
                log.info(
                    "replica %s of %s ready after %.0fs%s",
                    row.launch_id,
                    row.workload_slug,
                    seconds,
                    "" if row.resumed_at is None else f" (resumed, {row.park_mode})",
                )
            continue
        if healthy:
            deps.memory.unhealthy_since.pop(row.launch_id, None)
            continue
        since = deps.memory.unhealthy_since.setdefault(row.launch_id, now)
        if (now - since).total_seconds() >= deps.settings.unhealthy_grace_sec:
            dead.append(row)
    if changed:
        await session.commit()
        deps.notify_change()
    return dead
