"""The API's published contract: every answer the server gives is in its OpenAPI document.

Users generate clients from ``/openapi.json``, so the document describes the error
answers too, not only the successes FastAPI derives from the handlers:

* every ``/v1`` operation documents the error envelope (``Error``) for the statuses it
  can answer: 400 (a body that is not JSON, or not the JSON the operation takes), 401
  (no or a wrong token), 403 (a token of another project, or not an admin's), 404 (no
  such project resource), 409 (a workload ``PUT`` or ``PATCH`` whose body names another
  slug than its path, or whose drift ``on_drift=fail`` refuses; a secret ``POST`` of a
  name already stored, a secret ``DELETE`` of one in use), 410 (a
  boot callback for a launch already terminating), 415 (a workload ``PATCH`` that is not
  a JSON merge patch), 422 (a request that parses but is not valid); the rules are
  :data:`ERRORS` below, by path;
* the workload ``PUT`` documents its body, the workload spec's JSON schema with every
  rule JSON Schema can express (:mod:`autoscaler.api.spec_schema`; the handler reads the
  raw JSON to report every problem at once, so FastAPI cannot see it);
* a method a path does not have answers 405 with ``Allow`` listing every method the path
  has (FastAPI lists only those of the first route that matched the path), and
  FastAPI's own errors (a body that does not parse, a path that does not exist) come in
  the same error envelope as the API's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoscaler.api.errors import error_body
from autoscaler.api.spec_schema import workload_schema
from autoscaler.spec import DEFAULT_MAX_REPLICAS

_REASONS = {
    400: "The body is not JSON, or not the JSON this operation takes.",
    401: "No bearer token, or one the server does not know (or revoked).",
    403: "The token may not do this (another project's, or not an admin's).",
    404: "No such resource.",
    409: "The body's slug names another workload than the path (`slug_mismatch`), or the "
    "stored spec differs and `on_drift` is `fail` (`drift_refused`): nothing changed.",
    410: "The launch is terminating or terminated.",
    413: "The body is larger than the API takes (`MAX_BODY_BYTES`, 1 MiB).",
    415: "A workload `PATCH` takes a JSON merge patch (`application/merge-patch+json`).",
    422: "The request parses but is not valid: `details` lists every problem.",
}

_SECRETS = "/v1/projects/{project}/secrets"
_SECRET_CONFLICT = (
    "A `POST` names a secret already stored (`secret_exists`), or a `DELETE` one that "
    "workloads still refer to (`secret_in_use`, naming them): nothing changed."
)

ERRORS: tuple[tuple[str, frozenset[int]], ...] = (
    ("/v1/projects/{project}/workloads/{slug}", frozenset({400, 401, 403, 404, 409, 413, 422})),
    (_SECRETS, frozenset({400, 401, 403, 404, 409, 413, 422})),
    (_SECRETS + "/", frozenset({400, 401, 403, 404, 409, 413, 422})),  # one secret, by name
    ("/v1/boot/", frozenset({400, 401, 404, 410, 413, 422})),
    ("/v1/workers/", frozenset({400, 401, 404, 413, 422})),
    ("/v1/", frozenset({400, 401, 403, 404, 413, 422})),
)
"""Error statuses by path prefix (the first that matches)."""

_WORKLOAD = "/v1/projects/{project}/workloads/{slug}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "description": "Stable: clients branch on it."},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}


def install(app: FastAPI) -> None:
    """Publish the full contract on ``app`` and answer FastAPI's own errors in it."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = complete(schema, max_replicas=app.state.api.max_replicas)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit)


MAX_BODY_BYTES = 1 << 20
"""The largest request body the management API reads: a workload spec is a few KiB (its
largest field, a chat template, at most 32 KiB), so a body over a MiB is refused with 413
before it is held in memory."""


class BodyLimit:
    """ASGI middleware answering 413 ``too_large`` to a body over :data:`MAX_BODY_BYTES`:
    at once when ``Content-Length`` says so, else as soon as the chunks read pass it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    raise StarletteHTTPException(413, _TOO_LARGE)
            return message

        await self.app(scope, limited, send)


_TOO_LARGE = f"the body is larger than the {MAX_BODY_BYTES} bytes this API takes"


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(error_body("too_large", _TOO_LARGE), status_code=413)
    await response(scope, receive, send)


def _conflicts(path: str, method: str) -> bool:
    """Whether an operation can answer 409 (see :data:`_REASONS` and the secrets')."""
    if path == _WORKLOAD:
        return method in ("put", "patch")
    return path.startswith(_SECRETS) and method in ("post", "delete")


def complete(schema: dict[str, Any], *, max_replicas: int = DEFAULT_MAX_REPLICAS) -> dict[str, Any]:
    """The generated document with error answers and the workload body added (its rules
    from :mod:`autoscaler.api.spec_schema`, ``max_replicas`` the service's maximum)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        statuses = _errors_of(path)
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            patching = path == _WORKLOAD and method == "patch"
            for status in sorted(statuses | ({415} if patching else set())):
                if status == 409 and not _conflicts(path, method):
                    continue
                reason = _REASONS[status]
                if status == 409 and path.startswith(_SECRETS):
                    reason = _SECRET_CONFLICT
                responses.setdefault(
                    str(status),
                    {
                        "description": reason,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    },
                )
    put = schema.get("paths", {}).get(_WORKLOAD, {}).get("put")
    if put is not None:
        spec, definitions = workload_schema(max_replicas=max_replicas)
        for name, definition in definitions.items():
            components.setdefault(name, definition)
        # The path names the workload: a body without ``slug`` takes the path's.
        spec["required"] = [name for name in spec.get("required", []) if name != "slug"]
        components["WorkloadSpec"] = spec
        created = put.get("responses", {}).get("200")
        if created is not None:
            put["responses"].setdefault("201", {**created, "description": "Created"})
        put["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/WorkloadSpec"}}
            },
        }
    patch = schema.get("paths", {}).get(_WORKLOAD, {}).get("patch")
    if patch is not None:
        components["WorkloadPatch"] = workload_patch_schema(components["WorkloadSpec"])
        merge = {"schema": {"$ref": "#/components/schemas/WorkloadPatch"}}
        patch["requestBody"] = {
            "required": True,
            "content": {"application/merge-patch+json": merge, "application/json": merge},
        }
    _anchor_ends(schema)
    return schema


_END = r"(?!\n)$"


def _anchor_ends(node: object) -> None:
    """Every ``pattern`` in the document that ends with ``$`` made to end with
    ``(?!\\n)$``. JSON Schema's patterns are ECMA-262, whose ``$`` is the string's end;
    Python's ``re`` (which most Python validators and generators use) also lets ``$``
    match before a final newline, so ``slug\\n`` would pass for a valid slug there and be
    refused by the server. The guard means the same in both dialects."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                if value.endswith("$") and not value.endswith((_END, "\\$")):
                    node[key] = value[:-1] + _END
            else:
                _anchor_ends(value)
    elif isinstance(node, list):
        for item in node:
            _anchor_ends(item)


def workload_patch_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch of a workload spec: the spec's fields, each its value or
    ``null`` (which removes it); ``execution_policy_config`` is itself a merge patch of
    the stored config. What it makes is validated like a PUT's body, with the stored
    spec: whether that is valid depends on the stored spec, which no schema of the
    patch can say (a 422 names what the patched spec breaks)."""
    properties: dict[str, Any] = {}
    for name, field in spec.get("properties", {}).items():
        if name == "execution_policy_config":
            properties[name] = {
                "anyOf": [{"type": "object"}, {"type": "null"}],
                "description": "Merged into the stored config, key by key.",
            }
        elif name == "labels":
            # A merge patch of the labels: a key set to null removes that label.
            values = field.get("additionalProperties", {})
            properties[name] = {
                "anyOf": [
                    {**field, "additionalProperties": {"anyOf": [values, {"type": "null"}]}},
                    {"type": "null"},
                ]
            }
        else:
            properties[name] = {"anyOf": [field, {"type": "null"}]}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "description": workload_patch_schema.__doc__,
    }


def _errors_of(path: str) -> frozenset[int]:
    for prefix, statuses in ERRORS:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return statuses
    return frozenset()


def allowed_methods(app: Any, scope: dict[str, Any]) -> list[str]:
    """Every method some route of ``app`` serves at the request's path."""
    methods: set[str] = set()
    for route in _routes(app):
        match, _ = route.matches({**scope, "method": "GET"})
        if match is Match.NONE:
            continue
        methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _routes(app: Any) -> Iterable[Any]:
    return getattr(getattr(app, "router", None), "routes", [])


_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    message = str(exc.detail)
    if exc.status_code == 405:
        allowed = allowed_methods(request.app, dict(request.scope))
        headers["Allow"] = ", ".join(allowed)
        message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
    code = _CODES.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers)
