"""Buying replicas: the intent row first, then the provider call.

The order is the no-leak invariant. The row (with its launch id, offer and price) is
committed before the provider is asked, so the budget counts it and a crash in between
leaves a row that :func:`resolve_intent` settles on the next pass by looking the launch
id up by tag; the launch id is also the provider's idempotency token, so asking again
never buys a second machine.

Outcomes of a launch call:

* an instance: the row gets ``instance_id``, ``launched_at`` and the engine URL;
* :class:`~providers.base.Transient`: the row stays pending and is resolved next pass;
* any other provider error (capacity, quota, an invalid request): the provider bought
  nothing, so the row is closed on its word, the offer's market is marked unavailable
  for a while, and the next pass places elsewhere.

Cloud instances (AWS, GCP) boot from a startup script (``providers.bootstrap``) that
calls back to the management API at ``{callback_url}/v1/boot/{launch_id}`` with a
per-instance token: :func:`boot_token`, an HMAC of the launch id keyed by the row's
engine key, so no new secret is stored (the API derives it again to check a caller).
Local and simulated providers start their engines themselves and get no script.

A replica group (a placement with ``group_size`` above one) is one intent: a ledger row
per member (the leader's launch id is the group's id; each member has its own launch id,
tagged with the group and its role), all written in one commit with one launch decision
for the whole group's price before any member is bought, then launched leader first.
No half-bought group survives: when the provider refuses a member (capacity, quota, an
invalid request), :func:`_abandon_group` closes the members the provider was never asked
for, and asks for the termination of every other member (on record first, then the
provider call); those rows close only once the provider shows them gone, or, for a
member whose launch may or may not have happened, once its launch id has stayed unseen
for the visibility grace, as any unresolved intent. A transient error leaves the
remaining members pending, and a crash leaves them written: either way
:func:`resolve_intent` launches each by its own launch id on a later pass.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.decide.placement import Placement, worker_key
from autoscaler.decide.warm import warm_policy_of
from autoscaler.reconcile.deps import Deps, ProviderEntry, log
from autoscaler.reconcile.fleet import WorkloadFacts
from autoscaler.reconcile.ledger import (
    Facts,
    can_sleep,
    decision_values,
    record_decision,
    reserve_fleet,
)
from autoscaler.reconcile.observe import count_provider_error
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec
from autoscaler.store.models import Decision, Workload
from autoscaler.store.models import Instance as LedgerRow
from catalog.cuda import offer_cuda_problem
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import Offer, ProviderName
from catalog.query import Market
from catalog.storage import LAUNCH_DISK_GIB, stopped_usd_per_hour
from providers.base import (
    GROUP_TAG,
    ROLE_TAG,
    BootSpec,
    Instance,
    InsufficientCapacity,
    LaunchRequest,
    ProviderError,
    QuotaExceeded,
    Transient,
    instance_tags,
)
from providers.bootstrap import BootCallback, SpotNotice, with_startup_script
from providers.engines import boot_spec, engine_for

SCRIPTED_PROVIDERS = frozenset({ProviderName.AWS.value, ProviderName.GCP.value})
"""Providers whose instances boot from the startup script (the rest start engines)."""

SPOT_NOTICES: dict[str, SpotNotice] = {ProviderName.AWS.value: "ec2", ProviderName.GCP.value: "gce"}
"""Whose interruption notice a spot instance's startup script watches, by provider."""


def new_launch_id() -> str:
    """A launch id: short enough for EC2's 64-character ClientToken and GCE names."""
    return f"ln-{secrets.token_hex(10)}"


def boot_token(*, launch_id: str, engine_key: str) -> str:
    """The bearer token a launch's startup script proves itself with (hex HMAC-SHA256)."""
    message = f"autoscaler-boot-callback:{launch_id}".encode()
    return hmac.new(engine_key.encode(), message, hashlib.sha256).hexdigest()


def boot_callback(*, callback_url: str, launch_id: str, engine_key: str) -> BootCallback:
    """Where the launch's startup script fetches its secrets and reports."""
    return BootCallback(
        url=f"{callback_url.rstrip('/')}/v1/boot/{launch_id}",
        token=boot_token(launch_id=launch_id, engine_key=engine_key),
    )


def workload_boot(
    spec: WorkloadSpec,
    *,
    cuda_version: str | None = None,
    gpu_count: int = 1,
    nodes: int = 1,
    node_rank: int = 0,
    sleep_mode: bool = False,
) -> BootSpec:
    """How a replica of ``spec`` boots on a machine with ``gpu_count`` GPUs (a group of
    ``nodes`` such machines when above one, this machine its member ``node_rank``);
    ``sleep_mode``: able to sleep later (:func:`may_sleep`)."""
    return boot_spec(
        backend=spec.backend.value,
        model=spec.model,
        command=spec.engine_command,
        vllm_version=spec.vllm_version,
        task_type=spec.task_type.value,
        cuda_version=cuda_version,
        gpu_count=gpu_count,
        nodes=nodes,
        node_rank=node_rank,
        sleep_mode=sleep_mode,
    )


def may_sleep(spec: WorkloadSpec) -> bool:
    """Whether the workload's warm pool may put replicas to sleep: they boot with the
    engine's sleep flags then (vLLM ``--enable-sleep-mode``)."""
    warm = warm_policy_of(spec)
    if warm is None or warm.max_sleeping == 0:
        return False
    support = engine_for(spec.backend.value).sleep
    return support is not None and support.driven


def node_rank(launch_id: str, *, leader: str, members: Sequence[str]) -> int:
    """A group member's rank: 0 for the leader, the workers 1 up in launch id order (the
    same whenever it is computed: a group's members never change)."""
    if launch_id == leader:
        return 0
    workers = sorted(m for m in members if m != leader)
    return workers.index(launch_id) + 1


async def _rank_of(session: AsyncSession, row: LedgerRow) -> int:
    if row.group_id is None:
        return 0
    members = await session.scalars(
        select(LedgerRow.launch_id).where(LedgerRow.group_id == row.group_id)
    )
    return node_rank(row.launch_id, leader=row.group_id, members=list(members))


@dataclass(frozen=True, slots=True)
class LaunchOutcome:
    row: LedgerRow
    bought: bool
    error: str | None = None


async def launch_replica(
    deps: Deps,
    session: AsyncSession,
    *,
    workload: Workload,
    spec: WorkloadSpec,
    placement: Placement,
    reason: str,
    now: datetime,
    prefill: bool = False,
) -> LaunchOutcome:
    """Write the intent, commit, then ask the provider (or assign a private worker).

    A placement of a group launches all its members under one intent (see the module
    docstring); the outcome is then the leader's row. With several controllers the
    intent commits only with the shard's lease held and a place reserved under the
    fleet ceiling (:func:`admit`). ``prefill``: a warm pool refill (parked once ready)."""
    await admit(deps, session, workload=workload, usd_per_hour=placement.usd_per_hour)
    if placement.offer is not None and placement.group_size > 1:
        return await _launch_group(
            deps, session, workload=workload, spec=spec, placement=placement, reason=reason, now=now
        )
    row = intent_row(
        workload,
        spec,
        placement=placement,
        launch_id=new_launch_id(),
        now=now,
        disk_gib=launch_disk_gib(deps, placement),
    )
    row.prefill = prefill
    session.add(row)
    session.add(Decision(**launch_entry(row, placement=placement, reason=reason, now=now)))
    await session.commit()  # the intent exists before the provider hears of it
    if placement.offer is None:
        return LaunchOutcome(row=row, bought=True)  # the worker's agent starts it
    return await _call_launch(deps, session, row=row, spec=spec, now=now)


def launch_entry(
    row: LedgerRow, *, placement: Placement, reason: str, now: datetime
) -> dict[str, Any]:
    """The ``launch`` decision of one machine's intent (``ledger.decision_values``)."""
    return decision_values(
        workload_id=row.workload_id,
        at=now,
        kind="launch",
        reason=f"{reason}: {placement.reason}",
        inputs={"placement": placement.reason, "offer": row.offer_key, "spot": row.spot},
        result={"launch_id": row.launch_id, "usd_per_hour": row.hourly_usd},
        cost_delta=row.hourly_usd,
    )


class LaunchRefused(Exception):
    """The fleet ceiling, reserved in the store, has no room for this launch: nothing
    was written or bought; ``reason`` names the fleet ceiling."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def admit(
    deps: Deps, session: AsyncSession, *, workload: Workload, usd_per_hour: float
) -> None:
    """Where several controllers share the store (``deps.shards``), in the transaction
    the intent rows commit in: hold the shard's lease (``LeaseLost`` otherwise), then
    reserve the price under the fleet ceiling (:class:`LaunchRefused` otherwise; the
    transaction is committed first, which ends its locks). One controller alone needs
    neither: its pass's own total is exact (``ledger.FleetSpend``).

    Always the lease row first, then the reservation (no lock order the other way, so
    no deadlock); the lease rounds wait for neither (``shards``). The wait for the
    reservation can outlast the lease (a stalled controller, its rounds failing): the
    lease is checked again once the reservation is held, so a launch whose lease lapsed
    meanwhile raises ``LeaseLost`` and writes nothing."""
    if deps.shards is None:
        return
    await deps.shards.fence(session, project=workload.project, slug=workload.slug)
    ceiling = deps.settings.fleet_max_hourly_cost_usd
    if ceiling is None:
        return
    refusal = await reserve_fleet(session, usd_per_hour=usd_per_hour, ceiling=ceiling)
    # The row is still held by this transaction: checking it again waits for nothing.
    await deps.shards.fence(session, project=workload.project, slug=workload.slug)
    if refusal is not None:
        await session.commit()
        raise LaunchRefused(refusal)


def intent_row(
    workload: Workload | WorkloadFacts,
    spec: WorkloadSpec,
    *,
    placement: Placement,
    launch_id: str,
    now: datetime,
    disk_gib: float,
    rank: int = 0,
) -> LedgerRow:
    """The ledger row of one machine (one member of a group) to be bought; ``disk_gib``:
    the boot disk the launch asks for, which a stopped machine bills."""
    return LedgerRow(
        **intent_values(
            workload,
            spec,
            placement=placement,
            launch_id=launch_id,
            now=now,
            disk_gib=disk_gib,
            rank=rank,
        )
    )


def intent_values(
    workload: Workload | WorkloadFacts,
    spec: WorkloadSpec,
    *,
    placement: Placement,
    launch_id: str,
    now: datetime,
    disk_gib: float,
    rank: int = 0,
) -> dict[str, Any]:
    """The column values of :func:`intent_row`'s row, as a plain dictionary (a batch of
    intents is inserted as values: ``reconcile.batch``). O(1); the boot command is asked
    of ``providers.engines.boot_spec`` once."""
    nodes = placement.group_size
    offer = placement.offer
    values: dict[str, Any] = {
        "launch_id": launch_id,
        "workload_id": workload.id,
        "project": workload.project,
        "workload_slug": workload.slug,
        "spec_generation": workload.generation,
        "provider": ProviderName.PRIVATE.value,
        "offer_key": "",
        "region": "",
        "zone": "",
        "instance_type": "",
        "gpu": "",
        "gpu_count": 0,
        "spot": False,
        "hourly_usd": placement.usd_per_hour / nodes,
        "worker_id": placement.worker_id,
        "engine_key": secrets.token_urlsafe(24),
        "intent_at": now,
    }
    if offer is not None:
        spot = placement.market is Market.SPOT
        values |= {
            "provider": offer.provider.value,
            "offer_key": offer.key,
            "region": offer.region,
            "zone": offer.zone,
            "instance_type": offer.instance_type,
            "gpu": offer.gpu,
            "gpu_count": offer.gpu_count,
            "spot": spot,
        }
        if not spot and nodes == 1:  # a spot machine, a group member: never stopped
            values["stopped_usd_per_hour"] = stopped_usd_per_hour(offer, disk_gib)
    else:
        values["offer_key"] = worker_key(placement.worker_id or "")
    boot = workload_boot(
        spec,
        gpu_count=max(values["gpu_count"], 1),
        nodes=nodes,
        node_rank=rank,
        sleep_mode=nodes == 1 and may_sleep(spec),
    )
    values["engine_command"] = list(boot.command)
    return values


def launch_disk_gib(deps: Deps, placement: Placement) -> float:
    """The boot disk the provider's launches ask for (its configured size)."""
    entry = deps.providers.get(placement.offer.provider.value) if placement.offer else None
    return entry.disk_gib if entry is not None else LAUNCH_DISK_GIB


async def _launch_group(
    deps: Deps,
    session: AsyncSession,
    *,
    workload: Workload,
    spec: WorkloadSpec,
    placement: Placement,
    reason: str,
    now: datetime,
) -> LaunchOutcome:
    """Every member's intent in one commit, then the members leader first; a refused
    member abandons the group (see the module docstring)."""
    group_id = new_launch_id()
    ids = [group_id, *(new_launch_id() for _ in range(placement.group_size - 1))]
    rows = []
    for index, launch_id in enumerate(ids):
        row = intent_row(
            workload,
            spec,
            placement=placement,
            launch_id=launch_id,
            now=now,
            disk_gib=launch_disk_gib(deps, placement),
            rank=node_rank(launch_id, leader=group_id, members=ids),
        )
        row.group_id, row.group_size = group_id, placement.group_size
        row.group_role = "leader" if index == 0 else "worker"
        session.add(row)
        rows.append(row)
    record_decision(
        session,
        workload_id=workload.id,
        at=now,
        kind="launch",
        reason=f"{reason}: {placement.reason}",
        inputs={"placement": placement.reason, "offer": rows[0].offer_key, "spot": rows[0].spot},
        result={
            "launch_id": group_id,
            "members": [r.launch_id for r in rows],
            "usd_per_hour": placement.usd_per_hour,
        },
        cost_delta=placement.usd_per_hour,
    )
    await session.commit()  # every member's intent exists before the provider hears of any
    for n, row in enumerate(rows):
        outcome = await _call_launch(
            deps, session, row=row, spec=spec, now=now, never_called=rows[n + 1 :]
        )
        if not outcome.bought:
            return LaunchOutcome(row=rows[0], bought=False, error=outcome.error)
    return LaunchOutcome(row=rows[0], bought=True)


async def _abandon_group(
    deps: Deps,
    session: AsyncSession,
    *,
    failed: LedgerRow,
    never_called: Sequence[LedgerRow],
    now: datetime,
) -> None:
    """A member of ``failed``'s group was refused: close the members the provider was
    never asked for, and terminate every other open member (the request on record
    first, then the provider call; the row closes when the provider shows it gone)."""
    siblings = await session.scalars(
        select(LedgerRow).where(
            LedgerRow.group_id == failed.group_id,
            LedgerRow.launch_id != failed.launch_id,
            LedgerRow.terminated_confirmed_at.is_(None),
        )
    )
    skipped = {r.launch_id for r in never_called}
    why = f"group abandoned: member {failed.launch_id} could not be bought"
    bought = []
    for sibling in siblings:
        if sibling.launch_id in skipped:
            sibling.terminated_confirmed_at = now  # the provider was never asked for it
            sibling.last_error = f"never launched: {why}"
            continue
        sibling.terminate_requested_at = sibling.terminate_requested_at or now
        sibling.last_error = why
        bought.append(sibling)
    record_decision(
        session,
        workload_id=failed.workload_id,
        at=now,
        kind="terminate",
        reason=f"{why}; terminating {len(bought)} member(s) already launched or asked for",
        inputs={"group": failed.group_id, "failed": failed.launch_id},
        result={"terminating": [r.launch_id for r in bought]},
        cost_delta=0.0,
    )
    await session.commit()  # the termination requests are on record before any call
    for sibling in bought:
        if sibling.instance_id is not None:
            await _terminate_member(deps, sibling)
    await session.commit()
    log.warning("%s: %d member(s) terminating", why, len(bought))


async def _terminate_member(deps: Deps, row: LedgerRow) -> None:
    """Ask the provider to terminate a member (idempotent); a failure is counted and
    the request, on record, is carried out by the liveness pass
    (``liveness.sync_with_provider``), which also confirms the termination."""
    entry = deps.providers.get(row.provider)
    if entry is None or row.instance_id is None:
        return
    try:
        await entry.provider.terminate(row.instance_id)
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="terminate", error=exc)
        row.last_error = f"{row.last_error}; terminating: {exc}"


async def _call_launch(
    deps: Deps,
    session: AsyncSession,
    *,
    row: LedgerRow,
    spec: WorkloadSpec,
    now: datetime,
    never_called: Sequence[LedgerRow] = (),
) -> LaunchOutcome:
    request = launch_request(deps, row=row, spec=spec, rank=await _rank_of(session, row))
    if isinstance(request, str):
        return await _refused(
            deps, session, row=row, now=now, error=request, never_called=never_called
        )
    try:
        await call_launch(deps, row=row, request=request, now=now)
    except Transient as exc:
        launch_retry(deps, row=row, error=exc, now=now)
        await session.commit()
        return LaunchOutcome(row=row, bought=False, error=str(exc))
    except ProviderError as exc:
        mark_unavailable(deps, row=row, now=now)
        return await _refused(
            deps,
            session,
            row=row,
            now=now,
            error=str(exc),
            error_type=exc,
            never_called=never_called,
        )
    await session.commit()
    return LaunchOutcome(row=row, bought=True)


def launch_request(
    deps: Deps, *, row: LedgerRow, spec: WorkloadSpec, rank: int
) -> LaunchRequest | str:
    """The provider's request for ``row``'s machine (its member ``rank`` of a group), or
    why none can be made (no such provider, its offer left the catalog): no I/O. The
    offer is found by its key in the catalog load's index (``deps.memory.placements``:
    O(1) once the load's keys are indexed, where a scan of a catalog of some 1,200
    offers took up to a millisecond per launch)."""
    if deps.providers.get(row.provider) is None:
        return f"no provider {row.provider}"
    offer = deps.memory.placements.index(deps.offers()).by_key(row.offer_key)
    if offer is None:
        return f"offer {row.offer_key} left the catalog"
    boot = _scripted(
        deps,
        row=row,
        spec=spec,
        boot=workload_boot(
            spec,
            cuda_version=_cuda_pin(spec, offer),
            gpu_count=offer.gpu_count,
            nodes=row.group_size or 1,
            node_rank=rank,
            sleep_mode=can_sleep(row),  # as its intent recorded it
        ),
    )
    tags = instance_tags(
        cluster_id=deps.settings.cluster_id,
        project=row.project,
        workload=row.workload_slug,
        launch_id=row.launch_id,
    )
    if row.group_id is not None:
        tags |= {GROUP_TAG: row.group_id, ROLE_TAG: row.group_role or "worker"}
    return LaunchRequest(offer=offer, spot=row.spot, boot=boot, launch_id=row.launch_id, tags=tags)


async def call_launch(deps: Deps, *, row: LedgerRow, request: LaunchRequest, now: datetime) -> None:
    """Ask the provider for ``row``'s machine (its intent committed) and record the
    instance on the row (not committed); a :class:`ProviderError` is counted and raised."""
    entry = deps.providers.get(row.provider)
    assert entry is not None  # ``launch_request`` made the request
    deps.memory.not_visible_since.pop(row.launch_id, None)  # a machine may exist from now
    try:
        instance = await entry.provider.launch(request)
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="launch", error=exc)
        raise
    adopt(row, instance, entry=entry, port=request.boot.port, now=now)
    deps.metrics.launches.labels(row.provider).inc()


def launch_retry(deps: Deps, *, row: LedgerRow, error: Transient, now: datetime) -> None:
    """A transient launch error: the row stays pending, tried again from the provider's
    ``retry_after`` (the caller commits the row's ``last_error``)."""
    row.last_error = str(error)
    retry_at = now + timedelta(seconds=error.retry_after)
    deps.memory.launch_retry_at[row.launch_id] = retry_at
    log.warning("launch %s: %s (tried again from %s)", row.launch_id, error, retry_at.isoformat())


def refuse(
    deps: Deps,
    *,
    row: LedgerRow,
    now: datetime,
    error: str,
    error_type: ProviderError | None = None,
) -> dict[str, Any]:
    """Close ``row`` on the provider's word that it bought nothing (not committed); the
    ``launch_failed`` decision's values (``ledger.decision_values``)."""
    row.last_error = f"launch failed: {error}"
    row.terminated_confirmed_at = now
    what = (
        "no capacity"
        if isinstance(error_type, InsufficientCapacity)
        else "quota"
        if isinstance(error_type, QuotaExceeded)
        else "refused"
    )
    return decision_values(
        workload_id=row.workload_id,
        at=now,
        kind="launch_failed",
        reason=f"launch {row.launch_id} failed ({what}); {row.offer_key} skipped for "
        f"{deps.settings.unavailable_sec:g}s: {error}",
        inputs={"launch_id": row.launch_id, "offer": row.offer_key, "spot": row.spot},
        result={"error": error},
        cost_delta=-row.hourly_usd,
    )


def boots_from_script(deps: Deps, row: LedgerRow) -> bool:
    """Whether ``row``'s machine boots from the startup script, which reports to the boot
    callback (a cloud provider, a ``callback_url``, an engine key to derive its token)."""
    return (
        row.provider in SCRIPTED_PROVIDERS
        and deps.settings.callback_url is not None
        and bool(row.engine_key)
    )


def _scripted(deps: Deps, *, row: LedgerRow, spec: WorkloadSpec, boot: BootSpec) -> BootSpec:
    """``boot`` with its startup script, for providers whose instances boot from one.

    ``callback_url`` is required by the configuration wherever AWS or GCP is configured;
    without it (a hand-built ``Settings``) the request goes out as it is.
    """
    url = deps.settings.callback_url
    if url is None or not row.engine_key or not boots_from_script(deps, row):
        return boot
    callback = boot_callback(callback_url=url, launch_id=row.launch_id, engine_key=row.engine_key)
    role = row.group_role if row.group_role in ("leader", "worker") else None
    return with_startup_script(
        boot,
        backend=spec.backend.value,
        launch_id=row.launch_id,
        callback=callback,
        spot_notice=SPOT_NOTICES.get(row.provider) if row.spot else None,
        group_role="leader" if role == "leader" else "worker" if role == "worker" else None,
        group_size=row.group_size or 1,
    )


def _cuda_pin(spec: WorkloadSpec, offer: Offer) -> str | None:
    """The newest pinned CUDA version the offer's machine image can run: the catalog
    admitted the offer for at least one of the pins, and the instance boots (and checks
    its driver) for that one."""
    policy = spec.execution_policy_config
    pool = policy.cloud_pool if isinstance(policy, AutoscalingPolicy) else None
    pins = pool.allowed_cuda_versions if pool else None
    if not pins:
        return None
    try:
        gpu = resolve_gpu(offer.gpu)
    except UnknownGpuError:
        return max(pins, key=_version_key)
    runnable = [
        pin
        for pin in pins
        if offer_cuda_problem(provider=offer.provider, gpu=gpu, pins=(pin,)) is None
    ]
    return max(runnable or pins, key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def adopt(
    row: LedgerRow, instance: Instance, *, entry: ProviderEntry, port: int, now: datetime
) -> None:
    """Record the provider's instance on the row."""
    row.instance_id = instance.instance_id
    row.launched_at = row.launched_at or min(instance.launched_at, now)
    row.url = row.url or entry.engine_url(instance, port=port)
    row.private_address = row.private_address or instance.private_address
    row.engine = instance.engine or row.engine
    row.engine_reason = instance.engine_reason or row.engine_reason
    row.last_error = None


def mark_unavailable(deps: Deps, *, row: Facts, now: datetime) -> None:
    """Skip this offer's market (or this worker) for ``unavailable_sec``."""
    key = (
        worker_key(row.worker_id)
        if row.worker_id
        else (f"{row.offer_key}#spot" if row.spot else row.offer_key)
    )
    deps.memory.unavailable[key] = now + timedelta(seconds=deps.settings.unavailable_sec)


async def _refused(
    deps: Deps,
    session: AsyncSession,
    *,
    row: LedgerRow,
    now: datetime,
    error: str,
    error_type: ProviderError | None = None,
    never_called: Sequence[LedgerRow] = (),
) -> LaunchOutcome:
    """The provider bought nothing (its word): close the row, log why; a group member's
    refusal abandons its group (:func:`_abandon_group`)."""
    session.add(Decision(**refuse(deps, row=row, now=now, error=error, error_type=error_type)))
    await session.commit()
    log.warning("launch %s failed: %s", row.launch_id, error)
    if row.group_id is not None:
        await _abandon_group(deps, session, failed=row, never_called=never_called, now=now)
    return LaunchOutcome(row=row, bought=False, error=error)


async def resolve_intent(
    deps: Deps, session: AsyncSession, *, row: LedgerRow, spec: WorkloadSpec | None, now: datetime
) -> None:
    """Settle a pending intent left by a crash or a transient failure.

    Found by its launch id: adopt the instance. Not found: launch again under the same
    launch id (idempotent: the provider answers with the machine a lost answer described),
    unless the row is being terminated. Then a machine created by the last attempt may
    simply not be visible yet, so the row is closed as never launched only once the
    launch id has stayed unseen for ``visibility_grace_sec`` since this controller's last
    launch attempt; were it still to appear, it carries the cluster's tags and the orphan
    sweep terminates it.
    """
    entry = deps.providers.get(row.provider)
    if entry is None:
        return
    try:
        found = await entry.provider.find_by_launch_id(deps.settings.cluster_id, row.launch_id)
    except ProviderError as exc:
        count_provider_error(deps, provider=row.provider, operation="find", error=exc)
        return
    port = workload_boot(spec).port if spec is not None else 8000
    if found is not None:
        deps.memory.not_visible_since.pop(row.launch_id, None)
        adopt(row, found, entry=entry, port=port, now=now)
        if found.state.is_gone:
            row.terminated_confirmed_at = now
            row.last_error = f"instance {found.instance_id} {found.state.value} at the provider"
        await session.commit()
        log.info("intent %s resolved: instance %s", row.launch_id, found.instance_id)
        return
    if row.terminate_requested_at is not None or spec is None:
        unseen = deps.memory.not_visible_since.setdefault(row.launch_id, now)
        if (now - unseen).total_seconds() < deps.settings.visibility_grace_sec:
            return
        deps.memory.not_visible_since.pop(row.launch_id, None)
        row.terminated_confirmed_at = now
        row.last_error = row.last_error or "never launched: the provider has no such launch"
        await session.commit()
        return
    if deps.settings.dry_run:
        return
    await _call_launch(deps, session, row=row, spec=spec, now=now)
