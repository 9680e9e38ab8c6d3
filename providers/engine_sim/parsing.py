"""Reading OpenAI request bodies, and errors in OpenAI's shape.

Every rejection names the field that was wrong, as OpenAI's ``param`` and in the message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

JsonObject = Mapping[str, Any]


class ApiError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The error as a JSON response."""
        return error_response(
            self.status,
            self.message,
            kind=self.kind,
            param=self.param,
            code=self.code,
            headers=self.headers,
        )


def error_response(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped error body with ``status``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def bad_request(param: str, message: str) -> ApiError:
    """A 400 about ``param``."""
    return ApiError(400, f"{param}: {message}", param=param)


async def json_body(request: web.Request) -> JsonObject:
    """The request's JSON object, or a 400 saying why it is not one."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to be a request") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def int_field(
    body: JsonObject, name: str, *, default: int, minimum: int, maximum: int | None = None
) -> int:
    """An optional whole-number field within bounds."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise bad_request(name, f"must be >= {minimum}{upper}, got {value}")
    return value


def bool_field(body: JsonObject, name: str, *, default: bool) -> bool:
    """An optional true/false field."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, f"must be true or false, got {value!r}")
    return value


def str_field(body: JsonObject, name: str, *, default: str | None = None) -> str:
    """A string field, required unless it has a default."""
    value = body.get(name, default)
    if value is None:
        raise bad_request(name, "is required")
    if not isinstance(value, str):
        raise bad_request(name, f"must be a string, got {type(value).__name__}")
    return value


def choice_field(body: JsonObject, name: str, *, allowed: tuple[str, ...], default: str) -> str:
    """A string field restricted to ``allowed``."""
    value = str_field(body, name, default=default)
    if value not in allowed:
        raise bad_request(name, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def usage_hint(body: JsonObject, name: str) -> int | None:
    """A token count the caller states in ``usage`` (an engine-sim extension), if any."""
    usage = body.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise bad_request("usage", "must be an object such as {'prompt_tokens': 512}")
    value = usage.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"usage.{name}", f"must be a whole number >= 0, got {value!r}")
    return value
