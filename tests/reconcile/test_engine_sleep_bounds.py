"""The controller's sleep and wake calls are bounded to fit a reconcile pass, and a call
that times out is an error the pass records (the replica is asked again next pass)."""

from __future__ import annotations

import httpx
import pytest

from autoscaler.reconcile.deps import (
    ENGINE_SLEEP_CALL_TIMEOUT_SEC,
    ENGINE_SLEEP_QUERY_TIMEOUT_SEC,
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


async def test_sleep_and_wake_calls_wait_no_longer_than_the_bound() -> None:
    waits: dict[str, list[float]] = {}
    async with _engine(waits) as client:
        sleeper = HttpEngineSleeper(client)
        await sleeper.sleep(url=URL, level=1, engine_key="k")
        await sleeper.wake(url=URL, engine_key="k")
        assert await sleeper.is_sleeping(url=URL, engine_key="k") is False

    assert waits["/sleep"] == [ENGINE_SLEEP_CALL_TIMEOUT_SEC]
    assert waits["/wake_up"] == [ENGINE_SLEEP_CALL_TIMEOUT_SEC]
    assert all(w <= ENGINE_SLEEP_CALL_TIMEOUT_SEC for ws in waits.values() for w in ws)
    assert waits["/is_sleeping"][-1] == ENGINE_SLEEP_QUERY_TIMEOUT_SEC  # the question alone


async def test_a_hung_engine_is_a_sleep_error_not_a_park() -> None:
    waits: dict[str, list[float]] = {}
    async with _engine(waits, hang=True) as client:
        with pytest.raises(EngineSleepFailed, match="timed out"):
            await HttpEngineSleeper(client).sleep(url=URL, level=1, engine_key="k")
