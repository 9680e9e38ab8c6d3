"""vLLM's sleep mode on engine-sim, driven by the service's client (providers.engine_sleep).

Durations are measured on the engine's own clock (model seconds), never the wall clock.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from catalog.wake import sleep_seconds, wake_seconds, weights_bytes
from providers.engine_sim.server import EngineSimServer
from providers.engine_sleep import (
    EngineCannotSleep,
    EngineSleepFailed,
    is_sleeping,
    sleep_engine,
    sleeping_level,
    wake_engine,
)
from tests.engine_sim.conftest import MODEL, StartEngine, metric_samples

GPU = "NVIDIA A100-SXM4-80GB"
SIZE = weights_bytes(8.0, 2.0)  # the engine-sim default: 8B parameters in bf16
# Loopback calls on a client made beforehand, in model seconds at time scale 10 (0.2 s wall).
SLACK_S = 2.0


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as opened:
        yield opened


async def sleepy(start_engine: StartEngine) -> EngineSimServer:
    return await start_engine(enable_sleep_mode=True, time_scale=10.0, gpu=GPU)


async def gauge(url: str, name: str) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    return metric_samples(text, name)


async def labelled(url: str, sample: str) -> dict[str, float]:
    """The samples called ``sample`` by their last label's value."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    found = {
        list(s.labels.values())[-1]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    }
    assert found, f"no {sample}"
    return found


async def sleep_state(url: str) -> dict[str, float]:
    return await labelled(url, "vllm:engine_sleep_state")


async def until_waiting(url: str, count: int) -> None:
    for _ in range(2000):
        if (await gauge(url, "vllm:num_requests_waiting"))["vllm:num_requests_waiting"] == count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never {count} requests waiting")


async def complete(url: str, max_tokens: int) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30.0) as client:
        return await client.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens},
        )


async def stream_completion(
    url: str, max_tokens: int, chunks: list[dict[str, object]], first: asyncio.Event
) -> None:
    """Stream a completion, collecting its chunks; ``first`` is set at the first one."""
    async with (
        httpx.AsyncClient(timeout=30.0) as client,
        client.stream(
            "POST",
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "Tell", "max_tokens": max_tokens, "stream": True},
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
                first.set()


async def test_a_sleeping_engine_queues_requests_and_serves_them_after_the_wake(
    start_engine: StartEngine, stack: AsyncExitStack
) -> None:
    server = await sleepy(start_engine)
    shared = await stack.enter_async_context(httpx.AsyncClient())
    before = server.engine_seconds()
    await sleep_engine(server.url, 1, client=shared)
    slept = server.engine_seconds() - before

    assert await is_sleeping(server.url)
    modelled_sleep = sleep_seconds(weights_bytes=SIZE, gpu=GPU, level=1)
    assert modelled_sleep <= slept <= modelled_sleep + SLACK_S
    assert await sleep_state(server.url) == {
        "awake": 0.0,
        "weights_offloaded": 1.0,
        "discard_all": 0.0,
    }
    async with httpx.AsyncClient() as client:
        # vLLM's /health asks only whether the engine lives: a sleeping one is healthy.
        assert (await client.get(f"{server.url}/health")).status_code == 200
        assert (await client.get(f"{server.url}/v1/models")).status_code == 200

    # vLLM queues what arrives while it sleeps (its scheduler is paused), refusing nothing.
    held = asyncio.create_task(complete(server.url, 4))
    await until_waiting(server.url, 1)
    assert not held.done()

    started = server.engine_seconds()
    await wake_engine(server.url, level=1, client=shared)
    woke = server.engine_seconds() - started

    modelled = wake_seconds(weights_bytes=SIZE, gpu=GPU, level=1)
    assert modelled <= woke <= modelled + SLACK_S
    answer = await held
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert not await is_sleeping(server.url)
    assert await sleep_state(server.url) == {
        "awake": 1.0,
        "weights_offloaded": 0.0,
        "discard_all": 0.0,
    }
    # Its time to first token counts the wake it waited through.
    ttft = await gauge(server.url, "vllm:time_to_first_token_seconds")
    assert ttft["vllm:time_to_first_token_seconds_sum"] >= modelled
    # vLLM's histogram of sleep-mode operations, in model seconds.
    durations = await labelled(server.url, "vllm:sleep_mode_operation_duration_seconds_sum")
    assert durations["sleep"] >= modelled_sleep
    assert durations["wake"] >= modelled


async def test_a_level_2_wake_reloads_the_weights_before_serving(
    start_engine: StartEngine, stack: AsyncExitStack
) -> None:
    server = await sleepy(start_engine)
    await sleep_engine(server.url, 2)
    assert (await sleep_state(server.url))["discard_all"] == 1.0

    async with httpx.AsyncClient() as client:
        # Waking the weights alone leaves the engine asleep: they hold nothing yet.
        partial = await client.post(f"{server.url}/wake_up", params={"tags": "weights"})
    assert partial.json() == {"status": "sleeping", "tags": ["weights"]}
    assert await is_sleeping(server.url)

    shared = await stack.enter_async_context(httpx.AsyncClient())
    started = server.engine_seconds()
    # The level comes from the engine's sleep-state gauge.
    await wake_engine(server.url, client=shared)
    woke = server.engine_seconds() - started

    # The rest of the level-2 wake: reload from disk, then the KV cache.
    rest = wake_seconds(weights_bytes=SIZE, gpu=GPU, level=2) - 0.1
    assert rest <= woke <= rest + SLACK_S
    assert not await is_sleeping(server.url)
    assert (await complete(server.url, 3)).status_code == 200


async def test_sleeping_aborts_requests_in_flight_with_what_they_produced(
    start_engine: StartEngine,
) -> None:
    server = await sleepy(start_engine)
    chunks: list[dict[str, object]] = []
    first = asyncio.Event()
    streaming = asyncio.create_task(stream_completion(server.url, 5000, chunks, first))
    await first.wait()
    await sleep_engine(server.url, 1)
    await streaming

    reasons = [c["choices"][0]["finish_reason"] for c in chunks]  # type: ignore[index]
    assert reasons[-1] == "abort"
    assert 1 <= len(chunks) - 1 < 5000
    await wake_engine(server.url, level=1)
    assert (await complete(server.url, 2)).status_code == 200


async def test_bad_sleep_requests_are_refused_as_vllm_refuses_them(
    start_engine: StartEngine,
) -> None:
    server = await sleepy(start_engine)
    async with httpx.AsyncClient() as client:
        level = await client.post(f"{server.url}/sleep", params={"level": "3"})
        keep = await client.post(f"{server.url}/sleep", params={"mode": "keep"})
        rpc = await client.post(f"{server.url}/collective_rpc", json={"method": "shutdown"})

    assert level.status_code == 422
    assert level.json()["detail"][0]["loc"] == ["query", "level"]
    assert keep.status_code == 400
    assert "mode=keep" in keep.json()["error"]["message"]
    assert rpc.status_code == 400
    assert not await is_sleeping(server.url)


async def test_an_engine_not_booted_for_sleep_says_so(start_engine: StartEngine) -> None:
    server = await start_engine()

    with pytest.raises(EngineCannotSleep, match="--enable-sleep-mode"):
        await sleep_engine(server.url, 1)


@pytest.mark.parametrize("backend", ["ollama", "sglang", "vllm-omni"])
async def test_backends_the_client_cannot_put_to_sleep_raise_a_typed_error(
    backend: str,
) -> None:
    with pytest.raises(EngineCannotSleep, match=backend):
        await sleep_engine("http://127.0.0.1:9", 1, backend=backend)


async def test_an_unreachable_engine_is_a_failure_naming_the_call() -> None:
    with pytest.raises(EngineSleepFailed, match="GET /is_sleeping"):
        await is_sleeping("http://127.0.0.1:9", timeout_s=2.0)


def test_the_sleep_level_is_read_from_vllms_gauge() -> None:
    def text(awake: int, offloaded: int, discarded: int) -> str:
        lines = [
            f'vllm:engine_sleep_state{{engine="0",model_name="m",sleep_state="{name}"}} {value}'
            for name, value in (
                ("awake", awake),
                ("weights_offloaded", offloaded),
                ("discard_all", discarded),
            )
        ]
        return "# TYPE vllm:engine_sleep_state gauge\n" + "\n".join(lines) + "\n"

    assert sleeping_level(text(1, 0, 0)) is None
    assert sleeping_level(text(0, 1, 0)) == 1
    assert sleeping_level(text(0, 0, 1)) == 2
    assert sleeping_level(text(0, 0, 0)) == 0
    with pytest.raises(ValueError, match="no vllm:engine_sleep_state"):
        sleeping_level("vllm:num_requests_running 0\n")


async def test_sleeping_in_wait_mode_lets_requests_in_flight_finish(
    start_engine: StartEngine,
) -> None:
    server = await sleepy(start_engine)
    chunks: list[dict[str, object]] = []
    first = asyncio.Event()
    running = asyncio.create_task(stream_completion(server.url, 1000, chunks, first))
    await first.wait()
    async with httpx.AsyncClient(timeout=30.0) as client:
        slept = await client.post(f"{server.url}/sleep", params={"level": "1", "mode": "wait"})

    assert slept.json() == {"status": "sleeping", "level": 1}
    await running
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]  # type: ignore[index]
    assert reasons[-1] == "length"  # finished whole, not aborted
    assert len(chunks) == 1000 + 1  # every token, then the finish
    assert await is_sleeping(server.url)


async def test_an_engine_sim_process_sleeps_and_wakes() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "providers.engine_sim", "--port", "0", "--model", MODEL,
        "--time-scale", "50", "--enable-sleep-mode",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
        found = re.search(r"http://[\d.]+:\d+", line)
        assert found, f"no address announced: {line!r}"
        url = found.group(0)
        await sleep_engine(url, 2)
        assert await is_sleeping(url)
        await wake_engine(url)
        assert not await is_sleeping(url)
        assert (await complete(url, 2)).status_code == 200
    finally:
        process.kill()
        await process.wait()


async def test_a_sleep_whose_caller_goes_away_still_completes_and_can_be_woken(
    start_engine: StartEngine,
) -> None:
    server = await sleepy(start_engine)
    chunks: list[dict[str, object]] = []
    first = asyncio.Event()
    running = asyncio.create_task(stream_completion(server.url, 1000, chunks, first))
    await first.wait()

    async def ask_sleep() -> None:
        async with httpx.AsyncClient(timeout=30.0) as client:
            await client.post(f"{server.url}/sleep", params={"level": "1", "mode": "wait"})

    asking = asyncio.create_task(ask_sleep())
    sleeping = 'vllm:sleep_mode_operations_in_flight{operation="sleep"} 1.0'
    for _ in range(2000):  # the sleep has paused the scheduler and waits for the stream
        async with httpx.AsyncClient() as client:
            if sleeping in (await client.get(f"{server.url}/metrics")).text:
                break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the sleep never started")
    asking.cancel()  # the caller gives up: its connection closes mid-sleep
    with pytest.raises(asyncio.CancelledError):
        await asking

    await wake_engine(server.url, level=1)
    assert not await is_sleeping(server.url)
    await running
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"  # type: ignore[index]
    assert (await complete(server.url, 2)).status_code == 200
