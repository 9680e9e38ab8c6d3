"""The gateway measures each workload's token mix from the requests it relays."""

from __future__ import annotations

import json
import statistics

import httpx
import pytest

from autoscaler.store.tokens import TokenKind, issue_token
from gateway.app import Gateway, signals_from_json
from gateway.tokens import Answer, token_counts
from gateway.window import (
    TokenStats,
    WorkloadWindow,
    bucket_tokens,
    merge_token_stats,
    prompt_bucket,
    share_within,
)
from tests.gateway.conftest import (
    MODEL,
    Seed,
    Sessions,
    StartEngine,
    StartGateway,
    now,
    sdk,
)

REF = ("acme", "chat")


def _stats(gateway: Gateway) -> TokenStats:
    tokens = gateway.signals()[REF].tokens
    assert tokens is not None
    return tokens


async def test_token_mix_of_streamed_and_whole_answers_through_engine_sim(
    seed: Seed, sessions: Sessions, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("chat")
    engine = await start_engine()
    await seed.replica("chat", engine.url)
    async with sessions() as s, s.begin():
        admin = (await issue_token(s, kind=TokenKind.ADMIN, now=now())).secret
    gateway = await start_gateway(replica_concurrency_cap=16)
    assert gateway.signals() == {}  # nothing measured before the first request
    async with sdk(gateway, "chat", key) as client:
        # Whole answer: the engine's usage is taken as it is (engine-sim states 512 prompt
        # tokens on request, where the prompt's 400 characters would be estimated at 100).
        whole = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x" * 400}],
            max_tokens=7,
            extra_body={"usage": {"prompt_tokens": 512}},
        )
        assert whole.usage is not None and whole.usage.prompt_tokens == 512
        first = _stats(gateway)
        assert (first.requests, first.input_mean, first.output_mean) == (1, 512, 7)

        # Streamed without usage: the prompt is estimated from its characters (800 / 4)
        # and the completion counted from the stream's token events.
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "s" * 200},
                {"role": "user", "content": [{"type": "text", "text": "y" * 600}]},
            ],
            max_tokens=12,
            stream=True,
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert len([p for p in pieces if p]) == 12

        # Streamed text completion with usage in its last event: usage wins again.
        completion = await client.completions.create(
            model=MODEL,
            prompt="z" * 40,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"usage": {"prompt_tokens": 64}},
        )
        [usage] = [c.usage async for c in completion if c.usage is not None]
        assert usage.prompt_tokens == 64

    stats = _stats(gateway)
    inputs, outputs = [512, 200, 64], [7, 12, 5]
    assert stats.requests == 3
    assert stats.input_mean == pytest.approx(statistics.mean(inputs))
    assert stats.input_std == pytest.approx(statistics.pstdev(inputs))
    assert stats.output_mean == pytest.approx(statistics.mean(outputs))
    assert stats.output_std == pytest.approx(statistics.pstdev(outputs))
    # The prompts' lengths themselves, by bucket: the tail placement reads.
    assert stats.input_histogram == {prompt_bucket(n): 1 for n in inputs}

    # The controller running apart reads the same figures, and the gateway's cap.
    async with httpx.AsyncClient() as http:
        remote = await http.get(
            f"http://127.0.0.1:{gateway.port}/internal/signals",
            headers={"Authorization": f"Bearer {admin}"},
        )
    [parsed] = signals_from_json(remote.content).snapshots.values()
    assert parsed.tokens == stats
    assert parsed.concurrency_cap == 16


async def test_failed_answers_and_unmeasured_routes_add_no_sample(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("chat")
    engine = await start_engine()
    await seed.replica("chat", engine.url)
    gateway = await start_gateway()
    async with httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{gateway.port}/endpoint/acme/chat/v1"
        headers = {"Authorization": f"Bearer {key}"}
        bad = await http.post(
            f"{url}/chat/completions", headers=headers, json={"model": "no-such-model"}
        )
        image = await http.post(
            f"{url}/images/generations", headers=headers, json={"model": MODEL, "prompt": "a"}
        )
    assert bad.status_code >= 400
    assert image.status_code == 200
    snapshot = gateway.signals()[REF]
    assert snapshot.requests_in_window == 2
    assert snapshot.tokens is None


def test_fallbacks_when_the_answer_has_no_usage() -> None:
    body = b'{"messages":[{"role":"user","content":"abcdefghij"}],"max_tokens":9}'
    whole = Answer(kind="chat", stream=False, events=0, tail=b'{"choices":[]}')
    # Prompt estimated from 10 characters; completion from max_tokens.
    assert token_counts(whole, body=body, body_length=len(body)) == (3, 9)
    ids = b'{"prompt":[1,2,3,4,5],"max_completion_tokens":4}'
    text = Answer(kind="text", stream=False, events=0, tail=b"{}")
    assert token_counts(text, body=ids, body_length=len(ids)) == (5, 4)
    # A body streamed on (not read whole): its length / 4; no max_tokens known -> no sample.
    assert token_counts(text, body=None, body_length=4000) is None
    stream = Answer(kind="text", stream=True, events=6, tail=b"data: [DONE]\n\n")
    assert token_counts(stream, body=None, body_length=4000) == (1000, 4)
    embedding = Answer(
        kind="embedding", stream=False, events=0, tail=b'"usage":{"prompt_tokens":7}'
    )
    assert token_counts(embedding, body=None, body_length=None) == (7, 0)


def test_prompt_estimate_reads_the_raw_body_like_a_parse() -> None:
    stream = Answer(kind="chat", stream=True, events=4, tail=b"data: [DONE]\n\n")

    def prompt(body: dict[str, object], *, ensure_ascii: bool = True) -> int:
        raw = json.dumps(body, ensure_ascii=ensure_ascii).encode()
        counts = token_counts(stream, body=raw, body_length=len(raw))
        assert counts is not None
        return counts[0]

    # 8 characters, one of them an escaped quote (written as two): 9 / 4 -> 3.
    assert prompt({"messages": [{"role": "user", "content": 'say "hi!'}]}) == 3
    # Not ASCII: characters, not bytes (12 characters: 36 bytes, or 72 as \u escapes).
    japanese: dict[str, object] = {"messages": [{"role": "user", "content": "日本語" * 4}]}
    assert prompt(japanese) == prompt(japanese, ensure_ascii=False) == 3
    # Multi-part content and a key-like text inside a string.
    parts = [{"type": "text", "text": "a" * 8}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert prompt({"messages": [{"role": "user", "content": parts}], "x": '"prompt": "zz'}) == 2
    # Token ids are counted one each (by a parse).
    assert prompt({"prompt": [[5, 6, 7, 8, 9]]}) == 5


def test_prompt_histogram_follows_the_window_and_merges_across_workers() -> None:
    """Each prompt counts in the bucket whose top holds it (at most 9% above it), leaves
    with the window, and two gateway processes' histograms add up to the one a single
    process would have measured; an older gateway's JSON carries none."""
    for tokens in (1, 2, 3, 100, 1000, 1024, 2047, 7437, 1_000_000):
        top = bucket_tokens(prompt_bucket(tokens))
        assert tokens <= top <= tokens * 1.1 + 1
        assert prompt_bucket(tokens) == 0 or bucket_tokens(prompt_bucket(tokens) - 1) < tokens
    window, first, second = WorkloadWindow(), WorkloadWindow(), WorkloadWindow()
    prompts = [100, 120, 2000, 7000, 7437, 30]
    for at, tokens in enumerate(prompts):
        window.add_tokens(now=float(at), input_tokens=tokens, output_tokens=5)
        (first if at % 2 else second).add_tokens(
            now=float(at), input_tokens=tokens, output_tokens=5
        )
    whole = window.token_stats()
    assert whole is not None and sum(whole.input_histogram.values()) == len(prompts)
    assert share_within(whole.input_histogram, 2200) == pytest.approx(4 / 6)
    merged = merge_token_stats([first.token_stats(), second.token_stats()])
    assert merged is not None and merged.input_histogram == whole.input_histogram
    assert TokenStats.from_json(whole.to_json()) == whole
    old = whole.to_json()
    del old["input_histogram"]
    assert TokenStats.from_json(old).input_histogram == {}
    window.trim(now=10.5, window_sec=7.0)  # the first four (at 0-3) leave
    left = window.token_stats()
    assert left is not None
    assert left.input_histogram == {prompt_bucket(7437): 1, prompt_bucket(30): 1}
    assert share_within({}, 100) is None
