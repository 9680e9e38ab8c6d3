"""engine-sim answers vLLM's pooling routes (classify, score, pooling, rerank aliases) with
vLLM's shapes, deterministically, and names the field of a bad request."""

from __future__ import annotations

import httpx
import pytest

from tests.engine_sim.conftest import MODEL, StartEngine


async def test_classify_answers_a_label_and_probabilities_per_input(
    start_engine: StartEngine,
) -> None:
    server = await start_engine()
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = (
            await client.post("/classify", json={"model": MODEL, "input": ["good", "bad"]})
        ).json()
        again = (await client.post("/v1/classify", json={"model": MODEL, "input": "good"})).json()
    assert answer["object"] == "list" and answer["id"].startswith("classify-")
    assert [d["index"] for d in answer["data"]] == [0, 1]
    for item in answer["data"]:
        assert item["num_classes"] == len(item["probs"]) == 2
        assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert item["label"] == ("LABEL_0" if item["probs"][0] >= item["probs"][1] else "LABEL_1")
    assert again["data"][0]["probs"] == answer["data"][0]["probs"]
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] >= 2


@pytest.mark.parametrize(
    ("first", "second"), [("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents")]
)
async def test_score_pairs_one_query_with_each_document(
    start_engine: StartEngine, first: str, second: str
) -> None:
    server = await start_engine()
    body = {"model": MODEL, first: "refund policy", second: ["refunds", "weather", "refunds"]}
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = (await client.post("/score", json=body)).json()
        pairwise = await client.post(
            "/v1/score", json={"model": MODEL, first: ["a", "b"], second: ["a", "b", "c"]}
        )
    scores = [d["score"] for d in answer["data"]]
    assert [d["object"] for d in answer["data"]] == ["score"] * 3
    assert all(0 <= s <= 1 for s in scores)
    assert scores[0] == scores[2] != scores[1]
    assert pairwise.status_code == 400
    assert pairwise.json()["error"]["param"] == second


async def test_pooling_gives_one_reward_per_prompt_token(start_engine: StartEngine) -> None:
    server = await start_engine()
    async with httpx.AsyncClient(base_url=server.url) as client:
        answer = (await client.post("/pooling", json={"model": MODEL, "input": "x" * 40})).json()
        missing = await client.post("/pooling", json={"model": MODEL})
    [item] = answer["data"]
    assert item["object"] == "pooling"
    assert len(item["data"]) == answer["usage"]["prompt_tokens"] == 10
    assert all(-1 <= v < 1 for v in item["data"])
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input"


async def test_rerank_answers_on_each_of_vllms_paths(start_engine: StartEngine) -> None:
    server = await start_engine()
    body = {"model": MODEL, "query": "q", "documents": ["a", "b"]}
    async with httpx.AsyncClient(base_url=server.url) as client:
        answers = [
            (await client.post(p, json=body)).json()
            for p in ("/rerank", "/v1/rerank", "/v2/rerank")
        ]
    assert len({str(a["results"]) for a in answers}) == 1
