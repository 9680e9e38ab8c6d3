"""Token counts of one answered request, from what the gateway relayed anyway.

Prompt (input) tokens: the response's ``usage.prompt_tokens`` when it has one, else an
estimate from the request body: the characters of ``messages[*].content`` (text parts
of multi-part content too), ``prompt`` or ``input`` ÷ :data:`CHARS_PER_TOKEN`, read off
the raw JSON without parsing it; a prompt given as a list (token ids count one each)
is parsed. A body the gateway streamed on without reading whole, or one that is not
JSON, counts its bytes ÷ :data:`CHARS_PER_TOKEN`.

Cached prompt tokens: ``usage.prompt_tokens_details.cached_tokens`` (vLLM reports it with
``--enable-prompt-tokens-details``, engine-sim always), else 0: the prefix-cache hit rate
the controller's capacity estimate counts (``decide.inputs.TokenMix.cached_share``).

Completion (output) tokens: ``usage.completion_tokens`` when present; else, for a
streamed (SSE) answer, its events less the stream's framing (``[DONE]``, the final
event carrying ``finish_reason``, a chat stream's first event carrying only the role);
else the request's ``max_completion_tokens`` / ``max_tokens``.
Embeddings have none.

``usage`` sits at the end of an OpenAI answer (the last event of a stream with
``stream_options.include_usage``), so only the last bytes relayed are searched; the
request body is read only when the answer had no ``usage.prompt_tokens``, after the
answer has gone out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
"""Characters per token assumed when a prompt's tokens are estimated from its text."""

TAIL_BYTES = 2048
"""How many of an answer's last bytes are searched for its ``usage``."""

COUNTED_ROUTES = {"chat/completions": "chat", "completions": "text", "embeddings": "embedding"}
"""Routes whose token mix is measured, and which kind of answer they give."""

_USAGE = b'"usage"'
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens"\s*:\s*(\d+)')
_PROMPT_KEY = re.compile(rb'"(content|text|prompt|input)"\s*:\s*(["\[])')
_BACKSLASH = ord("\\")
_DONE = b"data: [DONE]"
_EVENT = b"data:"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the relay saw of one answer: ``events`` counts SSE ``data:`` events (0 for an
    answer that is not a stream), ``tail`` holds its last bytes."""

    kind: str
    stream: bool
    events: int
    tail: bytes


def routing_estimate(body_length: int | None) -> int:
    """A request's prompt tokens as the balancer weighs it, known before the body is
    read: its declared length ÷ :data:`CHARS_PER_TOKEN` (0 when unknown). The JSON
    around the prompt counts too; for the long prompts whose prefill matters it is small.
    """
    return 0 if not body_length else math.ceil(body_length / CHARS_PER_TOKEN)


def tail_of(previous: bytes, last: bytes) -> bytes:
    """The last :data:`TAIL_BYTES` of an answer whose last two chunks were these."""
    if len(last) >= TAIL_BYTES:
        return last[-TAIL_BYTES:]
    return previous[-(TAIL_BYTES - len(last)) :] + last


def token_counts(
    answer: Answer, *, body: bytes | None, body_length: int | None
) -> tuple[int, int] | None:
    """``(input, output)`` tokens of one answered request; ``None`` when the output is not
    known (no usage, not a stream, no ``max_tokens``) or the input cannot be estimated."""
    prompt, completion = _usage(answer.tail)
    if prompt is None:
        chars = None if body is None else _scan_prompt_chars(body)
        if chars is not None:
            prompt = math.ceil(chars / CHARS_PER_TOKEN)
        else:
            prompt = _estimate_prompt(_parse(body), body=body, body_length=body_length)
    if answer.kind == "embedding":
        completion = 0
    elif completion is None:
        completion = _stream_tokens(answer) if answer.stream else _max_tokens(_parse(body))
    if prompt is None or completion is None:
        return None
    return prompt, completion


def cached_tokens(answer: Answer) -> int:
    """The answer's ``usage.prompt_tokens_details.cached_tokens``, 0 when absent."""
    at = answer.tail.rfind(_USAGE)
    if at < 0:
        return 0
    found = _CACHED_TOKENS.search(answer.tail, at)
    return 0 if found is None else int(found.group(1))


def _usage(tail: bytes) -> tuple[int | None, int | None]:
    at = tail.rfind(_USAGE)
    if at < 0:
        return None, None
    prompt = _PROMPT_TOKENS.search(tail, at)
    completion = _COMPLETION_TOKENS.search(tail, at)
    return (
        None if prompt is None else int(prompt.group(1)),
        None if completion is None else int(completion.group(1)),
    )


def _stream_tokens(answer: Answer) -> int:
    framing = 1 + (answer.kind == "chat")  # the finish event; a chat's role event
    framing += _DONE in answer.tail
    return max(answer.events - framing, 0)


def _scan_prompt_chars(body: bytes) -> int | None:
    """Characters of the prompt's strings (``content``, ``text`` parts, ``prompt``,
    ``input``), read off the raw JSON without parsing it; ``None`` for a prompt given as
    a list (token ids, several prompts), which the parse handles. A key inside a string
    cannot match: its quotes would be escaped. A ``\\uXXXX`` escape counts as one
    character, other escapes as the two they are written with."""
    chars = 0
    at = 0
    ascii_only = body.isascii()
    # One-byte find runs at memchr speed, a two-byte one does not: look for \uXXXX
    # escapes (six written characters for one) only in strings holding a backslash.
    escaped = body.find(b"\\") >= 0
    while (key := _PROMPT_KEY.search(body, at)) is not None:
        at = key.end()
        if key.group(2) == b"[":
            if key.group(1) == b"content":
                continue  # multi-part content: its "text" parts come next
            return None
        end = _string_end(body, at)
        if end < 0:
            return None
        chars += end - at if ascii_only else len(body[at:end].decode("utf-8", "replace"))
        if escaped and body.find(b"\\", at, end) >= 0:
            chars -= 5 * body.count(b"\\u", at, end)
        at = end + 1
    return chars


def _string_end(body: bytes, start: int) -> int:
    """Where the JSON string starting at ``start`` ends (its closing quote), or -1."""
    end = body.find(b'"', start)
    while end > 0 and body[end - 1] == _BACKSLASH:
        slashes = 1
        while body[end - 1 - slashes] == _BACKSLASH:
            slashes += 1
        if slashes % 2 == 0:
            break  # the backslashes escape each other, not the quote
        end = body.find(b'"', end + 1)
    return end


def _parse(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _estimate_prompt(
    request: dict[str, Any] | None, *, body: bytes | None, body_length: int | None
) -> int | None:
    if request is None:
        size = len(body) if body else body_length
        return None if size is None else math.ceil(size / CHARS_PER_TOKEN)
    chars = ids = 0
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                c, i = _units(message.get("content"))
                chars, ids = chars + c, ids + i
    for name in ("prompt", "input"):
        c, i = _units(request.get(name))
        chars, ids = chars + c, ids + i
    return ids + math.ceil(chars / CHARS_PER_TOKEN)


def _units(value: Any) -> tuple[int, int]:
    """Characters of text and count of token ids in a prompt value."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, bool):
        return 0, 0
    if isinstance(value, int):
        return 0, 1
    if isinstance(value, dict):
        return _units(value.get("text"))
    if isinstance(value, list):
        chars = ids = 0
        for item in value:
            c, i = _units(item)
            chars, ids = chars + c, ids + i
        return chars, ids
    return 0, 0


def _max_tokens(request: dict[str, Any] | None) -> int | None:
    if request is None:
        return None
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None
