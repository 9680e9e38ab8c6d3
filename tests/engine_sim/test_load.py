"""Under load beyond the batch, the TTFT engine-sim reports rises as a real engine's would."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.engine_sim.conftest import MODEL, StartEngine, metric_samples

TTFT = "vllm:time_to_first_token_seconds"


async def _mean_ttft(client: httpx.AsyncClient) -> tuple[float, float]:
    samples = metric_samples((await client.get("/metrics")).text, TTFT)
    return samples[f"{TTFT}_sum"], samples[f"{TTFT}_count"]


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x" * 400}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        return sum([1 async for line in response.aiter_lines() if line.startswith("data: {")])


async def test_ttft_rises_when_requests_queue_beyond_the_batch(start_engine: StartEngine) -> None:
    # A slow enough clock that eight requests sent together overlap inside the engine.
    server = await start_engine(max_batch=2, time_scale=10.0)
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
        await _stream(client, 200)
        single_sum, single_count = await _mean_ttft(client)
        chunks = await asyncio.gather(*(_stream(client, 200) for _ in range(8)))
        loaded_sum, loaded_count = await _mean_ttft(client)
    assert chunks == [202] * 8  # role chunk, 200 tokens, the finish chunk
    assert (single_count, loaded_count) == (1, 9)
    single = single_sum / single_count
    loaded = (loaded_sum - single_sum) / (loaded_count - single_count)
    # Six of the eight waited for whole 200-token decodes of the two ahead of them.
    assert loaded > 10 * single


async def test_a_client_that_hangs_up_frees_its_batch_slot(start_engine: StartEngine) -> None:
    server = await start_engine(max_batch=1)
    long = {"model": MODEL, "prompt": "x", "max_tokens": 30_000}
    async with httpx.AsyncClient(base_url=server.url) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=long, timeout=0.3)
        async with client.stream("POST", "/v1/completions", json=long | {"stream": True}) as r:
            async for line in r.aiter_lines():
                assert line.startswith("data: {")
                break  # leave after the first token: the connection is closed mid-stream
        for _ in range(200):
            text = (await client.get("/metrics")).text
            running = metric_samples(text, "vllm:num_requests_running")
            if running["vllm:num_requests_running"] == 0:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("abandoned requests still hold the batch")
        quick = await client.post("/v1/completions", json={"model": MODEL, "prompt": "y"})
    assert quick.status_code == 200
    assert metric_samples(text, "vllm:num_requests_waiting") == {"vllm:num_requests_waiting": 0.0}
