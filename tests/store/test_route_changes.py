"""The route change log: the database's triggers log exactly what the gateway routes on,
on SQLite and PostgreSQL alike (``gateway.route_feed`` reloads only what they name)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store import tokens, workloads
from autoscaler.store.models import Decision, Instance, RouteChange, Workload
from autoscaler.store.tokens import TokenKind

Sessions = async_sessionmaker[AsyncSession]
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


async def _logged_since(sessions: Sessions, after: int) -> list[int | None]:
    async with sessions() as s:
        rows = await s.execute(
            select(RouteChange.id, RouteChange.workload_id)
            .where(RouteChange.id > after)
            .order_by(RouteChange.id)
        )
        return [w for _, w in rows]


async def _top(sessions: Sessions) -> int:
    async with sessions() as s:
        top = await s.scalar(select(RouteChange.id).order_by(RouteChange.id.desc()).limit(1))
        return int(top or 0)


async def _write(sessions: Sessions, statement: object) -> list[int | None]:
    before = await _top(sessions)
    async with sessions() as s, s.begin():
        if isinstance(statement, (Instance, Decision)):
            s.add(statement)
        else:
            await s.execute(statement)  # type: ignore[call-overload]
    return await _logged_since(sessions, before)


async def test_writes_that_change_a_route_are_logged_and_others_are_not(
    sessions: Sessions,
) -> None:
    spec = WorkloadSpec.model_validate({"name": "chat", "slug": "chat", "model": "org/model"})
    before = await _top(sessions)
    async with sessions() as s, s.begin():
        created = await workloads.ensure_workload(
            s, project="p", spec=spec, on_drift=OnDrift.RECONCILE, now=NOW
        )
    wid = created.workload.id
    assert await _logged_since(sessions, before) == [wid]

    replica = Instance(
        launch_id="lch_1",
        workload_id=wid,
        project="p",
        workload_slug="chat",
        spec_generation=1,
        provider="local",
        offer_key="local/sim",
        region="local",
        zone="local",
        instance_type="sim",
        gpu="A100",
        gpu_count=1,
        hourly_usd=1.0,
        intent_at=NOW,
    )
    assert await _write(sessions, replica) == [wid]
    row = Instance.launch_id == "lch_1"
    for routed in (
        {"url": "http://10.0.0.1:8000"},
        {"ready_at": NOW},
        {"engine_command": ["vllm", "serve", "m", "--enable-lora", "--lora-modules", "a=b"]},
        {"drain_requested_at": NOW},
        {"park_requested_at": NOW},  # asked to sleep or stop: off the routes at once
        {"parked_at": NOW},
        {"resumed_at": NOW},
    ):
        assert await _write(sessions, update(Instance).where(row).values(**routed)) == [wid]
    for unrouted in (
        {"last_error": "slow"},
        {"launched_at": NOW},
        {"joined_at": NOW},
        {"hourly_usd": 0.02},
    ):
        assert await _write(sessions, update(Instance).where(row).values(**unrouted)) == []

    this = Workload.id == wid
    assert await _write(sessions, update(Workload).where(this).values(last_request_at=NOW)) == []
    assert await _write(sessions, update(Workload).where(this).values(deleted_at=NOW)) == [wid]
    decision = Decision(
        workload_id=wid, at=NOW, kind="refused", inputs={}, result={}, reason="no offer fits"
    )
    assert await _write(sessions, decision) == [wid]

    before = await _top(sessions)
    async with sessions() as s, s.begin():
        issued = await tokens.issue_token(
            s, kind=TokenKind.LIVE, project="p", workload_slug="chat", now=NOW
        )
    assert await _logged_since(sessions, before) == [None]  # keys: no workload
    before = await _top(sessions)
    async with sessions() as s, s.begin():
        await tokens.revoke_token(s, token_id=issued.token.id, project="p", now=NOW)
    assert await _logged_since(sessions, before) == [None]
