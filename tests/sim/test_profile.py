"""Day traces drawn from a rate profile: the rate follows the profile, the tokens come
from the source trace, and the same seed gives the same trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoscaler.sim.profile import (
    DAY_S,
    RateBin,
    RateProfile,
    is_rate_profile,
    load_rate_profile,
    poisson_trace,
)
from autoscaler.sim.trace import TraceError, TraceRequest, load_trace

TRACES = Path(__file__).parents[2] / "traces"
WEEK = TRACES / "azure2024_conv_week_rate_digitized.csv"

TOKENS = [TraceRequest(0.0, 100, 10), TraceRequest(1.0, 3000, 7), TraceRequest(2.0, 50, 400)]


def _two_level() -> RateProfile:
    """An hour at 2 req/s, then an hour at 8 req/s."""
    return RateProfile((RateBin(0.0, 3600.0, 2.0), RateBin(3600.0, 7200.0, 8.0)))


def test_arrivals_follow_the_rate_of_each_bin() -> None:
    trace = poisson_trace(_two_level(), TOKENS, seed=1)
    first = sum(1 for r in trace if r.arrival_s < 3600.0)
    second = len(trace) - first
    # Poisson counts: 7,200 and 28,800 expected, standard deviations 85 and 170.
    assert abs(first - 7200) < 5 * 85
    assert abs(second - 28800) < 5 * 170
    assert all(0.0 <= r.arrival_s < 7200.0 for r in trace)
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)


def test_tokens_are_pairs_of_the_source_trace() -> None:
    trace = poisson_trace(_two_level(), TOKENS, seed=1)
    pairs = {(r.input_tokens, r.output_tokens) for r in trace}
    assert pairs == {(100, 10), (3000, 7), (50, 400)}


def test_same_seed_same_trace_other_seed_another() -> None:
    one = poisson_trace(_two_level(), TOKENS, seed=5)
    assert poisson_trace(_two_level(), TOKENS, seed=5) == one
    assert poisson_trace(_two_level(), TOKENS, seed=6) != one


def test_bundled_week_day_follows_its_diurnal_profile() -> None:
    """A day of the bundled week at a peak of 4 req/s: the hourly counts of the drawn
    trace track the profile's hourly means (within 5 Poisson standard deviations), and
    the busiest hour has about twice the quietest one's requests, as in the profile."""
    week = load_rate_profile(WEEK)
    assert week.span_s == pytest.approx(7 * DAY_S)
    day = week.day(1).with_peak(4.0)
    assert day.span_s == pytest.approx(DAY_S)
    assert day.peak_rps == pytest.approx(4.0)
    trace = poisson_trace(day, load_trace(TRACES / "azure2023_conv.csv"), seed=0)
    counts = [0] * 24
    for r in trace:
        counts[int(r.arrival_s // 3600)] += 1
    for hour, count in enumerate(counts):
        window = day.window(hour * 3600.0, 3600.0)
        expected = window.mean_rps * 3600.0
        assert abs(count - expected) < 5 * expected**0.5, (hour, count, expected)
    assert max(counts) > 1.6 * min(counts)


def test_profile_scaling_and_windows_reject_bad_values() -> None:
    profile = _two_level()
    assert profile.with_peak(4.0).bins[0].rps == pytest.approx(1.0)
    assert profile.window(1800.0, 3600.0).mean_rps == pytest.approx(5.0)
    with pytest.raises(ValueError, match="runs past the profile's end"):
        profile.window(3600.0, 7200.0)
    with pytest.raises(ValueError, match="peak rate must be"):
        profile.with_peak(0.0)
    with pytest.raises(ValueError, match="day must be 0-6"):
        load_rate_profile(WEEK).day(7)


def test_profile_files_are_recognised_and_bad_ones_named(tmp_path: Path) -> None:
    assert is_rate_profile(WEEK)
    assert not is_rate_profile(TRACES / "azure2023_conv.csv")
    bad = tmp_path / "gap.csv"
    bad.write_text("t_start_min,t_end_min,rpm_calibrated\n0,10,60\n20,30,60\n", encoding="utf-8")
    with pytest.raises(TraceError, match=r"gap.csv:3: bins must be contiguous"):
        load_rate_profile(bad)
    negative = tmp_path / "neg.csv"
    negative.write_text("t_start_min,t_end_min,rpm_calibrated\n0,10,-1\n", encoding="utf-8")
    with pytest.raises(TraceError, match=r"neg.csv:2: rpm_calibrated must be"):
        load_rate_profile(negative)
