"""Prompt blocks and the prefix cache (``catalog.prefix``), and the gateway's index."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.prefix import (
    BLOCK_CHARS,
    BLOCK_TOKENS,
    PrefixCache,
    capacity_blocks,
    prompt_text,
    text_blocks,
)
from gateway.prefix import PrefixIndex, request_blocks

SYSTEM = "You are a careful assistant. " * 200  # about 5,800 characters: 2 full blocks


def test_chat_and_raw_prompt_give_the_same_blocks_for_the_same_text() -> None:
    chat = {"messages": [{"role": "user", "content": SYSTEM}]}
    raw = {"prompt": SYSTEM}
    assert text_blocks(prompt_text(chat) or "") == text_blocks(prompt_text(raw) or "")
    assert len(text_blocks(SYSTEM)) == len(SYSTEM) // BLOCK_CHARS == 2


def test_every_message_counts_not_the_first_alone() -> None:
    first = {"role": "system", "content": SYSTEM}
    one = {"messages": [first, {"role": "user", "content": "a" * BLOCK_CHARS}]}
    other = {"messages": [first, {"role": "user", "content": "b" * BLOCK_CHARS}]}
    ones, others = text_blocks(prompt_text(one) or ""), text_blocks(prompt_text(other) or "")
    assert len(ones) == len(others) == 3
    assert ones[:2] == others[:2]  # the shared system prompt
    assert ones[2] != others[2]  # the user turns differ
    # Messages are joined by newlines, as engine-sim builds its prompt: the same text
    # given as a raw prompt lands on the same blocks.
    assert text_blocks(SYSTEM + "\n" + "a" * BLOCK_CHARS) == ones


def test_multi_part_content_hashes_its_text_parts() -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": SYSTEM}]}]}
    assert text_blocks(prompt_text(parts) or "") == text_blocks(SYSTEM)


def test_blocks_are_chained_a_block_names_its_whole_prefix() -> None:
    a = "x" * BLOCK_CHARS + "y" * BLOCK_CHARS
    b = "z" * BLOCK_CHARS + "y" * BLOCK_CHARS
    assert text_blocks(a)[1] != text_blocks(b)[1]  # same second block text, other prefix


def test_token_id_prompts_have_no_text() -> None:
    assert prompt_text({"prompt": [1, 2, 3]}) is None
    assert prompt_text({"input": "x"}) is None


@given(
    capacity=st.integers(min_value=0, max_value=50),
    prompts=st.lists(st.lists(st.integers(0, 200), max_size=30), max_size=40),
)
def test_the_cache_never_holds_more_than_its_capacity(
    capacity: int, prompts: list[list[int]]
) -> None:
    cache = PrefixCache(capacity)
    for blocks in prompts:
        cache.serve(blocks, len(blocks) * BLOCK_TOKENS)
        assert len(cache) <= capacity
    assert 0 <= cache.hits_tokens <= cache.queries_tokens


def test_a_repeated_prompt_hits_all_but_its_last_token_and_only_full_blocks_are_kept() -> None:
    cache = PrefixCache(10)
    assert cache.serve([1, 2, 3], 3 * BLOCK_TOKENS) == 0
    assert cache.serve([1, 2, 3], 3 * BLOCK_TOKENS) == 3 * BLOCK_TOKENS - 1
    # A prompt ending mid-block keeps only its full blocks.
    assert cache.serve([7, 8], BLOCK_TOKENS + 10) == 0
    assert cache.matched_blocks([7, 8]) == 1
    assert cache.hit_rate == pytest.approx((3 * BLOCK_TOKENS - 1) / (7 * BLOCK_TOKENS + 10))


def test_eviction_takes_the_deepest_blocks_first_so_a_shared_root_survives() -> None:
    cache = PrefixCache(3)
    cache.serve([1, 2, 3], 3 * BLOCK_TOKENS)
    cache.serve([1, 9], 2 * BLOCK_TOKENS)  # evicts 3, the deepest of the older chain
    assert cache.matched_blocks([1, 2, 3]) == 2
    assert cache.matched_blocks([1, 9]) == 2


def test_capacity_comes_from_kv_memory() -> None:
    assert capacity_blocks(453_360) == 453_360 // BLOCK_TOKENS
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixCache(-1)


def test_the_gateway_index_is_bounded_and_forgets_departed_replicas() -> None:
    index = PrefixIndex(default_capacity_blocks=4)
    for n in range(10):
        index.sent("a", [100 * n + b for b in range(3)], 3 * BLOCK_TOKENS)
    assert index.blocks_held("a") == 4
    index.sent("b", [1, 2], 2 * BLOCK_TOKENS, capacity_blocks=8)
    assert index.cached_tokens(["a", "b"], [1, 2, 5], 3 * BLOCK_TOKENS) == {"b": 2 * BLOCK_TOKENS}
    index.keep_only(["a"])
    assert index.blocks_held("b") == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{" * 3000,
        b"[" * 50_000 + b"]" * 50_000,
        b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b"\xff\xfe\x00garbage" * 500,
        b'{"messages": "not a list", "pad": "' + b"x" * BLOCK_CHARS + b'"}',
    ],
)
def test_bodies_that_are_not_prompts_have_no_blocks(body: bytes) -> None:
    assert request_blocks("chat/completions", body) == ()


def test_a_long_chat_body_is_hashed_like_its_text() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": SYSTEM}]}).encode()
    assert request_blocks("chat/completions", body) == text_blocks(SYSTEM)
    assert request_blocks("embeddings", body) == ()
    raw = json.dumps({"model": "base", "prompt": SYSTEM}).encode()
    chat = json.dumps({"model": "base", "messages": [{"role": "user", "content": SYSTEM}]})
    assert request_blocks("completions", raw) == request_blocks("chat/completions", chat.encode())
    # A LoRA adapter is named as the model: the same text under it shares no block.
    adapter = json.dumps({"model": "sql-lora", "prompt": SYSTEM}).encode()
    assert not set(request_blocks("completions", adapter)) & set(request_blocks("completions", raw))
