"""The measured spot interruption rate (``decide.spot_rate``): the record within the
window, and the Gamma-Poisson posterior mean the spot spares weigh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.decide.spot_rate import (
    DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR,
    SPOT_PRIOR_HOURS,
    SPOT_PRIOR_INTERRUPTIONS,
    SPOT_RATE_WINDOW_SEC,
    SpotLife,
    SpotRate,
    spot_rate,
)

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
WEEK_H = SPOT_RATE_WINDOW_SEC / 3600


def at(hours_ago: float) -> datetime:
    return NOW - timedelta(hours=hours_ago)


@st.composite
def lives(draw: st.DrawFn) -> SpotLife:
    """A spot machine launched up to two weeks ago, maybe still running."""
    started = draw(st.floats(0.0, 2 * WEEK_H))
    ended = draw(st.none() | st.floats(0.0, started))
    interrupted = ended is not None and draw(st.booleans())
    return SpotLife(
        started_at=at(started),
        ended_at=None if ended is None else at(ended),
        interrupted=interrupted,
    )


def test_nothing_measured_is_the_prior_of_one_a_machine_week() -> None:
    rate = spot_rate([], now=NOW)
    assert rate == SpotRate()
    assert rate.per_hour == DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR == 1 / 168
    assert rate.basis() == (
        "0 interruptions in 0.0 spot machine-hours of the last 7 days (prior 1 per 168 h) "
        "= 0.00595/h"
    )


def test_the_record_counts_hours_and_interruptions_inside_the_window() -> None:
    record = spot_rate(
        [
            SpotLife(at(10), None, interrupted=False),  # running: 10 h
            SpotLife(at(5), at(3), interrupted=True),  # 2 h, interrupted
            SpotLife(at(4), at(1), interrupted=False),  # 3 h, scaled down
            SpotLife(at(WEEK_H + 2), at(WEEK_H - 1), interrupted=True),  # 1 h inside
            SpotLife(at(WEEK_H + 9), at(WEEK_H + 1), interrupted=True),  # all before
        ],
        now=NOW,
    )
    assert record.interruptions == 2
    assert record.hours == pytest.approx(16.0)
    assert record.per_hour == pytest.approx(3 / 184)
    assert record.basis().startswith("2 interruptions in 16.0 spot machine-hours")


@given(st.lists(lives(), max_size=30))
def test_the_record_is_bounded_by_what_the_window_holds(record: list[SpotLife]) -> None:
    rate = spot_rate(record, now=NOW)
    assert 0.0 <= rate.hours <= len(record) * WEEK_H + 1e-6
    assert rate.interruptions <= sum(life.interrupted for life in record)
    # The posterior mean lies between the prior's and what was measured.
    measured = rate.interruptions / rate.hours if rate.hours > 0 else None
    prior = DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR
    if measured is not None:
        assert min(prior, measured) - 1e-12 <= rate.per_hour <= max(prior, measured) + 1e-12
    elif rate.interruptions == 0:
        assert rate.per_hour == prior


@given(st.lists(lives(), max_size=20), st.floats(0.01, 0.99))
def test_a_machine_counts_the_same_however_its_record_is_cut(
    record: list[SpotLife], share: float
) -> None:
    """One machine's life split at any moment into two records (a replacement in the same
    market, say) gives the same hours: hours add up, nothing counted twice."""
    whole = SpotLife(at(50), at(10), interrupted=True)
    cut = at(50 - 40 * share)
    split = [SpotLife(at(50), cut, interrupted=False), SpotLife(cut, at(10), interrupted=True)]
    a = spot_rate([*record, whole], now=NOW)
    b = spot_rate([*record, *split], now=NOW)
    assert a.interruptions == b.interruptions
    assert a.hours == pytest.approx(b.hours)


@given(st.integers(0, 50), st.floats(0.0, 1000.0), st.integers(1, 20))
def test_more_interruptions_raise_the_rate_and_more_quiet_hours_lower_it(
    interruptions: int, hours: float, more: int
) -> None:
    base = SpotRate(interruptions, hours)
    assert SpotRate(interruptions + more, hours).per_hour > base.per_hour
    assert SpotRate(interruptions, hours + more).per_hour < base.per_hour


@given(st.floats(0.01, 2.0))
def test_evidence_outweighs_the_prior_as_machine_hours_grow(true_rate: float) -> None:
    """After one machine-week the measurement weighs as much as the prior; after many,
    the estimate is the measured rate."""
    week = SpotRate(round(true_rate * SPOT_PRIOR_HOURS), SPOT_PRIOR_HOURS)
    halfway = (DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR + week.interruptions / SPOT_PRIOR_HOURS) / 2
    assert week.per_hour == pytest.approx(halfway)
    hours = 1000 * SPOT_PRIOR_HOURS
    many = SpotRate(round(true_rate * hours), hours)
    assert many.per_hour == pytest.approx(true_rate, rel=0.01)
    assert SPOT_PRIOR_INTERRUPTIONS / SPOT_PRIOR_HOURS == DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR


def test_a_negative_record_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        SpotRate(-1, 1.0)
    with pytest.raises(ValueError, match="negative"):
        SpotRate(0, float("nan"))
