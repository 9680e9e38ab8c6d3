"""Request traces: ``arrival_s,input_tokens,output_tokens`` rows, sorted by arrival; or
Mooncake's JSONL (``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids``:
the chained hashes of the prompt's 512-token blocks, ``catalog.prefix``), read by
:func:`load_trace` for a ``.jsonl`` file."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

COLUMNS = ("arrival_s", "input_tokens", "output_tokens")


class TraceError(ValueError):
    """A trace file that cannot be replayed; names the file, the line and the problem."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds from the start), tokens in and out."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    """The prompt's prefix blocks (``catalog.prefix``); empty when the trace has none."""


@dataclass(frozen=True, slots=True)
class TraceStats:
    """The load a trace puts on a service."""

    requests: int
    span_s: float
    mean_rps: float
    peak_rps: float
    """Highest request rate over any whole minute (from the first arrival)."""
    mean_input_tokens: float
    mean_output_tokens: float


def load_trace(path: Path) -> list[TraceRequest]:
    """Read a trace CSV, or Mooncake's JSONL when the name ends ``.jsonl``; arrivals are
    made relative to the first one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".jsonl":
        return load_mooncake(path, text)
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None or tuple(h.strip() for h in header) != COLUMNS:
        raise TraceError(f"{path}: the first line must be the header {','.join(COLUMNS)}")
    requests = [_parse(path, line_no, row) for line_no, row in enumerate(rows, start=2) if row]
    if not requests:
        raise TraceError(f"{path}: no requests after the header")
    for line_no, (before, after) in enumerate(itertools.pairwise(requests), start=3):
        if after.arrival_s < before.arrival_s:
            raise TraceError(f"{path}:{line_no}: arrival_s goes back in time; sort rows by arrival")
    start = requests[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - start) for r in requests]


MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def load_mooncake(path: Path, text: str) -> list[TraceRequest]:
    """Mooncake's JSONL: one object a line with ``timestamp`` (ms, sorted),
    ``input_length``, ``output_length`` and ``hash_ids`` (a list of integers)."""
    requests: list[TraceRequest] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            requests.append(_parse_mooncake(f"{path}:{line_no}", line))
    if not requests:
        raise TraceError(f"{path}: no requests")
    for line_no, (before, after) in enumerate(itertools.pairwise(requests), start=2):
        if after.arrival_s < before.arrival_s:
            raise TraceError(f"{path}:{line_no}: timestamp goes back in time; sort by timestamp")
    start = requests[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - start) for r in requests]


def _parse_mooncake(where: str, line: str) -> TraceRequest:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise TraceError(f"{where}: not a JSON object: {exc}") from None
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected a JSON object with {', '.join(MOONCAKE_FIELDS)}")
    missing = [name for name in MOONCAKE_FIELDS if name not in row]
    if missing:
        raise TraceError(f"{where}: missing field(s) {', '.join(missing)}")
    stamp, tokens_in, tokens_out, hashes = (row[name] for name in MOONCAKE_FIELDS)
    if not _is_number(stamp) or not math.isfinite(stamp) or stamp < 0:
        raise TraceError(f"{where}: timestamp must be milliseconds >= 0, got {stamp!r}")
    for name, value in (("input_length", tokens_in), ("output_length", tokens_out)):
        if not _is_int(value) or value < 1:
            raise TraceError(f"{where}: {name} must be a whole number >= 1, got {value!r}")
    if not isinstance(hashes, list) or not all(_is_int(h) for h in hashes):
        raise TraceError(f"{where}: hash_ids must be a list of integers, got {hashes!r:.60}")
    return TraceRequest(stamp / 1000.0, tokens_in, tokens_out, tuple(hashes))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse(path: Path, line_no: int, row: Sequence[str]) -> TraceRequest:
    where = f"{path}:{line_no}"
    if len(row) != len(COLUMNS):
        raise TraceError(f"{where}: expected {len(COLUMNS)} columns, got {len(row)}")
    try:
        arrival = float(row[0])
        tokens_in, tokens_out = int(row[1]), int(row[2])
    except ValueError:
        raise TraceError(f"{where}: expected a number, seconds and two token counts") from None
    if not math.isfinite(arrival) or arrival < 0:
        raise TraceError(f"{where}: arrival_s must be a finite number >= 0, got {row[0]}")
    if tokens_in < 1 or tokens_out < 1:
        raise TraceError(f"{where}: token counts must be >= 1, got {tokens_in}, {tokens_out}")
    return TraceRequest(arrival, tokens_in, tokens_out)


def scale_rate(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests ``factor`` times as fast: arrival times divided by ``factor``.

    Time is compressed, so an hour-long trace at ``factor`` 4 lasts fifteen minutes at four
    times the request rate; the requests themselves (tokens in and out) are unchanged.
    """
    if not factor > 0 or math.isinf(factor):
        raise ValueError(f"rate scale must be a finite number > 0, got {factor}")
    return [replace(r, arrival_s=r.arrival_s / factor) for r in requests]


def overlay_rate(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """``factor`` times the request rate on the trace's own time axis.

    The trace is laid over itself: copy ``j`` of ``ceil(factor)`` is shifted by
    ``j / ceil(factor)`` of the span (wrapping around the end), and the last copy keeps
    only every request whose position falls in its fractional share, so ``factor`` 2.5
    gives two and a half times the requests. This is a busier service with more
    independent callers: the minute-to-minute shape, the bursts and the token mix stay
    real, and the trace lasts as long as it did, so a three-minute boot is as long
    against it as in production. (:func:`scale_rate` instead compresses time.)
    """
    if not factor > 0 or math.isinf(factor):
        raise ValueError(f"rate scale must be a finite number > 0, got {factor}")
    if not requests:
        return []
    start = requests[0].arrival_s
    span = requests[-1].arrival_s - start
    copies = math.ceil(factor)
    out: list[TraceRequest] = []
    for j in range(copies):
        share = min(factor - j, 1.0)
        shift = span * j / copies
        for k, r in enumerate(requests):
            # Keep request k of a partial copy when it crosses a multiple of 1/share:
            # an even thinning, the same every run.
            if share < 1.0 and math.floor((k + 1) * share) == math.floor(k * share):
                continue
            at = r.arrival_s - start + shift
            if at > span:
                at -= span
            out.append(TraceRequest(start + at, r.input_tokens, r.output_tokens, r.hash_ids))
    out.sort(key=_arrival)
    return out


def _arrival(request: TraceRequest) -> float:
    return request.arrival_s


def trace_stats(requests: Sequence[TraceRequest]) -> TraceStats:
    """Request count, span, mean and peak one-minute rate, and mean token counts."""
    if not requests:
        return TraceStats(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    span = requests[-1].arrival_s - requests[0].arrival_s
    per_minute: dict[int, int] = {}
    for r in requests:
        minute = int((r.arrival_s - requests[0].arrival_s) // 60)
        per_minute[minute] = per_minute.get(minute, 0) + 1
    return TraceStats(
        requests=len(requests),
        span_s=span,
        mean_rps=len(requests) / max(span, 1.0),
        peak_rps=max(per_minute.values()) / 60.0,
        mean_input_tokens=sum(r.input_tokens for r in requests) / len(requests),
        mean_output_tokens=sum(r.output_tokens for r in requests) / len(requests),
    )
