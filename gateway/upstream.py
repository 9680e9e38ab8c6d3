"""A keep-alive HTTP/1.1 client for the relay's requests to replicas.

One request at a time per connection, on an ``asyncio.Protocol`` whose responses are
parsed by ``httptools`` (llhttp, in C): each read from the socket is one callback that
hands the body bytes it holds to the waiting relay, with no per-chunk stream objects.

A connection goes back to its replica's idle list only after a complete response that
allows keep-alive, with every body byte taken and nothing more received; any other end
(a response cut short, a parse error, bytes past the response, a request whose body was
not sent whole, a response that began before the request was sent whole, a caller that
went away) closes it, so two requests' bytes never mix. Idle connections are closed
after ``keepalive_sec`` (by a timer, so a replica that vanished without closing leaves
no socket behind), below the 5 s that uvicorn (vLLM) keeps an idle connection open, so
the replica rarely closes one just as it is reused.

A replica's head and trailers are not buffered without bound: more than ``_HEAD_LIMIT``
bytes in a row that carry no body byte fail the response. The request target and
header fields must not hold line breaks (or, for the target, spaces and controls).

Errors::

    ConnectFailed     the connection could not be opened: nothing reached the replica
    UpstreamError     the replica failed after the connection opened
    TimeoutError      no connection, or no bytes, within the timeout
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import cast

import httptools
from multidict import CIMultiDict

#: Body bytes held for a slow reader before the socket stops being read.
_HIGH_WATER = 256 * 1024
#: Parsed replica URLs cached, at most.
_ORIGINS_KEPT = 4096
#: Bytes received in a row without a body byte (a head, 1xx heads, trailers), at most.
_HEAD_LIMIT = 128 * 1024
#: What a request target may not hold: it would end the request line.
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
#: What a header name may not hold, and what a header value may not.
_BAD_NAME = re.compile(r"[\x00-\x20\x7f:]")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


class ConnectFailed(Exception):
    """The replica could not be connected to (refused, unreachable, no such host)."""


class UpstreamError(Exception):
    """The replica closed the connection or sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a replica's URL points: ``http://host:port/prefix``."""

    host: str
    port: int
    tls: bool
    authority: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url!r}")
        authority, slash, path = rest.partition("/")
        tls = scheme == "https"
        host, port = authority, 443 if tls else 80
        if authority.startswith("["):  # [::1]:8000
            end = authority.index("]")
            host = authority[1:end]
            if authority[end + 1 : end + 2] == ":":
                port = int(authority[end + 2 :])
        elif ":" in authority:
            host, _, number = authority.rpartition(":")
            port = int(number)
        return cls(
            host=host,
            port=port,
            tls=tls,
            authority=authority,
            prefix=(slash + path).rstrip("/"),
        )


class UpstreamResponse:
    """A replica's answer: status and headers at once, the body as it arrives."""

    __slots__ = ("_conn", "content_length", "content_type", "headers", "reason", "status")

    def __init__(
        self,
        conn: _Connection,
        *,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        kind = headers.get("Content-Type")
        self.content_type = (
            "application/octet-stream" if kind is None else kind.partition(";")[0].strip().lower()
        )

    def read_nowait(self) -> bytes:
        """The body bytes at hand (``b""`` when none is)."""
        return self._conn.take()

    async def read(self) -> bytes:
        """The next body bytes, waiting for them; ``b""`` once the body is complete.
        Raises ``UpstreamError`` when the body ends short, ``TimeoutError`` when none
        arrives within the idle timeout."""
        return await self._conn.read()

    def at_eof(self) -> bool:
        """Whether the whole body arrived and was read."""
        return self._conn.drained()

    def close(self) -> None:
        """Done with the response: its connection is reused if it is clean, else closed."""
        self._conn.finish()


class _Connection(asyncio.Protocol):
    """One TCP connection to a replica, serving one request at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.lost = False
        self.gone: asyncio.Future[None] = self._loop.create_future()  # connection_lost ran
        self._idle_timeout = pool.idle_timeout_sec
        self._reset()

    def _reset(self) -> None:
        self._headers: list[tuple[str, str]] = []
        self._reason = b""
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._chunks: list[bytes] = []
        self._held = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._clean = True  # nothing seen that forbids reuse
        self._error: BaseException | None = None
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._until_close = False  # a body without length or chunking: it ends at EOF
        self._interim = False  # between a 1xx answer's headers and its end
        self._answered = False  # the final response's head is in
        self._body_seen = 0  # body bytes of this response so far
        self._bare = 0  # bytes received since the last body byte

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # bytes nobody asked for: the connection is unusable
            self._close()
            return
        if self._complete:
            self._clean = False
            return
        body_seen = self._body_seen
        try:
            self._parser.feed_data(data)
            if self._body_seen != body_seen:
                self._bare = 0
            elif not self._complete:
                self._bare += len(data)
                if self._bare > _HEAD_LIMIT:
                    self._fail(UpstreamError("the replica's head or trailers are too large"))
                    self._close()
        except httptools.HttpParserError as exc:
            if self.complete():  # (the callbacks may have completed it)
                self._clean = False  # bytes past the response: not a reusable connection
            else:
                self._fail(UpstreamError(f"malformed response: {exc}"))
            self._close()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the replica switched protocols"))
            self._close()

    def eof_received(self) -> bool | None:
        if self._until_close and not self._complete:
            self.on_message_complete()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.gone.done():
            self.gone.set_result(None)
        self._pool.forget(self)
        if self._head is not None and not self._complete:
            if self._until_close and exc is None:
                self.on_message_complete()
            else:
                reason = "closed the connection" if exc is None else f"connection lost: {exc}"
                self._fail(UpstreamError(f"the replica {reason}"))
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second response to one request: never reuse this
            self._clean = False

    def on_status(self, status: bytes) -> None:
        if not self._complete:
            self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._answered:  # trailers: not relayed
            return
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers = []
            self._reason = b""
            self._interim = True
            return
        self._answered = True
        headers = CIMultiDict(self._headers)
        response = UpstreamResponse(
            self,
            status=status,
            reason=self._reason.decode("latin-1"),
            headers=headers,
        )
        if not self._parser.should_keep_alive():
            self._clean = False
        self._until_close = (
            response.content_length is None
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        )
        if self._until_close:
            self._clean = False
        if self.transport is not None and self.transport.get_write_buffer_size():
            # Answered before the request left: the replica may never read the rest.
            self._clean = False
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._held += len(body)
        self._body_seen += len(body)
        if self._held > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._complete:
            return
        self._complete = True
        self._wake()

    # -- used by the request and its response -------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._clean = False
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()

    def _close(self) -> None:
        self._clean = False
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # close() would wait for a reader that may never read
            else:
                self.transport.close()

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    async def send(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        chunked: bool,
    ) -> UpstreamResponse:
        """Send one request and wait for its response's status and headers."""
        assert self.transport is not None
        self._reset()
        future: asyncio.Future[UpstreamResponse] = self._loop.create_future()
        self._head = future
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
        else:
            self.transport.write(head)
            await self._stream(body, chunked=chunked)
        if self._error is not None and not future.done():
            raise self._error
        if not future.done():
            async with asyncio.timeout(self._idle_timeout):
                return await future
        return future.result()

    async def _stream(self, body: AsyncIterator[bytes], *, chunked: bool) -> None:
        assert self.transport is not None
        sent_whole = False
        try:
            async for chunk in body:
                if self._head is not None and self._head.done():
                    break  # the replica answered before the body was sent: stop sending
                if self.lost:
                    raise self._error or UpstreamError("the replica closed the connection")
                if chunk:
                    self.transport.write(
                        b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                    )
                if self._writable is not None:  # the replica stopped reading the body
                    async with asyncio.timeout(self._idle_timeout):
                        await self._writable
            else:
                sent_whole = True
                if chunked:
                    self.transport.write(b"0\r\n\r\n")
        finally:
            if not sent_whole:
                self._clean = False  # a request cut short leaves the replica mid-body

    def take(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._held = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        while True:
            data = self.take()
            if data or self._complete:
                return data
            if self._error is not None:
                raise self._error
            waiter = self._loop.create_future()
            self._waiter = waiter
            async with asyncio.timeout(self._idle_timeout):
                await waiter

    def complete(self) -> bool:
        return self._complete

    def drained(self) -> bool:
        return self._complete and not self._chunks

    def finish(self) -> None:
        head, self._head = self._head, None
        if head is not None and head.done() and not head.cancelled():
            head.exception()  # retrieved: a failure already answered needs no log
        if (
            self._complete
            and self._clean
            and not self._chunks
            and self.usable()
            and self.transport is not None
            and not self.transport.get_write_buffer_size()
        ):
            self._reset()
            self._pool.put(self)
        else:
            self._close()


class UpstreamPool:
    """Keep-alive connections to replicas, an idle list per replica address."""

    def __init__(
        self,
        *,
        connect_timeout_sec: float,
        idle_timeout_sec: float,
        keepalive_sec: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout_sec = idle_timeout_sec
        self._connect_timeout_sec = connect_timeout_sec
        self._keepalive_sec = keepalive_sec
        self._clock = clock
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self._reaper: asyncio.TimerHandle | None = None

    def origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            if len(self._origins) >= _ORIGINS_KEPT:  # replicas come and go: start afresh
                self._origins.clear()
            origin = self._origins[url] = Origin.parse(url)
        return origin

    async def request(
        self,
        *,
        url: str,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
    ) -> UpstreamResponse:
        """Send ``method`` ``target`` (a path under the replica URL ``url``) and return
        once the response's headers are in. ``length`` is the body's size when known; a
        streamed body of unknown size is sent chunked."""
        if method == "HEAD":  # its response's length would describe a body never sent
            raise ValueError("HEAD is not relayed")
        origin = self.origin(url)
        if _BAD_TARGET.search(target):
            raise ValueError(f"request target {target!r} holds a space or control character")
        chunked = body is not None and not isinstance(body, bytes) and length is None
        lines = [f"{method} {origin.prefix}{target} HTTP/1.1", f"Host: {origin.authority}"]
        for name, value in headers:
            if _BAD_VALUE.search(value) or _BAD_NAME.search(name) or not name:
                raise ValueError(f"header {name!r} holds a line break or is no field name")
            lines.append(f"{name}: {value}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif body is not None or method in ("POST", "PUT", "PATCH"):
            size = len(body) if isinstance(body, bytes) else length
            lines.append(f"Content-Length: {size or 0}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        conn = self._idle_connection(origin) or await self._connect(origin)
        try:
            return await conn.send(head, body, chunked=chunked)
        except BaseException:
            conn.finish()
            raise

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_kept = self._clock() - self._keepalive_sec
        while idle:
            conn = idle.pop()
            if conn.idle_since >= oldest_kept and conn.usable():
                return conn
            conn.finish()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout_sec):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port, ssl=context
                )
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.authority}: {exc}") from exc
        return conn

    def put(self, conn: _Connection) -> None:
        if self._closed:
            conn.finish()
            return
        conn.idle_since = self._clock()
        idle = self._idle.setdefault(conn.origin, [])
        oldest_kept = conn.idle_since - self._keepalive_sec
        while idle and idle[0].idle_since < oldest_kept:  # the oldest are at the front
            idle.pop(0).finish()
        idle.append(conn)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self._keepalive_sec, self._reap)

    def _reap(self) -> None:
        """Close the connections idle past ``keepalive_sec``; come back while any is left."""
        self._reaper = None
        now = self._clock()
        oldest_kept = now - self._keepalive_sec
        first = now
        for origin, idle in list(self._idle.items()):
            while idle and idle[0].idle_since < oldest_kept:
                idle.pop(0).finish()
            if idle:
                first = min(first, idle[0].idle_since)
            else:
                del self._idle[origin]
        if self._idle and not self._closed:
            delay = max(first + self._keepalive_sec - now, 0.0) + 0.001
            self._reaper = asyncio.get_running_loop().call_later(delay, self._reap)

    def forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle is not None:
            if conn in idle:
                idle.remove(conn)
            if not idle:  # a replica gone for good leaves no entry behind
                del self._idle[conn.origin]

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        """Close the idle connections (those in use close when their response does)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        closing = [conn for idle in self._idle.values() for conn in idle]
        self._idle.clear()
        for conn in closing:
            conn.finish()
        await asyncio.gather(*(conn.gone for conn in closing))
