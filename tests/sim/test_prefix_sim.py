"""Prefix caching in the simulator: Mooncake's JSONL, the conversation model, and the
replay's hit rates under prefix-aware and prefix-blind routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscaler.sim.policies import static_policy
from autoscaler.sim.prefix import Routing
from autoscaler.sim.run import Scenario, prepare, run_policy
from autoscaler.sim.sessions import SYSTEM_TOKENS, conversation_sessions
from autoscaler.sim.trace import TraceError, TraceRequest, load_trace
from autoscaler.sim.workload import SimWorkload
from catalog.model import Offer
from catalog.prefix import BLOCK_TOKENS
from tests.sim.conftest import CALM_CLOUD

TRACES = Path(__file__).parent.parent.parent / "traces"


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_mooncake_jsonl_is_read_with_its_blocks(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]},
            {"timestamp": 3500, "input_length": 600, "output_length": 2, "hash_ids": [0, 7]},
        ],
    )
    assert load_trace(path) == [
        TraceRequest(0.0, 1024, 5, (0, 1)),
        TraceRequest(2.5, 600, 2, (0, 7)),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"t.jsonl:2: not a JSON object"),
        ("[1, 2]", r"t.jsonl:2: expected a JSON object"),
        ('{"timestamp": 5, "input_length": 3}', r"t.jsonl:2: missing field\(s\) output_length"),
        (
            '{"timestamp": -1, "input_length": 3, "output_length": 1, "hash_ids": []}',
            r"t.jsonl:2: timestamp must be milliseconds >= 0, got -1",
        ),
        (
            '{"timestamp": 5, "input_length": 0, "output_length": 1, "hash_ids": []}',
            r"t.jsonl:2: input_length must be a whole number >= 1, got 0",
        ),
        (
            '{"timestamp": 5, "input_length": 3, "output_length": 1, "hash_ids": ["a"]}',
            r"t.jsonl:2: hash_ids must be a list of integers",
        ),
        (
            '{"timestamp": 0, "input_length": 3, "output_length": 1, "hash_ids": []}',
            r"t.jsonl:2: timestamp goes back in time",
        ),
    ],
)
def test_bad_mooncake_lines_are_refused_by_line_and_field(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "t.jsonl"
    first = '{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [1]}'
    path.write_text(first + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_the_bundled_mooncake_jsonl_matches_its_csv() -> None:
    jsonl = load_trace(TRACES / "mooncake_synthetic.jsonl")
    csv = load_trace(TRACES / "mooncake_synthetic.csv")
    assert len(jsonl) == len(csv) == 3993
    assert [(r.input_tokens, r.output_tokens) for r in jsonl] == [
        (r.input_tokens, r.output_tokens) for r in csv
    ]
    assert all(len(r.hash_ids) == -(-r.input_tokens // BLOCK_TOKENS) for r in jsonl)


def test_conversation_turns_carry_their_history_and_share_system_prompts() -> None:
    base = [TraceRequest(float(k), 700, 300) for k in range(400)]
    turns = conversation_sessions(base, seed=3, max_context_tokens=32_768)
    assert turns == conversation_sessions(base, seed=3, max_context_tokens=32_768)
    assert [t.arrival_s for t in turns] == [b.arrival_s for b in base]
    shared = SYSTEM_TOKENS // BLOCK_TOKENS
    by_first: dict[tuple[int, ...], int] = {}
    for t in turns:
        assert t.input_tokens >= SYSTEM_TOKENS + 700
        assert len(t.hash_ids) == -(-t.input_tokens // BLOCK_TOKENS)
        by_first[t.hash_ids[:shared]] = by_first.get(t.hash_ids[:shared], 0) + 1
    assert 1 < len(by_first) <= 16  # a handful of system prompts, shared
    # A later turn's prompt starts with an earlier turn's whole prompt and reply.
    grown = [t for t in turns if t.input_tokens >= SYSTEM_TOKENS + 2 * 700 + 300]
    assert grown
    later = grown[0]
    earlier = next(
        t
        for t in turns
        if t.input_tokens + 300 + 700 == later.input_tokens
        and later.hash_ids[: t.input_tokens // BLOCK_TOKENS]
        == t.hash_ids[: t.input_tokens // BLOCK_TOKENS]
    )
    assert earlier.arrival_s < later.arrival_s


def _documents(*, docs: int, requests: int, rps: float) -> list[TraceRequest]:
    """Requests over ``docs`` documents of 8 blocks each, round robin, each with a
    question block of its own. For 160 documents a round is 1,440 blocks: more than one
    H100's cache (885 blocks) holds, and half a round fits in one."""
    out = []
    for k in range(requests):
        doc = k % docs
        blocks = (*(doc * 100 + b for b in range(8)), 1_000_000 + k)
        out.append(TraceRequest(k / rps, 9 * BLOCK_TOKENS, 20, blocks))
    return out


def test_prefix_routing_partitions_the_documents_and_hits_where_least_work_misses(
    workload: SimWorkload, offers: tuple[Offer, ...]
) -> None:
    requests = _documents(docs=160, requests=960, rps=2.0)
    reports = {}
    for routing in Routing:
        prepared = prepare(
            Scenario(
                workload=workload,
                offers=offers,
                requests=requests,
                trace_name="docs",
                seed=0,
                cloud=CALM_CLOUD,
                routing=routing,
            )
        )
        policy = static_policy(prepared.workload.spec, replicas=2, name="static-2")
        reports[routing] = run_policy(prepared, policy)
    blind, aware = reports[Routing.LEAST_WORK], reports[Routing.PREFIX]
    assert blind.routing == "least-work" and aware.routing == "prefix"
    # Each document is asked 6 times; the first ask always misses. Routed by prefix,
    # each replica keeps its half of the documents: the other 5 asks hit 8 of 9 blocks
    # (5/6 x 8/9 = 74 %).
    assert aware.prefix_hit_rate > 0.7
    # Blind, an ask finds its document only where chance sent the ask before it.
    assert blind.prefix_hit_rate < 0.5
    assert aware.ttft_p50_s is not None and blind.ttft_p50_s is not None
    assert aware.ttft_p50_s < blind.ttft_p50_s
    assert aware.served == blind.served == 960
