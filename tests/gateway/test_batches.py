"""The OpenAI Files and Batches API on a real gateway, driven by the real ``openai`` SDK
against engine-sim replicas: results, refusals, cancel, expiry, the live-traffic
reserve, waking a workload at zero, and two gateways sharing one batch on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from openai.types import Batch
from sqlalchemy import event, select, update

from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Job
from gateway import batches
from gateway.app import Gateway, GatewaySettings
from gateway.jobs import BATCH_LINE_ATTEMPTS
from tests.gateway.conftest import (
    HI,
    MODEL,
    Seed,
    Sessions,
    StartEngine,
    StartGateway,
    base_url,
    eventually,
    sdk,
)
from tests.helpers import free_port

REF = ("acme", "support-bot")


def chat_line(custom_id: str, **body: Any) -> dict[str, Any]:
    request = {"model": MODEL, "messages": HI, "max_tokens": 3, **body}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": request,
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def submit(client: openai.AsyncOpenAI, lines: list[dict[str, Any]], **options: Any) -> Batch:
    uploaded = await client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
    )
    return await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        **options,
    )  # fmt: skip


async def finished(client: openai.AsyncOpenAI, batch_id: str, *, within: float = 30) -> Batch:
    """The batch once it reached a final status."""
    async with asyncio.timeout(within):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in ("completed", "expired", "cancelled", "failed"):
                return batch
            await asyncio.sleep(0.05)


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_a_batch_answers_each_request_once_in_the_output_or_error_file(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    for _ in range(2):
        await seed.replica("support-bot", (await start_engine()).url)
    gateway = await start_gateway()
    lines = [chat_line(f"req-{i}") for i in range(40)]
    lines[7] = {**lines[7], "body": {"model": MODEL}}  # no messages: the engine answers 400
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, lines, metadata={"team": "support"})
        assert batch.status == "in_progress"
        assert batch.request_counts is not None and batch.request_counts.total == 40
        done = await finished(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (39, 1)
        assert done.metadata == {"team": "support"}
        assert done.completed_at is not None and done.finalizing_at is not None
        output = await lines_of(client, done.output_file_id)
        errors = await lines_of(client, done.error_file_id)
        listed = await client.files.list(purpose="batch_output")
        assert {f.id for f in listed.data} == {done.output_file_id, done.error_file_id}
    assert sorted(line["custom_id"] for line in output) == sorted(
        f"req-{i}" for i in range(40) if i != 7
    )
    first = output[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"]
    assert [e["custom_id"] for e in errors] == ["req-7"]
    assert errors[0]["response"]["status_code"] == 400
    assert "messages" in errors[0]["response"]["body"]["error"]["message"]


async def test_an_invalid_line_is_refused_on_upload_naming_its_line(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    good = jsonl([chat_line("a"), chat_line("b")])
    async with sdk(gateway, "support-bot", key) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.files.create(
                file=("in.jsonl", io.BytesIO(good + b'{"custom_id": "c", "method": "POST"\n')),
                purpose="batch",
            )
        assert "in.jsonl: line 3 is not JSON" in refused.value.message
        with pytest.raises(openai.BadRequestError) as duplicate:
            await client.files.create(
                file=("in.jsonl", io.BytesIO(good + jsonl([chat_line("a")]))), purpose="batch"
            )
        assert "line 3: custom_id 'a' is already used on line 1" in duplicate.value.message
        with pytest.raises(openai.BadRequestError) as no_body:
            await client.files.create(
                file=("in.jsonl", io.BytesIO(good + b'{"custom_id":"c","method":"POST",'
                                                    b'"url":"/v1/chat/completions"}\n')),
                purpose="batch",
            )  # fmt: skip
        assert "line 3: body must be a JSON object" in no_body.value.message
        with pytest.raises(openai.BadRequestError) as purpose:
            await client.files.create(file=("in.jsonl", io.BytesIO(good)), purpose="fine-tune")
        assert "purpose 'fine-tune' is not one of ['batch']" in purpose.value.message


async def test_a_wrong_endpoint_is_refused_with_the_allowed_ones(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        uploaded = await client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl([chat_line("a")]))), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as wrong:
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h"
            )
        assert "endpoint '/v1/moderations' is not one of" in wrong.value.message
        assert "'/v1/chat/completions'" in wrong.value.message
        with pytest.raises(openai.BadRequestError) as mismatch:
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
            )
        assert "line 1: url '/v1/chat/completions' differs from the batch's endpoint" in (
            mismatch.value.message
        )
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id="file-nothere", endpoint="/v1/chat/completions",
                completion_window="24h",
            )  # fmt: skip
        assert not (await client.batches.list()).data


async def test_a_batch_on_a_workload_at_zero_wakes_it_and_cancel_reports_every_line(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    demand: list[tuple[str, str]] = []
    gateway = await start_gateway(on_demand=demand.append)
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line(f"r{i}") for i in range(5)])
        assert demand == [REF]  # the controller is told at once
        # ... and sees the lines as queued jobs, as it does a job queue's
        await eventually(lambda: queued_jobs(gateway) == 5)
        cancelled = await client.batches.cancel(batch.id)
        assert cancelled.status == "cancelled"
        assert cancelled.cancelling_at is not None and cancelled.cancelled_at is not None
        assert cancelled.output_file_id is None
        errors = await lines_of(client, cancelled.error_file_id)
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)
    assert cancelled.request_counts is not None
    assert cancelled.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
    assert sorted(e["custom_id"] for e in errors) == [f"r{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)
    await eventually(lambda: queued_jobs(gateway) == 0)


def queued_jobs(gateway: Gateway) -> int:
    snapshot = gateway.signals().get(REF)
    return 0 if snapshot is None else snapshot.async_queue_depth


async def test_lines_still_queued_when_the_window_closes_expire(
    seed: Seed, sessions: Sessions, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        uploaded = await client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl([chat_line("a"), chat_line("b")]))),
            purpose="batch",
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions",
            completion_window="24h",
        )  # fmt: skip
        assert batch.expires_at == batch.created_at + 24 * 3600
        await batches.sweep(sessions, now=datetime.now(UTC) + timedelta(hours=23))
        assert (await client.batches.retrieve(batch.id)).status == "in_progress"
        await batches.sweep(sessions, now=datetime.now(UTC) + timedelta(hours=24, seconds=1))
        expired = await client.batches.retrieve(batch.id)
        errors = await lines_of(client, expired.error_file_id)
    assert expired.status == "expired" and expired.expired_at is not None
    assert expired.request_counts is not None
    assert expired.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("a", "batch_expired"),
        ("b", "batch_expired"),
    ]


async def test_batch_lines_leave_a_quarter_of_each_replica_to_live_traffic(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    """per_worker 4: batch lines take at most 3 slots, so a live request finds the
    fourth free while a batch of 15 runs."""
    key = await seed.workload("support-bot", per_worker=4)
    engine = await start_engine(time_scale=1.0)  # slow enough to watch
    await seed.replica("support-bot", engine.url)
    gateway = await start_gateway()
    most = 0
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line(f"r{i}", max_tokens=8) for i in range(15)])
        await eventually(lambda: in_flight(gateway) == 3)
        live = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert live.choices[0].message.content
        while (await client.batches.retrieve(batch.id)).status == "in_progress":
            most = max(most, in_flight(gateway))
            await asyncio.sleep(0.01)
        done = await finished(client, batch.id)
    assert done.request_counts is not None and done.request_counts.completed == 15
    assert most == 3


def in_flight(gateway: Gateway) -> int:
    snapshot = gateway.signals().get(REF)
    return 0 if snapshot is None else snapshot.in_flight


async def test_batches_and_files_list_newest_first_with_after_and_limit(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    other = await seed.workload("other-bot")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        made = [await submit(client, [chat_line("a")]) for _ in range(3)]
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == [made[2].id, made[1].id]
        assert first.has_more
        rest = await client.batches.list(limit=2, after=first.data[-1].id)
        assert [b.id for b in rest.data] == [made[0].id] and not rest.has_more
        everything = [b.id async for b in client.batches.list(limit=1)]
        assert everything == [b.id for b in reversed(made)]
        inputs = await client.files.list(purpose="batch")
        assert len(inputs.data) == 3
        deleted = await client.files.delete(inputs.data[0].id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(inputs.data[0].id)
    async with sdk(gateway, "other-bot", other) as stranger:
        with pytest.raises(openai.NotFoundError):
            await stranger.batches.retrieve(made[0].id)
        with pytest.raises(openai.NotFoundError):
            await stranger.files.content(inputs.data[1].id)
        assert not (await stranger.batches.list()).data


@pytest.fixture
async def shared_sessions(database_url: str) -> AsyncIterator[Sessions]:
    """One store on SQLite or PostgreSQL (``database_url``), for two gateways."""
    async with open_store(database_url) as engine:
        yield session_factory(engine)


async def test_two_gateways_share_a_batch_and_a_stopped_one_loses_no_line(
    shared_sessions: Sessions, start_engine: StartEngine
) -> None:
    """Both gateways run lines of one batch; the first stops mid-batch (its running
    lines are queued again) and the second finishes: one line per request."""
    seed = Seed(shared_sessions)
    key = await seed.workload("support-bot", per_worker=8)
    for _ in range(2):
        await seed.replica("support-bot", (await start_engine(time_scale=20.0)).url)
    settings = GatewaySettings(refresh_interval_sec=0.2, job_poll_interval_sec=0.2)
    first = Gateway(sessions=shared_sessions, settings=settings)
    second = Gateway(sessions=shared_sessions, settings=settings)
    await first.start("127.0.0.1", 0)
    await second.start("127.0.0.1", 0)
    running = [first, second]
    try:
        async with sdk(first, "support-bot", key) as client:
            batch = await submit(client, [chat_line(f"r{i}", max_tokens=8) for i in range(60)])

            async def some_done() -> bool:
                counts = (await client.batches.retrieve(batch.id)).request_counts
                return counts is not None and counts.completed >= 10

            await eventually(some_done)
            await first.stop()
            running.remove(first)
        async with sdk(second, "support-bot", key) as client:
            done = await finished(client, batch.id)
            output = await lines_of(client, done.output_file_id)
    finally:
        for gateway in running:
            await gateway.stop()
    assert done.status == "completed" and done.error_file_id is None
    assert sorted(line["custom_id"] for line in output) == sorted(f"r{i}" for i in range(60))


async def test_a_replica_that_refuses_connections_costs_no_line(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    """A route to an engine that is gone (as after a restart, before the controller
    notices): its lines are queued again and answered by the replica that is there."""
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", f"http://127.0.0.1:{free_port()}")
    await seed.replica("support-bot", (await start_engine()).url)
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line(f"r{i}") for i in range(20)])
        done = await finished(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.request_counts is not None and done.request_counts.completed == 20


async def test_a_malformed_or_oversized_upload_is_a_4xx_in_openais_shape(
    seed: Seed, start_gateway: StartGateway
) -> None:
    key = await seed.workload("support-bot")
    gateway = await start_gateway(max_body_bytes=1024)
    url = base_url(gateway, "support-bot") + "/files"
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers) as http:
        no_boundary = await http.post(
            url, content=b"xx", headers={"Content-Type": "multipart/form-data"}
        )
        assert no_boundary.status_code == 400
        assert "multipart body could not be read" in no_boundary.json()["error"]["message"]
        not_multipart = await http.post(url, json={"purpose": "batch"})
        assert not_multipart.status_code == 400
        assert "multipart/form-data" in not_multipart.json()["error"]["message"]
        big = await http.post(
            url, files={"file": ("in.jsonl", b"x" * 4096)}, data={"purpose": "batch"}
        )
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "request_too_large"


async def test_a_line_whose_replica_never_answers_is_tried_three_times(
    seed: Seed, sessions: Sessions, start_gateway: StartGateway
) -> None:
    """A replica that cuts every connection before answering: the line is claimed
    ``BATCH_LINE_ATTEMPTS`` times, then fails with the replica's error."""
    cut = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cut
        await reader.readuntil(b"\r\n\r\n")  # the request reached the replica
        cut += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", f"http://127.0.0.1:{port}")
    gateway = await start_gateway()
    try:
        async with sdk(gateway, "support-bot", key) as client:
            batch = await submit(client, [chat_line("only")])
            done = await finished(client, batch.id)
            errors = await lines_of(client, done.error_file_id)
    finally:
        server.close()
    assert done.request_counts is not None and done.request_counts.failed == 1
    assert [e["error"]["code"] for e in errors] == ["server_error"]
    async with sessions() as s:
        attempts = await s.scalar(select(Job.attempts).where(Job.batch_id == batch.id))
    assert attempts == BATCH_LINE_ATTEMPTS == cut


async def test_a_line_queued_again_after_its_batch_was_cancelled_is_not_run(
    seed: Seed, sessions: Sessions, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    """A line running when its batch is cancelled, then queued again (its gateway
    stopped, or it went stale): no replica runs it, and it is reported cancelled."""
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line("a"), chat_line("b")])
        async with sessions() as s, s.begin():  # another gateway claims line "a"
            await s.execute(
                update(Job)
                .where(Job.batch_id == batch.id, Job.custom_id == "a")
                .values(status="running", started_at=datetime.now(UTC), attempts=1)
            )
        assert (await client.batches.cancel(batch.id)).status == "cancelling"
        async with sessions() as s, s.begin():  # ... and stops: "a" is queued again
            await s.execute(
                update(Job)
                .where(Job.batch_id == batch.id, Job.custom_id == "a")
                .values(status="queued", started_at=None)
            )
        engine = await start_engine()
        await seed.replica("support-bot", engine.url)
        await batches.sweep(sessions, now=datetime.now(UTC))
        done = await finished(client, batch.id)
        errors = await lines_of(client, done.error_file_id)
    assert done.status == "cancelled" and done.output_file_id is None
    assert sorted((e["custom_id"], e["error"]["code"]) for e in errors) == [
        ("a", "batch_cancelled"),
        ("b", "batch_cancelled"),
    ]


async def test_a_line_taken_over_by_another_gateway_is_left_to_it(
    seed: Seed, sessions: Sessions, start_gateway: StartGateway
) -> None:
    """A line found stale and claimed by another gateway while this one still runs it:
    this one's answer does not overwrite the new claim.

    The replica holds its answer until the takeover is written, so the run cannot end
    before it however slowly the test proceeds."""
    release = asyncio.Event()

    async def answer_when_released(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request reached the replica
        await release.wait()
        body = json.dumps(
            {"object": "chat.completion", "choices": [{"index": 0, "message": {
                "role": "assistant", "content": "late"}, "finish_reason": "stop"}]}
        ).encode()  # fmt: skip
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_when_released, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", f"http://127.0.0.1:{port}")
    gateway = await start_gateway()
    runner = gateway._jobs
    assert runner is not None
    try:
        async with sdk(gateway, "support-bot", key) as client:
            batch = await submit(client, [chat_line("a")])

            async def status() -> str | None:
                async with sessions() as s:
                    return await s.scalar(select(Job.status).where(Job.batch_id == batch.id))

            async def claimed() -> bool:
                # The runner holds its claim before the claim's transaction commits.
                return bool(runner._held) and await status() == "running"

            await eventually(claimed)
            theirs = datetime.now(UTC) + timedelta(seconds=1)
            async with sessions() as s, s.begin():
                await s.execute(
                    update(Job)
                    .where(Job.batch_id == batch.id)
                    .values(started_at=theirs, attempts=2)
                )
            release.set()  # now this gateway's answer comes
            await eventually(lambda: not runner._held)  # this gateway's run ended
            async with sessions() as s:
                job = await s.scalar(select(Job).where(Job.batch_id == batch.id))
            assert job is not None
            assert (job.status, job.started_at, job.result) == ("running", theirs, None)
            assert (await client.batches.retrieve(batch.id)).status == "in_progress"
    finally:
        release.set()
        server.close()


async def test_listing_files_reads_no_content(
    seed: Seed, sessions: Sessions, start_gateway: StartGateway
) -> None:
    """A workload's files may hold hundreds of MB: a listing reads their facts only,
    while a file's content and a batch still read it."""
    key = await seed.workload("support-bot")
    gateway = await start_gateway()
    engine = sessions.kw["bind"]
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *rest: object) -> None:
        statements.append(statement)

    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line("a")])
        event.listen(engine.sync_engine, "before_cursor_execute", seen)
        try:
            listed = await client.files.list(purpose="batch")
            retrieved = await client.files.retrieve(batch.input_file_id)
            listing = [s for s in statements if "FROM files" in s]
            content = await client.files.content(batch.input_file_id)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", seen)
    assert [f.id for f in listed.data] == [batch.input_file_id] == [retrieved.id]
    assert listing and not any("files.content" in s for s in listing)
    assert json.loads(content.text)["custom_id"] == "a"


async def test_a_line_outlasting_the_clients_default_timeout_is_answered(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway, monkeypatch: Any
) -> None:
    """Jobs have their own timeout: the default of the client the gateway shares with
    live traffic (aiohttp's 5 minutes, cut here to 0.2 s) does not end a line."""
    monkeypatch.setattr(aiohttp.client, "DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=0.2))
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", (await start_engine(time_scale=1.0)).url)
    gateway = await start_gateway()
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line("long", max_tokens=40)])
        done = await finished(client, batch.id)
        output = await lines_of(client, done.output_file_id)
    assert done.error_file_id is None
    assert [line["custom_id"] for line in output] == ["long"]


async def test_a_line_whose_replica_never_answers_fails_before_it_goes_stale(
    seed: Seed, start_gateway: StartGateway
) -> None:
    """A job's request is bounded just short of ``job_timeout_sec``: a replica that
    never answers fails each try of the line before another gateway would claim it."""
    held = 0

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held
        await reader.readuntil(b"\r\n\r\n")
        held += 1
        await reader.read()  # until the gateway gives up and closes
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", f"http://127.0.0.1:{port}")
    gateway = await start_gateway(job_timeout_sec=2.0)
    try:
        async with sdk(gateway, "support-bot", key) as client:
            batch = await submit(client, [chat_line("slow")])
            done = await finished(client, batch.id)
            errors = await lines_of(client, done.error_file_id)
    finally:
        server.close()
    assert done.request_counts is not None and done.request_counts.failed == 1
    assert "TimeoutError" in errors[0]["error"]["message"]
    assert held >= BATCH_LINE_ATTEMPTS


async def test_lines_naming_an_adapter_go_only_to_replicas_booted_with_it(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    """A rollout that adds a LoRA adapter: the old replica would answer 404 for it, so
    every line naming it must run on the new one (lines for the base model on either)."""
    sql = ("sql", "acme/llama-sql-lora")
    key = await seed.workload("support-bot", llm_loras=[{"name": sql[0], "source": sql[1]}])
    old = await start_engine()
    new = await start_engine(enable_lora=True, lora_modules=(sql,))
    await seed.replica("support-bot", old.url, engine_command=["vllm", "serve", MODEL])
    await seed.replica(
        "support-bot", new.url,
        engine_command=["vllm", "serve", MODEL, "--enable-lora", "--lora-modules", "sql=" + sql[1]],
    )  # fmt: skip
    gateway = await start_gateway()
    lines = [chat_line(f"sql-{i}", model="sql") for i in range(12)]
    lines += [chat_line(f"base-{i}") for i in range(12)]
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, lines)
        done = await finished(client, batch.id)
        output = await lines_of(client, done.output_file_id)
    assert done.error_file_id is None and len(output) == 24
    assert {
        line["response"]["body"]["model"] for line in output if line["custom_id"][0] == "s"
    } == {"sql"}


async def test_a_gateway_stopping_mid_line_of_a_cancelled_batch_finishes_the_cancel(
    seed: Seed, sessions: Sessions, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    """The line a stopping gateway cuts short belongs to a batch cancelled meanwhile:
    it is cancelled, not queued again, and the batch is cancelled at once."""
    key = await seed.workload("support-bot")
    await seed.replica("support-bot", (await start_engine(time_scale=1.0)).url)
    gateway = await start_gateway()
    runner = gateway._jobs
    assert runner is not None
    async with sdk(gateway, "support-bot", key) as client:
        batch = await submit(client, [chat_line("a", max_tokens=200)])
        await eventually(lambda: bool(runner._held))
        assert (await client.batches.cancel(batch.id)).status == "cancelling"
    await gateway.stop()
    async with sessions() as s:
        line = await s.scalar(select(Job.status).where(Job.batch_id == batch.id))
        stored = await batches.get_batch(s, ref=REF, batch_id=batch.id)
        view = await batches.batch_view(s, stored)
    assert line == "cancelled"
    assert view["status"] == "cancelled"
    assert view["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
