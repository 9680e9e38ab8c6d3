"""Scheduled activity: cron runs, weekly windows, midnight crossings and clock changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.decide.schedule import schedule_state
from autoscaler.spec import ScheduledPolicy

MADRID = ZoneInfo("Europe/Madrid")
NEW_YORK = ZoneInfo("America/New_York")


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    """A local wall time in ``zone``, as UTC."""
    return datetime(year, month, day, hour, minute, tzinfo=zone).astimezone(UTC)


def test_window_is_active_inside_and_says_when_it_closes() -> None:
    policy = ScheduledPolicy(window="Mon-Fri 08:00-20:00 Europe/Madrid", replicas=3)
    state = schedule_state(policy, now=at(MADRID, 2024, 6, 12, 9, 0))  # a Wednesday
    assert state.active
    assert state.replicas == 3
    assert state.next_change_at == at(MADRID, 2024, 6, 12, 20, 0)
    assert "open until" in state.reason


def test_window_is_closed_at_the_weekend_and_opens_on_monday() -> None:
    policy = ScheduledPolicy(window="Mon-Fri 08:00-20:00 Europe/Madrid", replicas=2)
    state = schedule_state(policy, now=at(MADRID, 2024, 6, 15, 12, 0))  # Saturday
    assert not state.active
    assert state.replicas == 0
    assert state.next_change_at == at(MADRID, 2024, 6, 17, 8, 0)


def test_window_that_crosses_midnight_belongs_to_the_day_it_opens() -> None:
    policy = ScheduledPolicy(window="Fri 22:00-06:00 Europe/Madrid")
    saturday_early = at(MADRID, 2024, 6, 15, 3, 0)
    state = schedule_state(policy, now=saturday_early)
    assert state.active
    assert state.next_change_at == at(MADRID, 2024, 6, 15, 6, 0)
    # Friday just after midnight belongs to Thursday's night, which is not in the window.
    assert not schedule_state(policy, now=at(MADRID, 2024, 6, 14, 3, 0)).active


def test_window_ending_at_24_00_closes_at_midnight() -> None:
    policy = ScheduledPolicy(window="Daily 18:00-24:00 UTC")
    state = schedule_state(policy, now=datetime(2024, 1, 1, 23, 59, tzinfo=UTC))
    assert state.active
    assert state.next_change_at == datetime(2024, 1, 2, 0, 0, tzinfo=UTC)


def test_window_on_the_spring_forward_night_in_madrid() -> None:
    # 2024-03-31: clocks jump 02:00 -> 03:00. A 01:00-05:00 window lasts three real hours.
    policy = ScheduledPolicy(window="Sun 01:00-05:00 Europe/Madrid")
    opened = at(MADRID, 2024, 3, 31, 1, 30)
    state = schedule_state(policy, now=opened)
    assert state.active
    assert state.next_change_at - datetime(2024, 3, 31, 0, 0, tzinfo=UTC) == timedelta(hours=3)


def test_window_on_the_fall_back_night_in_new_york() -> None:
    # 2024-11-03: clocks go 02:00 -> 01:00. A 00:00-03:00 window lasts four real hours.
    policy = ScheduledPolicy(window="Sun 00:00-03:00 America/New_York")
    start = at(NEW_YORK, 2024, 11, 3, 0, 0)
    state = schedule_state(policy, now=start + timedelta(hours=3, minutes=30))
    assert state.active  # 01:30 EST, the second 01:30 of the night
    assert state.next_change_at == start + timedelta(hours=4)


def test_cron_run_lasts_its_duration_in_real_time() -> None:
    policy = ScheduledPolicy(cron="0 2 * * *", duration="90m", timezone="Europe/Madrid")
    fired = at(MADRID, 2024, 6, 12, 2, 0)
    inside = schedule_state(policy, now=fired + timedelta(minutes=89))
    assert inside.active
    assert inside.next_change_at == fired + timedelta(minutes=90)
    after = schedule_state(policy, now=fired + timedelta(minutes=90))
    assert not after.active
    assert after.next_change_at == at(MADRID, 2024, 6, 13, 2, 0)


def test_cron_missing_local_time_fires_after_the_gap() -> None:
    # 02:30 does not exist on 2024-03-31 in Madrid; cron runs it at 03:30 CEST (01:30 UTC).
    policy = ScheduledPolicy(cron="30 2 * * *", duration="1h", timezone="Europe/Madrid")
    state = schedule_state(policy, now=datetime(2024, 3, 31, 0, 0, tzinfo=UTC))
    assert not state.active
    assert state.next_change_at == datetime(2024, 3, 31, 1, 30, tzinfo=UTC)


def test_cron_repeated_local_time_runs_once() -> None:
    # 01:30 happens twice on 2024-11-03 in New York; the run starts at the first one only.
    policy = ScheduledPolicy(cron="30 1 * * *", duration="1h", timezone="America/New_York")
    first = datetime(2024, 11, 3, 5, 30, tzinfo=UTC)  # 01:30 EDT
    assert schedule_state(policy, now=first + timedelta(minutes=30)).active
    second = schedule_state(policy, now=first + timedelta(hours=1, minutes=30))  # 01:30 EST
    assert not second.active
    assert second.next_change_at == at(NEW_YORK, 2024, 11, 4, 1, 30)


def test_overlapping_cron_runs_merge() -> None:
    policy = ScheduledPolicy(cron="*/30 * * * *", duration="45m")
    state = schedule_state(policy, now=datetime(2024, 1, 1, 12, 10, tzinfo=UTC))
    assert state.active
    assert state.next_change_at >= datetime(2024, 1, 1, 18, 0, tzinfo=UTC)


def test_naive_now_is_refused() -> None:
    policy = ScheduledPolicy(cron="0 2 * * *")
    with pytest.raises(ValueError, match="naive"):
        schedule_state(policy, now=datetime(2024, 1, 1))


ZONES = st.sampled_from(["Europe/Madrid", "America/New_York"])
# Every minute of 2024's clock-change days and their neighbours, plus the rest of the year.
MOMENTS = st.one_of(
    st.datetimes(min_value=datetime(2024, 3, 9), max_value=datetime(2024, 4, 1)),
    st.datetimes(min_value=datetime(2024, 10, 26), max_value=datetime(2024, 11, 5)),
    st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2024, 12, 31)),
).map(lambda d: d.replace(tzinfo=UTC, microsecond=0))


@settings(max_examples=150, deadline=None)
@given(
    zone=ZONES,
    now=MOMENTS,
    start=st.integers(0, 23),
    length=st.integers(1, 23),
    days=st.sampled_from(["Daily", "Mon-Fri", "Sat,Sun", "Sun"]),
)
def test_window_activity_matches_the_local_wall_clock(
    zone: str, now: datetime, start: int, length: int, days: str
) -> None:
    """Away from the changed hour, activity is exactly "local day and time inside the
    window", and the state really changes at next_change_at and not before."""
    end = (start + length) % 24
    policy = ScheduledPolicy(window=f"{days} {start:02d}:00-{end:02d}:00 {zone}")
    window = policy.parsed_window
    assert window is not None
    state = schedule_state(policy, now=now)
    local = now.astimezone(ZoneInfo(zone))
    if local.hour in (1, 2, 3) and _near_clock_change(now, ZoneInfo(zone)):
        return  # checked by the named tests above
    opened_day = local.date() if local.hour >= start else local.date() - timedelta(days=1)
    crosses = end <= start
    inside_today = start <= local.hour and (crosses or local.hour < end)
    inside_from_yesterday = crosses and local.hour < end
    expected = (inside_today and local.weekday() in window.days) or (
        inside_from_yesterday and opened_day.weekday() in window.days
    )
    assert state.active == expected
    assert state.next_change_at > now
    just_before = schedule_state(policy, now=state.next_change_at - timedelta(seconds=1))
    assert just_before.active == state.active
    assert schedule_state(policy, now=state.next_change_at).active != state.active


def _near_clock_change(now: datetime, zone: ZoneInfo) -> bool:
    offsets = {(now + timedelta(hours=h)).astimezone(zone).utcoffset() for h in range(-26, 27)}
    return len(offsets) > 1


@settings(max_examples=60, deadline=None)
@given(zone=ZONES, now=MOMENTS, hour=st.integers(0, 23), minutes=st.integers(1, 600))
def test_cron_activity_is_the_last_firing_plus_duration(
    zone: str, now: datetime, hour: int, minutes: int
) -> None:
    policy = ScheduledPolicy(cron=f"15 {hour} * * *", duration=f"{minutes}m", timezone=zone)
    state = schedule_state(policy, now=now)
    assert state.next_change_at > now
    if state.active:
        assert state.next_change_at - now <= timedelta(minutes=minutes)
    after = schedule_state(policy, now=state.next_change_at)
    assert after.active != state.active
