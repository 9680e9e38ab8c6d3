"""vLLM's sleep-mode routes, with vLLM 0.32's shapes (``vllm/entrypoints/serve/dev/sleep``).

* ``POST /sleep?level=0|1|2&mode=abort|wait`` -> 200 ``{"status": "sleeping", "level": N}``
  once asleep. A level outside 0..2 or a mode vLLM does not know is FastAPI's 422
  ``{"detail": [...]}``; ``mode=keep`` (requests frozen across the sleep) is not modelled
  and answers 400.
* ``POST /wake_up[?tags=weights&tags=kv_cache]`` -> 200 ``{"status": "awake" | "sleeping",
  "tags": [...] | null}``: ``sleeping`` while some memory is still asleep.
* ``GET /is_sleeping`` -> ``{"is_sleeping": bool}``.
* ``POST /collective_rpc`` with ``{"method": "reload_weights"}`` -> ``{"results": [null,
  ...]}`` (one per GPU worker): the weights read from disk again after a level-2 sleep.
  Other methods answer 400 here.
"""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web

from catalog.wake import SLEEP_LEVELS, SleepLevel
from providers.engine_sim.parsing import ApiError, json_body
from providers.engine_sim.sleep import PauseMode
from providers.engine_sim.state import STATE

_MODES = ("abort", "wait", "keep")


def add_routes(app: web.Application) -> None:
    """Serve the sleep-mode routes on ``app``."""
    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_post("/collective_rpc", collective_rpc)


async def sleep(request: web.Request) -> web.Response:
    """``POST /sleep``."""
    try:
        level = _level(request.query.get("level", "1"))
        mode = _mode(request.query.get("mode", "abort"))
    except _Invalid as exc:
        return web.json_response({"detail": [exc.detail]}, status=422)
    await request.app[STATE].sleep.sleep(level, mode)
    return web.json_response({"status": "sleeping", "level": level})


async def wake_up(request: web.Request) -> web.Response:
    """``POST /wake_up``."""
    tags: list[str] | None = request.query.getall("tags", []) or None
    result = await request.app[STATE].sleep.wake_up(tags)
    return web.json_response(
        {"status": "awake" if result.fully_awake else "sleeping", "tags": tags}
    )


async def is_sleeping(request: web.Request) -> web.Response:
    """``GET /is_sleeping``."""
    return web.json_response({"is_sleeping": request.app[STATE].sleep.sleeping})


async def collective_rpc(request: web.Request) -> web.Response:
    """``POST /collective_rpc``: only ``reload_weights`` is modelled."""
    body = await json_body(request)
    method = body.get("method")
    if method is None:
        raise ApiError(400, "Missing 'method' in request body", param="method")
    if method != "reload_weights":
        raise ApiError(
            400, f"engine-sim models only the reload_weights method, not {method!r}", param="method"
        )
    state = request.app[STATE]
    await state.sleep.reload_weights()
    return web.json_response({"results": [None] * state.config.gpu_count})


def _level(raw: str) -> SleepLevel:
    try:
        level = int(raw)
    except ValueError:
        raise _unprocessable(
            "int_parsing",
            "level",
            "Input should be a valid integer, unable to parse string as an integer",
            raw,
        ) from None
    if level not in SLEEP_LEVELS:
        kind, bound = ("greater_than_equal", 0) if level < 0 else ("less_than_equal", 2)
        relation = "greater than or equal to" if level < 0 else "less than or equal to"
        raise _unprocessable(kind, "level", f"Input should be {relation} {bound}", raw)
    return level


def _mode(raw: str) -> PauseMode:
    if raw not in _MODES:
        raise _unprocessable(
            "literal_error", "mode", "Input should be 'abort', 'wait' or 'keep'", raw
        )
    if raw == "keep":
        raise ApiError(
            400,
            "engine-sim does not model mode=keep (requests frozen across the sleep); "
            "use abort or wait",
            param="mode",
        )
    return cast(PauseMode, raw)


class _Invalid(Exception):
    """A query parameter FastAPI would refuse; ``detail`` is its entry in the 422 body."""

    def __init__(self, detail: dict[str, Any]) -> None:
        super().__init__(detail["msg"])
        self.detail = detail


def _unprocessable(kind: str, name: str, message: str, raw: str) -> _Invalid:
    return _Invalid({"type": kind, "loc": ["query", name], "msg": message, "input": raw})
