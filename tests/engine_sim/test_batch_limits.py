"""engine-sim takes vLLM's step token budget: a prompt longer than the budget is
prefilled over several engine steps, so it answers later than with the default budget."""

from __future__ import annotations

import math

import httpx

from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.server import EngineSimServer
from tests.engine_sim.conftest import StartEngine, metric_samples

PROMPT_TOKENS = 4096
TTFT = "vllm:time_to_first_token_seconds"


async def _ttft_s(server: EngineSimServer) -> float:
    async with httpx.AsyncClient(base_url=server.url) as client:
        body = {"prompt": "hi", "max_tokens": 1, "usage": {"prompt_tokens": PROMPT_TOKENS}}
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        text = (await client.get("/metrics")).text
    return metric_samples(text, TTFT)[f"{TTFT}_sum"]


async def test_a_small_budget_prefills_a_long_prompt_over_several_steps(
    start_engine: StartEngine,
) -> None:
    small = EngineSimConfig(max_batched_tokens=64, max_batch=64).profile()
    default = EngineSimConfig().profile()
    assert default.max_batched_tokens >= 8 * small.max_batched_tokens
    # A chunk this small is read-bound: each step reads every weight once, however few
    # tokens it holds, so the prompt costs a step per chunk.
    steps = math.ceil(PROMPT_TOKENS / small.max_batched_tokens)
    floor_s = steps * small.decode_step_seconds(1)

    chunked = await _ttft_s(await start_engine(max_batched_tokens=64, max_batch=64))
    whole = await _ttft_s(await start_engine())

    assert floor_s > whole
    assert chunked >= floor_s * (1 - 1e-9)  # the steps' times, summed in floating point
