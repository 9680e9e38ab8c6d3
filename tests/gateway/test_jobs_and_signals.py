"""Async jobs survive in the store; signals and metrics show what callers felt."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from autoscaler.store.tokens import TokenKind, issue_token
from gateway.app import signals_from_json
from tests.gateway.conftest import (
    HI,
    MODEL,
    Seed,
    Sessions,
    StartEngine,
    StartGateway,
    base_url,
    eventually,
    now,
    sdk,
)

REF = ("acme", "support-bot")


async def test_jobs_queue_through_a_restart_and_finish_on_a_replica(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    first = await start_gateway()
    auth = {"Authorization": f"Bearer {key}"}
    job = {"route": "chat/completions", "body": {"model": MODEL, "messages": HI, "max_tokens": 3}}
    async with httpx.AsyncClient(headers=auth) as http:
        submitted = await http.post(f"{base_url(first, 'support-bot')}/jobs", json=job)
        assert submitted.status_code == 202
        job_id = submitted.json()["id"]
        await eventually(lambda: first.signals()[REF].async_queue_depth == 1)
        await first.stop()  # no replica yet: the job waits in the store, not in memory

        engine = await start_engine()
        await seed.replica("support-bot", engine.url)
        second = await start_gateway()
        url = f"{base_url(second, 'support-bot')}/jobs/{job_id}"

        async def finished() -> bool:
            return (await http.get(url)).json()["status"] in ("succeeded", "failed")

        await eventually(finished)
        done = (await http.get(url)).json()
    assert done["status"] == "succeeded"
    assert done["result"]["status_code"] == 200
    assert len(done["result"]["body"]["choices"][0]["message"]["content"].split()) == 3


async def test_job_errors_name_the_problem_and_jobs_stay_in_their_workload(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    other = await seed.workload("other-bot")
    gateway = await start_gateway()
    async with httpx.AsyncClient() as http:
        bad_route = await http.post(
            f"{base_url(gateway, 'support-bot')}/jobs",
            json={"route": "teleport", "body": {}},
            headers={"Authorization": f"Bearer {key}"},
        )
        made = await http.post(
            f"{base_url(gateway, 'support-bot')}/jobs",
            json={"body": {"model": MODEL, "messages": HI}},
            headers={"Authorization": f"Bearer {key}"},
        )
        elsewhere = await http.get(
            f"{base_url(gateway, 'other-bot')}/jobs/{made.json()['id']}",
            headers={"Authorization": f"Bearer {other}"},
        )
    assert bad_route.status_code == 400
    assert "'teleport' is not one of" in bad_route.json()["error"]["message"]
    assert made.json()["route"] == "chat/completions"  # the text2text default
    assert elsewhere.status_code == 404


async def test_signals_metrics_and_the_internal_endpoint(
    seed: Seed, sessions: Sessions, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    engine = await start_engine()
    await seed.replica("support-bot", engine.url)
    async with sessions() as s, s.begin():
        admin = (await issue_token(s, kind=TokenKind.ADMIN, now=now())).secret
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        for _ in range(3):
            stream = await client.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=2, stream=True
            )
            async for _chunk in stream:
                pass
        for _ in range(2):  # answered in one piece: requests, not first-token times
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    root = f"http://127.0.0.1:{gateway.port}"
    async with httpx.AsyncClient() as http:
        anonymous = await http.get(f"{root}/metrics")
        metrics = (
            await http.get(f"{root}/metrics", headers={"Authorization": f"Bearer {admin}"})
        ).text
        refused = await http.get(
            f"{root}/internal/signals", headers={"Authorization": f"Bearer {key}"}
        )
        remote = await http.get(
            f"{root}/internal/signals", headers={"Authorization": f"Bearer {admin}"}
        )
    local = gateway.signals()[REF]
    assert len(local.ttft_samples) == 3
    assert len(local.unstreamed_samples) == 2
    assert local.requests_in_window == 5
    assert local.in_flight == 0
    assert local.last_request_at is not None
    assert all(0 < ttft < 30 for _, ttft in local.ttft_samples)
    samples = {
        (s.name, s.labels.get("status")): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.labels.get("workload") == "support-bot"
    }
    assert samples[("autoscaler_gateway_ttft_seconds_count", None)] == 3
    assert samples[("autoscaler_gateway_request_duration_seconds_count", None)] == 5
    assert samples[("autoscaler_gateway_requests_total", "200")] == 5
    assert refused.status_code == 401
    assert anonymous.status_code == 401  # the data plane does not list workload names
    assert "support-bot" not in anonymous.text
    [parsed] = signals_from_json(remote.content).snapshots.values()
    assert (parsed.project, parsed.workload) == REF
    assert parsed.ttft_samples == local.ttft_samples
    assert parsed.unstreamed_samples == local.unstreamed_samples


async def test_a_job_of_each_pooling_modality_succeeds_on_engine_sim(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    gateway = await start_gateway()
    bodies = {
        "reranker": {"model": MODEL, "query": "refunds", "documents": ["refund policy", "rain"]},
        "classification": {"model": MODEL, "input": ["great service", "awful"]},
        "reward": {"model": MODEL, "input": "2 + 2 = 4"},
    }
    results = {}
    async with httpx.AsyncClient() as http:
        for task_type, body in bodies.items():
            key = await seed.workload(task_type, task_type=task_type)
            await seed.replica(task_type, engine.url)
            auth = {"Authorization": f"Bearer {key}"}
            made = await http.post(
                f"{base_url(gateway, task_type)}/jobs", json={"body": body}, headers=auth
            )
            assert made.status_code == 202, made.text
            url = f"{base_url(gateway, task_type)}/jobs/{made.json()['id']}"

            async def finished(url: str = url, auth: dict[str, str] = auth) -> bool:
                status = (await http.get(url, headers=auth)).json()["status"]
                return status in ("succeeded", "failed")

            await eventually(finished)
            results[task_type] = (await http.get(url, headers=auth)).json()
    assert {t: r["status"] for t, r in results.items()} == dict.fromkeys(bodies, "succeeded")
    ranked = results["reranker"]["result"]["body"]["results"]
    assert {r["index"] for r in ranked} == {0, 1}
    classified = results["classification"]["result"]["body"]["data"]
    assert [len(d["probs"]) for d in classified] == [2, 2]
    [pooled] = results["reward"]["result"]["body"]["data"]
    assert pooled["object"] == "pooling" and pooled["data"]
