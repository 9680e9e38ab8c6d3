"""A bounded fuzz of the gateway process: what a hostile or broken client can send.

The gateway runs as its own process (``autoscaler gateway``) in front of an engine-sim,
so its memory can be read alone. Malformed JSON, wrong content types, bodies past the
limit (declared and streamed), bad keys, odd paths, clients that stall mid-request and
hundreds of connections at once: no answer is a 5xx, nothing hangs, a normal request
still works at every step, the store is unchanged, and the process's memory stays
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from autoscaler.store.models import Instance, Token, Workload
from tests.gateway.conftest import Seed, StartEngine, eventually
from tests.helpers import free_port

pytestmark = pytest.mark.slow

CHAT = {"model": "sim/llama-8b", "messages": [{"role": "user", "content": "hi"}]}
MEMORY_GROWTH_LIMIT = 200 * 1024 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class GatewayProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def endpoint(self, slug: str = "bot", project: str = "acme") -> str:
        return f"{self.url}/endpoint/{project}/{slug}/v1"


@pytest.fixture
async def gateway(tmp_path: Path, seed: Seed) -> AsyncIterator[GatewayProcess]:
    del seed  # the store is made by the seed's sessions fixture at tmp_path/state.db
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autoscaler",
        "gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    process = GatewayProcess(proc, port)
    try:
        async with httpx.AsyncClient() as http:

            async def up() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(f"{process.url}/health")).status_code == 200
                return False

            await eventually(up, within=60)
        yield process
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 20)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def _store_counts(seed: Seed) -> tuple[int, int, int]:
    async with seed.sessions() as s:
        counts = [
            await s.scalar(select(func.count()).select_from(model))
            for model in (Workload, Instance, Token)
        ]
    return (counts[0] or 0, counts[1] or 0, counts[2] or 0)


@pytest.mark.timeout(240)
async def test_hostile_clients_get_no_5xx_no_hang_and_bounded_memory(
    seed: Seed, start_engine: StartEngine, gateway: GatewayProcess
) -> None:
    engine = await start_engine()
    key = await seed.workload("bot")
    other_key = await seed.workload("other")
    await seed.replica("bot", engine.url)
    before = await _store_counts(seed)
    rng = random.Random(17)
    auth = {"Authorization": f"Bearer {key}"}
    chat = f"{gateway.endpoint()}/chat/completions"
    statuses: list[tuple[str, int]] = []
    timeout = httpx.Timeout(30.0)

    async with httpx.AsyncClient(timeout=timeout) as http:

        async def works() -> bool:
            response = await http.post(chat, json=CHAT, headers=auth)
            return response.status_code == 200

        await eventually(works, within=30)  # routes loaded
        baseline = _rss(gateway.proc.pid)

        async def send(what: str, method: str, url: str, **kw: object) -> None:
            response = await http.request(method, url, **kw)  # type: ignore[arg-type]
            statuses.append((what, response.status_code))

        # Malformed JSON and wrong content types.
        bodies = [
            b"{",
            b'{"model": ',
            b"null",
            b"[]",
            b'"a string"',
            b"\xff\xfe\x00garbage",
            b"[" * 50_000 + b"]" * 50_000,
            b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            bytes(rng.getrandbits(8) for _ in range(4096)),
        ]
        for body in bodies:
            for content_type in ("application/json", "text/plain", "application/xml", ""):
                headers = {**auth, "Content-Type": content_type} if content_type else auth
                await send("malformed", "POST", chat, content=body, headers=headers)
        await send(
            "multipart",
            "POST",
            f"{gateway.endpoint()}/audio/transcriptions",
            content=b"--x\r\nContent-Disposition: form-data; name=file\r\n\r\n\x00\x01",
            headers={**auth, "Content-Type": "multipart/form-data; boundary=x"},
        )
        assert await works()

        # Bodies past the limit: declared, and streamed without a length.
        huge = b"x" * (33 * 1024 * 1024)
        for _ in range(3):
            await send("huge", "POST", chat, content=huge, headers=auth)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"y" * (1024 * 1024)

        await send("huge-streamed", "POST", chat, content=chunks(), headers=auth)
        assert await works()

        # Bad keys.
        bad_keys: tuple[dict[str, str | bytes], ...] = (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Basic Zm9vOmJhcg=="},
            {"Authorization": "Bearer ik_live_nope"},
            {"Authorization": f"Bearer {other_key}"},
            {"Authorization": "Bearer " + "k" * 15_000},
            {"Authorization": b"Bearer " + key.encode() + b"\xc3\xa9\xff"},
        )
        for header in bad_keys:
            await send("bad key", "POST", chat, json=CHAT, headers=header)

        # Odd paths and methods.
        for path in (
            "/endpoint",
            "/endpoint/acme",
            "/endpoint/acme/bot",
            "/endpoint/acme/bot/v1",
            "/endpoint/acme/bot/v1/unknown",
            "/endpoint/acme/bot/v2/chat/completions",
            "/endpoint/../../etc/passwd",
            "/endpoint/acme/bot/v1/../../../internal/signals",
            "/endpoint/%00/%ff/v1/models",
            "/endpoint/acme/nope/v1/models",
            "/endpoint/" + "a" * 8000 + "/b/v1/models",
            "//endpoint//acme//bot//v1//models",
            "/endpoint/acme/bot/v1/models?" + "q=1&" * 2000,
            "/\u2603/\U0001f600",
        ):
            for method in ("GET", "POST", "DELETE", "OPTIONS", "PATCH"):
                await send("odd path", method, gateway.url + path, headers=auth)
        assert await works()

    # Slow clients: stall mid-headers and mid-body while others are served.
    stalled: list[asyncio.StreamWriter] = []
    for partial in (
        b"POST /endpoint/acme/bot/v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        b"POST /endpoint/acme/bot/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 100000\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n{",
    ):
        for _ in range(20):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(partial)
            await writer.drain()
            stalled.append(writer)

    # Many connections at once, with the stalled ones still open.
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        answers = await asyncio.wait_for(
            asyncio.gather(*(http.post(chat, json=CHAT, headers=auth) for _ in range(200))),
            timeout=120,
        )
        statuses.extend(("many", r.status_code) for r in answers)
        assert sum(r.status_code == 200 for r in answers) >= 150  # the rest wait or are capped

    for writer in stalled:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server_errors = [(what, code) for what, code in statuses if code >= 500]
    assert not server_errors, server_errors
    assert {code for what, code in statuses if what.startswith("huge")} == {413}
    assert {code for what, code in statuses if what == "bad key"} <= {400, 401, 431}
    async with httpx.AsyncClient(timeout=timeout) as http:
        assert (await http.post(chat, json=CHAT, headers=auth)).status_code == 200
    assert await _store_counts(seed) == before
    growth = _rss(gateway.proc.pid) - baseline
    assert growth < MEMORY_GROWTH_LIMIT, f"gateway memory grew {growth / 2**20:.0f} MiB"
    assert gateway.proc.returncode is None
