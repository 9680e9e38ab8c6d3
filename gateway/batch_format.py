"""The OpenAI Batches API's formats, pure: input lines, the create request, the status
and the output and error lines. No I/O here; ``gateway.batches`` stores and serves them.

An input file is JSONL, one request a line::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Every error names the line (from 1) and the field, and says what is allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: A batch's endpoint -> the job route its lines run on.
ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
MAX_LINES = 50_000
LINE_FIELDS = ("custom_id", "method", "url", "body")
#: Shortest and longest completion windows taken ("24h" is OpenAI's only value).
MIN_WINDOW_SEC = 60
MAX_WINDOW_SEC = 7 * 24 * 3600
MAX_METADATA_PAIRS = 16
_WINDOW = re.compile(r"^([1-9][0-9]*)([smh])$")
_UNIT_SEC = {"s": 1, "m": 60, "h": 3600}

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed: the batch was cancelled."


class BatchFormatError(ValueError):
    """A request or file the Batches API refuses; ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class BatchLine:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_input(content: bytes) -> list[BatchLine]:
    """The requests of a batch input file; blank lines are skipped."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchFormatError(f"the file is not UTF-8 text: {exc}", param="file") from None
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    # Lines end at "\n" (or "\r\n") only: JSON strings may hold U+2028 and the other
    # separators ``str.splitlines`` would also split on.
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        parsed = _parse_line(raw, number)
        if parsed.custom_id in seen:
            raise BatchFormatError(
                f"line {number}: custom_id {parsed.custom_id!r} is already used on line "
                f"{seen[parsed.custom_id]}; each request needs its own",
                param="custom_id",
            )
        seen[parsed.custom_id] = number
        lines.append(parsed)
        if len(lines) > MAX_LINES:
            raise BatchFormatError(f"the file holds more than {MAX_LINES} requests", param="file")
    if not lines:
        raise BatchFormatError("the file holds no request: one JSON object a line", param="file")
    return lines


def _parse_line(raw: str, number: int) -> BatchLine:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BatchFormatError(f"line {number} is not JSON: {exc}", param="file") from None
    if not isinstance(data, dict):
        raise BatchFormatError(f"line {number} must be a JSON object", param="file")
    unknown = sorted(set(data) - set(LINE_FIELDS))
    if unknown:
        raise BatchFormatError(
            f"line {number}: unknown field(s) {unknown}; a line has {list(LINE_FIELDS)}",
            param=unknown[0],
        )
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchFormatError(
            f"line {number}: custom_id must be a non-empty string, not {custom_id!r}",
            param="custom_id",
        )
    if data.get("method") != "POST":
        raise BatchFormatError(
            f"line {number}: method must be 'POST', not {data.get('method')!r}", param="method"
        )
    url = data.get("url")
    if url not in ENDPOINTS:
        raise BatchFormatError(
            f"line {number}: url {url!r} is not one of {sorted(ENDPOINTS)}", param="url"
        )
    body = data.get("body")
    if not isinstance(body, dict):
        raise BatchFormatError(
            f"line {number}: body must be a JSON object (the request), not {body!r:.40}",
            param="body",
        )
    return BatchLine(line=number, custom_id=custom_id, url=url, body=body)


def check_endpoint(lines: list[BatchLine], endpoint: str) -> None:
    """Every line must call the batch's endpoint."""
    for line in lines:
        if line.url != endpoint:
            raise BatchFormatError(
                f"line {line.line}: url {line.url!r} differs from the batch's endpoint "
                f"{endpoint!r}; every line of a batch calls its endpoint",
                param="endpoint",
            )


def parse_window(window: object) -> int:
    """A completion window's length in seconds: ``"24h"``, ``"90m"``, ``"600s"``."""
    match = _WINDOW.fullmatch(window) if isinstance(window, str) else None
    seconds = int(match[1]) * _UNIT_SEC[match[2]] if match else 0
    if not MIN_WINDOW_SEC <= seconds <= MAX_WINDOW_SEC:
        raise BatchFormatError(
            f"completion_window {window!r} is not a duration from 1m to 168h "
            "such as '24h' (a whole number and s, m or h)",
            param="completion_window",
        )
    return seconds


@dataclass(frozen=True, slots=True)
class BatchRequest:
    input_file_id: str
    endpoint: str
    completion_window: str
    window_sec: int
    metadata: dict[str, str] | None


def parse_create(raw: bytes) -> BatchRequest:
    """A ``POST /v1/batches`` body."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BatchFormatError(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BatchFormatError("request body must be a JSON object")
    allowed = ("input_file_id", "endpoint", "completion_window", "metadata")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BatchFormatError(
            f"unknown field(s) {unknown}: a batch takes {list(allowed)}", param=unknown[0]
        )
    file_id = data.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise BatchFormatError(
            "input_file_id is required: the id of a file uploaded with purpose 'batch'",
            param="input_file_id",
        )
    endpoint = data.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise BatchFormatError(
            f"endpoint {endpoint!r} is not one of {sorted(ENDPOINTS)}", param="endpoint"
        )
    window = data.get("completion_window", "24h")
    return BatchRequest(
        input_file_id=file_id,
        endpoint=endpoint,
        completion_window=window,
        window_sec=parse_window(window),
        metadata=_metadata(data.get("metadata")),
    )


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS:
        raise BatchFormatError(
            f"metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs",
            param="metadata",
        )
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise BatchFormatError(
                f"metadata {key!r}: keys are at most 64 characters and values strings "
                "of at most 512",
                param="metadata",
            )
    return dict(value)


@dataclass(frozen=True, slots=True)
class BatchFacts:
    """What happened to a batch, when (``None``: not yet)."""

    in_progress_at: datetime | None
    cancelling_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    expired_at: datetime | None
    cancelled_at: datetime | None
    failed_at: datetime | None


def batch_status(facts: BatchFacts) -> str:
    """The OpenAI status, from the newest fact."""
    for status, at in (
        ("failed", facts.failed_at),
        ("cancelled", facts.cancelled_at),
        ("expired", facts.expired_at),
        ("completed", facts.completed_at),
        ("finalizing", facts.finalizing_at),
        ("cancelling", facts.cancelling_at),
        ("in_progress", facts.in_progress_at),
    ):
        if at is not None:
            return status
    return "validating"


def request_id(job_id: str) -> str:
    """A batch line's output ``id`` (``batch_req_…``), from its job's id."""
    return "batch_req_" + job_id.removeprefix("job_")


def answered_line(*, job_id: str, custom_id: str, status_code: int, body: object) -> dict[str, Any]:
    """A line the replica answered (an output line below 400, an error line above)."""
    return {
        "id": request_id(job_id),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": job_id, "body": body},
        "error": None,
    }


def unanswered_line(*, job_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line no replica answered: expired, cancelled, or the replica failed."""
    return {
        "id": request_id(job_id),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def jsonl(lines: Sequence[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
