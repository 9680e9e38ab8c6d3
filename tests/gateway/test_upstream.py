"""The relay's HTTP/1.1 client against raw replicas on real sockets: keep-alive reuse and
every way a response can end that must close the connection instead."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import httptools
import pytest
import uvloop

from gateway.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse


@dataclass(frozen=True)
class Answer:
    data: bytes
    close: bool = False  # the replica closes the connection after writing ``data``


@dataclass
class Seen:
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class RawReplica:
    """Answers the n-th request it reads with ``answers[n]``; counts connections."""

    answers: list[Answer]
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    open_transports: list[asyncio.Transport] = field(default_factory=list)
    gone: list[asyncio.Future[None]] = field(default_factory=list)  # one per connection


StartRaw = Callable[[list[Answer]], Awaitable[RawReplica]]


class _ServerSide(asyncio.Protocol):
    def __init__(self, replica: RawReplica) -> None:
        self._replica = replica
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._target = b""
        self._headers: dict[bytes, bytes] = {}
        self._body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._replica.connections += 1
        self._replica.open_transports.append(self._transport)
        self._gone = asyncio.get_running_loop().create_future()
        self._replica.gone.append(self._gone)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        assert self._transport is not None
        self._replica.seen.append(Seen(self._target, self._headers, self._body))
        self._target, self._headers, self._body = b"", {}, b""
        answer = self._replica.answers.pop(0)
        self._transport.write(answer.data)
        if answer.close:
            self._transport.close()


async def _start_raw(
    answers: list[Answer], servers: list[asyncio.Server], replicas: list[RawReplica]
) -> RawReplica:
    replica = RawReplica(answers)
    server = await asyncio.get_running_loop().create_server(
        lambda: _ServerSide(replica), "127.0.0.1", 0
    )
    servers.append(server)
    replicas.append(replica)
    replica.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return replica


async def _stop_raw(servers: list[asyncio.Server], replicas: list[RawReplica]) -> None:
    for replica in replicas:
        for transport in replica.open_transports:
            transport.close()
        await asyncio.gather(*replica.gone)
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def start_raw() -> AsyncIterator[StartRaw]:
    servers: list[asyncio.Server] = []
    replicas: list[RawReplica] = []

    async def start(answers: list[Answer]) -> RawReplica:
        return await _start_raw(answers, servers, replicas)

    yield start
    await _stop_raw(servers, replicas)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(connect_timeout_sec=5, idle_timeout_sec=5)
    yield pool
    await pool.close()


def ok(body: bytes, *extra: str) -> Answer:
    head = "".join(f"{line}\r\n" for line in extra)
    return Answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), head.encode(), body)
    )


def chunked(*chunks: bytes) -> Answer:
    framed = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks)
    return Answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + framed
        + b"0\r\n\r\n"
    )


async def post(pool: UpstreamPool, replica: RawReplica, body: bytes = b"{}") -> UpstreamResponse:
    return await pool.request(
        url=replica.url,
        method="POST",
        target="/v1/chat/completions",
        headers=[("Content-Type", "application/json")],
        body=body,
        length=len(body),
    )


async def read_all(response: UpstreamResponse) -> bytes:
    body = response.read_nowait()
    while not response.at_eof():
        body += await response.read()
    return body


async def exchange(pool: UpstreamPool, replica: RawReplica) -> bytes:
    response = await post(pool, replica)
    try:
        return await read_all(response)
    finally:
        response.close()


async def wait_for(condition: Callable[[], bool]) -> None:
    # The pool signals nothing when it drops a connection the replica closed.
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.005)


async def read_cut_short(response: UpstreamResponse) -> bytes:
    """The body bytes read before the read that raised ``UpstreamError``."""
    got = response.read_nowait()
    while True:
        try:
            more = await response.read()
        except UpstreamError:
            return got
        assert more, "a truncated body must not read as complete"
        got += more


async def test_a_complete_response_leaves_its_connection_for_the_next_request(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw([ok(b"one"), chunked(b"data: a\n\n", b"data: b\n\n"), ok(b"three")])
    assert await exchange(pool, replica) == b"one"
    assert await exchange(pool, replica) == b"data: a\n\ndata: b\n\n"
    assert await exchange(pool, replica) == b"three"
    assert replica.connections == 1
    assert [s.body for s in replica.seen] == [b"{}"] * 3
    assert replica.seen[0].headers[b"content-length"] == b"2"
    assert replica.seen[0].target == b"/v1/chat/completions"


async def test_connection_close_is_honoured(pool: UpstreamPool, start_raw: StartRaw) -> None:
    replica = await start_raw([ok(b"one", "Connection: close"), ok(b"two")])
    assert await exchange(pool, replica) == b"one"
    assert await exchange(pool, replica) == b"two"
    assert replica.connections == 2


async def test_a_body_that_ends_at_close_is_read_whole_and_not_reused(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw(
        [
            Answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it", close=True),
            ok(b"x"),
        ]
    )
    assert await exchange(pool, replica) == b"all of it"
    assert await exchange(pool, replica) == b"x"
    assert replica.connections == 2


async def test_a_body_cut_short_is_an_error_and_its_connection_is_closed(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw(
        [
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", close=True),
            Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", close=True
            ),
            ok(b"fine"),
        ]
    )
    for expected in (b"partial", b"hello"):
        response = await post(pool, replica)
        assert await read_cut_short(response) == expected
        response.close()
    assert await exchange(pool, replica) == b"fine"
    assert replica.connections == 3
    assert pool.idle_connections() == 1


async def test_interim_and_bodyless_answers(pool: UpstreamPool, start_raw: StartRaw) -> None:
    replica = await start_raw(
        [
            Answer(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100").data),
            Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Answer(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
            ok(b"last"),
        ]
    )
    response = await post(pool, replica)
    assert response.status == 200
    assert await read_all(response) == b"after 100"
    response.close()
    for status in (204, 304):
        response = await post(pool, replica)
        assert (response.status, response.at_eof(), response.read_nowait()) == (status, True, b"")
        response.close()
    assert await exchange(pool, replica) == b"last"
    assert replica.connections == 1


async def test_bytes_past_the_response_close_the_connection(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw([Answer(ok(b"one").data + b"HTTP/1.1 200 OK\r\n"), ok(b"two")])
    assert await exchange(pool, replica) == b"one"
    assert await exchange(pool, replica) == b"two"
    assert replica.connections == 2


async def test_a_response_left_unread_is_never_reused(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw([ok(b"unread body"), ok(b"two")])
    response = await post(pool, replica)
    response.close()  # the caller went away before the body was read
    assert await exchange(pool, replica) == b"two"
    assert replica.connections == 2


async def test_a_connection_the_replica_closed_while_idle_is_not_reused(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw([ok(b"one"), ok(b"two")])
    assert await exchange(pool, replica) == b"one"
    replica.open_transports[0].close()
    await wait_for(lambda: pool.idle_connections() == 0)
    assert await exchange(pool, replica) == b"two"
    assert replica.connections == 2


async def test_a_replica_slow_to_answer_times_out(start_raw: StartRaw) -> None:
    replica = await start_raw([Answer(b"")])
    pool = UpstreamPool(connect_timeout_sec=5, idle_timeout_sec=0.05)
    with pytest.raises(TimeoutError):
        await post(pool, replica)
    assert pool.idle_connections() == 0
    await pool.close()


async def test_a_refused_connection_is_connect_failed(pool: UpstreamPool) -> None:
    # A port held bound and not listening: connecting is refused, and no other process
    # (the tests run in several) can start listening there meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ConnectFailed):
            await pool.request(
                url=f"http://127.0.0.1:{port}",
                method="POST",
                target="/v1/x",
                headers=[],
                body=None,
                length=None,
            )


async def test_a_streamed_body_of_unknown_size_is_sent_chunked(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw([ok(b"got it"), ok(b"again")])

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"first ", b"", b"second"):
            yield part

    response = await pool.request(
        url=replica.url,
        method="POST",
        target="/v1/audio/transcriptions",
        headers=[],
        body=parts(),
        length=None,
    )
    assert await read_all(response) == b"got it"
    response.close()
    assert replica.seen[0].headers[b"transfer-encoding"] == b"chunked"
    assert replica.seen[0].body == b"first second"
    assert await exchange(pool, replica) == b"again"
    assert replica.connections == 1


async def test_a_request_body_cut_short_closes_the_connection(
    pool: UpstreamPool, start_raw: StartRaw
) -> None:
    replica = await start_raw([ok(b"two")])

    class Refused(Exception):
        pass

    async def parts() -> AsyncIterator[bytes]:
        yield b"some"
        raise Refused

    with pytest.raises(Refused):
        await pool.request(
            url=replica.url, method="POST", target="/v1/x", headers=[], body=parts(), length=None
        )
    assert pool.idle_connections() == 0
    assert await exchange(pool, replica) == b"two"
    assert replica.connections == 2


async def test_header_values_cannot_smuggle_lines(pool: UpstreamPool) -> None:
    with pytest.raises(ValueError, match="line break"):
        await pool.request(
            url="http://127.0.0.1:9",
            method="POST",
            target="/v1/x",
            headers=[("X-A", "b\r\nX-Injected: yes")],
            body=b"",
            length=0,
        )


def test_the_client_runs_on_uvloop() -> None:
    """The gateway's loop: its transports are not asyncio's classes."""

    async def scenario() -> None:
        servers: list[asyncio.Server] = []
        replicas: list[RawReplica] = []
        pool = UpstreamPool(connect_timeout_sec=5, idle_timeout_sec=5)
        try:
            replica = await _start_raw(
                [
                    ok(b"one"),
                    chunked(b"data: a\n\n", b"data: b\n\n"),
                    Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", close=True),
                    ok(b"last"),
                ],
                servers,
                replicas,
            )
            assert await exchange(pool, replica) == b"one"
            assert await exchange(pool, replica) == b"data: a\n\ndata: b\n\n"
            response = await post(pool, replica)
            assert await read_cut_short(response) == b"partial"
            response.close()
            assert await exchange(pool, replica) == b"last"
            assert replica.connections == 2
        finally:
            await pool.close()
            await _stop_raw(servers, replicas)

    uvloop.run(scenario())


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[[StreamHandler], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """A replica scripted byte by byte: ``handler`` runs once per connection."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: StreamHandler) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            with contextlib.suppress(ConnectionError):
                await handler(reader, writer)

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def fetch(pool: UpstreamPool, url: str) -> bytes:
    response = await pool.request(
        url=url, method="POST", target="/v1/x", headers=[], body=b"{}", length=2
    )
    try:
        return await read_all(response)
    finally:
        response.close()


async def test_a_replica_sending_endless_headers_is_cut_off(
    pool: UpstreamPool, serve: Serve
) -> None:
    """A head (or trailer section) that never ends is an error once it passes the limit,
    not memory held until the idle timeout."""
    sent: list[int] = []

    def endless(trailers: bool) -> StreamHandler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            start = b"HTTP/1.1 200 OK\r\n"
            if trailers:
                start += b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
            writer.write(start)
            total = 0
            while total < 64 * 1024 * 1024:
                writer.write(b"X-Filler: " + b"a" * 4000 + b"\r\n")
                total += 4012
                await writer.drain()
            sent.append(total)
            await reader.read()  # until the gateway closes the connection

        return handler

    for trailers in (False, True):
        url = await serve(endless(trailers))
        with pytest.raises(UpstreamError, match="too large"):
            await fetch(pool, url)
        assert not sent, "the replica wrote 64 MiB of headers and the gateway took them all"


async def test_an_answer_before_the_request_body_was_sent_closes_the_connection(
    serve: Serve,
) -> None:
    """A replica that answers (413) without reading the body may never read again: the
    next request must not wait behind the unsent body on that connection."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections == 1:
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
            await asyncio.Event().wait()  # reads nothing more, keeps the connection
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    url = await serve(handler)
    pool = UpstreamPool(connect_timeout_sec=5, idle_timeout_sec=2)
    try:
        big = b"x" * (32 * 1024 * 1024)
        response = await pool.request(
            url=url, method="POST", target="/v1/x", headers=[], body=big, length=len(big)
        )
        assert response.status == 413
        response.close()
        response = await pool.request(
            url=url, method="GET", target="/v1/x", headers=[], body=None, length=None
        )
        assert await read_all(response) == b"ok"
        response.close()
        assert connections == 2
    finally:
        await pool.close()


async def test_a_reset_cuts_a_body_that_ends_at_close(pool: UpstreamPool, serve: Serve) -> None:
    """Only a clean close ends a body without length; a reset is a failure."""
    reset = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart")
        await writer.drain()
        await reset.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    url = await serve(handler)
    response = await pool.request(
        url=url, method="POST", target="/v1/x", headers=[], body=b"{}", length=2
    )
    try:
        assert response.read_nowait() or await response.read() == b"part"
        reset.set()
        with pytest.raises(UpstreamError):
            await response.read()
    finally:
        response.close()


async def test_idle_connections_close_after_keepalive_without_further_traffic(
    start_raw: StartRaw,
) -> None:
    """A replica that vanished without closing (terminated instance) leaves no socket."""
    replica = await start_raw([ok(b"one")])
    pool = UpstreamPool(connect_timeout_sec=5, idle_timeout_sec=5, keepalive_sec=0.05)
    try:
        assert await exchange(pool, replica) == b"one"
        assert pool.idle_connections() == 1
        async with asyncio.timeout(5):
            await replica.gone[0]
        assert pool.idle_connections() == 0
    finally:
        await pool.close()


async def test_a_target_with_a_line_break_or_space_is_refused(pool: UpstreamPool) -> None:
    for target in ("/v1/x?a=\r\nX-Injected: yes", "/v1/x?a b", "/v1/x\n"):
        with pytest.raises(ValueError, match="target"):
            await pool.request(
                url="http://127.0.0.1:9",
                method="POST",
                target=target,
                headers=[],
                body=b"",
                length=0,
            )


async def test_a_fast_replica_waits_for_a_slow_reader(pool: UpstreamPool, serve: Serve) -> None:
    """The client stops reading the socket while the body bytes it holds go unread: a
    large answer waits in the replica's send buffer, not in the gateway's memory."""
    written = 0
    blocked = asyncio.Event()
    size = 256 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"x" * (1024 * 1024)
        while written < size:
            writer.write(piece)
            written += len(piece)
            try:
                async with asyncio.timeout(1):
                    await writer.drain()
            except TimeoutError:  # the gateway stopped reading
                blocked.set()
                await writer.drain()

    url = await serve(handler)
    response = await pool.request(
        url=url, method="POST", target="/v1/x", headers=[], body=b"{}", length=2
    )
    try:
        async with asyncio.timeout(10):
            await blocked.wait()
        assert written < size // 4
        got = len(response.read_nowait())
        assert got <= 2 * 1024 * 1024  # at most what the socket held when reading paused
        async with asyncio.timeout(20):
            while got < size:  # reading resumes once the held bytes are taken
                got += len(await response.read())
        assert response.at_eof()
    finally:
        response.close()


async def test_a_replica_that_stops_reading_a_streamed_body_times_out(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()  # neither reads the body nor answers

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"x" * (1024 * 1024)

    url = await serve(handler)
    pool = UpstreamPool(connect_timeout_sec=5, idle_timeout_sec=0.5)
    try:
        async with asyncio.timeout(30):  # (a failure, not a hang, when nothing times out)
            with pytest.raises(TimeoutError):
                await pool.request(
                    url=url, method="POST", target="/v1/x", headers=[], body=parts(), length=None
                )
        assert pool.idle_connections() == 0
    finally:
        await pool.close()
