"""The controller's sleep calls are bounded to fit a reconcile pass, a wake's calls by the
longest modelled wake, and a call that times out is an error the pass records (the
replica is asked again next pass)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from autoscaler.reconcile.deps import (
    ENGINE_SLEEP_CALL_TIMEOUT_SEC,
    ENGINE_SLEEP_QUERY_TIMEOUT_SEC,
    ENGINE_WAKE_CALL_TIMEOUT_SEC,
    EngineWakes,
    HttpEngineSleeper,
    Settings,
)
from providers.engine_sleep import EngineSleepFailed

URL = "http://engine:8000"


def _engine(waits: dict[str, list[float]], *, hang: bool = False) -> httpx.AsyncClient:
    """An awake engine that answers every sleep route; ``hang``: POSTs time out."""

    def handle(request: httpx.Request) -> httpx.Response:
        waits.setdefault(request.url.path, []).append(request.extensions["timeout"]["read"])
        if request.method == "POST" and hang:
            raise httpx.ReadTimeout("no answer", request=request)
        if request.url.path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": False})
        if request.url.path == "/metrics":
            return httpx.Response(200, text='vllm:engine_sleep_state{sleep_state="awake"} 1\n')
        return httpx.Response(200)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def test_a_parks_calls_fit_in_a_workloads_share_of_a_pass() -> None:
    # ``reconcile.park``: is the engine asleep, put it to sleep, is it asleep now.
    park = 2 * ENGINE_SLEEP_QUERY_TIMEOUT_SEC + ENGINE_SLEEP_CALL_TIMEOUT_SEC
    assert park < Settings(cluster_id="c").workload_share_sec


async def test_sleep_and_wake_calls_wait_no_longer_than_their_bounds() -> None:
    waits: dict[str, list[float]] = {}
    async with _engine(waits) as client:
        sleeper = HttpEngineSleeper(client)
        await sleeper.sleep(url=URL, level=1, engine_key="k")
        await sleeper.wake(url=URL, engine_key="k")
        assert await sleeper.is_sleeping(url=URL, engine_key="k") is False

    assert waits["/sleep"] == [ENGINE_SLEEP_CALL_TIMEOUT_SEC]
    # A wake runs beside the passes (``EngineWakes``), each call bounded on its own.
    assert waits["/wake_up"] == [ENGINE_WAKE_CALL_TIMEOUT_SEC]
    assert waits["/is_sleeping"][-1] == ENGINE_SLEEP_QUERY_TIMEOUT_SEC  # the question alone


async def test_a_hung_engine_is_a_sleep_error_not_a_park() -> None:
    waits: dict[str, list[float]] = {}
    async with _engine(waits, hang=True) as client:
        with pytest.raises(EngineSleepFailed, match="timed out"):
            await HttpEngineSleeper(client).sleep(url=URL, level=1, engine_key="k")


async def test_a_wake_goes_on_beside_the_passes_and_ends_with_the_controller() -> None:
    wakes = EngineWakes(wait_sec=0.01)
    gate = asyncio.Event()
    calls: list[str] = []

    async def wake() -> None:
        calls.append("wake")
        await gate.wait()

    assert await wakes.wake("r1", wake) is False  # not done within the pass's wait
    assert await wakes.wake("r1", wake) is False and calls == ["wake"]  # not sent again
    gate.set()
    assert await wakes.wake("r1", wake) is True and not wakes.under_way("r1")

    async def fails() -> None:
        raise EngineSleepFailed("waking", "the engine did not answer")

    with pytest.raises(EngineSleepFailed):
        await wakes.wake("r2", fails)
    gate.clear()
    assert await wakes.wake("r3", wake) is False
    await wakes.aclose()  # the controller's shutdown: nothing left running
    assert not wakes.under_way("r3")
