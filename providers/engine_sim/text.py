"""``/v1/chat/completions`` and ``/v1/completions``, streamed (SSE) or not.

Nothing is sent before the first token exists, not even headers, so a proxy's
time-to-first-byte is the engine's time to first token. Streams follow OpenAI's chunk
format and end with ``data: [DONE]``.

The engine caches prompt prefixes as vLLM's automatic prefix caching does
(``catalog.prefix``: the prompt text, chat messages joined by newlines, cut into chained
512-token blocks, kept in an LRU sized by the profile's KV memory): a prompt's cached
tokens skip prefill, are reported in ``usage.prompt_tokens_details.cached_tokens`` and
counted in ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from catalog.engine import RequestTiming
from catalog.prefix import text_blocks
from providers.engine_sim import media
from providers.engine_sim.live import Ticket
from providers.engine_sim.parsing import (
    ApiError,
    JsonObject,
    bad_request,
    bool_field,
    int_field,
    json_body,
    usage_hint,
)
from providers.engine_sim.state import STATE, EngineState

DEFAULT_MAX_TOKENS = 16
MAX_OUTPUT_TOKENS = 32_768
IMAGE_PART_TOKENS = 576  # what a 336 px image costs a LLaVA-style vision encoder
_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.05


@dataclass(frozen=True, slots=True)
class _Generation:
    chat: bool
    model: str
    seed: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    request_id: str
    created: int
    cached_tokens: int = 0
    """Prompt tokens found in the engine's prefix cache."""


def check_model(state: EngineState, body: JsonObject) -> str:
    """The model the request names (the served one when it names none), which must be
    the served model or one of its LoRA adapters; else vLLM's own 404, body and all."""
    model = body.get("model") or state.config.model
    if not isinstance(model, str) or not state.config.served(model):
        raise ApiError(
            404,
            f"The model `{model}` does not exist.",
            kind="NotFoundError",
            param="model",
            code=404,
        )
    return model


def _content_text(content: Any, where: str) -> tuple[str, int]:
    if isinstance(content, str):
        return content, 0
    if content is None:
        return "", 0
    if not isinstance(content, list):
        raise bad_request(where, "must be a string or a list of content parts")
    text: list[str] = []
    extra = 0
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{where}[{index}]", "must be an object with a 'type'")
        if part["type"] == "text":
            text.append(str(part.get("text", "")))
        else:
            extra += IMAGE_PART_TOKENS
    return "".join(text), extra


def _chat_prompt(body: JsonObject) -> tuple[str, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty list of messages")
    texts: list[str] = []
    extra = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{index}]", "must be an object with a 'role'")
        text, tokens = _content_text(message.get("content"), f"messages[{index}].content")
        texts.append(text)
        extra += tokens
    prompt = "\n".join(texts)
    return prompt, media.estimate_tokens(prompt) + extra


def _text_prompt(body: JsonObject) -> tuple[str, int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, media.estimate_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    raise bad_request("prompt", "must be a string or a list of token ids (one prompt per request)")


def _generation(state: EngineState, body: JsonObject, *, chat: bool) -> _Generation:
    model = check_model(state, body)
    prompt, estimated = _chat_prompt(body) if chat else _text_prompt(body)
    if int_field(body, "n", default=1, minimum=1) != 1:
        raise bad_request("n", "engine-sim generates one choice per request")
    field = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    limit = int_field(body, field, default=DEFAULT_MAX_TOKENS, minimum=1, maximum=MAX_OUTPUT_TOKENS)
    stream = bool_field(body, "stream", default=False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options", "must be an object")
    prompt_hint = usage_hint(body, "prompt_tokens")
    completion_hint = usage_hint(body, "completion_tokens")
    input_tokens = estimated if prompt_hint is None else prompt_hint
    output_tokens = limit if completion_hint is None else completion_hint
    context = state.config.max_model_len
    if context is not None:  # the window checks and cuts the output, a stated one too
        output_tokens = _within_context(context, input_tokens, output_tokens, field)
    return _Generation(
        chat=chat,
        model=model,
        seed=prompt,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason="length" if body.get(field) is not None else "stop",
        stream=stream,
        include_usage=stream and bool_field(options, "include_usage", default=False),
        request_id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        created=int(time.time()),
    )


def _within_context(context: int, input_tokens: int, limit: int, field: str) -> int:
    """The output limit left by a prompt of ``input_tokens`` in a ``context``-token window,
    checked in vLLM's order and words: an output limit over the whole window, then a
    prompt over it, then a prompt that leaves no token to generate, are each a 400;
    otherwise the limit is cut to what the prompt leaves."""

    def refused(message: str, param: str) -> ApiError:
        return ApiError(400, message, kind="BadRequestError", param=param, code=400)

    if limit > context:
        raise refused(
            f"{field}={limit} cannot be greater than max_model_len={context}. "
            "Please request fewer output tokens.",
            field,
        )
    if input_tokens > context:
        raise refused(
            f"This model's maximum context length is {context} tokens. However, your "
            f"prompt contains {input_tokens} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
        )
    left = min(limit, context - input_tokens)
    if left < 1:  # vLLM cuts max_tokens to 0, which its sampling parameters refuse
        raise refused(f"max_tokens must be at least 1, got {left}.", "max_tokens")
    return left


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _complete(request, chat=False)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    state.require_ready()
    generation = _generation(state, await json_body(request), chat=chat)
    cached = state.prefix_cache.serve(text_blocks(generation.seed), generation.input_tokens)
    generation = replace(generation, cached_tokens=cached)
    ticket = await state.submit(
        input_tokens=generation.input_tokens,
        output_tokens=generation.output_tokens,
        finished_reason=generation.finish_reason,
        cached_tokens=cached,
    )
    try:
        if generation.stream:
            response = await _stream(request, state, ticket, generation)
        else:
            timing = await ticket.finished
            response = web.json_response(_whole(_as_ended(generation, ticket), timing))
            await response.prepare(request)
            await response.write_eof()
    finally:
        state.engine.cancel(ticket)  # a no-op once finished; frees the slot if abandoned
    state.count_served()
    return response


def _as_ended(generation: _Generation, ticket: Ticket) -> _Generation:
    """The generation as it ended: cut short with vLLM's ``abort`` reason when a sleep
    aborted it."""
    if not ticket.aborted:
        return generation
    return replace(generation, output_tokens=ticket.output_tokens, finish_reason="abort")


def _usage(generation: _Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": generation.input_tokens,
        "completion_tokens": generation.output_tokens,
        "total_tokens": generation.input_tokens + generation.output_tokens,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }


def _whole(generation: _Generation, timing: RequestTiming) -> dict[str, Any]:
    text = media.generated_text(generation.seed, timing.output_tokens)
    choice: dict[str, Any]
    if generation.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": None, "finish_reason": generation.finish_reason}
    return {
        "id": generation.request_id,
        "object": "chat.completion" if generation.chat else "text_completion",
        "created": generation.created,
        "model": generation.model,
        "choices": [choice],
        "usage": _usage(generation),
    }


def _chunk_maker(generation: _Generation) -> Callable[[dict[str, Any] | None, str | None], bytes]:
    envelope = {
        "id": generation.request_id,
        "object": "chat.completion.chunk" if generation.chat else "text_completion",
        "created": generation.created,
        "model": generation.model,
    }

    def chunk(delta: dict[str, Any] | None, finish_reason: str | None) -> bytes:
        choice: dict[str, Any]
        if generation.chat:
            choice = {"index": 0, "delta": delta or {}}
        else:
            choice = {"index": 0, "text": (delta or {}).get("content", "")}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return _sse({**envelope, "choices": [choice]})

    return chunk


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    request: web.Request, state: EngineState, ticket: Ticket, generation: _Generation
) -> web.StreamResponse:
    await ticket.first_token
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    chunk = _chunk_maker(generation)
    pieces = [chunk({"role": "assistant", "content": ""}, None)] if generation.chat else []
    sent = 0
    while True:
        produced = state.engine.generated_tokens(ticket)
        for index in range(sent, produced):
            pieces.append(chunk({"content": media.token_text(generation.seed, index)}, None))
        sent = produced
        if pieces:
            await response.write(b"".join(pieces))
            pieces = []
        if sent >= generation.output_tokens or (ticket.aborted and sent >= produced):
            break
        await asyncio.wait([ticket.finished], timeout=_poll_interval(state))
    generation = _as_ended(generation, ticket)
    tail = [chunk({}, generation.finish_reason)]
    if generation.include_usage:
        tail.append(_sse(_usage_chunk(generation)))
    tail.append(b"data: [DONE]\n\n")
    await response.write(b"".join(tail))
    await response.write_eof()
    return response


def _usage_chunk(generation: _Generation) -> dict[str, Any]:
    return {
        "id": generation.request_id,
        "object": "chat.completion.chunk" if generation.chat else "text_completion",
        "created": generation.created,
        "model": generation.model,
        "choices": [],
        "usage": _usage(generation),
    }


def _poll_interval(state: EngineState) -> float:
    # About one decode step of wall time: fine enough that tokens trickle out as they would.
    step = state.profile.decode_step_seconds(max(state.engine.running, 1))
    return min(max(step / state.config.time_scale, _POLL_MIN_S), _POLL_MAX_S)
