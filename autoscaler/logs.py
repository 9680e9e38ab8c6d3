"""Operable logs for the server roles: structured, timestamped, levelled.

``configure_logging(level=…, fmt=…)`` sets one handler on the root logger (stderr):

* ``text``: ``2026-11-30T08:35:12.123Z INFO autoscaler.controller: message``, one line
  per record (a traceback, when there is one, follows on its own lines);
* ``json``: one JSON object per line, ``{"ts", "level", "logger", "msg"}`` and ``exc``
  (the traceback as one string) when there is one, for log shippers.

Tokens never reach a log: every message passes :class:`RedactSecrets`, which masks
anything shaped like one of our tokens (``ik_sdk_…``, ``ik_live_…``); engine keys and boot
secrets are never put in a message.
The roles take ``--log-level`` and ``--log-format`` (or ``AUTOSCALER_LOG_LEVEL`` and
``AUTOSCALER_LOG_FORMAT``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]
LEVELS = ("debug", "info", "warning", "error")

_SECRET_RE = re.compile(r"\b(ik_(?:sdk|live)_)[A-Za-z0-9_\-]{6,}")


def redact(text: str) -> str:
    """``text`` with every token-shaped string masked after its prefix."""
    return _SECRET_RE.sub(lambda m: f"{m.group(1)}***", text)


class RedactSecrets(logging.Filter):
    """Masks token-shaped strings in a record's message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(
    *, level: str = "info", fmt: LogFormat = "text", stream: TextIO | None = None
) -> None:
    """One stderr handler on the root logger with ``fmt`` at ``level``; replaces any."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries' chatter stays out unless asked for.
    quiet = logging.DEBUG if level == "debug" else logging.WARNING
    for name in (
        "uvicorn",
        "aiohttp",
        "botocore",
        "aiobotocore",
        "httpx",
        "alembic",
        "apscheduler",
    ):
        logging.getLogger(name).setLevel(quiet)
