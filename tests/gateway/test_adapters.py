"""LoRA adapters at the gateway: ``/v1/models`` lists the base model and its adapters in
OpenAI's list shape, and a request naming an adapter goes only to replicas booted with it
(during a rollout that adds one, it waits for the first such replica)."""

from __future__ import annotations

import asyncio

import httpx
import openai

from tests.gateway.conftest import (
    HI,
    MODEL,
    Seed,
    StartEngine,
    StartGateway,
    base_url,
    eventually,
    sdk,
)

SQL = {"name": "sql", "source": "acme/llama-sql-lora"}
WITH_SQL = ["vllm", "serve", MODEL, "--enable-lora", "--max-loras", "1", "--lora-modules",
            "sql=acme/llama-sql-lora"]  # fmt: skip
WITHOUT = ["vllm", "serve", MODEL]


async def _ask(client: openai.AsyncOpenAI, model: str) -> str:
    answer = await client.chat.completions.create(model=model, messages=HI, max_tokens=2)
    return answer.model


async def test_models_lists_the_base_model_and_its_adapters(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("chat", llm_loras=[SQL])
    gateway = await start_gateway()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as client:
        listed = (await client.get(f"{base_url(gateway, 'chat')}/models")).json()
        one = (await client.get(f"{base_url(gateway, 'chat')}/models/sql")).json()
    base = {"id": MODEL, "object": "model", "created": 0, "owned_by": "acme", "root": MODEL,
            "parent": None}  # fmt: skip
    adapter = {"id": "sql", "object": "model", "created": 0, "owned_by": "acme",
               "root": "acme/llama-sql-lora", "parent": MODEL}  # fmt: skip
    assert listed == {"object": "list", "data": [base, adapter]}
    assert one == adapter
    async with sdk(gateway, "chat", key) as client:
        assert [m.id async for m in client.models.list()] == [MODEL, "sql"]


async def test_an_adapter_goes_only_to_the_replicas_booted_with_it(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("chat", llm_loras=[SQL])
    # A rollout: one replica of the spec before the adapter, one booted with it.
    old = await start_engine()
    new = await start_engine(enable_lora=True, lora_modules=(("sql", "acme/llama-sql-lora"),))
    await seed.replica("chat", old.url, engine_command=WITHOUT)
    await seed.replica("chat", new.url, engine_command=WITH_SQL)
    gateway = await start_gateway()
    async with sdk(gateway, "chat", key) as client:
        # The old replica would answer 404 for "sql": every one of these must reach the new.
        answers = await asyncio.gather(*(_ask(client, "sql") for _ in range(12)))
        base = await asyncio.gather(*(_ask(client, MODEL) for _ in range(12)))
    assert answers == ["sql"] * 12
    assert base == [MODEL] * 12


async def test_an_adapter_request_waits_for_the_first_replica_that_has_it(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("chat", llm_loras=[SQL])
    old = await start_engine()
    await seed.replica("chat", old.url, engine_command=WITHOUT)
    gateway = await start_gateway()
    ref = ("acme", "chat")
    async with sdk(gateway, "chat", key) as client:
        assert await _ask(client, MODEL) == MODEL  # the base model is served meanwhile
        waiting = asyncio.create_task(_ask(client, "sql"))
        await eventually(lambda: gateway.signals()[ref].queued == 1)
        new = await start_engine(enable_lora=True, lora_modules=(("sql", "acme/llama-sql-lora"),))
        await seed.replica("chat", new.url, engine_command=WITH_SQL)
        gateway.notify_change()
        assert await waiting == "sql"


async def test_an_unknown_model_reaches_the_engine_and_gets_its_404(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("chat", llm_loras=[SQL])
    engine = await start_engine(enable_lora=True, lora_modules=(("sql", "acme/llama-sql-lora"),))
    await seed.replica("chat", engine.url, engine_command=WITH_SQL)
    gateway = await start_gateway()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as client:
        response = await client.post(
            f"{base_url(gateway, 'chat')}/chat/completions", json={"model": "nope", "messages": HI}
        )
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `nope` does not exist."
