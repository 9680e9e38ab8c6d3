"""A data key or workload made since the gateway's last refresh works at once: the
gateway finds it in the store on the first request instead of answering 401 until its
next reload. An unknown key still gets 401, and costs no reload."""

from __future__ import annotations

import httpx

from tests.gateway.conftest import MODEL, Seed, StartEngine, StartGateway, base_url

HOUR = 3600.0  # a refresh interval no test waits out


async def _chat(gateway_url: str, key: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{gateway_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )


async def test_a_key_made_after_the_last_refresh_is_served_at_once(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    first = await seed.workload("support-bot")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    gateway = await start_gateway(refresh_interval_sec=HOUR)
    url = base_url(gateway, "support-bot")
    assert (await _chat(url, first)).status_code == 200

    second = await seed.key("support-bot")  # in the store; the gateway was not told
    response = await _chat(url, second)
    assert response.status_code == 200, response.text


async def test_a_workload_and_key_made_after_the_last_refresh_are_served_at_once(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    gateway = await start_gateway(refresh_interval_sec=HOUR)
    key = await seed.workload("late-bot")
    await seed.replica("late-bot", engine.url)
    response = await _chat(base_url(gateway, "late-bot"), key)
    assert response.status_code == 200, response.text


async def test_an_unknown_key_is_401_without_a_reload(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    await seed.workload("support-bot")
    gateway = await start_gateway(refresh_interval_sec=HOUR)
    before = gateway._refreshes
    response = await _chat(base_url(gateway, "support-bot"), "ik_live_" + "x" * 40)
    assert response.status_code == 401
    assert gateway._refreshes == before
