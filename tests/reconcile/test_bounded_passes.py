"""A pass's work is bounded: replicas capped, launches spread over passes, a workload cut
at its share, a pass cut at its budget, failures quarantined, deletes always carried out."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from sqlalchemy import select, update

from autoscaler.api.app import create_app
from autoscaler.api.deps import ApiState
from autoscaler.decide.signals import Signals
from autoscaler.reconcile.loop import reconcile_once
from autoscaler.store import tokens
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase
from autoscaler.store.tokens import TokenKind
from providers.base import Instance, LaunchRequest
from providers.fake import FakeProvider
from tests.reconcile.world import PROJECT, World, autoscaling, fixed, offer

HUGE = 2_147_483_648


async def _store_replicas(world: World, workload_id: int, replicas: int) -> None:
    """Write a replica count straight into the store, past the API's checks."""
    async with world.sessions() as s, s.begin():
        row = await s.get(Workload, workload_id)
        assert row is not None
        spec = {**row.spec, "execution_policy_config": {"replicas": replicas}}
        await s.execute(update(Workload).where(Workload.id == workload_id).values(spec=spec))


def _overruns(world: World, kind: str) -> float:
    value: float = world.deps.metrics.pass_overruns.labels(kind)._value.get()
    return value


async def test_a_huge_stored_replica_count_is_planned_to_the_cap_a_few_per_pass(
    world: World,
) -> None:
    world.deps = world.make_deps(
        fleet_ceiling=1000.0, max_replicas_per_workload=5, max_launches_per_pass=2
    )
    bot = await world.apply(fixed("bot", 1))
    await _store_replicas(world, bot, HUGE)
    due = await world.step()
    assert len(await world.rows("bot")) == 2
    assert due == 0  # more launches are wanted: the next pass is due at once
    await world.step()
    await world.step()
    await world.step(5)
    assert len(await world.rows("bot")) == 5
    assert len(world.live_instances()) == 5
    [scale] = await world.decisions("scale")
    assert "capped at 5 replicas (max_replicas_per_workload)" in scale.reason


async def test_the_api_answers_within_a_second_while_a_huge_spec_is_reconciled(
    world: World,
) -> None:
    world.deps = world.make_deps(fleet_ceiling=1000.0)
    free = offer("free.xlarge", "NVIDIA L4", 0.0)  # no ceiling ever stops the launches
    world.deps.offers = lambda: (free,)
    bot = await world.apply(fixed("bot", 1))
    await _store_replicas(world, bot, HUGE)
    async with world.sessions() as s, s.begin():
        issued = await tokens.issue_token(s, kind=TokenKind.ADMIN, name="t", now=world.now)
    app = create_app(ApiState(sessions=world.sessions, now=lambda: world.now))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        passes = asyncio.ensure_future(reconcile_once(world.deps))
        answer = await asyncio.wait_for(
            client.get(
                f"/v1/projects/{PROJECT}/workloads/bot",
                headers={"Authorization": f"Bearer {issued.secret}"},
            ),
            timeout=1.0,
        )
        assert answer.status_code == 200
        assert answer.json()["spec"]["execution_policy_config"]["replicas"] == HUGE
        await passes
    assert len(await world.rows("bot")) == world.deps.settings.max_launches_per_pass


class HangingProvider(FakeProvider):
    """Launches for workload ``slow`` never answer (a provider call that hangs)."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")
        self.hung = asyncio.Event()

    async def launch(self, request: LaunchRequest) -> Instance:
        if request.tags.get("autoscaler:workload") == "slow":
            self.hung.set()
            await asyncio.Event().wait()
        return await super().launch(request)


async def test_a_workload_past_its_share_is_cut_and_the_others_go_on(world: World) -> None:
    provider = HangingProvider(world)
    world.deps = world.make_deps(provider=provider, workload_share_sec=2.0)
    await world.apply(fixed("slow", 1))
    await world.apply(fixed("fine", 1))
    due = await world.step()
    assert provider.hung.is_set()
    assert await world.phases("fine") == [Phase.BOOTING]
    assert _overruns(world, "workload") == 1
    assert due == 0
    [intent] = await world.rows("slow")  # the intent is on record: resolved by launch id
    assert intent.instance_id is None and intent.terminated_confirmed_at is None


async def test_a_pass_cancelled_while_its_steps_hang_ends_after_them(world: World) -> None:
    """A stop cancels a pass stuck in a provider call (``controller``'s grace): the pass
    ends only once its steps have unwound (their sessions closed), none left running
    beside the controller's shutdown."""
    provider = HangingProvider(world)
    world.deps = world.make_deps(provider=provider)
    await world.apply(fixed("slow", 1))
    await world.apply(fixed("fine", 1))  # waits for a slot the hung step holds (SQLite)
    stuck = asyncio.ensure_future(world.step())
    await provider.hung.wait()
    stuck.cancel()
    await asyncio.gather(stuck, return_exceptions=True)
    assert stuck.cancelled()
    steps = [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").endswith("stepped")
    ]
    assert [t for t in steps if not t.done()] == []


async def test_a_pass_past_its_budget_continues_where_it_stopped(world: World) -> None:
    world.deps = world.make_deps(pass_budget_sec=0.0)
    for slug in ("a", "b", "c"):
        await world.apply(fixed(slug, 1))
    assert await world.step() == 0
    assert [len(await world.rows(slug)) for slug in "abc"] == [1, 0, 0]
    await world.step()
    assert [len(await world.rows(slug)) for slug in "abc"] == [1, 1, 0]
    await world.step()
    assert [len(await world.rows(slug)) for slug in "abc"] == [1, 1, 1]
    assert _overruns(world, "pass") == 3  # each pass stopped before the next one in turn


async def _break_spec(world: World, workload_id: int) -> None:
    """A stored spec the controller cannot read: autoscaling with no policy config."""
    async with world.sessions() as s, s.begin():
        row = await s.get(Workload, workload_id)
        assert row is not None
        spec = {**row.spec, "execution_policy": "autoscaling"}
        spec.pop("execution_policy_config")
        await s.execute(update(Workload).where(Workload.id == workload_id).values(spec=spec))


class ExplodingProvider(FakeProvider):
    """Launches for workload ``broken`` raise an error the controller does not expect."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")
        self.broken = True

    async def launch(self, request: LaunchRequest) -> Instance:
        if self.broken and request.tags.get("autoscaler:workload") == "broken":
            raise RuntimeError("boom: an SDK answer the adapter does not know")
        return await super().launch(request)


async def test_a_failing_workload_is_quarantined_with_one_traceback_and_one_decision(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    provider = ExplodingProvider(world)
    world.deps = world.make_deps(provider=provider)
    await world.apply(fixed("broken", 1))
    await world.apply(fixed("fine", 1))
    caplog.set_level(logging.INFO, logger="autoscaler.controller")
    await world.step()
    await world.step(5)  # retried after tick_sec
    await world.step(5)  # backing off: 10 s after the second failure
    await world.step(5)
    errors = world.deps.metrics.reconcile_errors.labels(PROJECT, "broken")._value.get()
    assert errors == 3
    assert world.deps.metrics.quarantined.labels(PROJECT, "broken")._value.get() == 1
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    [decision] = await world.decisions("error")
    assert "RuntimeError: boom" in decision.reason and "retried with backoff" in decision.reason
    assert await world.phases("fine") == [Phase.READY]
    provider.broken = False
    await world.step(60)  # the intent is launched again under its launch id
    assert await world.phases("broken") == [Phase.READY]
    assert len(await world.rows("broken")) == 1
    assert world.deps.metrics.quarantined.labels(PROJECT, "broken")._value.get() == 0


async def test_deleting_a_workload_the_controller_cannot_reconcile_terminates_it(
    world: World,
) -> None:
    bot = await world.apply(fixed("bot", 2))
    await world.step()
    await world.step(5)
    assert await world.phases("bot") == [Phase.READY, Phase.READY]
    await _break_spec(world, bot)
    await world.delete("bot")
    await world.step(5)
    assert await world.phases("bot") == [Phase.DRAINING, Phase.DRAINING]
    await world.step(5)
    await world.step(5)
    assert await world.phases("bot") == [Phase.TERMINATED, Phase.TERMINATED]
    assert not world.live_instances()
    async with world.sessions() as s:
        assert (await s.scalar(select(Workload.deleted_at).where(Workload.id == bot))) is not None


async def test_a_slug_applied_again_inherits_the_spend_of_its_deleted_predecessor(
    world: World,
) -> None:
    spec = autoscaling("bot", min_workers=2, max_workers=4, max_hourly_cost_usd=4.0)
    await world.apply(spec)
    await world.step()
    await world.step(5)
    assert await world.phases("bot") == [Phase.READY, Phase.READY]
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=3)  # the drain waits
    await world.delete("bot")
    await world.apply(spec)
    for _ in range(3):
        await world.step(5)
        live = [r for r in await world.rows("bot") if r.terminated_confirmed_at is None]
        assert sum(r.hourly_usd for r in live) <= 4.0
    assert len(world.live_instances()) == 2  # the old pair, draining; nothing new bought
    [refused, *_] = await world.decisions("refused")
    assert "workload ceiling" in refused.reason
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)
    for _ in range(4):
        await world.step(5)
    rows = await world.rows("bot")
    assert sum(1 for r in rows if r.terminated_confirmed_at is None) == 2
    assert len(world.live_instances()) == 2  # the new pair replaced the old


async def test_each_decision_acted_on_is_one_log_line(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autoscaler.controller")
    await world.apply(fixed("bot", 2))
    await world.step()
    launches = [r.getMessage() for r in caplog.records if ": launch: " in r.getMessage()]
    assert len(launches) == 2
    assert all(m.startswith("workload ") and "scale up" in m for m in launches)
