"""Forwarding one request to a replica and its response back, streamed both ways.

Response chunks are written to the caller as they arrive (SSE stays unbuffered). The
caller's data key never reaches the replica: ``Authorization`` is replaced by the
replica's own engine key. Hop-by-hop headers (RFC 9110 §7.6.1, and any the
``Connection`` header names) are dropped in both directions. A replica that refuses the
connection is skipped and the request retried on another: nothing reached it. Any other
upstream failure is answered, never retried. A replica dying mid-stream ends the
caller's response with an error event (SSE) and a truncated body, so clients see an
error instead of hanging; a caller hanging up cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import tokens
from gateway.dispatch import Dispatcher, Lease
from gateway.errors import GatewayError, error_body
from gateway.prefix import hashes_prompt, json_object, model_named, object_blocks
from gateway.routes import WorkloadRoute
from gateway.signals import Signals
from gateway.upstream import ConnectFailed, UpstreamError, UpstreamPool, UpstreamResponse

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date"}

#: Bodies up to this size are read whole: cheaper than streaming and safe to retry.
_SMALL_BODY = 256 * 1024
_JSON = "application/json"
_CHUNK = 64 * 1024


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_body_bytes: int
    idle_timeout_sec: float
    connect_timeout_sec: float


def _drop_set(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], base: frozenset[str]
) -> frozenset[str]:
    """``base`` plus whatever the ``Connection`` header names as hop-by-hop."""
    named = headers.getall("Connection", ())
    if not named:
        return base
    tokens = {t.strip().lower() for value in named for t in value.split(",")}
    tokens.discard("")
    return base | tokens


def forwarded_headers(
    incoming: CIMultiDictProxy[str], *, engine_key: str | None
) -> list[tuple[str, str]]:
    """The caller's headers as the replica gets them, in order."""
    drop = _drop_set(incoming, _REQUEST_DROP)
    out = [(k, v) for k, v in incoming.items() if k.lower() not in drop]
    if engine_key:
        out.append(("Authorization", f"Bearer {engine_key}"))
    return out


def response_headers(upstream: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    drop = _drop_set(upstream, _RESPONSE_DROP)
    return CIMultiDict([(k, v) for k, v in upstream.items() if k.lower() not in drop])


class _RelayedResponse(web.StreamResponse):
    """A streamed response whose headers leave with its first body bytes.

    ``prepare()`` only serializes the headers; the first ``write()`` (or ``write_eof()``)
    sends them and the body in one segment, and the relay flushes them on their own
    (``send_headers()``) when no body byte is at hand yet, so the caller never waits for
    headers the replica already sent.
    """

    _send_headers_immediately = False


class Forwarder:
    """Sends requests to replicas over one pool of keep-alive connections."""

    def __init__(
        self,
        *,
        pool: UpstreamPool,
        dispatcher: Dispatcher,
        signals: Signals,
        limits: ProxyLimits,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._dispatcher = dispatcher
        self._signals = signals
        self._limits = limits
        self._wall_clock = wall_clock

    async def forward(
        self, request: web.Request, *, route: WorkloadRoute, path: str, arrived: float
    ) -> web.StreamResponse:
        """Proxy ``request`` to ``/v1/{path}`` on a replica of ``route``."""
        length = request.content_length
        if length is not None and length > self._limits.max_body_bytes:
            raise _too_large(self._limits.max_body_bytes)
        body: bytes | AsyncIterator[bytes] | None
        # A workload with adapters routes on the body's ``model``: its JSON is read whole.
        whole = length is not None and (
            length <= _SMALL_BODY or (bool(route.adapters) and request.content_type == _JSON)
        )
        if whole:
            body = await request.read() if length else None
        elif request.body_exists:
            body = self._stream_body(request)
        else:
            body = None
        # The body is parsed once, for its prompt's blocks and the adapter it names.
        read = body if isinstance(body, bytes) else None
        hashed = hashes_prompt(path, read)
        data = json_object(read) if hashed or route.adapters else None
        adapter = route.adapter(model_named(data)) if route.adapters else None
        tried: list[str] = []
        prompt_tokens = tokens.routing_estimate(length)
        blocks = object_blocks(data) if hashed else ()
        while True:
            lease = await self._dispatcher.acquire(
                route.ref,
                excluded=tried,
                prompt_tokens=prompt_tokens,
                blocks=blocks,
                adapter=None if adapter is None else adapter.name,
            )
            try:
                upstream = await self._open(
                    request, lease=lease, path=path, body=body, length=length
                )
            except ConnectFailed:
                self._dispatcher.refused(lease)
                self._dispatcher.release(lease)
                tried.append(lease.replica.key)
                continue
            except BaseException:
                self._dispatcher.release(lease)
                raise
            break
        try:
            response, answer = await self._relay(
                request, upstream=upstream, route=route, arrived=arrived, path=path, lease=lease
            )
        finally:
            upstream.close()
            self._dispatcher.release(lease)
        if answer is not None:
            self._record_tokens(
                route, answer=answer, body=body if isinstance(body, bytes) else None, length=length
            )
        return response

    async def _open(
        self,
        request: web.Request,
        *,
        lease: Lease,
        path: str,
        body: bytes | AsyncIterator[bytes] | None,
        length: int | None,
    ) -> UpstreamResponse:
        target = f"/v1/{path}"
        query = request.rel_url.raw_query_string  # as the caller encoded it: never decoded
        if query:
            target = f"{target}?{query}"
        try:
            return await self._pool.request(
                url=lease.replica.url,
                method=request.method,
                target=target,
                headers=forwarded_headers(request.headers, engine_key=lease.replica.engine_key),
                body=body,
                length=length if body is not None else None,
            )
        except BodyTooLarge:
            raise _too_large(self._limits.max_body_bytes) from None
        except ConnectFailed:
            raise
        except TimeoutError:
            raise GatewayError(
                504, "the replica did not answer in time", code="upstream_timeout"
            ) from None
        except (UpstreamError, OSError) as exc:
            raise GatewayError(
                502, f"the replica failed before answering: {exc}", code="upstream_error"
            ) from None

    async def _stream_body(self, request: web.Request) -> AsyncIterator[bytes]:
        sent = 0
        while True:
            async with asyncio.timeout(self._limits.idle_timeout_sec):
                chunk = await request.content.readany()
            if not chunk:
                return
            sent += len(chunk)
            if sent > self._limits.max_body_bytes:
                raise BodyTooLarge
            yield chunk

    async def _relay(
        self,
        request: web.Request,
        *,
        upstream: UpstreamResponse,
        route: WorkloadRoute,
        arrived: float,
        path: str,
        lease: Lease,
    ) -> tuple[web.StreamResponse, tokens.Answer | None]:
        """Copy the replica's answer to the caller, each chunk as soon as it arrives; and
        what the token count needs of a complete answer on a counted route.

        Write calls are the relay's main cost, so they are coalesced where that delays
        nothing: headers go out with body bytes that came in the same read as the
        replica's headers, and the last chunk goes out with the end of the body when the
        replica's end had already arrived too.
        """
        response = _RelayedResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(response_headers(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        measure = upstream.status < 400
        kind = tokens.COUNTED_ROUTES.get(path) if measure else None
        stream = kind is not None and upstream.content_type == "text/event-stream"
        events = 0
        previous = b""
        writer = await response.prepare(request)
        assert writer is not None
        try:
            chunk = upstream.read_nowait()
            if not chunk and not upstream.at_eof():
                writer.send_headers()
                chunk = await upstream.read()
            self._dispatcher.prefilled(lease)
            if measure:  # the first body byte, or the end of an empty body
                generated = kind in ("chat", "text")
                self._record_first_byte(route, arrived, one_piece=generated and not stream)
            while chunk:
                if upstream.at_eof():
                    break
                await response.write(chunk)
                if stream:
                    events += chunk.count(b"data:")
                previous = chunk
                chunk = await upstream.read()
        except (UpstreamError, TimeoutError) as exc:
            await self._abort(request, response, writer, exc)
            return response, None
        await response.write_eof(chunk)
        if kind is None:
            return response, None
        if stream:
            events += chunk.count(b"data:")
        tail = tokens.tail_of(previous, chunk)
        return response, tokens.Answer(kind=kind, stream=stream, events=events, tail=tail)

    def _record_tokens(
        self, route: WorkloadRoute, *, answer: tokens.Answer, body: bytes | None, length: int | None
    ) -> None:
        counts = tokens.token_counts(answer, body=body, body_length=length)
        if counts is not None:
            self._signals.answered(
                route.ref,
                now=self._wall_clock(),
                input_tokens=counts[0],
                output_tokens=counts[1],
                cached_tokens=min(tokens.cached_tokens(answer), counts[0]),
            )

    def _record_first_byte(self, route: WorkloadRoute, arrived: float, *, one_piece: bool) -> None:
        """TTFT for a streamed answer or a one-unit answer (embeddings, images); for a
        generation answered in one piece the first byte follows its last token, so it
        is kept as an answered request only (``Signals.unstreamed_answer``)."""
        latency = time.perf_counter() - arrived
        if one_piece:
            self._signals.unstreamed_answer(route.ref, now=self._wall_clock(), latency=latency)
        else:
            self._signals.first_byte(route.ref, now=self._wall_clock(), ttft=latency)

    async def _abort(
        self,
        request: web.Request,
        response: web.StreamResponse,
        writer: AbstractStreamWriter,
        exc: BaseException,
    ) -> None:
        """End a response whose replica failed after its headers arrived."""
        with contextlib.suppress(ConnectionError):
            writer.send_headers()
        if response.content_type == "text/event-stream":
            message = f"the replica failed mid-stream: {type(exc).__name__}"
            event = b"data: " + error_body(502, message, code="upstream_error") + b"\n\n"
            with contextlib.suppress(ConnectionError):
                await response.write(event)
        # Closing without the final chunk tells every HTTP client the body is incomplete.
        if request.transport is not None:
            request.transport.close()


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"request body exceeds the gateway's limit of {limit} bytes",
        code="request_too_large",
    )
