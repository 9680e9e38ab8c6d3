"""Embeddings, images, speech and transcription: deterministic payloads, modelled latency.

Each request passes through the same engine as text, so it queues behind the batch like
any other. Token costs stand in for work the GPU would do: an embedding is a prefill
alone; an image is ``IMAGE_STEPS`` decode steps (one per diffusion step); speech is
``SPEECH_TOKENS_PER_S`` audio tokens per second of output; a transcription prefills
``AUDIO_TOKENS_PER_S`` tokens per second of input and decodes its words.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any

from aiohttp import web

from providers.engine_sim import media
from providers.engine_sim.parsing import (
    ApiError,
    JsonObject,
    bad_request,
    choice_field,
    int_field,
    json_body,
    str_field,
)
from providers.engine_sim.state import STATE, EngineState
from providers.engine_sim.text import check_model

DEFAULT_EMBEDDING_DIMENSIONS = 1024
MAX_EMBEDDING_DIMENSIONS = 8192
IMAGE_STEPS = 30
MAX_IMAGE_SIDE = 2048
SPEECH_TOKENS_PER_S = 25
AUDIO_TOKENS_PER_S = 50  # Whisper: 1500 encoder positions per 30 s
WORDS_PER_AUDIO_S = 2.5
MAX_SPEECH_CHARS = 4096


async def _run(state: EngineState, *, input_tokens: int, output_tokens: int) -> None:
    ticket = await state.submit(
        input_tokens=input_tokens, output_tokens=output_tokens, finished_reason="stop"
    )
    try:
        await ticket.finished
    finally:
        state.engine.cancel(ticket)  # a no-op once finished; frees the slot if abandoned
    if ticket.aborted:
        raise ApiError(
            503, "the request was aborted: the engine was put to sleep", kind="service_unavailable"
        )


async def run_prefill(state: EngineState, tokens: int) -> None:
    """Pass ``tokens`` of prompt through the engine, queued behind the batch like text."""
    await _run(state, input_tokens=tokens, output_tokens=0)


async def send(request: web.Request, response: web.Response) -> web.Response:
    await response.prepare(request)
    await response.write_eof()
    request.app[STATE].count_served()
    return response


def embedding_inputs(body: JsonObject) -> list[tuple[str, int]]:
    value = body.get("input")
    single_ids = isinstance(value, list) and value and all(isinstance(t, int) for t in value)
    if isinstance(value, str) or single_ids:
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("input", "must be a string, a list of strings or of token-id lists")
    inputs: list[tuple[str, int]] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            inputs.append((item, media.estimate_tokens(item)))
        elif isinstance(item, list) and all(isinstance(t, int) for t in item):
            inputs.append((" ".join(map(str, item)), max(len(item), 1)))
        else:
            raise bad_request(f"input[{index}]", "must be a string or a list of token ids")
    return inputs


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: unit vectors from a hash of model and input."""
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    model = check_model(state, body)
    inputs = embedding_inputs(body)
    dimensions = int_field(
        body,
        "dimensions",
        default=DEFAULT_EMBEDDING_DIMENSIONS,
        minimum=1,
        maximum=MAX_EMBEDDING_DIMENSIONS,
    )
    encoding = choice_field(body, "encoding_format", allowed=("float", "base64"), default="float")
    tokens = sum(count for _, count in inputs)
    await _run(state, input_tokens=tokens, output_tokens=0)
    data: list[dict[str, Any]] = []
    for index, (text, _) in enumerate(inputs):
        vector = media.embedding(text, model=model, dimensions=dimensions)
        encoded: list[float] | str = (
            media.embedding_base64(vector) if encoding == "base64" else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    payload = {"object": "list", "data": data, "model": model, "usage": usage}
    return await send(request, web.json_response(payload))


def _image_size(body: JsonObject) -> tuple[int, int]:
    size = str_field(body, "size", default="1024x1024")
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise bad_request("size", f"must look like '1024x1024', got {size!r}")
    w, h = int(width), int(height)
    if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
        raise bad_request("size", f"each side must be 1..{MAX_IMAGE_SIDE} pixels, got {size!r}")
    return w, h


async def images(request: web.Request) -> web.Response:
    """``POST /v1/images/generations``: one-colour PNGs, as a data: URL unless base64 is
    asked for (``response_format``; OpenAI's images API answers with URLs by default)."""
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    check_model(state, body)
    prompt = str_field(body, "prompt")
    if not prompt.strip():
        raise bad_request("prompt", "must not be empty")
    count = int_field(body, "n", default=1, minimum=1, maximum=10)
    width, height = _image_size(body)
    fmt = choice_field(body, "response_format", allowed=("b64_json", "url"), default="url")
    await _run(state, input_tokens=media.estimate_tokens(prompt), output_tokens=IMAGE_STEPS * count)
    data: list[dict[str, str]] = []
    for index in range(count):
        encoded = base64.b64encode(media.png(f"{prompt}#{index}", width=width, height=height))
        text = encoded.decode()
        item = {"b64_json": text} if fmt == "b64_json" else {"url": f"data:image/png;base64,{text}"}
        data.append(item | {"revised_prompt": prompt})
    return await send(request, web.json_response({"created": int(time.time()), "data": data}))


async def speech(request: web.Request) -> web.Response:
    """``POST /v1/audio/speech``: a WAV (or raw PCM) tone as long as the text would take."""
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    check_model(state, body)
    text = str_field(body, "input")
    if not text.strip() or len(text) > MAX_SPEECH_CHARS:
        raise bad_request("input", f"must be 1..{MAX_SPEECH_CHARS} characters")
    voice = body.get("voice")
    if not isinstance(voice, str | dict) or not voice:
        raise bad_request("voice", "is required (a voice name such as 'alloy')")
    voice_name = voice if isinstance(voice, str) else str(voice.get("id", voice))
    fmt = choice_field(body, "response_format", allowed=("wav", "pcm"), default="wav")
    output_tokens = math.ceil(media.speech_seconds(text) * SPEECH_TOKENS_PER_S)
    await _run(state, input_tokens=media.estimate_tokens(text), output_tokens=output_tokens)
    if fmt == "wav":
        audio, content_type = media.wav(text, voice=voice_name), "audio/wav"
    else:
        audio, content_type = media.pcm16(text, voice=voice_name), "audio/pcm"
    return await send(request, web.Response(body=audio, content_type=content_type))


async def _upload(request: web.Request) -> tuple[bytes, dict[str, str]]:
    if not request.content_type.startswith("multipart/"):
        raise bad_request("file", "send the audio as multipart/form-data with a 'file' part")
    try:
        form = await request.post()
    except ValueError as exc:  # aiohttp's multipart reader on a truncated or broken body
        raise bad_request("file", f"the multipart body does not parse: {exc}") from None
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        raise bad_request("file", "is required (the audio to transcribe)")
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    return upload.file.read(), fields


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions``: words derived from the uploaded file's hash."""
    state = request.app[STATE]
    state.require_ready()
    data, fields = await _upload(request)
    check_model(state, fields)
    fmt = choice_field(
        fields, "response_format", allowed=("json", "text", "verbose_json"), default="json"
    )
    seconds = media.audio_seconds(data)
    words = max(1, round(seconds * WORDS_PER_AUDIO_S))
    input_tokens = max(1, math.ceil(seconds * AUDIO_TOKENS_PER_S))
    await _run(state, input_tokens=input_tokens, output_tokens=words)
    text = media.transcript(data, words=words)
    if fmt == "text":
        return await send(request, web.Response(text=text, content_type="text/plain"))
    payload: dict[str, Any] = {"text": text}
    if fmt == "verbose_json":
        language = fields.get("language", "en")
        payload = {"task": "transcribe", "language": language, "duration": seconds} | payload
        payload["segments"] = []
    return await send(request, web.json_response(payload))


async def rerank(request: web.Request) -> web.Response:
    """``POST /v1/rerank`` (vLLM's reranker route): ``documents`` ordered by a relevance
    score to ``query``, the cosine of their deterministic embeddings mapped to [0, 1]."""
    state = request.app[STATE]
    state.require_ready()
    body = await json_body(request)
    model = check_model(state, body)
    query = str_field(body, "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise bad_request("documents", "must be a non-empty list of strings")
    texts: list[str] = []
    for index, item in enumerate(documents):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise bad_request(f"documents[{index}]", "must be a string or {'text': string}")
        texts.append(text)
    top_n = int_field(body, "top_n", default=len(texts), minimum=1, maximum=len(texts))
    tokens = media.estimate_tokens(query) * len(texts) + sum(map(media.estimate_tokens, texts))
    await _run(state, input_tokens=tokens, output_tokens=0)
    anchor = media.embedding(query, model=model, dimensions=DEFAULT_EMBEDDING_DIMENSIONS)
    scored = []
    for index, text in enumerate(texts):
        vector = media.embedding(text, model=model, dimensions=DEFAULT_EMBEDDING_DIMENSIONS)
        cosine = sum(a * b for a, b in zip(anchor, vector, strict=True))
        scored.append((index, text, round((cosine + 1) / 2, 6)))
    scored.sort(key=lambda item: (-item[2], item[0]))
    results = [
        {"index": index, "document": {"text": text}, "relevance_score": score}
        for index, text, score in scored[:top_n]
    ]
    payload = {
        "id": f"rerank-{int(time.time() * 1000)}",
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": results,
    }
    return await send(request, web.json_response(payload))
