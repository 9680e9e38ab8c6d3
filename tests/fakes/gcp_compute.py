"""A fake of the GCE Compute REST API on 127.0.0.1, for what ``providers/gcp.py`` calls.

Serves instances insert/get/delete/list/aggregatedList (with ``labels.KEY = "VALUE"``
filters), zone operations get and aggregated operations list. It honours ``requestId``
(the same id returns the same operation and creates nothing new), refuses a taken name
with 409, and lets tests inject failures and preempt spot VMs:

* ``fail_inserts("capacity" | "quota" | "unavailable" | "throttle" | None)``: capacity and
  quota fail the insert *operation* (as GCE does, after accepting the request); 503 and
  429 fail the HTTP request itself.
* ``preempt(zone, name)``: deletes the spot VM and records a
  ``compute.instances.preempted`` operation.
* ``settle()``: every instance that is provisioning or staging becomes ``RUNNING``, and
  every one stopping (suspending) becomes ``TERMINATED`` (``SUSPENDED``).
* ``instances/{name}/stop``: ``RUNNING`` becomes ``STOPPING`` (``TERMINATED`` on
  ``settle``); a VM already stopping or stopped is left as it is. The operation is
  done at once (GCE reports it done when the VM is down; nothing waits on it here).
* ``instances/{name}/start`` (``TERMINATED``) and ``instances/{name}/resume``
  (``SUSPENDED``): the VM becomes ``STAGING`` through an operation that reports
  ``RUNNING`` first; a start of a VM that is not stopped is a no-op, as on GCE; a
  resume of one not suspended is refused with 400. ``fail_starts("capacity")`` fails
  the start operation with ``ZONE_RESOURCE_POOL_EXHAUSTED`` and leaves the VM stopped.
* ``suspend(zone, name)``: the VM is ``SUSPENDED``, as ``instances.suspend`` leaves it.
* ``settle_every(seconds)``: :meth:`settle` runs on its own every ``seconds`` until
  :meth:`stop`, for a controller in another process; while ``hold_stops`` is set a VM
  stopping stays ``STOPPING``.

``POST /token`` answers an OAuth 2.0 token request (a service account's signed JWT
grant, as ``google.oauth2.service_account`` sends it to its key file's ``token_uri``)
with an access token; ``authorizations`` records the ``Authorization`` header of every
API call, so a test can see the calls were made with it.

Firewall rules (``global/firewalls``: insert, get, patch, delete, list) change through
global operations (``global/operations``), which also report ``RUNNING`` first;
``firewall_calls`` records each insert, patch and delete.

Resource policies (``regions/{region}/resourcePolicies``: insert, get) are created
through region operations (``regions/{region}/operations``, ``RUNNING`` first);
``resource_policies`` holds them by region and name, and an instance keeps the
``resourcePolicies`` it was inserted with. An instance naming a policy that does not
exist (or lies in another region) is refused with 400, as GCE does.

Insert operations report ``RUNNING`` on the first read and ``DONE`` after, so clients
must poll.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

GceFailure = Literal["capacity", "quota", "unavailable", "throttle"]

_PREFIX = "/compute/v1/projects/"
_OPERATION_FAILURES = {
    "capacity": (
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone does not have enough resources available to fulfill the request.",
    ),
    "quota": ("QUOTA_EXCEEDED", "Quota 'NVIDIA_A100_GPUS' exceeded. Limit: 0.0 in region."),
}
_HTTP_FAILURES = {
    "unavailable": (503, "backendError", "The service is currently unavailable."),
    "throttle": (429, "rateLimitExceeded", "Rate Limit Exceeded"),
}


def _now() -> str:
    return datetime.now(tz=UTC).isoformat()


def _matches(resource: dict[str, Any], filter_text: str) -> bool:
    for path, value in re.findall(r'([A-Za-z0-9_.\-]+)\s*=\s*"([^"]*)"', filter_text):
        current: Any = resource
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if current != value:
            return False
    return True


class FakeGceServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``endpoint`` is the api_endpoint."""

    def __init__(self) -> None:
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.insert_requests = 0
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.firewall_calls: list[tuple[str, str]] = []
        self.global_operations: dict[str, dict[str, Any]] = {}
        self.resource_policies: dict[tuple[str, str], dict[str, Any]] = {}
        self.policy_inserts = 0
        self._by_request_id: dict[str, str] = {}
        self._failure: GceFailure | None = None
        self._start_failure: GceFailure | None = None
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self.hold_stops = False
        self.authorizations: set[str] = set()
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # Levers for tests.

    def fail_inserts(self, failure: GceFailure | None) -> None:
        with self._lock:
            self._failure = failure

    def fail_starts(self, failure: GceFailure | None) -> None:
        with self._lock:
            self._start_failure = failure

    def settle(self) -> None:
        with self._lock:
            for instance in self.instances.values():
                if instance["status"] in ("PROVISIONING", "STAGING"):
                    instance["status"] = "RUNNING"
                elif instance["status"] == "STOPPING" and not self.hold_stops:
                    instance["status"] = "TERMINATED"
                elif instance["status"] == "SUSPENDING":
                    instance["status"] = "SUSPENDED"

    def settle_every(self, seconds: float) -> None:
        def settling() -> None:
            while not self._stopped.wait(seconds):
                self.settle()

        threading.Thread(target=settling, daemon=True, name="gce-settle").start()

    def suspend(self, zone: str, name: str) -> None:
        with self._lock:
            self.instances[(zone, name)]["status"] = "SUSPENDED"

    def preempt(self, zone: str, name: str) -> None:
        with self._lock:
            instance = self.instances.pop((zone, name))
            if instance.get("scheduling", {}).get("provisioningModel") != "SPOT":
                raise ValueError(f"{zone}/{name} is not a spot VM")
            self._operation(
                project=instance["_project"],
                zone=zone,
                kind="compute.instances.preempted",
                target=instance["selfLink"],
                done=True,
                status_message="Instance was preempted.",
            )

    # The API.

    def _operation(
        self,
        *,
        project: str,
        zone: str,
        kind: str,
        target: str,
        done: bool,
        error: tuple[str, str] | None = None,
        status_message: str = "",
    ) -> dict[str, Any]:
        number = next(self._ids)
        name = f"operation-{number}"
        operation: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(number),
            "name": name,
            "zone": f"{self.endpoint}{_PREFIX}{project}/zones/{zone}",
            "operationType": kind,
            "targetLink": target,
            "status": "DONE" if done else "RUNNING",
            "progress": 100 if done else 0,
            "insertTime": _now(),
            "selfLink": f"{self.endpoint}{_PREFIX}{project}/zones/{zone}/operations/{name}",
        }
        if status_message:
            operation["statusMessage"] = status_message
        if error is not None:
            operation["error"] = {"errors": [{"code": error[0], "message": error[1]}]}
            operation["httpErrorStatusCode"] = 503 if error[0].startswith("ZONE") else 403
        self.operations[name] = operation
        return operation

    def _insert(
        self, project: str, zone: str, body: dict[str, Any], query: dict[str, str]
    ) -> tuple[int, Any]:
        self.insert_requests += 1
        if self._failure in _HTTP_FAILURES:
            return _http_error(*_HTTP_FAILURES[self._failure])
        rid = query.get("requestId")
        if rid and rid in self._by_request_id:
            return 200, self.operations[self._by_request_id[rid]]
        name = body["name"]
        link = f"{self.endpoint}{_PREFIX}{project}/zones/{zone}/instances/{name}"
        for policy in body.get("resourcePolicies", []):
            region, _, policy_name = policy.rpartition("/regions/")[2].partition(
                "/resourcePolicies/"
            )
            if region != zone.rsplit("-", 1)[0] or (region, policy_name) not in (
                self.resource_policies
            ):
                return _http_error(400, "invalid", f"resource policy {policy} not found")
        if (zone, name) in self.instances:
            return _http_error(409, "alreadyExists", f"The resource '{link}' already exists")
        failure = _OPERATION_FAILURES.get(self._failure or "")
        if failure is None:
            number = next(self._ids)
            self.instances[(zone, name)] = {
                **body,
                "kind": "compute#instance",
                "id": str(number),
                "zone": f"{self.endpoint}{_PREFIX}{project}/zones/{zone}",
                "status": "PROVISIONING",
                "creationTimestamp": _now(),
                "selfLink": link,
                "networkInterfaces": [
                    {
                        **interface,
                        "networkIP": f"10.128.0.{number % 250 + 2}",
                        "accessConfigs": [
                            {**config, "natIP": f"203.0.113.{number % 250 + 2}"}
                            for config in interface.get("accessConfigs", [])
                        ],
                    }
                    for interface in body.get("networkInterfaces", [])
                ],
                "_project": project,
            }
        operation = self._operation(
            project=project, zone=zone, kind="insert", target=link, done=False, error=failure
        )
        if rid:
            self._by_request_id[rid] = operation["name"]
        return 200, operation

    def _power(self, project: str, zone: str, name: str, verb: str) -> tuple[int, Any]:
        """``stop``, ``start`` or ``resume`` an instance, as GCE moves its status."""
        instance = self.instances.get((zone, name))
        if instance is None:
            return _http_error(404, "notFound", f"instance {name} not found")
        status = instance["status"]
        if verb == "resume" and status != "SUSPENDED":
            return _http_error(400, "invalid", f"instance {name} is {status}, not SUSPENDED")
        failure = None
        if verb == "stop":
            if status not in ("STOPPING", "TERMINATED", "SUSPENDED"):
                instance["status"] = "STOPPING"
        elif status in ("TERMINATED", "SUSPENDED"):
            failure = _OPERATION_FAILURES.get(self._start_failure or "")
            if failure is None:
                instance["status"] = "STAGING"
        return 200, self._operation(
            project=project,
            zone=zone,
            kind=verb,
            target=instance["selfLink"],
            done=verb == "stop",
            error=failure,
        )

    def _global_operation(self, project: str, kind: str, target: str) -> dict[str, Any]:
        number = next(self._ids)
        name = f"operation-g{number}"
        operation: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(number),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "progress": 0,
            "insertTime": _now(),
            "selfLink": f"{self.endpoint}{_PREFIX}{project}/global/operations/{name}",
        }
        self.global_operations[name] = operation
        return operation

    def _policy_route(
        self,
        method: str,
        project: str,
        region: str,
        rest: list[str],
        body: dict[str, Any],
        query: dict[str, str],
    ) -> tuple[int, Any]:
        base = f"{self.endpoint}{_PREFIX}{project}/regions/{region}/resourcePolicies"
        match rest, method:
            case [], "POST":
                self.policy_inserts += 1
                rid = query.get("requestId")
                if rid and rid in self._by_request_id:
                    return 200, self.global_operations[self._by_request_id[rid]]
                name = body["name"]
                if (region, name) in self.resource_policies:
                    return _http_error(
                        409, "alreadyExists", f"The resource '{base}/{name}' already exists"
                    )
                self.resource_policies[(region, name)] = {
                    **body,
                    "kind": "compute#resourcePolicy",
                    "region": f"{self.endpoint}{_PREFIX}{project}/regions/{region}",
                    "selfLink": f"{base}/{name}",
                    "status": "READY",
                }
                operation = self._global_operation(project, "insert", f"{base}/{name}")
                operation["region"] = f"{self.endpoint}{_PREFIX}{project}/regions/{region}"
                if rid:
                    self._by_request_id[rid] = operation["name"]
                return 200, operation
            case [name], "GET":
                found = self.resource_policies.get((region, name))
                if found is None:
                    return _http_error(404, "notFound", f"resource policy {name} not found")
                return 200, found
        return _http_error(404, "notFound", f"no route {method} resourcePolicies/{rest}")

    def _firewall_route(
        self,
        method: str,
        project: str,
        rest: list[str],
        body: dict[str, Any],
        query: dict[str, str],
    ) -> tuple[int, Any]:
        base = f"{self.endpoint}{_PREFIX}{project}/global/firewalls"
        match rest, method:
            case [], "GET":
                return 200, {"kind": "compute#firewallList", "items": list(self.firewalls.values())}
            case [], "POST":
                rid = query.get("requestId")
                if rid and rid in self._by_request_id:
                    return 200, self.global_operations[self._by_request_id[rid]]
                name = body["name"]
                if name in self.firewalls:
                    return _http_error(
                        409, "alreadyExists", f"The resource '{base}/{name}' already exists"
                    )
                self.firewall_calls.append(("insert", name))
                self.firewalls[name] = {
                    **body,
                    "kind": "compute#firewall",
                    "selfLink": f"{base}/{name}",
                }
                operation = self._global_operation(project, "insert", f"{base}/{name}")
                if rid:
                    self._by_request_id[rid] = operation["name"]
                return 200, operation
            case [name], "GET":
                if name not in self.firewalls:
                    return _http_error(404, "notFound", f"firewall {name} not found")
                return 200, self.firewalls[name]
            case [name], "PATCH":
                if name not in self.firewalls:
                    return _http_error(404, "notFound", f"firewall {name} not found")
                self.firewall_calls.append(("patch", name))
                self.firewalls[name] = {**self.firewalls[name], **body}
                return 200, self._global_operation(project, "patch", f"{base}/{name}")
            case [name], "DELETE":
                if self.firewalls.pop(name, None) is None:
                    return _http_error(404, "notFound", f"firewall {name} not found")
                self.firewall_calls.append(("delete", name))
                return 200, self._global_operation(project, "delete", f"{base}/{name}")
        return _http_error(404, "notFound", f"no route {method} firewalls/{'/'.join(rest)}")

    def _route(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        if not path.startswith(_PREFIX):
            return _http_error(404, "notFound", f"no route {path}")
        parts = path[len(_PREFIX) :].split("/")
        project = parts[0]
        rest = parts[1:]
        with self._lock:
            if rest[:2] == ["global", "firewalls"]:
                return self._firewall_route(method, project, rest[2:], body, query)
            if rest[:1] == ["regions"] and rest[2:3] == ["resourcePolicies"]:
                return self._policy_route(method, project, rest[1], rest[3:], body, query)
            match rest, method:
                case (["global", "operations", name], "GET") | (
                    ["regions", _, "operations", name],
                    "GET",
                ):
                    found_op = self.global_operations.get(name)
                    if found_op is None:
                        return _http_error(404, "notFound", f"operation {name} not found")
                    reply = dict(found_op)
                    found_op["status"] = "DONE"
                    found_op["progress"] = 100
                    return 200, reply
                case ["zones", zone, "instances"], "POST":
                    return self._insert(project, zone, body, query)
                case ["zones", zone, "instances"], "GET":
                    items = [
                        _public(i)
                        for (z, _), i in self.instances.items()
                        if z == zone and _matches(i, query.get("filter", ""))
                    ]
                    return 200, {"kind": "compute#instanceList", "items": items}
                case ["aggregated", "instances"], "GET":
                    scoped: dict[str, Any] = {}
                    for (zone, _), listed in self.instances.items():
                        if _matches(listed, query.get("filter", "")):
                            entry = scoped.setdefault(f"zones/{zone}", {"instances": []})
                            entry["instances"].append(_public(listed))
                    return 200, {"kind": "compute#instanceAggregatedList", "items": scoped}
                case ["zones", zone, "instances", name], "GET":
                    found = self.instances.get((zone, name))
                    if found is None:
                        return _http_error(404, "notFound", f"instance {name} not found")
                    return 200, _public(found)
                case ["zones", zone, "instances", name], "DELETE":
                    deleted = self.instances.pop((zone, name), None)
                    if deleted is None:
                        return _http_error(404, "notFound", f"instance {name} not found")
                    return 200, self._operation(
                        project=project,
                        zone=zone,
                        kind="delete",
                        target=deleted["selfLink"],
                        done=True,
                    )
                case ["zones", zone, "instances", name, verb], "POST" if verb in (
                    "stop",
                    "start",
                    "resume",
                ):
                    return self._power(project, zone, name, verb)
                case ["zones", zone, "operations", name], "GET":
                    operation = self.operations.get(name)
                    if operation is None:
                        return _http_error(404, "notFound", f"operation {name} not found")
                    reply = dict(operation)
                    operation["status"] = "DONE"  # the next read sees it finished
                    operation["progress"] = 100
                    return 200, reply
                case ["aggregated", "operations"], "GET":
                    scoped = {}
                    for operation in self.operations.values():
                        if _matches(operation, query.get("filter", "")):
                            zone = operation["zone"].rsplit("/", 1)[-1]
                            entry = scoped.setdefault(f"zones/{zone}", {"operations": []})
                            entry["operations"].append(operation)
                    return 200, {"kind": "compute#operationAggregatedList", "items": scoped}
        return _http_error(404, "notFound", f"no route {method} {path}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if url.path == "/token" and self.command == "POST":
                    status, payload = (
                        200,
                        {
                            "access_token": "fake-gce-token",
                            "token_type": "Bearer",
                            "expires_in": 3600,
                        },
                    )
                else:
                    with server._lock:
                        server.authorizations.add(self.headers.get("Authorization") or "")
                    body = json.loads(raw) if raw else {}
                    status, payload = server._route(self.command, url.path, query, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                # No keep-alive: a handler thread waiting on an idle client socket would
                # outlive the server.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _public(instance: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in instance.items() if not k.startswith("_")}


def _http_error(status: int, reason: str, message: str) -> tuple[int, Any]:
    return status, {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
