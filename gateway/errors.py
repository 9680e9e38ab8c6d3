"""Errors in the OpenAI error shape, so the OpenAI SDKs raise their usual exceptions.

``{"error": {"message", "type", "param", "code"}}`` with the matching status: the SDKs map
401 to ``AuthenticationError``, 404 to ``NotFoundError``, 413/400 to ``BadRequestError``
or ``APIStatusError``, 429 to ``RateLimitError``, 503 to ``InternalServerError``.
"""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(Exception):
    """An answer the gateway gives itself instead of a replica's."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.param = param

    def response(self) -> web.Response:
        return error_response(
            self.status,
            self.message,
            code=self.code,
            retry_after=self.retry_after,
            param=self.param,
        )


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> bytes:
    payload = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }
    return json.dumps(payload).encode()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
    param: str | None = None,
) -> web.Response:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="autoscaler"'
    return web.Response(
        status=status,
        body=error_body(status, message, code=code, param=param),
        content_type="application/json",
        headers=headers,
    )
