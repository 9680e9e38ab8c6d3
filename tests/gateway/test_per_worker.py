"""``per_worker`` caps what one replica is sent at once, counted at the engine itself;
async endpoints take jobs only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from autoscaler.decide.inputs import concurrency_cap_of, concurrency_target, measured_of
from autoscaler.spec import WorkloadSpec
from providers.engine_sim.app import create_app
from providers.engine_sim.config import EngineSimConfig
from tests.gateway.conftest import (
    ENGINE_KEY,
    HI,
    MODEL,
    Seed,
    StartGateway,
    base_url,
    eventually,
    sdk,
)


@dataclass
class CountedEngine:
    """An engine-sim whose inference requests are counted as they enter the engine and
    held there until ``release`` is set, so concurrency can be read without timing."""

    url: str = ""
    active: int = 0
    peak: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


StartCounted = Callable[[], Awaitable[CountedEngine]]


@pytest.fixture
async def start_counted() -> AsyncIterator[StartCounted]:
    runners: list[web.AppRunner] = []

    async def start() -> CountedEngine:
        engine = CountedEngine()

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith("/v1/chat/"):
                return await handler(request)
            engine.active += 1
            engine.peak = max(engine.peak, engine.active)
            try:
                await engine.release.wait()
                return await handler(request)
            finally:
                engine.active -= 1

        config = EngineSimConfig(port=0, model=MODEL, time_scale=100.0, api_key=ENGINE_KEY)
        app = create_app(config)
        app.middlewares.insert(0, count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        engine.url = f"http://{host}:{port}"
        runners.append(runner)
        return engine

    yield start
    for runner in runners:
        await runner.cleanup()


async def _chat(client: openai.AsyncOpenAI) -> str:
    answer = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    return answer.choices[0].message.content or ""


async def test_per_worker_caps_each_replica_and_queues_the_rest(
    seed: Seed, start_counted: StartCounted, start_gateway: StartGateway
) -> None:
    capped_key = await seed.workload("capped", endpoint_type="streaming", per_worker=2)
    open_key = await seed.workload("uncapped")
    capped, uncapped = await start_counted(), await start_counted()
    await seed.replica("capped", capped.url)
    await seed.replica("uncapped", uncapped.url)
    gateway = await start_gateway()
    ref = ("acme", "capped")
    async with sdk(gateway, "capped", capped_key) as a, sdk(gateway, "uncapped", open_key) as b:
        calls = [asyncio.create_task(_chat(a)) for _ in range(6)]
        others = [asyncio.create_task(_chat(b)) for _ in range(6)]
        # The capped replica holds two; the gateway queues the other four.
        await eventually(lambda: capped.active == 2 and gateway.signals()[ref].queued == 4)
        await eventually(lambda: uncapped.active == 6)  # the gateway's cap is 64
        assert gateway.signals()[ref].concurrency_cap == 2
        assert gateway.signals()[("acme", "uncapped")].concurrency_cap == 64
        capped.release.set()
        uncapped.release.set()
        answers = await asyncio.gather(*calls, *others)
    assert all(answers)
    assert capped.peak == 2
    assert uncapped.peak == 6


async def test_an_async_endpoint_refuses_live_routes_and_runs_jobs(
    seed: Seed, start_counted: StartCounted, start_gateway: StartGateway
) -> None:
    key = await seed.workload("batchy", endpoint_type="async", per_worker=1)
    engine = await start_counted()
    engine.release.set()
    await seed.replica("batchy", engine.url)
    gateway = await start_gateway()
    async with sdk(gateway, "batchy", key) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await _chat(client)
    assert refused.value.status_code == 400
    assert "is an async endpoint (endpoint_type 'async')" in str(refused.value)
    assert "only as async jobs: POST /v1/jobs" in str(refused.value)
    assert engine.peak == 0  # nothing reached the replica

    job = {"body": {"model": MODEL, "messages": HI, "max_tokens": 2}}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        submitted = await http.post(f"{base_url(gateway, 'batchy')}/jobs", json=job)
        assert submitted.status_code == 202
        url = f"{base_url(gateway, 'batchy')}/jobs/{submitted.json()['id']}"

        async def succeeded() -> bool:
            status: str = (await http.get(url)).json()["status"]
            return status == "succeeded"

        await eventually(succeeded)
    assert engine.peak == 1


async def test_jobs_fill_every_replicas_per_worker_slots(
    seed: Seed, start_counted: StartCounted, start_gateway: StartGateway
) -> None:
    key = await seed.workload("batchy", endpoint_type="async", per_worker=3)
    engines = [await start_counted(), await start_counted()]
    for engine in engines:
        await seed.replica("batchy", engine.url)
    gateway = await start_gateway()
    job = {"body": {"model": MODEL, "messages": HI, "max_tokens": 2}}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        ids = [
            (await http.post(f"{base_url(gateway, 'batchy')}/jobs", json=job)).json()["id"]
            for _ in range(8)
        ]
        # Two replicas, three jobs each at once; the other two wait in the store.
        await eventually(lambda: [e.active for e in engines] == [3, 3])
        for engine in engines:
            engine.release.set()

        async def all_succeeded() -> bool:
            for job_id in ids:
                answer = await http.get(f"{base_url(gateway, 'batchy')}/jobs/{job_id}")
                if answer.json()["status"] != "succeeded":
                    return False
            return True

        await eventually(all_succeeded)
    assert [e.peak for e in engines] == [3, 3]


async def test_signals_carry_the_age_of_the_oldest_queued_job(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("batchy", endpoint_type="async")
    gateway = await start_gateway()
    ref = ("acme", "batchy")
    job = {"body": {"model": MODEL, "messages": HI, "max_tokens": 2}}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        before = gateway.signals().get(ref)
        assert before is None or before.async_oldest_at is None
        first = await http.post(f"{base_url(gateway, 'batchy')}/jobs", json=job)
        await http.post(f"{base_url(gateway, 'batchy')}/jobs", json=job)
    await eventually(lambda: gateway.signals()[ref].async_queue_depth == 2)
    oldest = gateway.signals()[ref].async_oldest_at
    created = first.json()["created_at"]
    assert oldest is not None
    assert abs(oldest - datetime.fromisoformat(created).timestamp()) < 1e-3


async def test_the_cap_reported_is_what_the_worker_processes_enforce_together(
    seed: Seed, start_counted: StartCounted, start_gateway: StartGateway
) -> None:
    """One of four worker processes on a port, ``per_worker: 10``: it sends the replica
    at most 10 // 4 = 2, so the four send at most 8, and 8 is the cap the controller
    reads (its capacity and concurrency target), not 10."""
    key = await seed.workload("capped", endpoint_type="streaming", per_worker=10)
    engine = await start_counted()
    await seed.replica("capped", engine.url)
    gateway = await start_gateway(workers=4)
    ref = ("acme", "capped")
    async with sdk(gateway, "capped", key) as client:
        calls = [asyncio.create_task(_chat(client)) for _ in range(4)]
        await eventually(lambda: engine.active == 2 and gateway.signals()[ref].queued == 2)
        snapshot = gateway.signals()[ref]
        engine.release.set()
        assert all(await asyncio.gather(*calls))
    assert engine.peak == 2
    assert snapshot.concurrency_cap == 8
    spec = WorkloadSpec.model_validate(
        {
            "name": "capped",
            "slug": "capped",
            "model": MODEL,
            "per_worker": 10,
            "endpoint_type": "streaming",
        }
    )
    measured = measured_of(snapshot)
    assert concurrency_cap_of(spec, measured) == 8
    assert concurrency_target(spec, measured) == 8
