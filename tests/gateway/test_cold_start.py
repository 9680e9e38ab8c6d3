"""Scale from zero: demand is recorded, requests are held in order, then served or 503."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import openai
import pytest

from autoscaler.reconcile.ledger import record_decision
from autoscaler.store.workloads import get_workload
from gateway.app import Gateway
from tests.gateway.conftest import (
    HI,
    MODEL,
    Seed,
    Sessions,
    StartEngine,
    StartGateway,
    eventually,
    sdk,
)


async def has_last_request(sessions: Sessions) -> bool:
    async with sessions() as s:
        workload = await get_workload(s, project="acme", slug="support-bot")
        assert workload is not None
        return workload.last_request_at is not None


def waiting(gateway: Gateway, field: str) -> int:
    snapshot = gateway.signals().get(REF)
    return 0 if snapshot is None else int(getattr(snapshot, field))


REF = ("acme", "support-bot")


async def test_held_request_is_served_once_a_replica_is_ready(
    seed: Seed, sessions: Sessions, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine()
    launch_id = await seed.replica("support-bot", engine.url, ready=False)
    demand: list[tuple[str, str]] = []
    gateway = await start_gateway(on_demand=demand.append)
    async with sdk(gateway, "support-bot", key) as client:
        held = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
        )
        await eventually(lambda: waiting(gateway, "cold_start_waiting") == 1)
        assert not held.done()
        assert demand == [REF]
        # What a controller in another process sees:
        await eventually(lambda: has_last_request(sessions))
        await seed.mark(launch_id, ready_at=datetime.now(UTC))
        gateway.notify_change()
        answer = await held
    assert len((answer.choices[0].message.content or "").split()) == 3
    assert gateway.signals()[REF].cold_start_waiting == 0


async def test_held_requests_are_served_in_arrival_order(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine()
    gateway = await start_gateway(replica_concurrency_cap=1)
    finished: list[int] = []

    async def ask(client: openai.AsyncOpenAI, n: int) -> None:
        await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        finished.append(n)

    async with sdk(gateway, "support-bot", key) as client:
        tasks = []
        for n in range(4):
            tasks.append(asyncio.create_task(ask(client, n)))
            await eventually(lambda n=n: waiting(gateway, "queued") == n + 1)  # type: ignore[misc]
        await seed.replica("support-bot", engine.url)
        gateway.notify_change()
        await asyncio.gather(*tasks)
    assert finished == [0, 1, 2, 3]


async def test_cold_start_deadline_answers_503_with_retry_after(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway(
        cold_start_timeouts={"acme/support-bot": 0.3}, cold_start_retry_after_sec=30
    )
    async with sdk(gateway, "support-bot", key) as client:
        with pytest.raises(openai.InternalServerError, match="scaling up from zero") as caught:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "30"


async def _refuse(sessions: Sessions, reason: str) -> None:
    """What the controller writes when it cannot start a replica of the workload."""
    async with sessions() as s, s.begin():
        workload = await get_workload(s, project="acme", slug="support-bot")
        assert workload is not None
        record_decision(
            s,
            workload_id=workload.id,
            at=datetime.now(UTC),
            kind="refused",
            reason=reason,
            inputs={},
            result={"launched": 0},
            acted=False,
        )


NO_OFFER = "launch not possible: no offer fits: 12 catalog rejected cuda"


async def test_a_workload_that_cannot_be_placed_answers_503_with_the_reason_at_once(
    seed: Seed, sessions: Sessions, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    await _refuse(sessions, NO_OFFER)
    demand: list[tuple[str, str]] = []
    gateway = await start_gateway(on_demand=demand.append, cold_start_retry_after_sec=30)
    async with sdk(gateway, "support-bot", key) as client:
        with pytest.raises(openai.InternalServerError, match="no offer fits") as caught:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "30"
    assert demand == [REF]  # the demand still reaches the controller, which tries again


async def test_a_held_request_gets_the_reason_as_soon_as_the_refusal_is_known(
    seed: Seed, sessions: Sessions, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        held = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        )
        await eventually(lambda: waiting(gateway, "cold_start_waiting") == 1)
        await _refuse(sessions, NO_OFFER)
        gateway.notify_change()
        with pytest.raises(openai.InternalServerError, match="none can be started now"):
            await held


async def test_a_launch_after_the_refusal_holds_requests_again(
    seed: Seed, sessions: Sessions, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    await _refuse(sessions, NO_OFFER)
    engine = await start_engine()
    launch_id = await seed.replica("support-bot", engine.url, ready=False)  # bought since
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        held = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        )
        await eventually(lambda: waiting(gateway, "cold_start_waiting") == 1)
        await seed.mark(launch_id, ready_at=datetime.now(UTC))
        gateway.notify_change()
        assert (await held).choices
