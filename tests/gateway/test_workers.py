"""The gateway as two worker processes on one port: requests spread over both, the
controller sees the whole load, a worker that dies is restarted, and none outlives its
parent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from autoscaler.controller import GatewaySignals
from autoscaler.decide.scaling import ttft_percentile
from gateway.app import GatewaySettings
from gateway.workers import Peers, WorkerPool, control_socket
from tests.gateway.conftest import PROJECT, Seed, eventually

SLUG = "chat"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class HeldEngine:
    """An engine whose streams send their first token at once and finish on release."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        await self.release.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def engine() -> AsyncIterator[HeldEngine]:
    held = HeldEngine()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", held.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    held.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield held
    held.release.set()
    await runner.cleanup()


class Demands:
    """What the pool told the controller: demand for workloads at zero."""

    def __init__(self) -> None:
        self.refs: list[tuple[str, str]] = []
        self.seen = asyncio.Event()

    def __call__(self, ref: tuple[str, str]) -> None:
        self.refs.append(ref)
        self.seen.set()


@pytest.fixture
def demands() -> Demands:
    return Demands()


@pytest.fixture
async def pool(
    tmp_path: Path, seed: Seed, engine: HeldEngine, demands: Demands
) -> AsyncIterator[WorkerPool]:
    workers = WorkerPool(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        workers=2,
        settings=GatewaySettings(refresh_interval_sec=0.2),
        on_demand=demands,
    )
    await workers.start("127.0.0.1", 0)
    yield workers
    await workers.stop()


async def _stream(url: str, key: str, first: asyncio.Event) -> None:
    """One stream on a connection of its own (a new source port: the kernel may hand it
    to either worker); ``first`` is set once its first chunk is back."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.post(url, json=BODY, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        assert response.status == 200
        async for _chunk in response.content.iter_any():
            first.set()


async def test_two_workers_share_the_port_and_the_controller_sees_all_their_load(
    seed: Seed, engine: HeldEngine, pool: WorkerPool
) -> None:
    key = await seed.workload(SLUG)
    launch = await seed.replica(SLUG, engine.url)
    url = f"http://127.0.0.1:{pool.port}/endpoint/{PROJECT}/{SLUG}/v1/chat/completions"
    assert pool.control_dir is not None
    each = [Peers([control_socket(pool.control_dir, i)]) for i in range(2)]

    async def in_flight_per_worker() -> list[int]:
        views = [(await p.signals()).snapshots for p in each]
        return [v[(PROJECT, SLUG)].in_flight if (PROJECT, SLUG) in v else 0 for v in views]

    streams: list[asyncio.Task[None]] = []
    # Held streams on new connections until both workers serve some (a connection goes
    # to one worker by the hash of its addresses: a few suffice, 64 is the bound).
    while len(streams) < 4 or 0 in await in_flight_per_worker():
        assert len(streams) < 64, "every connection went to the same worker"
        first = asyncio.Event()
        streams.append(asyncio.create_task(_stream(url, key, first)))
        await asyncio.wait_for(first.wait(), 20)
    held = len(streams)
    per_worker = await in_flight_per_worker()
    assert sum(per_worker) == held and min(per_worker) > 0

    read = await GatewaySignals(pool.signals).signals()
    assert read.incomplete is None
    measured = read.measured[(PROJECT, SLUG)]
    assert measured.signals.in_flight == held
    assert measured.replica_in_flight == {launch: held}
    merged = (await pool.signals()).snapshots[(PROJECT, SLUG)]
    assert merged.requests_in_window == held
    # A read with a worker that does not answer says which, and so does the controller's.
    gone = str(Path(pool.control_dir) / "gone.sock")
    partial = Peers([control_socket(pool.control_dir, i) for i in range(2)] + [gone])
    view = await partial.signals()
    assert view.incomplete == "1 of 3 gateway workers did not answer (worker 2)"
    assert view.snapshots[(PROJECT, SLUG)].in_flight == held
    read = await GatewaySignals(partial.signals).signals()
    assert read.of(("other", "idle")).incomplete == view.incomplete

    engine.release.set()
    await asyncio.wait_for(asyncio.gather(*streams), 20)

    async def all_answered() -> bool:
        view = (await pool.signals()).snapshots[(PROJECT, SLUG)]
        return view.in_flight == 0 and len(view.ttft_samples) == held

    await eventually(all_answered)
    merged = (await pool.signals()).snapshots[(PROJECT, SLUG)]
    apart = [(await p.signals()).snapshots[(PROJECT, SLUG)] for p in each]
    union = sorted(s for a in apart for s in a.ttft_samples)
    assert sorted(merged.ttft_samples) == union
    measured = (await GatewaySignals(pool.signals).signals()).measured[(PROJECT, SLUG)]
    since = measured.signals.ttft_samples[0][0].replace(year=2000)
    assert (
        ttft_percentile(measured.signals.ttft_samples, q=0.95, since=since)
        == sorted(v for _, v in union)[int(0.95 * held + 0.999) - 1]
    )


async def test_a_worker_that_dies_is_restarted_and_none_is_left_after_stop(
    seed: Seed, engine: HeldEngine, pool: WorkerPool, demands: Demands
) -> None:
    key = await seed.workload(SLUG)
    await seed.replica(SLUG, engine.url)
    engine.release.set()
    # A request for a workload with no replica, held by a worker: the parent hears the
    # demand (which wakes the controller in ``autoscaler run``).
    idle_key = await seed.workload("idle")
    idle = f"http://127.0.0.1:{pool.port}/endpoint/{PROJECT}/idle/v1/chat/completions"
    held = asyncio.create_task(_stream(idle, idle_key, asyncio.Event()))
    await asyncio.wait_for(demands.seen.wait(), 20)
    assert demands.refs[0] == (PROJECT, "idle")
    held.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await held

    url = f"http://127.0.0.1:{pool.port}/endpoint/{PROJECT}/{SLUG}/v1/chat/completions"
    assert pool.control_dir is not None
    each = [Peers([control_socket(pool.control_dir, i)]) for i in range(2)]
    # Requests until some worker has answered some: the one killed (its counters die).
    while not any(served := [_answered(await p.metrics()) for p in each]):
        await asyncio.wait_for(_stream(url, key, asyncio.Event()), 20)
    before = _answered(await pool.metrics())
    assert before == sum(served)
    dead = served.index(max(served))

    first = pool.pids()
    assert all(first) and len(set(first)) == 2
    os.kill(first[dead], signal.SIGKILL)
    await asyncio.wait_for(pool.wait_started(3), 30)
    again = pool.pids()
    assert again[dead] not in (0, first[dead]) and again[1 - dead] == first[1 - dead]
    # The new worker counts from zero; the merged total keeps what the dead one counted.
    fresh = Peers([control_socket(pool.control_dir, dead)])  # a reader that never saw it
    assert _answered(await fresh.metrics()) == 0
    assert _answered(await each[dead].metrics()) == served[dead]
    assert _answered(await pool.metrics()) == before
    for _ in range(4):  # whichever worker takes them, both serve
        await asyncio.wait_for(_stream(url, key, asyncio.Event()), 20)
    assert _answered(await pool.metrics()) == before + 4
    await pool.stop()
    for pid in again:
        assert not _alive(pid)


def _answered(metrics: bytes) -> int:
    """Requests answered 200 for the workload, as the (merged) metrics count them."""
    for family in text_string_to_metric_families(metrics.decode()):
        if family.name == "autoscaler_gateway_requests":
            return int(
                sum(
                    s.value
                    for s in family.samples
                    if s.name.endswith("_total")
                    and s.labels.get("workload") == SLUG
                    and s.labels.get("status") == "200"
                )
            )
    return 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for an init that does not reap is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def test_workers_do_not_outlive_a_parent_killed_outright(tmp_path: Path, seed: Seed) -> None:
    """``autoscaler gateway --workers 2`` killed with SIGKILL (no chance to clean up):
    its workers see their stdin close and stop."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autoscaler",
        "gateway",
        "--db",
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        "--port",
        "0",
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 60)
        assert b"2 worker processes" in line, line
        workers = _children(parent.pid)
        assert len(workers) == 2
        parent.kill()
        await parent.wait()
        await eventually(lambda: not any(_alive(pid) for pid in workers), within=30)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
