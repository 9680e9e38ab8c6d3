"""The relay against small replicas of our own: what callers see of headers, bodies, cookies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import yarl
from aiohttp import web

from tests.gateway.conftest import Seed, StartGateway, base_url

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Replica:
    """A replica that runs ``handler`` and remembers the requests it got."""

    url: str
    seen: list[web.Request] = field(default_factory=list)


StartReplica = Callable[[Handler], Awaitable[Replica]]


@pytest.fixture
async def start_replica() -> AsyncIterator[StartReplica]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Replica:
        replica = Replica(url="")

        async def recording(request: web.Request) -> web.StreamResponse:
            replica.seen.append(request)
            return await handler(request)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", recording)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        # By name: a cookie jar keeps cookies for host names (not for bare IP addresses).
        replica.url = f"http://localhost:{runner.addresses[0][1]}"
        return replica

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_headers_reach_the_caller_before_a_slow_first_byte(
    seed: Seed, start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    release = asyncio.Event()

    async def slow_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await release.wait()  # the replica is still thinking (prefill)
        await response.write(b"data: first\n\n")
        await response.write_eof(b"data: [DONE]\n\n")
        return response

    key = await seed.workload("support-bot")
    await seed.replica("support-bot", (await start_replica(slow_body)).url)
    gateway = await start_gateway()
    url = f"{base_url(gateway, 'support-bot')}/chat/completions"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json={}, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        # The status and headers arrived while the replica still holds its body.
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert not release.is_set()
        release.set()
        assert await response.read() == b"data: first\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("chunks", [0, 1, 5])
async def test_bodies_arrive_whole_whatever_their_shape(
    seed: Seed, start_gateway: StartGateway, start_replica: StartReplica, chunks: int
) -> None:
    """Empty, one-piece and many-piece bodies, chunked and with a length, byte for byte."""
    pieces = [f"data: {i}\n\n".encode() * (i + 1) for i in range(chunks)]

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"".join(pieces), content_type="application/json")

    keys = {}
    for slug, handler in (("chunked", chunked), ("sized", sized)):
        keys[slug] = await seed.workload(slug)
        await seed.replica(slug, (await start_replica(handler)).url)
    gateway = await start_gateway()
    for slug, key in keys.items():
        url = f"{base_url(gateway, slug)}/chat/completions"
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json={}, headers={"Authorization": f"Bearer {key}"}) as response,
        ):
            assert response.status == 200
            assert await response.read() == b"".join(pieces)


async def test_a_cookie_one_caller_got_is_not_replayed_for_the_next(
    seed: Seed, start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    async def sets_a_cookie(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"ok": True})
        response.set_cookie("session", "first-callers-session")
        return response

    key = await seed.workload("support-bot")
    replica = await start_replica(sets_a_cookie)
    await seed.replica("support-bot", replica.url)
    gateway = await start_gateway()
    url = f"{base_url(gateway, 'support-bot')}/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    for caller in ("first", "second"):  # two callers that keep no cookies themselves
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
            http.post(url, json={}, headers=auth) as response,
        ):
            assert response.status == 200, caller
            assert response.cookies["session"].value == "first-callers-session"
    assert [r.headers.get("Cookie") for r in replica.seen] == [None, None]


async def test_a_query_string_cannot_smuggle_lines_to_the_replica(
    seed: Seed, start_gateway: StartGateway
) -> None:
    """The query reaches the replica as the caller encoded it: an encoded line break
    stays encoded instead of ending the request line (and starting a request of its own)."""
    heads: list[bytes] = []

    async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw, "127.0.0.1", 0)
    try:
        key = await seed.workload("support-bot")
        await seed.replica("support-bot", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        gateway = await start_gateway()
        query = "a=%20HTTP/1.1%0D%0AX-Injected:%20yes&b=%26"
        url = yarl.URL(f"{base_url(gateway, 'support-bot')}/chat/completions?{query}", encoded=True)
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json={}, headers={"Authorization": f"Bearer {key}"}) as response,
        ):
            assert response.status == 200
        request_line, *header_lines = heads[0].split(b"\r\n")
        assert request_line == f"POST /v1/chat/completions?{query} HTTP/1.1".encode()
        assert not [line for line in header_lines if line.lower().startswith(b"x-injected")]
    finally:
        server.close()
        await server.wait_closed()
