"""A 127.0.0.1 reverse proxy in front of moto's EC2 server, adding what moto lacks.

moto ignores ``RunInstances``' ``ClientToken`` and never runs out of capacity. This proxy
answers a repeated ``ClientToken`` with the first response (as EC2 does), and answers
``RunInstances`` with an EC2 error document while a failure is injected.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs

Ec2Failure = Literal["capacity", "quota", "throttle"]

_FAILURES: dict[Ec2Failure, tuple[int, str, str]] = {
    "capacity": (
        500,
        "InsufficientInstanceCapacity",
        "We currently do not have sufficient capacity in the Availability Zone you requested.",
    ),
    "quota": (
        400,
        "InstanceLimitExceeded",
        "You have requested more instances than your current instance limit allows.",
    ),
    "throttle": (503, "RequestLimitExceeded", "Request limit exceeded."),
}


@dataclass(slots=True)
class _Cached:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Ec2Proxy:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is the endpoint to use."""

    def __init__(self, *, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.failure: Ec2Failure | None = None
        self.failures_left: int | None = None
        """With a failure set: how many more launches fail (``None``: all of them)."""
        self.run_instances_calls = 0
        self._tokens: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail(self, failure: Ec2Failure | None, *, times: int | None = None) -> None:
        with self._lock:
            self.failure = failure
            self.failures_left = times

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Cached:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return _Cached(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def _injected(self) -> _Cached | None:
        if self.failure is None:
            return None
        status, code, message = _FAILURES[self.failure]
        if self.failures_left is not None:
            self.failures_left -= 1
            if self.failures_left <= 0:
                self.failure = None
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
            "</Error></Errors><RequestID>0000-injected</RequestID></Response>"
        ).encode()
        return _Cached(status, [("Content-Type", "text/xml")], body)

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Cached:
        form = parse_qs(body.decode(errors="replace")) if method == "POST" else {}
        if form.get("Action") != ["RunInstances"]:
            return self._forward(method, path, headers, body)
        with self._lock:
            self.run_instances_calls += 1
            injected = self._injected()
            if injected is not None:
                return injected
            token = form.get("ClientToken", [""])[0]
            if token and token in self._tokens:
                return self._tokens[token]
            response = self._forward(method, path, headers, body)
            if token and response.status == 200:
                self._tokens[token] = response
            return response

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                result = proxy._handle(self.command, self.path, headers, body)
                self.send_response(result.status)
                for key, value in result.headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(result.body)))
                self.end_headers()
                self.wfile.write(result.body)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
