"""How many replicas a measured load needs: the queueing model behind the scaling rules.

Pure functions of one replica's capacity (:class:`ReplicaCapacity`, from
``catalog.perf``) and the measured signals:

* :func:`load_need`: batch slots and prefill as M/G/c queues at the recent rate
  (:func:`recent_rate`), sized so that :data:`WAIT_QUANTILE` of arrivals wait no longer
  than the TTFT target leaves after a typical prefill (:func:`queue_need`,
  :func:`slot_need`, :func:`erlang_c`);
* :func:`burst_floor`: headroom over the largest recent burst, read from the arrival
  curve (:func:`arrival_curve`).

``autoscaler.decide.scaling`` applies these in its load and consolidation rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from itertools import compress, count, repeat
from operator import add, gt, itemgetter, lt, sub
from statistics import NormalDist

from autoscaler.decide.signals import Signals
from autoscaler.spec import AutoscalingPolicy

SAFE_UTILIZATION = 0.75
"""Share of a replica's throughput the load need runs it at when batch slots cannot be
sized (no prefill time or batch size); the consolidation check's margin likewise."""


RECENT_LOAD_WINDOW_SEC = 60.0
"""The window the recent request rate is read over: first tokens (one per request
answered, from ``ttft_samples``) plus requests still waiting for one."""

BACKLOG_CLEAR_SEC = 60.0
"""Queued requests are to be cleared within this, on top of the incoming rate."""

WAIT_QUANTILE = 0.99
"""With a prefill time known, the fleet is sized so that this share of requests waits no
longer than the TTFT target leaves after a typical prompt's own prefill."""

BURST_WINDOWS_SEC: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
"""The window lengths at which the burst floor reads the arrival curve: the most requests
that arrived within any window of each length. Longer spans are sustained load, which
the load need sizes by queueing."""

BURST_HEADROOM = 1.6
"""The burst floor keeps capacity for a burst this many times the largest one in its
memory. A replica bought after a burst arrives a boot (minutes) later, so the capacity
for the next burst has to be there before it; on the Azure code trace a burst is
followed minutes later by a larger one (61, then 68 requests within a second), and a
burst's prompts run longer than the mean the floor is sized with (2.5k tokens against
2.0k). Measured on the three benchmark traces (``bench.policy``): 1.4 misses the SLO on
code and Mooncake, 1.5 meets it by 0.1-0.2 points, 1.6 with a margin on all three (seeds
0-2), 1.75 costs 13 % more on code for no gain (``docs/decisions.md``)."""

PREFILL_TTFT_FACTOR = 1.5
"""A TTFT quantile up to this times the same quantile of prefill alone is explained by
long prompts, not by too few replicas (the simulator's SLO rule uses the same factor)."""

_MAX_QUEUE_REPLICAS = 4096


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    """How much one replica can carry for this model (from ``catalog.perf``), if known.

    ``requests_per_s`` a saturated replica completes; ``max_concurrency`` sequences it
    runs at once (the engine's batch limit).
    """

    requests_per_s: float
    max_concurrency: int | None = None
    prefill_s: float | None = None
    """Mean time one replica takes to prefill a prompt of the measured mix, alone. With it
    the scaler sizes the fleet by queueing (:func:`queue_need`), not a flat utilisation."""
    prefill_scv: float = 1.0
    """Squared coefficient of variation of prefill times (the prompt-length spread:
    variance over squared mean). 1 is as spread as an exponential."""
    fastest_prefill_s: float | None = None
    """The same mean prompt's prefill alone on one GPU of the fastest kind the workload may
    use: the SLO's reference for long prompts. A TTFT that only this replica's slower
    prefill explains is a miss a faster shape would avoid, not an excuse
    (``decide.scaling.breach_bound``)."""
    output_tokens_per_s: float | None = None
    """Generated tokens per second a saturated replica sustains at the measured mix
    (``requests_per_s`` times the mean completion): what ``min_throughput_rate`` counts."""


def prefill_quantile(capacity: ReplicaCapacity, q: float) -> float | None:
    """The ``q`` quantile of prefill time alone, from its mean and spread taken as
    lognormal (``sigma^2 = ln(1 + scv)``); ``None`` without a prefill time."""
    mean = capacity.prefill_s
    if mean is None or mean <= 0:
        return None
    sigma = math.sqrt(math.log1p(max(capacity.prefill_scv, 0.0)))
    z = NormalDist().inv_cdf(min(max(q, 1e-6), 1 - 1e-6))
    return mean * math.exp(sigma * z - sigma * sigma / 2.0)


def recent_rate(signals: Signals, *, now: datetime) -> float:
    """Requests per second over :data:`RECENT_LOAD_WINDOW_SEC`: those answered (a TTFT
    sample each), plus those queued, which arrived and await an answer. Never below the
    gateway's own (longer-window) ``request_rate``."""
    since = now - timedelta(seconds=RECENT_LOAD_WINDOW_SEC)
    # The samples answered after ``since``, counted in C (``at > since`` for each).
    answered: int = sum(map(partial(lt, since), map(itemgetter(0), signals.answered_samples)))
    recent = (answered + signals.queue_depth) / RECENT_LOAD_WINDOW_SEC
    return max(recent, signals.request_rate)


def peak_rate(signals: Signals, *, now: datetime, over_s: float) -> float:
    """Requests per second in the busiest :data:`RECENT_LOAD_WINDOW_SEC` of the last
    ``over_s`` seconds, by arrival (read from the samples as :func:`arrival_curve` reads
    them). The scale-down rule sizes the smaller fleet for it: scale-up reads the last
    window's rate, so a fleet shrunk for a quiet minute that the next busy one undoes
    would pay a boot for each such minute (the hysteresis between the two)."""
    curve = arrival_curve(signals, now=now, over_s=over_s, windows=(RECENT_LOAD_WINDOW_SEC,))
    return curve[RECENT_LOAD_WINDOW_SEC] / RECENT_LOAD_WINDOW_SEC


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``servers`` servers and
    ``offered`` load (arrival rate x mean service time); 1 when ``offered >= servers``."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    blocking = 1.0  # Erlang B by its stable recurrence
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    rho = offered / servers
    return blocking / (1.0 - rho * (1.0 - blocking))


def queue_need(
    *, rate: float, service_s: float, service_scv: float, wait_s: float, quantile: float
) -> int:
    """The fewest servers for which the ``quantile`` of waiting time stays within ``wait_s``.

    M/G/c with Poisson arrivals: an arrival waits with the Erlang C probability, and a
    wait, when there is one, is taken as exponential with the M/M/c rate ``(c - a) / S``
    scaled by ``2 / (1 + scv)`` (the Allen-Cunneen / Kingman correction for service-time
    spread). So ``P(wait > t) = C(c, a) * exp(-2 (c - a) t / ((1 + scv) S))``.
    """
    offered = rate * service_s
    if offered <= 0:
        return 0
    allowed = 1.0 - quantile
    servers = max(math.floor(offered) + 1, 1)
    spread = (1.0 + max(service_scv, 0.0)) / 2.0
    # :func:`erlang_c` for each count tried, its Erlang B recurrence carried from one
    # count to the next instead of restarted (the same steps, so the same floats): a
    # fleet's batch slots are hundreds of servers.
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    while servers < _MAX_QUEUE_REPLICAS:
        decay = (servers - offered) / (service_s * spread)
        rho = offered / servers
        waits = blocking / (1.0 - rho * (1.0 - blocking))  # erlang_c(servers, offered)
        if waits * math.exp(-decay * max(wait_s, 0.0)) <= allowed:
            return servers
        servers += 1
        blocking = offered * blocking / (servers + offered * blocking)
    return servers


def _wait_budget(capacity: ReplicaCapacity, upper_s: float) -> float | None:
    """How long a typical request may wait before its own prefill, if known and positive."""
    if capacity.prefill_s is None or capacity.prefill_s <= 0:
        return None
    return upper_s - capacity.prefill_s


def load_need(
    capacity: ReplicaCapacity,
    signals: Signals,
    *,
    now: datetime,
    upper_s: float | None = None,
    rate: float | None = None,
) -> tuple[int, float]:
    """Replicas the measured load needs, and the rate it was read as (``rate``, else
    :func:`recent_rate`).

    Throughput, for the rate (queue cleared within :data:`BACKLOG_CLEAR_SEC`): with a
    prefill time, a batch size and ``upper_s`` (the TTFT target), the replicas whose
    batch slots let :data:`WAIT_QUANTILE` of arrivals start within the target's wait
    budget (:func:`slot_need`); otherwise :data:`SAFE_UTILIZATION` of ``capacity``.
    With a prefill time, also queueing for prefill: the fewest replicas for which
    :data:`WAIT_QUANTILE` of arrivals wait no more than the target leaves after a
    typical prefill (:func:`queue_need`); the larger of the two counts.
    """
    if rate is None:
        rate = recent_rate(signals, now=now)
    per_replica = capacity.requests_per_s * SAFE_UTILIZATION
    if per_replica <= 0:
        return 0, rate
    load = rate + signals.queue_depth / BACKLOG_CLEAR_SEC
    need = slot_need(capacity, load, upper_s)
    if need is None:
        need = math.ceil(load / per_replica - 1e-9)
    return max(need, _queue_need(capacity, load, upper_s)), rate


def slot_need(capacity: ReplicaCapacity, rate: float, upper_s: float | None) -> int | None:
    """Replicas whose batch slots carry ``rate`` so that :data:`WAIT_QUANTILE` of
    arrivals find a slot within the wait budget (``upper_s`` less a typical prefill);
    ``None`` without a prefill time, a batch size or a positive budget.

    Each replica's ``max_concurrency`` sequences are servers of an M/G/c queue; a
    request holds one, by Little's law, ``max_concurrency / requests_per_s`` seconds at
    saturation (its time is shorter in a smaller batch, so this errs long), with
    exponential spread. Sized by :func:`queue_need` over all the fleet's slots, which
    asks for less headroom the more slots share the load, where a flat utilisation
    asks the same of one replica as of ten.
    """
    slots = capacity.max_concurrency
    budget = None if upper_s is None else _wait_budget(capacity, upper_s)
    if not slots or budget is None or budget <= 0 or capacity.requests_per_s <= 0:
        return None
    if rate <= 0:
        return 0
    needed = queue_need(
        rate=rate,
        service_s=slots / capacity.requests_per_s,
        service_scv=1.0,
        wait_s=budget,
        quantile=WAIT_QUANTILE,
    )
    return math.ceil(needed / slots)


def _allowed_wait(capacity: ReplicaCapacity, upper_s: float | None) -> float | None:
    """How long a typical request may wait before its prefill: the wait budget, or, when
    a typical prompt alone takes longer than the target (no budget), a wait short
    against its own prefill (the SLO allows :data:`PREFILL_TTFT_FACTOR` times it).
    ``None`` without a prefill time or a target."""
    budget = None if upper_s is None else _wait_budget(capacity, upper_s)
    if budget is None or capacity.prefill_s is None:
        return None
    return budget if budget > 0 else capacity.prefill_s * (PREFILL_TTFT_FACTOR - 1.0)


def _queue_need(capacity: ReplicaCapacity, rate: float, upper_s: float | None) -> int:
    wait = _allowed_wait(capacity, upper_s)
    if wait is None or capacity.prefill_s is None:
        return 0
    return queue_need(
        rate=rate,
        service_s=capacity.prefill_s,
        service_scv=capacity.prefill_scv,
        wait_s=wait,
        quantile=WAIT_QUANTILE,
    )


def arrival_curve(
    signals: Signals,
    *,
    now: datetime,
    over_s: float,
    windows: Iterable[float] = BURST_WINDOWS_SEC,
) -> dict[float, int]:
    """For each window length ``w``: the most requests that arrived within any ``w``
    seconds of the last ``over_s`` seconds.

    Arrival times are read from the TTFT samples (first token time minus TTFT, exact for
    every request answered). Requests still queued are left out: when they arrived is not
    known, and counting them all as arriving now made a backlog look like a burst and
    bought replicas for it (the load need carries the backlog).
    """
    windows = tuple(windows)
    if _memo.signals is not signals:
        _memo.signals = signals
        _memo.curves.clear()
        _memo.ages.clear()
    known = _memo.curves.get((now, over_s, windows))
    if known is not None:
        return dict(known)  # the load, burst and consolidation rules ask, in one pass
    ages = _memo.ages.get((now, over_s))
    if ages is None:
        # ``(now - at).total_seconds() + ttft`` per sample and ``age < over_s``, in C.
        samples = signals.answered_samples
        since = map(timedelta.total_seconds, map(sub, repeat(now), map(itemgetter(0), samples)))
        every = list(map(add, since, map(itemgetter(1), samples)))
        ages = sorted(compress(every, map(partial(gt, over_s), every)))
        _memo.ages[(now, over_s)] = ages
    curve: dict[float, int] = {}
    for window in windows:
        # The most requests within ``window`` after any one: ``most`` grows while the
        # request ``most`` places after the k-th is within the window of it (the ages
        # are sorted, so the k-th request's window holds a run from it). One pass,
        # about one comparison per sample (the controller asks this every tick over
        # five minutes of samples, thousands on a busy service): the comparisons
        # ``ages[k + most] < ages[k] + span`` run in C, pairing each age with the
        # one ``most`` places on (``later``, an iterator kept that far ahead), and
        # Python steps in only where one holds and ``most`` grows.
        span = window - 1e-9
        later = iter(ages)
        most = 0
        for k in compress(count(), map(lt, later, map(add, ages, repeat(span)))):
            most += 1  # ages[k + most] was within the window of ages[k]
            limit = ages[k] + span
            for age in later:  # ages[k + most], and on while within it
                if not age < limit:
                    break  # k + 1 pairs with the age after this one
                most += 1
        curve[window] = most
    _memo.curves[(now, over_s, windows)] = dict(curve)
    return curve


@dataclass(slots=True)
class _CurveMemo:
    """Arrival curves and sorted arrival ages already read from one ``Signals`` object
    (held, so its identity is not reused), by moment, span and windows: a pure memo."""

    signals: Signals | None = None
    curves: dict[tuple[datetime, float, tuple[float, ...]], dict[float, int]] = field(
        default_factory=dict
    )
    ages: dict[tuple[datetime, float], list[float]] = field(default_factory=dict)


_memo = _CurveMemo()


@dataclass(frozen=True, slots=True)
class Burst:
    """The burst that sets the burst floor: ``requests`` within ``window_s`` seconds."""

    requests: int
    window_s: float
    replicas: int

    def text(self, over_s: float) -> str:
        return (
            f"a burst of {self.requests} requests within {self.window_s:g}s in the last {over_s:g}s"
        )


def burst_floor(
    capacity: ReplicaCapacity, signals: Signals, *, now: datetime, policy: AutoscalingPolicy
) -> tuple[int, Burst | None]:
    """Replicas that keep :data:`BURST_HEADROOM` times the largest burst of the last
    ``scale_down_time_window_sec`` within the TTFT target, and that burst.

    A deterministic bound from the arrival curve: ``n`` requests arriving within ``w``
    seconds bring ``n x prefill_s`` seconds of prefill work; ``c`` replicas, balanced by
    outstanding prefill work, clear it with no request waiting longer than the wait
    budget (the target less a typical prefill) when ``c >= n x prefill_s / (w +
    budget)`` (network calculus: the service curve stays within the budget of the
    arrival curve). Taken over :data:`BURST_WINDOWS_SEC`, the largest wins.

    A keep-alive rule too: capacity a burst needed is held for the scale-down window
    after it. Releasing a replica and buying it back within a boot time costs more than
    holding it (billing runs from launch) and misses the burst it was bought for, so the
    hold should be at least a boot; the default window (300 s) covers a typical GPU boot
    of about three minutes. Zero without a prefill time.
    """
    wait = _allowed_wait(capacity, policy.upper_allowed_latency_sec)
    if wait is None or capacity.prefill_s is None:
        return 0, None
    curve = arrival_curve(signals, now=now, over_s=policy.scale_down_time_window_sec)
    worst: Burst | None = None
    for window, requests in curve.items():
        work = BURST_HEADROOM * requests * capacity.prefill_s
        replicas = math.ceil(work / (window + wait) - 1e-9)
        if replicas > 0 and (worst is None or replicas > worst.replicas):
            worst = Burst(requests=requests, window_s=window, replicas=replicas)
    return (0, None) if worst is None else (worst.replicas, worst)


def fleet_rate(signals: Signals, *, now: datetime, policy: AutoscalingPolicy) -> float:
    """The rate :func:`fleet_need` sizes a fleet for: the busier of the last minute
    (:func:`recent_rate`) and the busiest minute of the scale-down window
    (:func:`peak_rate`). O(samples in the window); the same for every GPU shape."""
    return max(
        recent_rate(signals, now=now),
        peak_rate(signals, now=now, over_s=policy.scale_down_time_window_sec),
    )


def fleet_need(
    capacity: ReplicaCapacity,
    signals: Signals,
    *,
    now: datetime,
    policy: AutoscalingPolicy,
    rate: float | None = None,
) -> int:
    """Replicas of ``capacity`` the measured load needs, at least one: the larger of the
    load rule at :func:`fleet_rate` (:func:`load_need`) and the burst floor
    (:func:`burst_floor`), the counts a scale-down keeps (``decide.scaling``). Placement
    prices a fleet of each GPU shape by it, and passes ``rate`` (``fleet_rate`` of the
    same signals, moment and policy) read once for all the shapes. O(samples in the
    window)."""
    upper = policy.upper_allowed_latency_sec
    if rate is None:
        rate = fleet_rate(signals, now=now, policy=policy)
    by_rate, _ = load_need(capacity, signals, now=now, upper_s=upper, rate=rate)
    by_burst, _ = burst_floor(capacity, signals, now=now, policy=policy)
    return max(by_rate, by_burst, 1)


def capacity_text(cap: ReplicaCapacity) -> str:
    if cap.prefill_s is not None and cap.max_concurrency:
        text = f"{cap.max_concurrency} batch slots at {cap.requests_per_s:.2f} req/s each"
    else:
        text = f"{SAFE_UTILIZATION:.0%} of {cap.requests_per_s:.2f} req/s each"
    if cap.prefill_s is not None:
        text += (
            f"; p{WAIT_QUANTILE * 100:g} wait within the target after a "
            f"{cap.prefill_s:.3f}s prefill (spread {cap.prefill_scv:.2f})"
        )
    return text
