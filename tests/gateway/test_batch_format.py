"""The Batches API's pure formats: input lines, the create request, windows, status."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway import batch_format as fmt
from gateway.window import batch_reserve

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}


def encode(*lines: object) -> bytes:
    return b"\n".join(json.dumps(line).encode() for line in lines)


def test_lines_are_numbered_from_one_and_blank_lines_skipped() -> None:
    parsed = fmt.parse_input(encode(LINE) + b"\n\n" + encode({**LINE, "custom_id": "b"}))
    assert [(p.line, p.custom_id, p.url) for p in parsed] == [
        (1, "a", "/v1/embeddings"),
        (3, "b", "/v1/embeddings"),
    ]
    assert parsed[0].body == {"input": "x"}


def test_line_separators_inside_strings_do_not_split_a_line() -> None:
    """JSON may hold U+2028, U+2029, U+0085 and form feeds raw; only "\n" ends a line,
    and a "\r" before it (Windows line ends) is dropped."""
    text = "x\u2028y\u2029z\u0085w\x0cv"
    raw = json.dumps({**LINE, "body": {"input": text}}, ensure_ascii=False).encode()
    parsed = fmt.parse_input(raw + b"\r\n" + encode({**LINE, "custom_id": "b"}) + b"\r\n")
    assert [(p.line, p.custom_id) for p in parsed] == [(1, "a"), (2, "b")]
    assert parsed[0].body == {"input": text}


@pytest.mark.parametrize(
    ("bad", "message", "param"),
    [
        ({**LINE, "custom_id": ""}, "line 2: custom_id must be a non-empty string", "custom_id"),
        ({**LINE, "method": "GET"}, "line 2: method must be 'POST', not 'GET'", "method"),
        ({**LINE, "url": "/v1/images"}, "line 2: url '/v1/images' is not one of", "url"),
        ({**LINE, "body": [1]}, "line 2: body must be a JSON object", "body"),
        ({**LINE, "extra": 1}, "line 2: unknown field(s) ['extra']", "extra"),
        ([1, 2], "line 2 must be a JSON object", "file"),
    ],
)
def test_each_bad_line_names_its_number_and_field(bad: object, message: str, param: str) -> None:
    with pytest.raises(fmt.BatchFormatError) as refused:
        fmt.parse_input(encode({**LINE, "custom_id": "first"}, bad))
    assert message in refused.value.message
    assert refused.value.param == param


def test_an_empty_or_non_utf8_file_is_refused() -> None:
    with pytest.raises(fmt.BatchFormatError, match="holds no request"):
        fmt.parse_input(b"\n  \n")
    with pytest.raises(fmt.BatchFormatError, match="not UTF-8"):
        fmt.parse_input(b"\xff\xfe")


def test_every_line_must_call_the_batch_endpoint() -> None:
    lines = fmt.parse_input(encode(LINE))
    fmt.check_endpoint(lines, "/v1/embeddings")
    with pytest.raises(fmt.BatchFormatError, match="line 1: url '/v1/embeddings' differs"):
        fmt.check_endpoint(lines, "/v1/chat/completions")


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86400), ("90m", 5400), ("60s", 60)])
def test_windows_in_hours_minutes_or_seconds(window: str, seconds: int) -> None:
    assert fmt.parse_window(window) == seconds


@pytest.mark.parametrize("window", ["0h", "59s", "169h", "1d", "24", 24, None, "01h", "24h\n"])
def test_windows_outside_a_minute_to_a_week_are_refused(window: object) -> None:
    with pytest.raises(fmt.BatchFormatError, match="from 1m to 168h") as refused:
        fmt.parse_window(window)
    assert refused.value.param == "completion_window"


def test_the_create_request_is_checked_field_by_field() -> None:
    made = fmt.parse_create(
        b'{"input_file_id": "file-1", "endpoint": "/v1/completions", "metadata": {"a": "b"}}'
    )
    assert (made.completion_window, made.window_sec, made.metadata) == ("24h", 86400, {"a": "b"})
    for body, message in [
        (b'{"endpoint": "/v1/completions"}', "input_file_id is required"),
        (b'{"input_file_id": "f", "endpoint": "/v1/x"}', "endpoint '/v1/x' is not one of"),
        (b'{"input_file_id": "f", "endpoint": "/v1/completions", "x": 1}', "unknown field"),
        (
            b'{"input_file_id": "f", "endpoint": "/v1/completions", "metadata": {"a": 1}}',
            "metadata",
        ),
        (b"[]", "must be a JSON object"),
    ]:
        with pytest.raises(fmt.BatchFormatError, match=message):
            fmt.parse_create(body)


def test_status_is_the_newest_fact() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    facts = fmt.BatchFacts(None, None, None, None, None, None, None)
    assert fmt.batch_status(facts) == "validating"
    facts = fmt.BatchFacts(at, None, None, None, None, None, None)
    assert fmt.batch_status(facts) == "in_progress"
    facts = fmt.BatchFacts(at, at, None, None, None, None, None)
    assert fmt.batch_status(facts) == "cancelling"
    facts = fmt.BatchFacts(at, at, at, None, None, at, None)
    assert fmt.batch_status(facts) == "cancelled"
    facts = fmt.BatchFacts(at, None, at, None, at, None, None)
    assert fmt.batch_status(facts) == "expired"


def test_result_lines_have_openais_shape() -> None:
    answered = fmt.answered_line(job_id="job_ab", custom_id="c", status_code=200, body={"x": 1})
    assert answered == {
        "id": "batch_req_ab",
        "custom_id": "c",
        "response": {"status_code": 200, "request_id": "job_ab", "body": {"x": 1}},
        "error": None,
    }
    missed = fmt.unanswered_line(job_id="job_ab", custom_id="c", code="batch_expired", message="m")
    assert missed["response"] is None and missed["error"] == {
        "code": "batch_expired",
        "message": "m",
    }
    assert fmt.jsonl([answered, missed]).count(b"\n") == 2


@pytest.mark.parametrize(("cap", "reserve"), [(1, 0), (3, 0), (4, 1), (8, 2), (64, 16)])
def test_batch_lines_leave_a_quarter_of_the_cap_rounded_down(cap: int, reserve: int) -> None:
    assert batch_reserve(cap) == reserve
