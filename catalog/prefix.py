"""Prefix caching: prompts as chains of 512-token blocks, and an engine's LRU of them.

An engine with automatic prefix caching (vLLM's default) keeps the KV cache of full
prompt blocks after a request ends and reuses them for a later prompt that starts with
the same tokens: those tokens skip prefill. A block is identified by the hash of its
tokens chained with its parent block's hash (vLLM's ``hash_block_tokens``), so a block
hash stands for the whole prefix up to its end, and two prompts share their first ``k``
blocks exactly when their first ``k`` hashes are equal. Mooncake's traces carry such
chains (``hash_ids``, 512-token blocks); :func:`text_blocks` makes them from text.

* :func:`text_blocks` hashes a prompt's text. The gateway and engine-sim see text, not
  tokens, so a block is :data:`BLOCK_CHARS` characters (:data:`BLOCK_TOKENS` at
  :data:`CHARS_PER_TOKEN`, the gateway's token estimate). Only full blocks are hashed:
  an engine caches only full blocks. :func:`prompt_text` is the text of a request body,
  the same for chat messages (all of them, joined by newlines, as engine-sim builds its
  prompt) and for a raw prompt, so the same text hashes to the same blocks either way.
* :class:`PrefixCache` is one engine's cache: an LRU of block hashes bounded by the KV
  memory its serving profile leaves (``ServingProfile.kv_capacity_tokens`` /
  :data:`BLOCK_TOKENS`), counting the prompt tokens looked up and found as vLLM's
  ``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits`` do.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

BLOCK_TOKENS = 512
"""Tokens per prefix block (Mooncake's ``hash_ids`` block; vLLM's is 16, which changes
how much of a partial block is reused, not which prompts share prefixes)."""

CHARS_PER_TOKEN = 4
"""Characters per token when a prompt's text is cut into blocks (as the gateway estimates)."""

BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN


def text_blocks(text: str, *, namespace: str = "") -> tuple[int, ...]:
    """The chained hashes of ``text``'s full blocks: block ``i``'s hash covers its
    characters and block ``i - 1``'s hash, so it names the whole prefix up to its end.
    The first block's parent is ``namespace`` (the gateway passes the requested model, so
    a LoRA adapter's blocks never match the base model's, as vLLM keys its cache by
    adapter too)."""
    hashes: list[int] = []
    parent = namespace.encode("utf-8", "surrogatepass")
    for start in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        chunk = text[start : start + BLOCK_CHARS].encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + chunk, digest_size=8).digest()
        hashes.append(int.from_bytes(parent, "big"))
    return tuple(hashes)


def prompt_text(body: Mapping[str, object]) -> str | None:
    """The prompt text of a chat or completions request body, ``None`` when it has none.

    Chat: every message's text (a string, or the ``text`` of each part of multi-part
    content), joined by newlines; roles are left out. Completions: ``prompt`` (a string,
    or a one-element list of one). Prompts given as token ids have no text here.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
        return "\n".join(texts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def cacheable_blocks(blocks: Sequence[int], prompt_tokens: int) -> Sequence[int]:
    """The blocks of a ``prompt_tokens`` prompt that an engine keeps: its full ones."""
    return blocks[: max(prompt_tokens, 0) // BLOCK_TOKENS]


@dataclass(slots=True)
class PrefixCache:
    """An LRU of prefix blocks holding at most ``capacity_blocks``.

    :meth:`serve` is one prompt's pass through an engine: the tokens of its cached prefix
    are found (a hit), and its full blocks become the most recently used. Within one
    prompt the first block is refreshed last, so eviction takes the deepest blocks of a
    chain first and a shared root outlives the branches that hang off it.
    """

    capacity_blocks: int
    queries_tokens: int = 0
    """Prompt tokens looked up (vLLM's ``prefix_cache_queries``)."""
    hits_tokens: int = 0
    """Prompt tokens found cached (vLLM's ``prefix_cache_hits``)."""
    _blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {self.capacity_blocks}")

    def __len__(self) -> int:
        return len(self._blocks)

    def matched_blocks(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks``' leading blocks are cached (the first miss ends a prefix)."""
        cached = self._blocks
        count = 0
        for block in blocks:
            if block not in cached:
                break
            count += 1
        return count

    def cached_tokens(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """Tokens of a ``prompt_tokens`` prompt with these blocks that need no prefill.
        The last token is always computed (its logits give the first output token)."""
        matched = self.matched_blocks(cacheable_blocks(blocks, prompt_tokens))
        return max(min(matched * BLOCK_TOKENS, prompt_tokens - 1), 0)

    def admit(self, blocks: Sequence[int]) -> None:
        """``blocks`` were just computed or reused: most recently used, root last."""
        cached = self._blocks
        for block in reversed(blocks):
            if block in cached:
                cached.move_to_end(block)
            else:
                cached[block] = None
        while len(cached) > self.capacity_blocks:
            cached.popitem(last=False)

    def serve(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """A prompt of ``prompt_tokens`` with these blocks is prefilled: its cached
        tokens (counted as hits) are returned and its full blocks kept."""
        cached = self.cached_tokens(blocks, prompt_tokens)
        self.queries_tokens += prompt_tokens
        self.hits_tokens += cached
        self.admit(cacheable_blocks(blocks, prompt_tokens))
        return cached

    @property
    def hit_rate(self) -> float:
        """Share of the prompt tokens looked up that were found cached (0 before any)."""
        return self.hits_tokens / self.queries_tokens if self.queries_tokens else 0.0


def capacity_blocks(kv_capacity_tokens: int) -> int:
    """Prefix blocks an engine with ``kv_capacity_tokens`` of KV cache can keep: all of
    it, since the running sequences' own blocks are the cache's most recent ones."""
    return max(kv_capacity_tokens, 0) // BLOCK_TOKENS
