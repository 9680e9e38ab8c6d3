"""Day- and week-long traces drawn from a request-rate profile.

A rate profile is a CSV of time bins and the requests per minute in each (the week of
Azure's 2024 conversation trace in ``traces/``, read off its published per-minute
plot: ``t_start_min,t_end_min,...,rpm_calibrated``; other columns are ignored). A trace
is drawn from it as a non-homogeneous Poisson process: within each bin the rate is the
bin's (scaled), so arrivals are exponential gaps at that rate, restarted at every bin
boundary (exact for a piecewise-constant rate: the process is memoryless). Each
request's prompt and completion tokens are one ``(input, output)`` pair of a token
source trace (the 2023 trace of the same service), drawn uniformly with replacement,
so prompt and completion stay paired as they were measured. The same profile, window,
scale, token source and seed give the same trace.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoscaler.sim.gcpause import paused_gc
from autoscaler.sim.trace import TraceError, TraceRequest

PROFILE_COLUMNS = ("t_start_min", "t_end_min", "rpm_calibrated")
"""The columns a rate profile must have (in any order, among others)."""

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class RateBin:
    """``rps`` requests per second from ``start_s`` to ``end_s``."""

    start_s: float
    end_s: float
    rps: float


@dataclass(frozen=True, slots=True)
class RateProfile:
    """Request rate over time, piecewise constant; bins contiguous from time 0."""

    bins: tuple[RateBin, ...]

    @property
    def span_s(self) -> float:
        return self.bins[-1].end_s if self.bins else 0.0

    @property
    def peak_rps(self) -> float:
        return max((b.rps for b in self.bins), default=0.0)

    @property
    def mean_rps(self) -> float:
        span = self.span_s
        return sum(b.rps * (b.end_s - b.start_s) for b in self.bins) / span if span else 0.0

    def rate_at(self, t: float) -> float:
        """The rate at ``t`` seconds (0 outside the profile)."""
        for b in self.bins:
            if b.start_s <= t < b.end_s:
                return b.rps
        return 0.0

    def window(self, start_s: float, span_s: float) -> RateProfile:
        """The part from ``start_s`` for ``span_s`` seconds, re-based to start at 0."""
        if not 0 <= start_s < self.span_s:
            raise ValueError(
                f"window start must be in [0, {self.span_s:g}) s of the profile, got {start_s:g}"
            )
        if not span_s > 0:
            raise ValueError(f"window span must be > 0 s, got {span_s:g}")
        end = start_s + span_s
        if end > self.span_s + 1e-6:
            raise ValueError(
                f"window {start_s:g}-{end:g} s runs past the profile's end ({self.span_s:g} s)"
            )
        cut = [
            RateBin(max(b.start_s, start_s) - start_s, min(b.end_s, end) - start_s, b.rps)
            for b in self.bins
            if b.end_s > start_s and b.start_s < end
        ]
        return RateProfile(tuple(b for b in cut if b.end_s > b.start_s))

    def day(self, index: int) -> RateProfile:
        """Day ``index`` (0 is the first whole 24 h of the profile)."""
        days = int(self.span_s // DAY_S + 1e-9)
        if not 0 <= index < days:
            raise ValueError(
                f"day must be 0-{days - 1} (the profile spans {days} days), got {index}"
            )
        return self.window(index * DAY_S, DAY_S)

    def scaled(self, factor: float) -> RateProfile:
        """Every bin's rate times ``factor``."""
        if not factor > 0 or math.isinf(factor):
            raise ValueError(f"rate scale must be a finite number > 0, got {factor}")
        return RateProfile(tuple(RateBin(b.start_s, b.end_s, b.rps * factor) for b in self.bins))

    def with_peak(self, peak_rps: float) -> RateProfile:
        """The same shape scaled so that its highest bin is ``peak_rps``."""
        if not peak_rps > 0 or math.isinf(peak_rps):
            raise ValueError(f"peak rate must be a finite number > 0 req/s, got {peak_rps}")
        return self.scaled(peak_rps / self.peak_rps)


def is_rate_profile(path: Path) -> bool:
    """Whether ``path``'s header names the rate-profile columns (not a request trace)."""
    try:
        with path.open(encoding="utf-8") as f:
            header = f.readline()
    except OSError:
        return False
    names = {h.strip() for h in header.split(",")}
    return set(PROFILE_COLUMNS) <= names


def load_rate_profile(path: Path) -> RateProfile:
    """Read a rate-profile CSV (``t_start_min,t_end_min,...,rpm_calibrated``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read rate profile {path}: {exc.strerror or exc}") from exc
    rows = csv.DictReader(text.splitlines())
    missing = [c for c in PROFILE_COLUMNS if c not in (rows.fieldnames or [])]
    if missing:
        raise TraceError(
            f"{path}: a rate profile needs the columns {', '.join(PROFILE_COLUMNS)}; "
            f"missing {', '.join(missing)}"
        )
    bins: list[RateBin] = []
    for line_no, row in enumerate(rows, start=2):
        where = f"{path}:{line_no}"
        try:
            start = float(row["t_start_min"]) * 60.0
            end = float(row["t_end_min"]) * 60.0
            rpm = float(row["rpm_calibrated"])
        except (TypeError, ValueError):
            raise TraceError(
                f"{where}: t_start_min, t_end_min and rpm_calibrated must be numbers"
            ) from None
        if not (math.isfinite(start) and math.isfinite(end) and end > start):
            raise TraceError(f"{where}: t_end_min must be after t_start_min")
        if not math.isfinite(rpm) or rpm < 0:
            raise TraceError(f"{where}: rpm_calibrated must be a finite number >= 0, got {rpm}")
        expected = bins[-1].end_s if bins else 0.0
        if abs(start - expected) > 1.0:
            raise TraceError(
                f"{where}: bins must be contiguous from 0; this one starts at "
                f"{start / 60:.3f} min, the previous ended at {expected / 60:.3f} min"
            )
        bins.append(RateBin(expected, end, rpm / 60.0))
    if not bins:
        raise TraceError(f"{path}: no bins after the header")
    return RateProfile(tuple(bins))


def poisson_trace(
    profile: RateProfile, tokens: Sequence[TraceRequest], *, seed: int
) -> list[TraceRequest]:
    """A non-homogeneous Poisson trace of ``profile``'s rate with token lengths drawn
    from ``tokens`` (see the module docstring); deterministic in ``seed``."""
    if not tokens:
        raise ValueError("the token source trace has no requests")
    rng = random.Random(seed)
    pairs = [(r.input_tokens, r.output_tokens) for r in tokens]
    out: list[TraceRequest] = []
    with paused_gc():  # ``autoscaler.sim.gcpause``: a day is half a million requests
        for b in profile.bins:
            if b.rps <= 0:
                continue
            t = b.start_s + rng.expovariate(b.rps)
            while t < b.end_s:
                tokens_in, tokens_out = pairs[rng.randrange(len(pairs))]
                out.append(TraceRequest(t, tokens_in, tokens_out))
                t += rng.expovariate(b.rps)
    return out
