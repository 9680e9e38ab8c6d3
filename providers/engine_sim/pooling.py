"""vLLM's pooling routes: classification, scoring and raw pooling (reward models).

The shapes follow vLLM's OpenAI-compatible server (``vllm serve --task classify``,
``--task score``, reward models on ``/pooling``), so the gateway's jobs for the
``classification``, ``reranker`` and ``reward`` modalities run against engine-sim as
against vLLM:

* ``POST /classify`` (also ``/v1/classify``, SGLang's path): ``{"model", "input"}`` with
  a string, a list of strings or token ids -> ``data[i] = {index, label, probs,
  num_classes}``, labels ``LABEL_0``/``LABEL_1`` as Hugging Face names them by default;
* ``POST /score`` and ``/v1/score``: ``text_1``/``text_2`` (older vLLM), ``data_1``/
  ``data_2`` or ``queries``/``documents`` (newer), one against many or pairwise ->
  ``data[i] = {index, object: "score", score}``;
* ``POST /pooling``: ``{"model", "input"}`` -> ``data[i] = {index, object: "pooling",
  data}``, one value per prompt token, as a reward model's per-token rewards.

Every answer is deterministic (a hash of model and text), costs a prefill of its
tokens in the shared engine, and carries ``usage`` like vLLM's.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

from aiohttp import web

from providers.engine_sim import media
from providers.engine_sim.modalities import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    embedding_inputs,
    run_prefill,
    send,
)
from providers.engine_sim.parsing import JsonObject, bad_request, json_body
from providers.engine_sim.state import STATE
from providers.engine_sim.text import check_model

CLASSES = ("LABEL_0", "LABEL_1")
MAX_POOLED_TOKENS = 8192


def _answer(kind: str, model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    return {
        "id": f"{kind}-{secrets.token_hex(16)}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


def _unit(text: str, *, model: str, salt: str) -> float:
    """A deterministic number in [-1, 1) for ``text``."""
    return 2 * media.fraction(salt, model, text) - 1


async def classify(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    model = check_model(state, body)
    inputs = embedding_inputs(body)
    tokens = sum(count for _, count in inputs)
    await run_prefill(state, tokens)
    data = []
    for index, (text, _) in enumerate(inputs):
        logit = 3 * _unit(text, model=model, salt="classify")
        first = 1 / (1 + math.exp(-logit))
        probs = [round(first, 6), round(1 - first, 6)]
        label = CLASSES[probs.index(max(probs))]
        data.append({"index": index, "label": label, "probs": probs, "num_classes": len(probs)})
    return await send(request, web.json_response(_answer("classify", model, data, tokens)))


def _texts(body: JsonObject, name: str) -> list[str]:
    value = body.get(name)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise bad_request(name, "must be a string or a non-empty list of strings")
    return items


def _score_sides(body: JsonObject) -> tuple[str, str]:
    for first, second in (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents")):
        if first in body or second in body:
            return first, second
    raise bad_request(
        "text_1", "a score request takes text_1 and text_2 (or data_1/data_2, or queries/documents)"
    )


async def score(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    model = check_model(state, body)
    first_name, second_name = _score_sides(body)
    first, second = _texts(body, first_name), _texts(body, second_name)
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise bad_request(
            second_name,
            f"{first_name} has {len(first)} texts and {second_name} {len(second)}: give one "
            f"{first_name} or as many as {second_name}",
        )
    tokens = sum(
        media.estimate_tokens(a) + media.estimate_tokens(b)
        for a, b in zip(first, second, strict=True)
    )
    await run_prefill(state, tokens)
    data = []
    for index, (query, document) in enumerate(zip(first, second, strict=True)):
        a = media.embedding(query, model=model, dimensions=DEFAULT_EMBEDDING_DIMENSIONS)
        b = media.embedding(document, model=model, dimensions=DEFAULT_EMBEDDING_DIMENSIONS)
        cosine = sum(x * y for x, y in zip(a, b, strict=True))
        data.append({"index": index, "object": "score", "score": round((cosine + 1) / 2, 6)})
    return await send(request, web.json_response(_answer("score", model, data, tokens)))


async def pooling(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    model = check_model(state, body)
    inputs = embedding_inputs(body)
    tokens = sum(count for _, count in inputs)
    if tokens > MAX_POOLED_TOKENS:
        raise bad_request("input", f"{tokens} tokens in all; at most {MAX_POOLED_TOKENS}")
    await run_prefill(state, tokens)
    data = []
    for index, (text, count) in enumerate(inputs):
        rewards = [round(_unit(f"{text}#{i}", model=model, salt="reward"), 6) for i in range(count)]
        data.append({"index": index, "object": "pooling", "data": rewards})
    return await send(request, web.json_response(_answer("pool", model, data, tokens)))
