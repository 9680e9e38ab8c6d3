"""A warm pool on this machine: a real engine-sim process, launched by the local
provider, put to sleep and woken through the reconciler over HTTP (the engine's own
``/sleep``, ``/wake_up`` and ``/is_sleeping``), then serving again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from autoscaler.reconcile.deps import (
    HttpEngineSleeper,
    HttpHealthChecker,
    ProviderEntry,
    ProviderRegistry,
    Settings,
    ledger_secrets,
)
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.phase import Phase, phase_of
from catalog.model import ProviderName
from providers.engine_sleep import is_sleeping
from providers.local import EngineSimLauncher, LocalProvider, offer_for_this_machine
from tests.reconcile.test_warm_pools import idle, pooled, waiting
from tests.reconcile.world import World

GPU = "NVIDIA L4"
OFFER = offer_for_this_machine(gpu=GPU, gpu_count=1)


@pytest.fixture
async def local_world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        world = World(session_factory(engine))
        local = LocalProvider(
            state_dir=tmp_path / "instances",
            launcher=EngineSimLauncher(time_scale=50.0),
            secrets=ledger_secrets(world.sessions),
            grace_seconds=5.0,
        )
        health = HttpHealthChecker()
        world.deps.providers = ProviderRegistry({ProviderName.LOCAL.value: ProviderEntry(local)})
        world.deps.health = health
        world.deps.sleeper = HttpEngineSleeper()
        world.deps.offers = lambda: (OFFER,)
        world.deps.settings = Settings(cluster_id="c-local", unhealthy_grace_sec=20)
        try:
            yield world
        finally:
            for instance in await local.list("c-local"):
                await local.terminate(instance.instance_id)
            await health.aclose()


async def _until(world: World, launch_id: str | None, phase: Phase) -> None:
    """Reconcile until the replica (the only one when ``launch_id`` is ``None``) reaches
    ``phase``; the engine is a real process: each pass gives it a moment of real time."""
    for _ in range(200):
        await world.step(1)
        rows = await world.rows("bot")
        if any(phase_of(r) is phase for r in rows if launch_id in (None, r.launch_id)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {phase.value}: {await world.phases('bot')}")


async def test_an_engine_sim_replica_sleeps_and_wakes_through_the_reconciler(
    local_world: World,
) -> None:
    world = local_world
    pool = {"gpu_pool": [GPU]}
    spec = pooled(warm_pool={"sleeping": 1}, workers={"source": "cloud", "cloud_pool": pool})
    await world.apply(spec)
    idle(world)
    await _until(world, None, Phase.PARKED)  # the pool refilled: launched, ready, drained, asleep
    [row] = await world.rows("bot")
    assert row.park_mode == "sleeping" and row.prefill and row.url is not None
    assert "--enable-sleep-mode" in (row.engine_command or [])
    assert await is_sleeping(row.url, api_key=row.engine_key)

    waiting(world)
    await _until(world, row.launch_id, Phase.READY)
    [woken] = [r for r in await world.rows("bot") if r.launch_id == row.launch_id]
    assert woken.resumed_at is not None and woken.url == row.url
    assert not await is_sleeping(row.url, api_key=row.engine_key)
    async with httpx.AsyncClient(timeout=10.0) as client:
        answer = await client.post(
            f"{row.url}/v1/chat/completions",
            json={"model": spec.model, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {row.engine_key}"},
        )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert len(await world.decisions("resume")) == 1
