"""The engine-sim aiohttp application: routes, API-key check, OpenAI-shaped errors."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from providers.engine_sim import modalities, pooling, sleep_api, text
from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.live import LiveEngine
from providers.engine_sim.metrics import EngineMetrics
from providers.engine_sim.parsing import ApiError, error_response
from providers.engine_sim.state import STATE, EngineState, exit_abruptly

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit for audio uploads


def create_app(
    config: EngineSimConfig, *, on_fail: Callable[[], None] = exit_abruptly
) -> web.Application:
    """The application for ``config``. ``on_fail`` runs once ``fail_after`` requests are served.

    Raises ``ValueError`` when the configured GPU cannot serve the configured model.
    """
    profile = config.profile()
    app = web.Application(middlewares=[_errors, _api_key], client_max_size=MAX_UPLOAD_BYTES)
    app[STATE] = EngineState(
        config=config,
        profile=profile,
        engine=LiveEngine(profile, time_scale=config.time_scale),
        metrics=EngineMetrics(config.model),
        ready_at=time.monotonic() + config.startup_delay_s,
        on_fail=on_fail,
    )
    app.cleanup_ctx.append(_engine_running)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", text.chat_completions)
    app.router.add_post("/v1/completions", text.completions)
    app.router.add_post("/v1/embeddings", modalities.embeddings)
    app.router.add_post("/v1/images/generations", modalities.images)
    app.router.add_post("/v1/audio/speech", modalities.speech)
    app.router.add_post("/v1/audio/transcriptions", modalities.transcriptions)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, modalities.rerank)
    for path in ("/classify", "/v1/classify"):
        app.router.add_post(path, pooling.classify)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, pooling.score)
    app.router.add_post("/pooling", pooling.pooling)
    if config.enable_sleep_mode:
        sleep_api.add_routes(app)
    return app


async def _engine_running(app: web.Application) -> AsyncIterator[None]:
    engine = app[STATE].engine
    engine.start()
    yield
    await engine.stop()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.status != 404 else f"no route {request.method} {request.path}"
        return error_response(exc.status, message or exc.reason, code=str(exc.status))


@web.middleware
async def _api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Like vLLM's --api-key: the OpenAI routes need the key; health and metrics do not.
    key = request.app[STATE].config.api_key
    if key is not None and request.path.startswith("/v1/"):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "Incorrect API key provided; send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
    return await handler(request)


async def _health(request: web.Request) -> web.Response:
    # A sleeping vLLM is healthy: /health asks only whether the engine is alive.
    if not request.app[STATE].ready:
        return web.Response(status=503, text="loading model weights\n")
    return web.Response(status=200)


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # Requests held by a sleeping engine sit in vLLM's waiting queue.
    waiting = state.engine.waiting + state.sleep.held
    body = state.metrics.render(running=state.engine.running, waiting=waiting)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_ready()
    created = int(time.time())
    config = state.config
    # vLLM's cards: the model is its own root; an adapter's root is its source and its
    # parent the model.
    cards: list[tuple[str, str, str | None]] = [(config.model, config.model, None)]
    cards += [(name, source, config.model) for name, source in config.lora_modules]
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "engine-sim",
            "root": root,
            "parent": parent,
        }
        for name, root, parent in cards
    ]
    return web.json_response({"object": "list", "data": data})
