"""The store on SQLite and on PostgreSQL alike: ensure, drift, tokens, UTC, migrations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store import tokens, workloads
from autoscaler.store.db import migrate, session_factory
from autoscaler.store.models import Instance, Job, RouteChange, Workload
from autoscaler.store.phase import Phase, phase_of
from autoscaler.store.tokens import TokenKind
from autoscaler.store.workloads import EnsureAction

NOW = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)


def spec(**overrides: object) -> WorkloadSpec:
    raw = {"name": "Support bot", "slug": "support-bot", "model": "m/x-8B", **overrides}
    return WorkloadSpec.model_validate(raw)


async def ensure(
    sessions: async_sessionmaker[AsyncSession],
    s: WorkloadSpec,
    *,
    on_drift: OnDrift = OnDrift.RECONCILE,
    project: str = "acme",
) -> workloads.EnsureResult:
    async with sessions() as session, session.begin():
        return await workloads.ensure_workload(
            session, project=project, spec=s, on_drift=on_drift, now=NOW
        )


def to(revision: str) -> Callable[[Connection], None]:
    """A ``run_sync`` step migrating the connection's database up to ``head`` or down to
    ``revision``."""
    from alembic import command

    from autoscaler.store.db import _alembic_config

    def run(conn: Connection) -> None:
        config = _alembic_config()
        config.attributes["connection"] = conn
        if revision == "head":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)

    return run


async def test_ensure_creates_then_is_idempotent(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    first = await ensure(sessions, spec())
    again = await ensure(sessions, spec())
    assert (first.action, first.workload.generation) == (EnsureAction.CREATED, 1)
    assert (again.action, again.workload.generation) == (EnsureAction.UNCHANGED, 1)
    assert again.workload.id == first.workload.id


async def test_changed_spec_reconciles_with_a_diff(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await ensure(sessions, spec())
    result = await ensure(sessions, spec(execution_policy_config={"replicas": 3}))
    assert result.action is EnsureAction.UPDATED
    assert result.workload.generation == 2
    assert result.diff == [{"path": "execution_policy_config.replicas", "old": 1, "new": 3}]
    async with sessions() as session:
        stored = await workloads.get_workload(session, project="acme", slug="support-bot")
    assert stored is not None and stored.spec["execution_policy_config"] == {"replicas": 3}


async def test_drift_fail_refuses_and_keeps_the_stored_spec(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await ensure(sessions, spec())
    with pytest.raises(workloads.DriftRefused) as info:
        await ensure(sessions, spec(model="m/other"), on_drift=OnDrift.FAIL)
    assert info.value.diff == [{"path": "model", "old": "m/x-8B", "new": "m/other"}]
    ignored = await ensure(sessions, spec(model="m/other"), on_drift=OnDrift.IGNORE)
    assert ignored.action is EnsureAction.IGNORED
    async with sessions() as session:
        stored = await workloads.get_workload(session, project="acme", slug="support-bot")
    assert stored is not None
    assert (stored.spec["model"], stored.generation) == ("m/x-8B", 1)


async def test_same_slug_in_two_projects_are_two_workloads(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    a = await ensure(sessions, spec(), project="acme")
    b = await ensure(sessions, spec(), project="globex")
    assert a.workload.id != b.workload.id
    async with sessions() as session:
        assert [w.project for w in await workloads.list_workloads(session, project="globex")] == [
            "globex"
        ]


async def test_concurrent_ensures_of_one_slug_make_one_workload(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    results = await asyncio.gather(*(ensure(sessions, spec()) for _ in range(5)))
    assert sorted(r.action.value for r in results).count("created") == 1
    async with sessions() as session:
        rows = (await session.scalars(select(Workload))).all()
    assert len(rows) == 1


async def test_delete_is_soft_and_the_slug_can_be_reused(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await ensure(sessions, spec())
    async with sessions() as session, session.begin():
        deleted = await workloads.delete_workload(
            session, project="acme", slug="support-bot", now=NOW
        )
    assert deleted is not None and deleted.deleted_at == NOW
    again = await ensure(sessions, spec())
    assert (again.action, again.workload.generation) == (EnsureAction.CREATED, 1)
    async with sessions() as session:
        rows = (await session.scalars(select(Workload).order_by(Workload.id))).all()
    assert [r.deleted_at is not None for r in rows] == [True, False]


async def test_timestamps_come_back_as_aware_utc(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    madrid = timezone(timedelta(hours=2))
    async with sessions() as session, session.begin():
        await workloads.ensure_workload(
            session,
            project="acme",
            spec=spec(),
            on_drift=OnDrift.RECONCILE,
            now=datetime(2026, 6, 1, 14, 0, tzinfo=madrid),
        )
    async with sessions() as session:
        row = await workloads.get_workload(session, project="acme", slug="support-bot")
    assert row is not None
    assert row.created_at == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert row.created_at.utcoffset() == timedelta(0)


async def test_naive_datetimes_are_refused(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session, session.begin():
        with pytest.raises(Exception, match="naive datetime"):
            await workloads.ensure_workload(
                session,
                project="acme",
                spec=spec(),
                on_drift=OnDrift.RECONCILE,
                now=datetime(2026, 6, 1, 14, 0),
            )


async def test_tokens_are_stored_as_hashes_and_verify(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await ensure(sessions, spec())
    async with sessions() as session, session.begin():
        issued = await tokens.issue_token(
            session, kind=TokenKind.LIVE, project="acme", workload_slug="support-bot", now=NOW
        )
    assert issued.secret.startswith("ik_live_")
    assert issued.token.secret_hash != issued.secret
    assert issued.secret not in issued.token.prefix + issued.token.secret_hash
    async with sessions() as session, session.begin():
        found = await tokens.verify_secret(session, issued.secret)
        assert found is not None and found.workload_slug == "support-bot"
        assert await tokens.verify_secret(session, issued.secret + "x") is None
        await tokens.revoke_token(session, token_id=issued.token.id, project="acme", now=NOW)
    async with sessions() as session:
        assert await tokens.verify_secret(session, issued.secret) is None


async def test_token_scoping_rules_are_enforced_at_creation(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        with pytest.raises(ValueError, match="belong to a workload"):
            await tokens.issue_token(session, kind=TokenKind.LIVE, project="acme", now=NOW)
        with pytest.raises(ValueError, match="belongs to a project"):
            await tokens.issue_token(session, kind=TokenKind.SDK, now=NOW)


async def test_phase_is_derived_from_stored_facts(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    created = await ensure(sessions, spec())
    row = Instance(
        launch_id="l-1",
        workload_id=created.workload.id,
        project="acme",
        workload_slug="support-bot",
        spec_generation=1,
        provider="local",
        offer_key="local/host/engine-sim",
        region="local",
        zone="host",
        instance_type="engine-sim",
        gpu="NVIDIA L4",
        gpu_count=1,
        hourly_usd=0.0,
        intent_at=NOW,
    )
    seen = [phase_of(row)]
    for fact in ("launched_at", "ready_at", "drain_requested_at", "terminate_requested_at"):
        setattr(row, fact, NOW)
        seen.append(phase_of(row))
    row.terminated_confirmed_at = NOW
    seen.append(phase_of(row))
    assert seen == [p for p in Phase if p not in (Phase.PARKING, Phase.PARKED)]
    parked = Instance(launched_at=NOW, ready_at=NOW, drain_requested_at=NOW)
    parks = []
    for fact in ("park_requested_at", "parked_at", "terminate_requested_at"):
        setattr(parked, fact, NOW)
        parks.append(phase_of(parked))
    assert parks == [Phase.PARKING, Phase.PARKED, Phase.TERMINATING]
    resumed = Instance(launched_at=NOW, resumed_at=NOW, park_mode="stopped")
    assert phase_of(resumed) is Phase.BOOTING  # ready again only once its engine answers
    async with sessions() as session, session.begin():
        session.add(row)
    async with sessions() as session:
        stored = await session.get(Instance, "l-1")
        assert stored is not None and phase_of(stored) is Phase.TERMINATED


async def test_migrations_are_idempotent(engine: AsyncEngine) -> None:
    await migrate(engine)
    await migrate(engine)
    async with engine.connect() as conn:
        from sqlalchemy import text

        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    assert version is not None


async def test_the_warm_pool_migration_goes_down_and_up_keeping_the_route_log(
    engine: AsyncEngine,
) -> None:
    """0012 names the park columns in the route change log's trigger: going down to 0011
    puts 0007's trigger back (PostgreSQL refuses to drop a column a trigger names; SQLite
    rebuilds the table without its triggers), and up again adds the park columns."""

    def columns(conn: Connection) -> set[str]:
        return {c["name"] for c in inspect(conn).get_columns("instances")}

    async with engine.begin() as conn:
        await conn.run_sync(to("0011"))
        assert "park_requested_at" not in await conn.run_sync(columns)
        await conn.run_sync(to("head"))
        assert "park_requested_at" in await conn.run_sync(columns)
    sessions = session_factory(engine)
    created = await ensure(sessions, spec())
    logged = select(func.count()).select_from(RouteChange)
    async with sessions() as session:
        before = await session.scalar(logged)
    async with sessions() as session, session.begin():
        session.add(
            Instance(
                launch_id="l-warm",
                workload_id=created.workload.id,
                project="acme",
                workload_slug="support-bot",
                spec_generation=1,
                provider="aws",
                offer_key="aws/us-east-1a/g5.xlarge",
                region="us-east-1",
                zone="us-east-1a",
                instance_type="g5.xlarge",
                gpu="NVIDIA A10G",
                gpu_count=1,
                hourly_usd=1.0,
                intent_at=NOW,
            )
        )
    async with sessions() as session, session.begin():
        row = await session.get(Instance, "l-warm")
        assert row is not None
        row.park_requested_at = NOW  # asked to park: off the routes
    async with sessions() as session:
        after = await session.scalar(logged)
    assert before is not None and after == before + 2  # the insert, the park request


async def test_a_batchs_lines_are_indexed_by_batch_and_status(engine: AsyncEngine) -> None:
    """Finalizing a batch looks for an open line after each line: the migrated store
    indexes jobs on (batch_id, status), as the models declare."""
    await migrate(engine)
    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda c: inspect(c).get_indexes("jobs"))
    on = {index["name"]: index["column_names"] for index in indexes}
    assert on["ix_jobs_batch_id_status"] == ["batch_id", "status"]
    assert "ix_jobs_batch_id" not in on
    declared = {i.name for i in Job.metadata.tables["jobs"].indexes}
    assert {name for name in on if name and name.startswith("ix_jobs_batch")} == {
        name for name in declared if name and name.startswith("ix_jobs_batch")
    }


async def test_the_reclaim_time_migration_moves_it_out_of_the_text_and_back(
    engine: AsyncEngine,
) -> None:
    """0016 gives the reclaim time its own column: a spot notice recorded before it keeps
    its text, less ``; reclaim at …`` (a failed termination's note after it kept), and
    the time, as an aware UTC datetime, is in ``reclaim_at``; a notice without a time, or
    with one that does not parse, is left as it was. Down again, the text is back."""
    from sqlalchemy import text

    reclaim = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)
    recorded = {
        "l-timed": f"spot notice: ec2 warning; reclaim at {reclaim.isoformat()}",
        "l-retried": (
            "spot notice: ec2 warning; reclaim at "
            f"{reclaim.astimezone(timezone(timedelta(hours=2))).isoformat()}"
            "; terminating: throttled"
        ),
        "l-untimed": "spot notice: gce preempted",
        "l-garbled": "spot notice: x; reclaim at soon",
        "l-other": "boot failed: driver too old",
    }
    created = await ensure(session_factory(engine), spec())
    async with engine.begin() as conn:
        await conn.run_sync(to("0015"))
        for launch_id, error in recorded.items():
            await conn.execute(
                text(
                    "INSERT INTO instances (launch_id, workload_id, project, workload_slug, "
                    "spec_generation, provider, offer_key, region, zone, instance_type, gpu, "
                    "gpu_count, spot, hourly_usd, intent_at, last_error) VALUES (:launch_id, "
                    ":workload_id, 'acme', 'support-bot', 1, 'aws', 'aws/us-east-1a/g5.xlarge', "
                    "'us-east-1', 'us-east-1a', 'g5.xlarge', 'NVIDIA A10G', 1, true, 1.0, "
                    ":intent_at, :last_error)"
                ),
                {
                    "launch_id": launch_id,
                    "workload_id": created.workload.id,
                    "intent_at": NOW.replace(tzinfo=None) if conn.dialect.name == "sqlite" else NOW,
                    "last_error": error,
                },
            )
        await conn.run_sync(to("head"))
    sessions = session_factory(engine)
    async with sessions() as session:
        rows = {r.launch_id: r for r in await session.scalars(select(Instance))}
    assert rows["l-timed"].last_error == "spot notice: ec2 warning"
    assert rows["l-retried"].last_error == "spot notice: ec2 warning; terminating: throttled"
    assert rows["l-timed"].reclaim_at == reclaim and rows["l-retried"].reclaim_at == reclaim
    assert rows["l-timed"].reclaim_at.tzinfo is UTC
    for launch_id in ("l-untimed", "l-garbled", "l-other"):
        assert rows[launch_id].last_error == recorded[launch_id]
        assert rows[launch_id].reclaim_at is None

    async with engine.begin() as conn:
        await conn.run_sync(to("0015"))
        found = await conn.execute(text("SELECT launch_id, last_error FROM instances"))
        back: dict[str, str | None] = {str(launch_id): error for launch_id, error in found}
        assert "reclaim_at" not in await conn.run_sync(
            lambda sync: {col["name"] for col in inspect(sync).get_columns("instances")}
        )
        await conn.run_sync(to("head"))
    assert back["l-timed"] == recorded["l-timed"]
    assert back["l-retried"] == (
        f"spot notice: ec2 warning; reclaim at {reclaim.isoformat()}; terminating: throttled"
    )
    assert {k: back[k] for k in ("l-untimed", "l-garbled", "l-other")} == {
        k: recorded[k] for k in ("l-untimed", "l-garbled", "l-other")
    }
