"""Server logs: timestamped, levelled, text or JSON lines, tokens masked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from autoscaler.logs import configure_logging, redact


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_text_lines_carry_a_utc_timestamp_the_level_and_the_logger(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging(level="info", fmt="text", stream=out)
    logging.getLogger("autoscaler.controller").info("scale up %d -> %d", 1, 3)
    logging.getLogger("autoscaler.controller").debug("not shown at info")
    [line] = out.getvalue().splitlines()
    stamp, level, rest = line.split(" ", 2)
    assert stamp.endswith("Z") and "T" in stamp
    assert level == "INFO"
    assert rest == "autoscaler.controller: scale up 1 -> 3"


def test_json_lines_are_one_object_each_with_the_traceback_in_one_field(
    restore_root: None,
) -> None:
    out = io.StringIO()
    configure_logging(level="warning", fmt="json", stream=out)
    log = logging.getLogger("autoscaler.controller")
    log.info("below the level")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("reconciling acme/bot failed")
    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert entry["logger"] == "autoscaler.controller"
    assert entry["msg"] == "reconciling acme/bot failed"
    assert "RuntimeError: boom" in entry["exc"]


def test_tokens_never_reach_the_log(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging(fmt="text", stream=out)
    secret = "ik_sdk_" + "a1B2" * 8
    logging.getLogger("gateway").warning("refused %s", secret)
    assert secret not in out.getvalue()
    assert "ik_sdk_***" in out.getvalue()
    assert redact("key ik_live_abcdefgh12 here") == "key ik_live_*** here"
