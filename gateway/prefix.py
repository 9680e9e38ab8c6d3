"""What the gateway remembers of each replica's prefix cache: which blocks it sent where.

An approximate index (SGLang's and llm-d's approximate routers keep one too): the
prompt blocks (``catalog.prefix``, chained hashes of 512-token blocks) of each request
sent to a replica are recorded in an LRU of that replica's, bounded like the engine's own
cache, and a new request's expected cached tokens on a replica are the leading blocks
its LRU holds. It drifts from the engine's truth where the engine evicts under memory
pressure the index does not see, or restarts; a wrong guess costs one prefill, never a
wrong answer. Memory is bounded: at most ``capacity_blocks`` hashes per replica
(:data:`DEFAULT_INDEX_BLOCKS`: about 170 KiB per replica, measured, LRU overhead
included), and replicas that leave the route table are forgotten. Hashing a body costs
its JSON parse and a blake2b pass: 0.7 ms for a 150 KB chat body (38k tokens, whose
prefill takes over a second on an H100), 9 µs for 3 KB; bodies shorter than one block
are not parsed.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from catalog.prefix import (
    BLOCK_CHARS,
    BLOCK_TOKENS,
    PrefixCache,
    cacheable_blocks,
    prompt_text,
    text_blocks,
)

HASHED_ROUTES = frozenset({"chat/completions", "completions"})
"""Routes whose prompts are hashed into blocks for prefix-aware routing."""


def request_blocks(path: str, body: bytes | None) -> tuple[int, ...]:
    """The prefix blocks of a chat or completions request body read whole (empty for
    other routes, a body too short to hold one block, or one that is not a JSON object),
    chained from the requested model's name (an adapter's cache is its own).
    A body the proxy streams on without reading is routed by least work."""
    return object_blocks(json_object(body)) if hashes_prompt(path, body) else ()


def hashes_prompt(path: str, body: bytes | None) -> bool:
    """Whether the request's prompt is hashed into blocks: a chat or completions body
    long enough to hold one block."""
    return path in HASHED_ROUTES and body is not None and len(body) >= BLOCK_CHARS


def json_object(body: bytes | None) -> dict[str, object] | None:
    """The body parsed as a JSON object; ``None`` for no body, not JSON, or JSON that is
    not an object (or nested past the parser's depth)."""
    if body is None:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def object_blocks(data: dict[str, object] | None) -> tuple[int, ...]:
    """:func:`request_blocks` of a body already parsed by :func:`json_object`."""
    if data is None:
        return ()
    text = prompt_text(data)
    namespace = model_named(data)
    return () if text is None else text_blocks(text, namespace=namespace or "")


def model_named(data: dict[str, object] | None) -> str | None:
    """The ``model`` a parsed request body names, or ``None``."""
    model = None if data is None else data.get("model")
    return model if isinstance(model, str) else None


DEFAULT_INDEX_BLOCKS = 1024
"""Blocks remembered per replica when its KV capacity is unknown: 512 Ki tokens, about
what one H100 keeps for an 8B model in bf16 (``catalog.perf``: ~450 Ki tokens)."""


@dataclass(slots=True)
class PrefixIndex:
    """Per replica, an LRU of the prompt blocks the gateway sent it."""

    default_capacity_blocks: int = DEFAULT_INDEX_BLOCKS
    _replicas: dict[str, PrefixCache] = field(default_factory=dict)

    def cached_tokens(
        self, keys: Collection[str], blocks: Sequence[int], prompt_tokens: int
    ) -> dict[str, int]:
        """Expected cached tokens of a prompt with ``blocks`` on each replica of ``keys``
        that holds any (absent: none)."""
        found: dict[str, int] = {}
        if not blocks:
            return found
        for key in keys:
            cache = self._replicas.get(key)
            if cache is not None:
                tokens = cache.cached_tokens(blocks, prompt_tokens)
                if tokens > 0:
                    found[key] = tokens
        return found

    def sent(
        self,
        key: str,
        blocks: Sequence[int],
        prompt_tokens: int,
        *,
        capacity_blocks: int | None = None,
    ) -> None:
        """A request with ``blocks`` went to ``key``; its full blocks are now that
        replica's most recent. ``capacity_blocks`` sizes a replica seen for the first
        time (its engine's KV capacity in blocks, where known)."""
        if not blocks:
            return
        cache = self._replicas.get(key)
        if cache is None:
            size = self.default_capacity_blocks if capacity_blocks is None else capacity_blocks
            cache = self._replicas[key] = PrefixCache(size)
        cache.admit(cacheable_blocks(blocks, prompt_tokens))

    def keep_only(self, keys: Collection[str]) -> None:
        """Forget replicas not in ``keys`` (they left the route table)."""
        for key in [k for k in self._replicas if k not in keys]:
            del self._replicas[key]

    def forget(self, key: str) -> None:
        self._replicas.pop(key, None)

    def blocks_held(self, key: str) -> int:
        """Blocks the index believes ``key`` holds: how warm its cache is."""
        cache = self._replicas.get(key)
        return 0 if cache is None else len(cache)

    def tokens_held(self, key: str) -> int:
        return self.blocks_held(key) * BLOCK_TOKENS
