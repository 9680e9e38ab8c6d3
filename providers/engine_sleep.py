"""Putting a running engine to sleep and waking it: the client of vLLM's sleep mode.

A sleeping engine keeps its process, its machine and (at level 1) its weights in host
memory, and gives the GPU's memory back; it wakes in seconds where a fresh start takes
minutes. Only vLLM's protocol is driven (``providers.engines.SleepSupport``); the engine
must have booted with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``
(``boot_spec(..., sleep_mode=True)``).

* :func:`sleep_engine` ``POST /sleep?level=N`` (requests in flight are aborted: drain
  first). Requests sent while it sleeps are queued by vLLM and run after the wake; they
  are not refused, and ``/health`` stays 200, so the gateway must stop routing first.
* :func:`wake_engine`: level 1, one ``POST /wake_up``; level 2, ``POST
  /wake_up?tags=weights``, ``POST /collective_rpc {"method": "reload_weights"}``, ``POST
  /wake_up?tags=kv_cache``, so no request runs on weights that hold nothing. The level
  is read from ``vllm:engine_sleep_state`` when the caller does not say.
* :func:`is_sleeping` ``GET /is_sleeping``.

Errors::

    EngineSleepError         a sleep call did not do what was asked
     ├── EngineCannotSleep   the backend has no sleep the service drives, or the engine
     │                       was not booted for it (no such route): boot it with sleep_mode
     └── EngineSleepFailed   the engine answered an error, timed out or could not be reached

Every call has a bounded timeout, one figure for every model: :data:`DEFAULT_TIMEOUT_S`
sits above ``catalog.wake``'s longest modelled call (the level-2 reload of a 405B bf16
model over 8 GPUs, about 236 s), so a hung engine holds its caller that long per call;
a caller that must not wait so long passes a shorter ``timeout_s`` (the controller, within a
reconcile pass: ``autoscaler.reconcile.deps.ENGINE_SLEEP_CALL_TIMEOUT_SEC``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from providers.engines import engine_for

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EngineCannotSleep",
    "EngineSleepError",
    "EngineSleepFailed",
    "is_sleeping",
    "sleep_engine",
    "sleeping_level",
    "wake_engine",
]

DEFAULT_TIMEOUT_S = 300.0
"""Longest wait for one call: a level-2 wake of a large model reads it all from disk
(``catalog.wake``: about 236 s for 405B parameters in bf16). A level-2 wake makes three
calls, so up to three times this."""


class EngineSleepError(Exception):
    """A sleep call failed. ``action`` is what was being done; ``detail`` is why."""

    def __init__(self, action: str, detail: str) -> None:
        super().__init__(f"{action}: {detail}")
        self.action = action
        self.detail = detail


class EngineCannotSleep(EngineSleepError):
    """The backend cannot sleep here, or the engine was not booted able to (no routes)."""


class EngineSleepFailed(EngineSleepError):
    """The engine answered an error, timed out, or could not be reached."""


async def sleep_engine(
    base_url: str,
    level: int,
    *,
    backend: str = "vllm",
    api_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.AsyncClient | None = None,
) -> None:
    """Put the engine at ``base_url`` to sleep at ``level`` (1: weights to host memory,
    2: weights dropped, 0: scheduling paused only); returns once it sleeps."""
    action = f"putting the engine at {base_url} to sleep at level {level}"
    _require_vllm(backend, action)
    if level not in (0, 1, 2):
        raise ValueError(f"sleep level must be 0, 1 or 2, got {level}")
    async with _Session(base_url, api_key, timeout_s, client) as session:
        await session.call("POST", "/sleep", action, params={"level": str(level)})


async def wake_engine(
    base_url: str,
    *,
    level: int | None = None,
    backend: str = "vllm",
    api_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.AsyncClient | None = None,
) -> None:
    """Wake the engine at ``base_url`` until it serves again (a no-op if awake).

    ``level`` is the level it slept at; ``None`` reads it from the engine's metrics.
    Raises :class:`EngineSleepFailed` if the engine still sleeps afterwards.
    """
    action = f"waking the engine at {base_url}"
    _require_vllm(backend, action)
    async with _Session(base_url, api_key, timeout_s, client) as session:
        if level is None:
            level = await session.sleeping_level(action)
        if level == 2:
            await session.call("POST", "/wake_up", action, params={"tags": "weights"})
            await session.call("POST", "/collective_rpc", action, json={"method": "reload_weights"})
            await session.call("POST", "/wake_up", action, params={"tags": "kv_cache"})
        else:
            await session.call("POST", "/wake_up", action)
        if await session.is_sleeping(action):
            raise EngineSleepFailed(action, "the engine still sleeps after waking")


async def is_sleeping(
    base_url: str,
    *,
    backend: str = "vllm",
    api_key: str | None = None,
    timeout_s: float = 10.0,
    client: httpx.AsyncClient | None = None,
) -> bool:
    """Whether the engine at ``base_url`` sleeps (scheduler paused or memory released)."""
    action = f"asking whether the engine at {base_url} sleeps"
    _require_vllm(backend, action)
    async with _Session(base_url, api_key, timeout_s, client) as session:
        return await session.is_sleeping(action)


def sleeping_level(metrics_text: str) -> int | None:
    """The level vLLM's ``vllm:engine_sleep_state`` gauge shows: ``None`` awake, 1 weights
    offloaded, 2 weights discarded, 0 paused only.

    Raises ``ValueError`` when the metrics carry no such gauge (vLLM releases before
    the gauge came, late 2025, in vLLM pull request 24176).
    """
    states: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "vllm:engine_sleep_state":
            for sample in family.samples:
                states[sample.labels.get("sleep_state", "")] = sample.value
    if not states:
        raise ValueError("the metrics have no vllm:engine_sleep_state gauge")
    if states.get("awake", 1.0) == 1.0:
        return None
    if states.get("discard_all") == 1.0:
        return 2
    return 1 if states.get("weights_offloaded") == 1.0 else 0


def _require_vllm(backend: str, action: str) -> None:
    support = engine_for(backend).sleep
    if support is None or not support.driven:
        offered = "offers no sleep" if support is None else "sleeps, but not through this client"
        raise EngineCannotSleep(action, f"backend {backend!r} {offered}; vllm can sleep")


class _Session:
    """One client (the caller's, or a new one closed on exit) and how errors read."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        client: httpx.AsyncClient | None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._own = client is None
        self._client = client or httpx.AsyncClient(trust_env=False)

    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._own:
            await self._client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        action: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        try:
            response = await self._client.request(
                method,
                self._base + path,
                params=params,
                json=json,
                headers=self._headers,
                timeout=self._timeout,
            )
        except httpx.TimeoutException as exc:
            raise EngineSleepFailed(action, f"{method} {path} timed out: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise EngineSleepFailed(action, f"{method} {path} failed: {exc!r}") from exc
        if response.status_code == 404:
            raise EngineCannotSleep(
                action,
                f"{method} {path} is not served (404): boot the engine with sleep mode "
                "(vLLM: --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1)",
            )
        if not response.is_success:
            body = response.text[:300]
            raise EngineSleepFailed(
                action, f"{method} {path} answered {response.status_code}: {body}"
            )
        return response

    async def is_sleeping(self, action: str) -> bool:
        response = await self.call("GET", "/is_sleeping", action)
        value = _json_field(response, "is_sleeping", action)
        if not isinstance(value, bool):
            raise EngineSleepFailed(action, f"is_sleeping is not a boolean: {value!r}")
        return value

    async def sleeping_level(self, action: str) -> int:
        """The level the engine sleeps at, from its metrics (1 when awake: waking is then
        a no-op)."""
        response = await self.call("GET", "/metrics", action)
        try:
            level = sleeping_level(response.text)
        except ValueError as exc:
            raise EngineSleepFailed(
                action, f"{exc}: say the level it slept at (wake_engine(level=...))"
            ) from exc
        return 1 if level is None else level


def _json_field(response: httpx.Response, name: str, action: str) -> object:
    try:
        body = response.json()
    except ValueError as exc:
        raise EngineSleepFailed(action, f"answer is not JSON: {response.text[:200]}") from exc
    if not isinstance(body, dict) or name not in body:
        raise EngineSleepFailed(action, f"answer has no {name!r}: {response.text[:200]}")
    return body[name]
