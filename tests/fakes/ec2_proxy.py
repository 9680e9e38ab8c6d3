"""A 127.0.0.1 reverse proxy in front of moto's EC2 server, adding what moto lacks.

moto ignores ``RunInstances``' ``ClientToken``, never runs out of capacity, never loses
an answer and shows a new instance at once. Real EC2 does all of these, so the proxy
adds them:

* **ClientToken idempotency, kept at creation.** The first ``RunInstances`` with a token
  that creates an instance records token -> answer the moment moto created it, before
  the answer is sent (or lost); a repeat gets that answer, never a second machine.
* **Injected faults** (:meth:`Ec2Proxy.fail`, :meth:`Ec2Proxy.inject`): EC2 error
  documents (capacity, quota, throttling, 5xx), a **lost** answer (the request reaches
  moto and takes effect, then the connection closes with no answer) and a **timeout**
  (the same, after holding the connection ``hang_sec``). Each rule applies to chosen
  actions, a number of times or with a probability.
* **Eventual consistency** (``hide_new_sec``): an instance created through the proxy is
  missing from ``DescribeInstances`` (filtered or by id: ``InvalidInstanceID.NotFound``)
  and from ``TerminateInstances`` for that long after ``RunInstances`` answered, as EC2
  answers for a while after a launch.
"""

from __future__ import annotations

import http.client
import random
import re
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs

Ec2Failure = Literal["capacity", "quota", "throttle", "server_error", "lost", "timeout"]

_ERRORS: dict[str, tuple[int, str, str]] = {
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
    "server_error": (500, "InternalError", "An internal error has occurred."),
}
_TAKES_EFFECT = frozenset({"lost", "timeout"})
"""Faults where the request reaches moto (and so takes effect) before the answer fails."""

_INSTANCE_ID = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")


@dataclass(slots=True)
class _Cached:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    drop: bool = False
    """Close the connection without answering (the answer was lost)."""


@dataclass(slots=True)
class FaultRule:
    """Fail matching calls with ``fault``: ``times`` more (``None``: no limit), each with
    ``probability``; ``actions`` names the EC2 actions (``None``: every action)."""

    fault: Ec2Failure
    actions: frozenset[str] | None = frozenset({"RunInstances"})
    times: int | None = None
    probability: float = 1.0


@dataclass(slots=True)
class ProxyCounts:
    """What the proxy did, for reports."""

    calls: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    hidden: int = 0
    token_repeats: int = 0


class Ec2Proxy:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is the endpoint to use."""

    def __init__(
        self,
        *,
        upstream_host: str,
        upstream_port: int,
        hang_sec: float = 2.0,
        seed: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.hang_sec = hang_sec
        self.hide_new_sec = 0.0
        """Eventual consistency: how long a new instance stays invisible."""
        self.run_instances_calls = 0
        self.counts = ProxyCounts()
        self._rules: list[FaultRule] = []
        self._random = random.Random(seed)
        self._tokens: dict[str, _Cached] = {}
        self._created: dict[str, float] = {}
        self.placement_groups: dict[str, str] = {}
        """Placement groups by name, with their strategy (moto has none; kept here)."""
        self.instance_placement_group: dict[str, str] = {}
        """The placement group each instance was launched into, by instance id."""
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail(self, failure: Ec2Failure | None, *, times: int | None = None) -> None:
        """Fail ``RunInstances`` with ``failure`` (``times`` more, or always); ``None``
        clears every rule."""
        with self._lock:
            self._rules = [] if failure is None else [FaultRule(failure, times=times)]

    def inject(self, rule: FaultRule) -> None:
        """Add a fault rule beside the others."""
        with self._lock:
            self._rules.append(rule)

    def clear_faults(self) -> None:
        with self._lock:
            self._rules = []

    def hidden_ids(self) -> set[str]:
        """Instances created through the proxy that EC2 would not show yet."""
        with self._lock:
            return self._hidden_locked()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # The parts.

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Cached:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return _Cached(response.status, response.getheaders(), response.read())
        finally:
            connection.close()

    def _hidden_locked(self) -> set[str]:
        if self.hide_new_sec <= 0:
            return set()
        now = time.monotonic()
        return {i for i, at in self._created.items() if now - at < self.hide_new_sec}

    def _fault_for(self, action: str) -> Ec2Failure | None:
        with self._lock:
            for rule in self._rules:
                if rule.actions is not None and action not in rule.actions:
                    continue
                if rule.times is not None and rule.times <= 0:
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                self.counts.faults[rule.fault] = self.counts.faults.get(rule.fault, 0) + 1
                return rule.fault
        return None

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Cached:
        form = parse_qs(body.decode(errors="replace")) if method == "POST" else {}
        action = form.get("Action", [""])[0]
        with self._lock:
            self.counts.calls[action] = self.counts.calls.get(action, 0) + 1
            if action == "RunInstances":
                self.run_instances_calls += 1
        fault = self._fault_for(action)
        if fault is not None and fault not in _TAKES_EFFECT:
            return _error(*_ERRORS[fault])
        if action == "CreatePlacementGroup":
            result = self._create_placement_group(form)
        elif action == "DescribePlacementGroups":
            result = self._describe_placement_groups(form)
        elif action == "RunInstances":
            result = self._run_instances(method, path, headers, body, form)
        elif action in ("DescribeInstances", "TerminateInstances"):
            result = self._consistent(action, method, path, headers, body, form)
        else:
            result = self._forward(method, path, headers, body)
        if fault is not None:
            if fault == "timeout":
                time.sleep(self.hang_sec)
            return _Cached(0, [], b"", drop=True)
        return result

    def _create_placement_group(self, form: dict[str, list[str]]) -> _Cached:
        name = form.get("GroupName", [""])[0]
        with self._lock:
            if name in self.placement_groups:
                return _error(400, "InvalidPlacementGroup.Duplicate", f"{name} exists")
            self.placement_groups[name] = form.get("Strategy", [""])[0]
        return _Cached(200, [("Content-Type", "text/xml")], _ok("CreatePlacementGroup"))

    def _describe_placement_groups(self, form: dict[str, list[str]]) -> _Cached:
        names = [v[0] for k, v in form.items() if k.startswith("GroupName.")]
        with self._lock:
            found = {n: s for n, s in self.placement_groups.items() if not names or n in names}
        items = "".join(
            f"<item><groupName>{n}</groupName><strategy>{s}</strategy>"
            "<state>available</state></item>"
            for n, s in found.items()
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<DescribePlacementGroupsResponse>'
            f"<requestId>0000</requestId><placementGroupSet>{items}</placementGroupSet>"
            "</DescribePlacementGroupsResponse>"
        ).encode()
        return _Cached(200, [("Content-Type", "text/xml")], body)

    def _run_instances(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        form: dict[str, list[str]],
    ) -> _Cached:
        token = form.get("ClientToken", [""])[0]
        with self._lock:  # one creation per token, even for concurrent repeats
            if token and token in self._tokens:
                self.counts.token_repeats += 1
                return self._tokens[token]
            response = self._forward(method, path, headers, body)
            if response.status == 200:
                now = time.monotonic()
                group = form.get("Placement.GroupName", [""])[0]
                for raw in _INSTANCE_ID.findall(response.body):
                    self._created[raw.decode()] = now
                    if group:
                        self.instance_placement_group[raw.decode()] = group
                if token:
                    self._tokens[token] = response  # kept at creation, answered or not
            return response

    def _consistent(
        self,
        action: str,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        form: dict[str, list[str]],
    ) -> _Cached:
        hidden = self.hidden_ids()
        named = [v[0] for k, v in form.items() if k.startswith("InstanceId.")]
        unseen = [i for i in named if i in hidden]
        if unseen:
            with self._lock:
                self.counts.hidden += 1
            return _error(
                400,
                "InvalidInstanceID.NotFound",
                f"The instance ID '{unseen[0]}' does not exist",
            )
        response = self._forward(method, path, headers, body)
        if action != "DescribeInstances" or not hidden or response.status != 200:
            return response
        stripped, removed = _without_instances(response.body, hidden)
        if removed:
            with self._lock:
                self.counts.hidden += 1
        return _Cached(response.status, response.headers, stripped)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                result = proxy._handle(self.command, self.path, headers, body)
                if result.drop:
                    self.close_connection = True
                    return
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


class _QuietServer(ThreadingHTTPServer):
    """A client that vanished mid-request (a controller SIGKILLed) is not news."""

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


def _ok(action: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response><requestId>0000</requestId>'
        f"<return>true</return></{action}Response>"
    ).encode()


def _error(status: int, code: str, message: str) -> _Cached:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
        "</Error></Errors><RequestID>0000-injected</RequestID></Response>"
    ).encode()
    return _Cached(status, [("Content-Type", "text/xml")], body)


def _without_instances(body: bytes, hidden: set[str]) -> tuple[bytes, int]:
    """A DescribeInstances answer without the ``hidden`` instances (and reservations left
    empty), and how many were removed. Namespace-agnostic: elements match by local name."""
    root = ET.fromstring(body)
    namespace = root.tag[1 : root.tag.index("}")] if root.tag.startswith("{") else ""
    if namespace:
        ET.register_namespace("", namespace)
    removed = 0
    reservations = _child(root, "reservationSet")
    if reservations is None:
        return body, 0
    for reservation in list(reservations):
        instances = _child(reservation, "instancesSet")
        if instances is None:
            continue
        for item in list(instances):
            instance_id = _child(item, "instanceId")
            if instance_id is not None and (instance_id.text or "") in hidden:
                instances.remove(item)
                removed += 1
        if len(instances) == 0:
            reservations.remove(reservation)
    if not removed:
        return body, 0
    return ET.tostring(root, encoding="utf-8", xml_declaration=True), removed


def _child(element: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in element if c.tag.rsplit("}", 1)[-1] == name), None)
