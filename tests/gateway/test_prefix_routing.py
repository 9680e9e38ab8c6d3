"""Prefix-aware routing end to end: requests sharing a long prefix go to the replica
whose engine holds it, and the engines and the gateway report the hits."""

from __future__ import annotations

import httpx

from tests.engine_sim.conftest import metric_samples
from tests.gateway.conftest import MODEL, Seed, StartEngine, StartGateway, sdk

SYSTEM = "You answer questions about the attached contract. " * 400  # ~20k chars, 9 blocks


async def _hits(url: str) -> tuple[float, float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    queries = metric_samples(text, "vllm:prefix_cache_queries")["vllm:prefix_cache_queries_total"]
    hits = metric_samples(text, "vllm:prefix_cache_hits")["vllm:prefix_cache_hits_total"]
    return queries, hits


async def test_shared_prefix_requests_land_on_the_warm_replica(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("contracts")
    engines = [await start_engine(), await start_engine()]
    for engine in engines:
        await seed.replica("contracts", engine.url)
    gateway = await start_gateway()
    async with sdk(gateway, "contracts", key) as client:
        for n in range(8):
            answer = await client.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"What does clause {n} say?"},
                ],
                max_tokens=2,
            )
            assert answer.usage is not None
    counts = [await _hits(engine.url) for engine in engines]
    warm, cold = sorted(counts, key=lambda c: c[1], reverse=True)
    assert cold == (0.0, 0.0)  # nothing went to the other replica
    # The first request warmed the replica; the other seven found the system prompt's
    # nine full blocks (4,608 tokens) in its cache.
    assert warm[1] == 7 * 9 * 512
    assert warm[0] > warm[1]
    # The answers' usage carried the hits to the gateway, which measures the share.
    tokens = gateway.signals()[("acme", "contracts")].tokens
    assert tokens is not None and 0.7 < tokens.cached_share < 1.0
