"""engine-sim through the real OpenAI SDK and plain HTTP: every endpoint and its errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import struct
import wave

import httpx
import openai
import pytest

from tests.engine_sim.conftest import MODEL, FailureRecorder, StartEngine, metric_samples


def sdk(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def test_streamed_chat_follows_openai_chunks(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about GPUs."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) == 12
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == math.ceil(len("Tell me about GPUs.") / 4)


async def test_whole_chat_and_text_completions(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=7
        )
        text = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
        default = await client.completions.create(model=MODEL, prompt="Once upon")
    assert chat.choices[0].message.role == "assistant"
    assert len((chat.choices[0].message.content or "").split()) == 7
    assert chat.usage is not None
    assert chat.usage.total_tokens == 8
    assert len(text.choices[0].text.split()) == 5
    assert default.usage is not None
    assert default.usage.completion_tokens == 16
    assert default.choices[0].finish_reason == "stop"


async def test_streamed_text_completion_ends_with_done(start_engine: StartEngine) -> None:
    server = await start_engine()
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True}
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(event["object"] == "text_completion" for event in events)
    assert "".join(event["choices"][0]["text"] for event in events).count(" ") == 4
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_token_hints_set_the_request_size(start_engine: StartEngine) -> None:
    server = await start_engine()
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 100,
        "usage": {"prompt_tokens": 900, "completion_tokens": 3},
    }
    async with httpx.AsyncClient(base_url=server.url) as client:
        reply = (await client.post("/v1/completions", json=body)).json()
    assert reply["usage"] == {
        "prompt_tokens": 900,
        "completion_tokens": 3,
        "total_tokens": 903,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_embeddings_are_deterministic_unit_vectors(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        first = await client.embeddings.create(model=MODEL, input=["cat", "dog"], dimensions=64)
        again = await client.embeddings.create(model=MODEL, input="cat", dimensions=64)
    cat, dog = (item.embedding for item in first.data)
    assert len(cat) == 64
    assert again.data[0].embedding == pytest.approx(cat, abs=1e-6)
    assert cat != dog
    assert math.fsum(v * v for v in cat) == pytest.approx(1.0, abs=1e-5)
    assert first.usage.prompt_tokens == 2
    async with httpx.AsyncClient(base_url=server.url) as client:
        plain = await client.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": "cat", "dimensions": 64, "encoding_format": "float"},
        )
    assert plain.json()["data"][0]["embedding"] == pytest.approx(cat, abs=1e-6)


async def test_images_are_valid_pngs_of_the_requested_size(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        result = await client.images.generate(
            model=MODEL, prompt="a red GPU", n=2, size="256x128", response_format="b64_json"
        )
    assert result.data is not None
    assert len(result.data) == 2
    image = base64.b64decode(result.data[0].b64_json or "")
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", image[16:24]) == (256, 128)


async def test_speech_is_a_wav_file(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        audio = await client.audio.speech.create(
            model=MODEL, voice="alloy", input="Hello from the simulator.", response_format="wav"
        )
    with wave.open(io.BytesIO(audio.content)) as clip:
        assert clip.getnchannels() == 1
        assert clip.getframerate() == 16_000
        assert clip.getnframes() > 1000


async def test_transcription_of_an_uploaded_file(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        speech = await client.audio.speech.create(
            model=MODEL, voice="alloy", input="A sentence to hear back.", response_format="wav"
        )
        first = await client.audio.transcriptions.create(
            model=MODEL, file=("clip.wav", speech.content, "audio/wav")
        )
        second = await client.audio.transcriptions.create(
            model=MODEL, file=("clip.wav", speech.content, "audio/wav")
        )
    assert first.text
    assert first.text.endswith(".")
    assert first.text == second.text


async def test_models_lists_the_served_model(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with sdk(server.url) as client:
        models = [model.id async for model in client.models.list()]
    assert models == [MODEL]


async def test_api_key_is_required_on_openai_routes_only(start_engine: StartEngine) -> None:
    server = await start_engine(api_key="sekrit")
    async with sdk(server.url, key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    assert caught.value.status_code == 401
    async with sdk(server.url, key="sekrit") as client:
        assert [model.id async for model in client.models.list()] == [MODEL]
    async with httpx.AsyncClient(base_url=server.url) as client:
        denied = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": "9"}, 400, "dimensions"),
        ("/v1/images/generations", {"model": MODEL, "prompt": "x", "size": "big"}, 400, "size"),
        ("/v1/audio/speech", {"input": "x", "voice": "a", "response_format": "mp3"}, 400,
         "response_format"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors_naming_the_field(
    start_engine: StartEngine, path: str, body: dict[str, object], status: int, param: str
) -> None:
    server = await start_engine()
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post(path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]


async def test_unknown_routes_and_bad_json_are_openai_errors(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with httpx.AsyncClient(base_url=server.url) as client:
        missing = await client.get("/v1/nothing")
        garbled = await client.post("/v1/chat/completions", content=b"{not json")
    assert missing.status_code == 404
    assert "no route GET /v1/nothing" in missing.json()["error"]["message"]
    assert garbled.status_code == 400
    assert "not valid JSON" in garbled.json()["error"]["message"]


async def test_health_is_503_until_the_startup_delay_passes(start_engine: StartEngine) -> None:
    # Long enough that a loaded machine still asks before the delay passes (it is wall-clock).
    server = await start_engine(startup_delay_s=2.0)
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/health")).status_code == 503
        early = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert early.status_code == 503
        assert "still loading" in early.json()["error"]["message"]
        for _ in range(2000):
            if (await client.get("/health")).status_code == 200:
                break
            await client.get("/metrics")  # metrics answer while loading
            await _pause()
        else:
            pytest.fail("engine never became healthy")


async def test_fail_after_fires_once_the_last_allowed_response_is_sent(
    start_engine: StartEngine, failures: FailureRecorder
) -> None:
    server = await start_engine(fail_after=2)
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        await client.get("/metrics")  # not an inference request: not counted
        await _pause()
        assert failures.calls == 0
        ok = await client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert ok.status_code == 200
        for _ in range(100):
            if failures.calls:
                break
            await _pause()
    assert failures.calls == 1


async def test_metrics_use_vllm_names_and_count_first_tokens(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with httpx.AsyncClient(base_url=server.url) as client:
        before = metric_samples(
            (await client.get("/metrics")).text, "vllm:time_to_first_token_seconds"
        )
        await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "abcd" * 50, "max_tokens": 3}
        )
        text = (await client.get("/metrics")).text
    after = metric_samples(text, "vllm:time_to_first_token_seconds")
    assert (
        after["vllm:time_to_first_token_seconds_count"]
        == before.get("vllm:time_to_first_token_seconds_count", 0) + 1
    )
    assert metric_samples(text, "vllm:prompt_tokens")["vllm:prompt_tokens_total"] == 50
    assert metric_samples(text, "vllm:generation_tokens")["vllm:generation_tokens_total"] == 3
    assert (
        metric_samples(text, "vllm:e2e_request_latency_seconds")[
            "vllm:e2e_request_latency_seconds_count"
        ]
        == 1
    )
    assert 'model_name="sim/llama-8b"' in text
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert metric_samples(text, gauge) == {gauge: 0.0}


async def _pause() -> None:
    await asyncio.sleep(0.01)


async def test_a_repeated_prompt_is_served_from_the_prefix_cache(start_engine: StartEngine) -> None:
    server = await start_engine()
    # 10,240 characters of report (5 full blocks of 2,048) and a question after them.
    prompt = "Summarise the following report. " * 320 + "What changed since May?"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with httpx.AsyncClient(base_url=server.url) as client:
        first = (await client.post("/v1/completions", json=body)).json()["usage"]
        again = (await client.post("/v1/completions", json=body)).json()["usage"]
        metrics = (await client.get("/metrics")).text
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["prompt_tokens_details"] == {"cached_tokens": 5 * 512}
    assert again["prompt_tokens"] == first["prompt_tokens"]
    queries = metric_samples(metrics, "vllm:prefix_cache_queries")
    hits = metric_samples(metrics, "vllm:prefix_cache_hits")
    assert queries["vllm:prefix_cache_queries_total"] == 2 * first["prompt_tokens"]
    assert hits["vllm:prefix_cache_hits_total"] == 5 * 512
    # The prompt counter counts whole prompts, cached tokens included, as vLLM's does.
    prompt_tokens = metric_samples(metrics, "vllm:prompt_tokens")
    assert prompt_tokens["vllm:prompt_tokens_total"] == 2 * first["prompt_tokens"]
