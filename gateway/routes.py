"""The gateway's picture of the store: workloads, their ready replicas, data keys.

Loaded whole into frozen values and swapped atomically, so a request never sees half a
refresh. The gateway reloads it every ``refresh_interval_sec`` and at once when
``notify_change()`` is called.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from autoscaler.decide.plan import spot_drain_at
from autoscaler.spec import JOB_ONLY_TASK_TYPES, EndpointType, TaskType, adapters_in_command
from autoscaler.store.models import Instance, Token, Workload
from autoscaler.store.phase import Phase, phase_of
from autoscaler.store.records import placement_blocks
from autoscaler.store.tokens import TokenKind

WorkloadRef = tuple[str, str]  # (project, slug)


@dataclass(frozen=True, slots=True)
class Replica:
    """A replica the gateway may route to (ready) or must let finish (draining)."""

    key: str  # the ledger's launch id
    url: str
    engine_key: str | None
    draining: bool
    adapters: frozenset[str] = frozenset()
    """The LoRA adapters its engine was started with (its launch's command)."""


@dataclass(frozen=True, slots=True)
class Adapter:
    """A LoRA adapter of a workload's spec: its name and where it is loaded from."""

    name: str
    source: str


@dataclass(frozen=True, slots=True)
class WorkloadRoute:
    ref: WorkloadRef
    workload_id: int
    model: str
    task_type: TaskType
    replicas: tuple[Replica, ...]
    last_request_at: datetime | None
    blocked: str | None = None
    """Why the controller cannot start a replica now (no offer fits, a ceiling, a spec
    that cannot run), while the workload has none: callers are answered at once."""
    endpoint_type: EndpointType | None = None
    per_worker: int | None = None
    """The spec's ``per_worker``: the most requests one replica is sent at once
    (``None``: the gateway's cap; ``gateway.window.replica_cap``)."""
    adapters: tuple[Adapter, ...] = ()
    """The spec's ``llm_loras``: served to requests whose ``model`` names one, by the
    replicas booted with it."""

    def adapter(self, model: str | None) -> Adapter | None:
        """The adapter a request's ``model`` names, or ``None`` (the base model, or a
        name the engine answers itself)."""
        return next((a for a in self.adapters if a.name == model), None)

    @property
    def job_only(self) -> bool:
        """Served only as async jobs: a job-only modality or an async endpoint."""
        return self.task_type in JOB_ONLY_TASK_TYPES or self.endpoint_type is EndpointType.ASYNC

    @property
    def ready(self) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if not r.draining)


@dataclass(frozen=True, slots=True)
class DataKey:
    project: str
    workload_slug: str


@dataclass(frozen=True, slots=True)
class RouteTable:
    workloads: dict[WorkloadRef, WorkloadRoute] = field(default_factory=dict)
    data_keys: dict[str, DataKey] = field(default_factory=dict)  # by SHA-256 of the secret
    admin_hashes: frozenset[str] = frozenset()


async def load_route_table(session: AsyncSession, *, now: datetime | None = None) -> RouteTable:
    """Read live workloads, their routable replicas, why any cannot be placed now (as of
    ``now``, the current time unless given), and unrevoked keys: the whole table, a
    query per kind of row, O(workloads + replicas + keys)."""
    routes = await load_routes(session, now=now or datetime.now(UTC))
    data_keys, admin = await load_keys(session)
    return RouteTable(workloads=routes, data_keys=data_keys, admin_hashes=admin)


async def load_routes(
    session: AsyncSession, *, now: datetime, workload_ids: Collection[int] | None = None
) -> dict[WorkloadRef, WorkloadRoute]:
    """The routes of live workloads: every one, or those of ``workload_ids`` (a deleted
    or unknown id is simply absent from the answer)."""
    if workload_ids is not None and not workload_ids:
        return {}
    blocks = await placement_blocks(session, now=now, workload_ids=workload_ids)
    live = select(Workload).where(Workload.deleted_at.is_(None))
    routable = select(Instance).where(
        Instance.ready_at.is_not(None),
        Instance.url.is_not(None),
        Instance.terminate_requested_at.is_(None),
        Instance.terminated_confirmed_at.is_(None),
        # A replica group is served by its leader alone; workers hold model shards.
        Instance.group_role.is_(None) | (Instance.group_role != "worker"),
    )
    if workload_ids is not None:
        live = live.where(Workload.id.in_(workload_ids))
        routable = routable.where(Instance.workload_id.in_(workload_ids))
    workload_rows = list(await session.scalars(live))
    by_workload: dict[int, list[Replica]] = {}
    for row in await session.scalars(routable):
        phase = phase_of(row)
        if phase not in (Phase.READY, Phase.DRAINING) or row.url is None:
            continue
        by_workload.setdefault(row.workload_id, []).append(
            Replica(
                key=row.launch_id,
                url=row.url.rstrip("/"),
                engine_key=row.engine_key,
                draining=phase is Phase.DRAINING or _reclaim_near(row.reclaim_at, now),
                adapters=adapters_in_command(row.engine_command),
            )
        )
    return {
        (w.project, w.slug): WorkloadRoute(
            ref=(w.project, w.slug),
            workload_id=w.id,
            model=str(w.spec.get("model", w.slug)),
            task_type=_task_type(w.spec.get("task_type")),
            replicas=tuple(sorted(by_workload.get(w.id, []), key=lambda r: r.key)),
            last_request_at=w.last_request_at,
            blocked=blocks.get(w.id),
            endpoint_type=_endpoint_type(w.spec.get("endpoint_type")),
            per_worker=_per_worker(w.spec.get("per_worker")),
            adapters=_adapters(w.spec.get("llm_loras")),
        )
        for w in workload_rows
    }


def _reclaim_near(reclaim_at: datetime | None, now: datetime) -> bool:
    """A ready replica warned of its spot reclaim serves until the controller drains it
    (``decide.plan.heed_spot_notice``), whose drain reaches the gateway through the
    change feed; a load past the drain's latest time (the controller late) routes no
    new request to it either, so none is sent to a machine about to be reclaimed."""
    drain_at = spot_drain_at(reclaim_at)
    return drain_at is not None and now >= drain_at


async def load_keys(session: AsyncSession) -> tuple[dict[str, DataKey], frozenset[str]]:
    """Unrevoked data keys (by the SHA-256 of the secret) and admin key hashes."""
    token_rows = await session.scalars(
        select(Token).where(
            Token.revoked_at.is_(None),
            Token.kind.in_([TokenKind.LIVE.value, TokenKind.ADMIN.value]),
        )
    )
    data_keys: dict[str, DataKey] = {}
    admin: set[str] = set()
    for token in token_rows:
        if token.kind == TokenKind.ADMIN.value:
            admin.add(token.secret_hash)
        elif token.project is not None and token.workload_slug is not None:
            data_keys[token.secret_hash] = DataKey(token.project, token.workload_slug)
    return data_keys, frozenset(admin)


async def knows_data_key(session: AsyncSession, *, digest: str) -> bool:
    """Whether the store holds an unrevoked data key with this SHA-256: a key made since
    the last refresh (one indexed lookup, so an unknown key costs no full reload)."""
    found = await session.scalar(
        select(Token.id).where(
            Token.secret_hash == digest,
            Token.revoked_at.is_(None),
            Token.kind == TokenKind.LIVE.value,
        )
    )
    return found is not None


def _task_type(value: object) -> TaskType:
    try:
        return TaskType(str(value))
    except ValueError:
        return TaskType.TEXT2TEXT


def _endpoint_type(value: object) -> EndpointType | None:
    try:
        return None if value is None else EndpointType(str(value))
    except ValueError:
        return None


def _per_worker(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _adapters(value: object) -> tuple[Adapter, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        Adapter(name=str(item["name"]), source=str(item.get("source", "")))
        for item in value
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    )
