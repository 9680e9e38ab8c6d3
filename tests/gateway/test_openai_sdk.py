"""The real OpenAI SDK through the gateway to engine-sim replicas: every route and error."""

from __future__ import annotations

import base64
import io
import wave

import httpx
import openai
import pytest

from tests.gateway.conftest import MODEL, Seed, StartEngine, StartGateway, base_url, sdk

OMNI = {"backend": "vllm-omni"}


async def test_chat_whole_and_streamed(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        whole = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about GPUs."}],
            max_tokens=9,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        text = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
    assert len((whole.choices[0].message.content or "").split()) == 5
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) == 9
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(text.choices[0].text.split()) == 4
    measured = gateway.signals()[("acme", "support-bot")]
    assert len(measured.ttft_samples) == 1  # only the streamed answer has a first token here
    assert len(measured.unstreamed_samples) == 2


async def test_embeddings_images_speech_and_transcription(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    keys = {}
    for slug, spec in {
        "embedder": {"task_type": "embedding"},
        "painter": {"task_type": "text2image", **OMNI},
        "speaker": {"task_type": "text2audio", **OMNI},
        "listener": {"task_type": "audio2text", **OMNI},
    }.items():
        keys[slug] = await seed.workload(slug, **spec)
        await seed.replica(slug, engine.url)
    gateway = await start_gateway()
    async with sdk(gateway, "embedder", keys["embedder"]) as client:
        embedded = await client.embeddings.create(model=MODEL, input=["a", "b"])
    async with sdk(gateway, "painter", keys["painter"]) as client:
        image = await client.images.generate(
            model=MODEL, prompt="a GPU", size="64x64", response_format="b64_json"
        )
    async with sdk(gateway, "speaker", keys["speaker"]) as client:
        speech = await client.audio.speech.create(
            model=MODEL, voice="alloy", input="Hello there.", response_format="wav"
        )
    async with sdk(gateway, "listener", keys["listener"]) as client:
        heard = await client.audio.transcriptions.create(
            model=MODEL, file=("clip.wav", speech.content, "audio/wav")
        )
    assert len(embedded.data) == 2
    assert embedded.data[0].embedding != embedded.data[1].embedding
    assert image.data is not None
    assert base64.b64decode(image.data[0].b64_json or "").startswith(b"\x89PNG")
    with wave.open(io.BytesIO(speech.content)) as clip:
        assert clip.getnframes() > 1000
    assert heard.text


async def test_models_answered_without_a_replica(seed: Seed, start_gateway: StartGateway) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        models = [m.id async for m in client.models.list()]
    assert models == [MODEL]


async def test_wrong_keys_and_unknown_workloads(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    other_key = await seed.workload("other-bot")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    gateway = await start_gateway()

    async def chat(slug: str, api_key: str) -> None:
        async with sdk(gateway, slug, api_key) as client:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )

    with pytest.raises(openai.AuthenticationError, match="invalid data key"):
        await chat("support-bot", "ik_live_not-a-key")
    with pytest.raises(openai.AuthenticationError, match="another workload"):
        await chat("support-bot", other_key)
    with pytest.raises(openai.NotFoundError, match="no workload 'nope'"):
        await chat("nope", key)
    # A keyless or bad-key caller cannot tell existing workloads from missing ones.
    with pytest.raises(openai.AuthenticationError):
        await chat("nope", "ik_live_not-a-key")
    async with httpx.AsyncClient() as http:
        missing = await http.post(f"{base_url(gateway, 'support-bot')}/chat/completions", json={})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    # The engine key stays with the gateway: a caller holding it directly gets nothing here.
    with pytest.raises(openai.AuthenticationError):
        await chat("support-bot", "engine-secret-key")


async def test_oversize_body_is_refused(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    gateway = await start_gateway(max_body_bytes=10_000)
    async with sdk(gateway, "support-bot", key) as client:
        with pytest.raises(openai.APIStatusError, match="exceeds the gateway's limit") as caught:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x" * 20_000}], max_tokens=2
            )
    assert caught.value.status_code == 413


async def test_job_only_workloads_refuse_direct_routes(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("ranker", task_type="reranker")
    gateway = await start_gateway()
    async with sdk(gateway, "ranker", key) as client:
        with pytest.raises(openai.BadRequestError, match="only as async jobs"):
            await client.embeddings.create(model=MODEL, input=["a"])
