"""Replicas that fail: refused connections, death mid-stream, draining, callers hanging up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import (
    ENGINE_KEY,
    HI,
    MODEL,
    Seed,
    StartEngine,
    StartGateway,
    base_url,
    eventually,
    sdk,
)


async def engine_metric(url: str, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


async def engine_metric_is(url: str, name: str, value: float) -> bool:
    return await engine_metric(url, name) == value


async def served(url: str) -> float:
    return await engine_metric(url, "vllm:e2e_request_latency_seconds_count")


@pytest.fixture
def closed_port() -> Iterator[Callable[[], int]]:
    """Ports held bound and not listening for the test: connecting is refused, and no
    other process (the tests run in several) can start listening there meanwhile."""
    with contextlib.ExitStack() as held:

        def port() -> int:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            bound: int = sock.getsockname()[1]
            return bound

        yield port


@contextlib.asynccontextmanager
async def engine_process(
    *, time_scale: float
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """An engine-sim in its own process, so that it can be killed like a lost machine."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "providers.engine_sim",
        "--port",
        "0",
        "--model",
        MODEL,
        "--api-key",
        ENGINE_KEY,
        "--time-scale",
        str(time_scale),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        url = next(word for word in line.split() if word.startswith("http://"))
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_refused_connections_are_retried_on_other_replicas(
    seed: Seed,
    start_engine: StartEngine,
    start_gateway: StartGateway,
    closed_port: Callable[[], int],
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    for _ in range(2):
        await seed.replica("support-bot", f"http://127.0.0.1:{closed_port()}")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        for _ in range(8):
            answer = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
            assert answer.choices[0].message.content
    assert await served(engine.url) == 8


async def test_only_refusing_replicas_is_a_clean_502(
    seed: Seed, start_gateway: StartGateway, closed_port: Callable[[], int]
) -> None:
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", f"http://127.0.0.1:{closed_port()}")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        with pytest.raises(openai.APIStatusError, match="accepted the connection") as caught:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert caught.value.status_code == 502


async def test_replica_killed_mid_stream_gives_the_client_an_error(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    async with engine_process(time_scale=20.0) as (proc, url):
        await seed.replica("support-bot", url)
        gateway = await start_gateway()
        async with sdk(gateway, "support-bot", key) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=4000, stream=True
            )
            received = 0

            async def consume() -> None:
                nonlocal received
                assert isinstance(stream, openai.AsyncStream)
                async with asyncio.timeout(30):  # a hang fails here, not at the test timeout
                    async for _chunk in stream:
                        received += 1
                        if received == 3:
                            proc.kill()

            with pytest.raises((openai.APIError, httpx.HTTPError)):
                await consume()
    assert received >= 3


async def test_draining_replicas_get_no_new_requests(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    draining, serving = await start_engine(), await start_engine()
    drained_id = await seed.replica("support-bot", draining.url)
    await seed.replica("support-bot", serving.url)
    await seed.mark(drained_id, drain_requested_at=datetime.now(UTC))
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        for _ in range(6):
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert await served(draining.url) == 0
    assert await served(serving.url) == 6


async def test_caller_hanging_up_cancels_the_upstream_request(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine(time_scale=5.0)
    await seed.replica("support-bot", engine.url)
    gateway = await start_gateway()
    body = {"model": MODEL, "messages": HI, "max_tokens": 4000, "stream": True}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
        url = f"{base_url(gateway, 'support-bot')}/chat/completions"
        async with http.stream("POST", url, json=body) as response:
            async for _line in response.aiter_lines():
                break
            assert await engine_metric(engine.url, "vllm:num_requests_running") == 1
    # The engine would run 4000 tokens long past eventually's deadline.
    await eventually(
        lambda: engine_metric_is(engine.url, "vllm:num_requests_running", 0.0), within=20
    )
    await eventually(lambda: gateway.signals()[("acme", "support-bot")].in_flight == 0)
