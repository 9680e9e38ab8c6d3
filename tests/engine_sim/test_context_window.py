"""engine-sim refuses and cuts by its context window as vLLM does, so a request the real
engine would refuse is not served in a test or a local run either."""

from __future__ import annotations

import httpx

from providers.engine_sim.server import EngineSimServer
from tests.engine_sim.conftest import StartEngine


async def _post(server: EngineSimServer, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url) as client:
        return await client.post("/v1/completions", json=body)


async def test_a_prompt_past_the_window_is_vllms_400_and_the_output_is_cut_to_fit(
    start_engine: StartEngine,
) -> None:
    server = await start_engine(max_model_len=64)
    over = await _post(server, {"prompt": "word " * 80, "max_tokens": 4})
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["param"] == "input_tokens"
    assert "maximum context length is 64 tokens" in error["message"]

    too_many = await _post(server, {"prompt": "hi", "max_tokens": 65})
    assert too_many.status_code == 400
    assert (
        "max_tokens=65 cannot be greater than max_model_len=64"
        in (too_many.json()["error"]["message"])
    )

    full = await _post(server, {"prompt": "hi", "usage": {"prompt_tokens": 64}})
    assert (full.status_code, full.json()["error"]["param"]) == (400, "max_tokens")

    cut = await _post(server, {"prompt": "word " * 30, "max_tokens": 64})
    assert cut.status_code == 200
    usage = cut.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 64


async def test_without_a_window_a_long_prompt_is_served(start_engine: StartEngine) -> None:
    """With no ``--max-model-len`` (the command gave none) engine-sim keeps no window:
    vLLM's own default is the model's context, which engine-sim does not know."""
    server = await start_engine()
    long = await _post(server, {"prompt": "hi", "usage": {"prompt_tokens": 200_000}})
    assert long.status_code == 200
    assert long.json()["usage"]["prompt_tokens"] == 200_000


async def test_a_stated_output_is_kept_without_a_window_and_cut_by_one(
    start_engine: StartEngine,
) -> None:
    """``usage.completion_tokens`` sets the output whatever ``max_tokens`` says, as it
    always did; a window cuts it to what the prompt leaves."""
    free = await start_engine()
    stated: dict[str, object] = {
        "prompt": "hi",
        "usage": {"prompt_tokens": 10, "completion_tokens": 40},
    }
    assert (await _post(free, stated)).json()["usage"]["completion_tokens"] == 40
    windowed = await start_engine(max_model_len=48)
    assert (await _post(windowed, stated)).json()["usage"]["completion_tokens"] == 38
