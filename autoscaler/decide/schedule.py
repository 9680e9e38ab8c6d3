"""Is a scheduled workload active at ``now``, and when does that next change?

Two shapes of schedule (see :class:`autoscaler.spec.ScheduledPolicy`):

* **cron + duration.** Each firing of the five-field crontab expression, read in the
  policy's ``timezone``, opens ``duration`` of activity. The duration is elapsed time,
  not wall-clock time: a one-hour run that straddles a clock change still lasts one
  hour. Firings whose runs overlap merge into one longer run.
* **weekly window.** ``"Mon-Fri 08:00-20:00 Europe/Madrid"``: opens at the local start
  time on each named day and closes at the local end time, the next day when the end is
  not after the start (a window that crosses midnight belongs to the day it opens).

Clock changes follow cron's conventions: a local time that does not exist (clocks go
forward) is read with the offset in force before the change, so it happens one gap
later in wall-clock terms; a local time that happens twice (clocks go back) counts once,
at its first occurrence.

Cron arithmetic is apscheduler 3's ``CronTrigger``: pure computation, no scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

from autoscaler.spec import ScheduledPolicy, Window

RECHECK_HORIZON = timedelta(days=8)
"""The furthest ahead a schedule is searched. A schedule that does not change within it
(a cron that fires more often than its runs last) reports the horizon as its next change,
so the controller simply looks again then."""

RUN_HORIZON = timedelta(hours=6)
"""How far ahead overlapping cron runs are merged. A cron that fires more often than its
runs last is active past it; the controller is told to look again then."""


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """Whether the schedule is active, how many replicas that asks for, and until when."""

    active: bool
    replicas: int
    next_change_at: datetime
    reason: str


def schedule_state(policy: ScheduledPolicy, *, now: datetime) -> ScheduleState:
    """The schedule's state at ``now`` (an aware datetime) and when it next changes (UTC)."""
    now = _aware_utc(now)
    window = policy.parsed_window
    if window is not None:
        active, change, why = _window_state(window, now=now, text=policy.window or "")
    else:
        assert policy.cron is not None  # the policy validates exactly one of the two
        active, change, why = _cron_state(
            policy.cron, zone=ZoneInfo(policy.timezone), duration_sec=policy.duration_sec, now=now
        )
    replicas = policy.replicas if active else 0
    return ScheduleState(
        active=active,
        replicas=replicas,
        next_change_at=change,
        reason=f"{why}: {replicas} replica{'s' if replicas != 1 else ''}",
    )


def format_offset(offset: timedelta) -> str:
    """A schedule clock's offset from the wall clock, as logs and reasons show it:
    ``+9h00m00s``, ``-0h30m00s``, ``+50h00m00s``."""
    seconds = round(offset.total_seconds())
    sign, seconds = ("-" if seconds < 0 else "+"), abs(seconds)
    return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _aware_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"now={moment!r} is naive: pass an aware datetime (UTC)")
    return moment.astimezone(UTC)


def _fmt(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


# --- cron ---------------------------------------------------------------------------------


def _cron_state(
    expr: str, *, zone: ZoneInfo, duration_sec: int, now: datetime
) -> tuple[bool, datetime, str]:
    trigger = CronTrigger.from_crontab(expr, timezone=zone)
    duration = timedelta(seconds=duration_sec)
    horizon = now + RECHECK_HORIZON
    # The earliest firing whose run still covers ``now`` opens the search.
    first = _next_firing(trigger, zone, after=now - duration + timedelta(microseconds=1))
    if first is None or first > now:
        if first is None or first > horizon:
            return False, horizon, f"cron {expr!r} does not fire before {_fmt(horizon, zone)}"
        return False, first, f"cron {expr!r} next fires at {_fmt(first, zone)}"
    end = first + duration
    fired = first
    run_horizon = max(now + RUN_HORIZON, end)
    while end <= run_horizon:
        following = _next_firing(trigger, zone, after=fired + timedelta(seconds=1))
        if following is None or following > end:
            break
        fired, end = following, max(end, following + duration)
    if end > run_horizon:
        return (
            True,
            run_horizon,
            f"cron {expr!r} fires more often than its {duration_sec}s runs last; active "
            f"at least until {_fmt(run_horizon, zone)}",
        )
    return (
        True,
        end,
        f"cron {expr!r} fired at {_fmt(fired, zone)}; active for {duration_sec}s until "
        f"{_fmt(end, zone)}",
    )


def _next_firing(trigger: CronTrigger, zone: ZoneInfo, *, after: datetime) -> datetime | None:
    """The first firing at or after ``after`` (UTC), skipping repeats of a wall-clock time."""
    moment = after
    for _ in range(4):  # at most one repeated wall time can be skipped per clock change
        fire = trigger.get_next_fire_time(None, moment.astimezone(zone))
        if fire is None:
            return None
        fire_utc: datetime = fire.astimezone(UTC)
        if not _is_repeat(fire_utc, zone):
            return fire_utc
        moment = fire_utc + timedelta(seconds=1)
    return None


def _is_repeat(moment: datetime, zone: ZoneInfo) -> bool:
    """Whether ``moment``'s local wall time already happened once (clocks went back)."""
    wall = moment.astimezone(zone).replace(tzinfo=None)
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC) != moment


# --- weekly windows -----------------------------------------------------------------------


def _window_state(window: Window, *, now: datetime, text: str) -> tuple[bool, datetime, str]:
    zone = window.zone
    today = now.astimezone(zone).date()
    spans = _merged(
        [
            _span(window, day=today + timedelta(days=offset))
            for offset in range(-2, RECHECK_HORIZON.days + 1)
            if (today + timedelta(days=offset)).weekday() in window.days
        ]
    )
    for opens, closes in spans:
        if opens <= now < closes:
            return True, closes, f"window {text!r} open until {_fmt(closes, zone)}"
        if now < opens:
            return False, opens, f"window {text!r} closed; opens at {_fmt(opens, zone)}"
    horizon = now + RECHECK_HORIZON
    return False, horizon, f"window {text!r} does not open before {_fmt(horizon, zone)}"


def _span(window: Window, *, day: date) -> tuple[datetime, datetime]:
    """The UTC interval of the window that opens on local date ``day``."""
    closes_on = day if window.end > window.start else day + timedelta(days=1)
    return _local(day, window.start, window.zone), _local(closes_on, window.end, window.zone)


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    # fold=0: a missing time takes the offset before the change; a repeated one its first.
    return datetime.combine(day, at).replace(tzinfo=zone, fold=0).astimezone(UTC)


def _merged(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sorted spans with overlapping or touching ones joined (a clock change can make two
    consecutive windows meet)."""
    merged: list[tuple[datetime, datetime]] = []
    for opens, closes in sorted(spans):
        if closes <= opens:
            continue
        if merged and opens <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], closes))
        else:
            merged.append((opens, closes))
    return merged
