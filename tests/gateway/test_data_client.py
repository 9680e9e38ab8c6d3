"""The SDK's data-plane client against the gateway and an engine-sim replica."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.data_client import DataClient, EmbeddingResult, GatewayError, Job, TextResult
from tests.gateway.conftest import MODEL, Seed, StartEngine, StartGateway


async def test_text_chat_stream_embed_and_jobs(
    seed: Seed,
    start_engine: StartEngine,
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = await seed.workload("support-bot")
    embed_key = await seed.workload("embedder", task_type="embedding")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    await seed.replica("embedder", engine.url)
    gateway = await start_gateway()
    monkeypatch.setenv("AUTOSCALER_GATEWAY_URL", f"http://127.0.0.1:{gateway.port}")
    monkeypatch.setenv("AUTOSCALER_PROJECT", "acme")

    def use_sdk() -> tuple[TextResult, TextResult, list[str], EmbeddingResult, Job, int]:
        with DataClient.from_env() as client:
            bot = client.endpoint("support-bot", api_key=key)
            hi = [{"role": "user", "content": "hi"}]
            text = bot.generate_text(prompt="Once upon", temperature=0.2, max_tokens=4)
            chat = bot.chat(messages=hi, max_tokens=3)
            pieces = list(bot.stream_chat(messages=hi, max_tokens=5))
            embedded = client.endpoint("embedder", api_key=embed_key).embed(input=["a", "b", "c"])
            job = bot.submit_job(body={"messages": hi, "max_tokens": 2})
            done = bot.job_result(job.id, timeout=30, poll_sec=0.05)
            with pytest.raises(GatewayError, match="another workload") as caught:
                client.endpoint("embedder", api_key=key).embed(input=["a"])
        return text, chat, pieces, embedded, done, caught.value.status

    text, chat, pieces, embedded, done, status = await asyncio.to_thread(use_sdk)
    assert len(text.text.split()) == 4
    assert text.model == MODEL
    assert len(chat.text.split()) == 3
    assert len(pieces) == 5
    assert len(embedded.embeddings) == 3
    assert embedded.model == MODEL
    assert done.status == "succeeded"
    assert done.result is not None
    assert len(done.result["body"]["choices"][0]["message"]["content"].split()) == 2
    assert status == 401
