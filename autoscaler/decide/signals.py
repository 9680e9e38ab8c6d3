"""What the scaling rules read about one workload's traffic: the gateway's measurements
(:class:`Signals`) and the engines' own load (:class:`EngineLoad`)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class Signals:
    """What the gateway measured for one workload.

    ``ttft_samples`` are ``(time, ttft_seconds)`` pairs, at least as far back as the
    longer of the two windows; older ones are ignored. ``request_rate`` is requests per
    second over the recent past, ``in_flight`` requests being served now, ``queue_depth``
    requests held by the gateway (no replica, or async jobs not yet started).

    ``engine_ttft_samples`` are the engines' own first-token times (from their
    histograms, ``autoscaler.reconcile.engine_metrics``): they cover the requests the
    gateway cannot time (answers not streamed). The TTFT rule reads the worse of the
    two percentiles, each over its own samples. ``unstreamed_samples`` are the gateway's
    ``(time, seconds)`` pairs for those requests: requests answered (rates, bursts),
    not TTFT. ``oldest_queued_at``: when the oldest queued async job was submitted
    (``None``: none queued).
    """

    ttft_samples: tuple[tuple[datetime, float], ...] = ()
    request_rate: float = 0.0
    in_flight: int = 0
    queue_depth: int = 0
    last_request_at: datetime | None = None
    engine_ttft_samples: tuple[tuple[datetime, float], ...] = ()
    unstreamed_samples: tuple[tuple[datetime, float], ...] = ()
    oldest_queued_at: datetime | None = None

    @property
    def answered_samples(self) -> tuple[tuple[datetime, float], ...]:
        """Every request answered: ``(first byte at, seconds to it)``, streamed or not."""
        if not self.unstreamed_samples:
            return self.ttft_samples
        return self.ttft_samples + self.unstreamed_samples

    @classmethod
    def from_epoch(
        cls,
        *,
        ttft_samples: Iterable[tuple[float, float]],
        request_rate: float,
        in_flight: int,
        queue_depth: int,
        last_request_at: float | None,
        unstreamed_samples: Iterable[tuple[float, float]] = (),
        oldest_queued_at: float | None = None,
    ) -> Signals:
        """Signals from epoch-second timestamps (the gateway's ``SignalSnapshot`` form)."""
        return cls(
            ttft_samples=_pairs_from_epoch(ttft_samples),
            unstreamed_samples=_pairs_from_epoch(unstreamed_samples),
            request_rate=request_rate,
            in_flight=in_flight,
            queue_depth=queue_depth,
            last_request_at=None if last_request_at is None else _from_epoch(last_request_at),
            oldest_queued_at=None if oldest_queued_at is None else _from_epoch(oldest_queued_at),
        )


def _from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


_FROM_EPOCH = functools.partial(datetime.fromtimestamp, tz=UTC)

_DATETIMES_KEPT = 1 << 16
"""Converted sample times remembered (:class:`_Datetimes`); about 10 MB when full."""


class _Datetimes(dict[float, datetime]):
    """Epoch seconds to their datetime, remembered: consecutive passes convert mostly
    the same samples (a window slides by a pass's worth), and a lookup costs a tenth of
    a conversion. Emptied when it holds :data:`_DATETIMES_KEPT`; a pure memo (the same
    float always gives the same datetime)."""

    def __missing__(self, seconds: float) -> datetime:
        if len(self) >= _DATETIMES_KEPT:
            self.clear()
        converted = self[seconds] = _FROM_EPOCH(seconds)
        return converted


_DATETIMES = _Datetimes()

_last: list[tuple[tuple[float, ...], tuple[datetime, ...]]] = [((), ())]
"""The times last converted and their datetimes: a workload's next pass reads the same
window slid forward, so the part they share is taken as it is (:func:`_datetimes_of`)."""


def _datetimes_of(times: tuple[float, ...]) -> tuple[datetime, ...]:
    """``times`` (epoch seconds) as datetimes. Where ``times`` starts inside the times
    last converted and matches them to their end (the window slid forward), their
    datetimes are reused and only the newer times converted; else each is looked up
    in :data:`_DATETIMES`. Exact either way: a datetime is reused only for an equal time."""
    last_times, last_datetimes = _last[0]
    try:
        start = last_times.index(times[0])  # a scan in C; samples need not be sorted
    except ValueError:
        start = len(last_times)
    shared = len(last_times) - start
    if 0 < shared <= len(times) and last_times[start:] == times[:shared]:
        converted = last_datetimes[start:] + tuple(map(_DATETIMES.__getitem__, times[shared:]))
    else:
        converted = tuple(map(_DATETIMES.__getitem__, times))
    _last[0] = (times, converted)
    return converted


def _pairs_from_epoch(
    samples: Iterable[tuple[float, float]],
) -> tuple[tuple[datetime, float], ...]:
    """``(epoch seconds, value)`` pairs with their times as datetimes. A snapshot holds
    thousands on a busy workload and the controller converts them every pass: the loop
    runs in C (``map``, ``zip``) over conversions already made (:func:`_datetimes_of`)."""
    pairs = tuple(samples)
    if not pairs:
        return ()
    times, values = zip(*pairs, strict=True)
    return tuple(zip(_datetimes_of(times), values, strict=True))


def with_engine_ttft(signals: Signals, samples: Iterable[tuple[float, float]]) -> Signals:
    """``signals`` with the engines' TTFT samples (epoch-second timestamps) added."""
    engine = tuple((_from_epoch(t), v) for t, v in samples)
    return replace(signals, engine_ttft_samples=engine)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engines of one workload report, summed over ``replicas`` scraped:
    requests waiting for a batch slot and running, and the fullest KV cache (0-1)."""

    replicas: int = 0
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float | None = None
