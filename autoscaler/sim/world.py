"""The discrete-event simulation: a clock, the simulated cloud, replicas, the gateway and
a controller that carries out a policy's count with the controller's own decisions.

Time jumps from event to event (an arrival, a first token, a finish, a machine becoming
ready, warned of its reclaim or reclaimed, a controller tick, a timeline sample), so an
hour of traffic replays in seconds.

A spot machine's warning (``providers.simulated.SPOT_NOTICE_LEAD_S`` before its reclaim:
120 s on AWS, 30 s on GCP) wakes the controller, which heeds it as the reconciler does
(``reconcile.workload``): its spot market skipped for ``unavailable_sec``, the replica
terminated if still booting or parked in a warm pool (asleep), and the replacement (or
the pool's refill) launched by the same step. A ready
one keeps taking requests until its replacement is ready or until
``decide.plan.SPOT_DRAIN_MARGIN_S`` before the reclaim, whichever comes first
(``decide.plan.heed_spot_notice``), then drains. The warm fleet, bought
:data:`WARM_LEAD_S` before time 0, is heeded the same way: a warning before time 0 wakes
the controller, which steps from then on with the warm fleet's count (no traffic before
time 0 to measure), so what the cloud reclaims of it is replaced before the trace starts.

Every random draw comes from generators seeded by ``seed``: the cloud's (stock-outs, boot
times, spot lifetimes) and the gateway's (balancing ties).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from autoscaler.decide.inputs import TokenMix, measured_of, shape_of
from autoscaler.decide.placement import Placement, PlacementMemo, pool_gpu_kinds
from autoscaler.decide.plan import (
    Drain,
    Launch,
    Park,
    ReplicaPhase,
    ReplicaView,
    Resume,
    Terminate,
    counted_phase,
    heed_spot_notice,
)
from autoscaler.decide.scaling import FleetCounts, ScaleMemory
from autoscaler.decide.spot_rate import SpotLife, spot_rate
from autoscaler.decide.step import (
    ReplicaState,
    StepKnobs,
    WorkloadView,
    fleet_counts,
    mark_unavailable,
    place_next,
    step,
    unplaced_reason,
)
from autoscaler.decide.warm import (
    DEFAULT_START_TIMES,
    ParkMode,
    StartPath,
    StartSample,
    StartTimes,
    start_times_from,
    warm_policy_of,
)
from autoscaler.reconcile.ledger import START_SAMPLES
from autoscaler.reconcile.provisioner import may_sleep
from autoscaler.sim.gateway import Outcome, RequestRecord, SimGateway, as_datetime
from autoscaler.sim.gcpause import paused_gc
from autoscaler.sim.policies import ControllerPolicy, ControlView, Policy
from autoscaler.sim.prefix import DEFAULT_ROUTING, HotSpotMeter, PrefixRouter, Routing, tpot_s
from autoscaler.sim.trace import TraceRequest
from autoscaler.sim.warm import START_MEDIAN_S, START_SIGMA, STOP_S, sleep_seconds, wake_seconds
from autoscaler.sim.workload import SimWorkload
from autoscaler.store.phase import SPOT_NOTICE
from catalog.engine import BatchEngine, EventKind
from catalog.model import Offer
from catalog.query import Market
from catalog.storage import stopped_usd_per_hour
from gateway.balancing import ReplicaLoad
from gateway.window import replica_cap
from providers.base import BootSpec, LaunchRequest, instance_tags
from providers.errors import InsufficientCapacity, QuotaExceeded
from providers.simulated import LogNormalBootTime, SimulatedCloud, SimulationConfig

EPOCH_S = 1_700_000_000.0
"""Simulated time 0 on the cloud's clock (any fixed instant would do)."""

FRESH, START, WAKE = "fresh", "start", "wake"
"""The start paths a replica's boot takes (``autoscaler.decide.warm``)."""

START_PATHS = (FRESH, START, WAKE)

UNSERVED = "unserved"
"""The ``cold_path`` of a scale-from-zero request no replica served."""

DEMAND_INTERVAL_S = 1.0
"""A request arriving with no replica ready runs a controller pass at once, as the
gateway's ``on_demand`` wakes the controller's loop, at most this often (the gateway's
worker processes report demand at zero once a second at most)."""

SAMPLE_INTERVAL_S = 10.0
"""Timeline resolution."""

WARM_LEAD_S = 1800.0
"""Warm-start replicas are bought this long before time 0; billing starts at time 0."""

WARM_FLEET_REASON = "the warm fleet: the count the traffic before time 0 asked for"
"""The count a step before time 0 is given: the simulator has no traffic before time 0
to measure, and the warm fleet is what the policy held for it."""

WARM_START_ATTEMPTS = 8
"""Offers tried per warm-start replica before the warm fleet is left smaller."""


class SimClock:
    """The simulation's clock, on the ``providers.base.Clock`` protocol."""

    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t


@dataclass(slots=True)
class SimReplica:
    """One bought machine and, once it is ready, its engine."""

    launch_id: str
    instance_id: str
    offer: Offer
    spot: bool
    usd_per_hour: float
    intent_s: float
    running_s: float
    interrupt_s: float | None
    notice_s: float | None = None
    """When its provider warns of the reclaim at ``interrupt_s`` (``None``: no warning;
    ``providers.simulated.SPOT_NOTICE_LEAD_S``)."""
    engine: BatchEngine | None = None
    drain_s: float | None = None
    ended_s: float | None = None
    interrupted: bool = False
    """Warned of a spot interruption, or ended by one (the measured rate counts it, as
    ``reconcile.liveness.interrupted`` counts a row with a recorded notice)."""
    noticed: bool = False
    """Its warning has come; the controller heeds it at its next step."""
    heeded: bool = False
    """The controller has acted on its warning (``decide.plan.heed_spot_notice``): the
    plan sees it warned (``decide.plan.ReplicaView.warned``), as the reconciler's does a
    row whose spot notice is recorded."""
    reclaim_known: bool = True
    """Whether its warning says when the reclaim comes (``False``: a notice without a
    time, as ``providers.base.reclaim_time`` leaves one of a provider of unknown lead;
    the controller drains it at once)."""
    requests: dict[int, RequestRecord] = field(default_factory=dict)
    work: int = 0
    """The balancer's weight of ``requests`` (``gateway.balancing.request_work``)."""
    path: str = FRESH
    """How its current boot started: ``fresh``, ``start`` (a stopped machine) or ``wake``."""
    boot_asked_s: float = 0.0
    """When its current boot was asked for (the launch, or the resume)."""
    prefill: bool = False
    """Launched to refill a warm pool: not routed until it is resumed after its park."""
    park_mode: ParkMode | None = None
    park_done_s: float | None = None
    """When its current park (sleep or stop) completes."""
    parked: bool = False
    """Whether that park has completed."""
    resumed_s: float | None = None
    park_asked_s: float | None = None
    """When its current park was asked for (``None``: not parked)."""
    parked_span_s: float = 0.0
    """Seconds it spent parking or parked before its current park."""
    stopped_since_s: float | None = None
    """When its machine stopped (billed for its disk from then), while stopped."""
    stopped_s: float = 0.0
    """Seconds its machine spent stopped before ``stopped_since_s``."""
    stopped_usd_per_hour: float | None = None
    """What it costs stopped (``None``: a spot machine, which cannot stop)."""

    def phase(self) -> ReplicaPhase:
        if self.ended_s is not None:
            return ReplicaPhase.TERMINATED
        if self.park_mode is not None:
            return ReplicaPhase.PARKED if self.parked else ReplicaPhase.PARKING
        if self.drain_s is not None:
            return ReplicaPhase.DRAINING
        return ReplicaPhase.READY if self.engine is not None else ReplicaPhase.BOOTING

    def plan_phase(self) -> ReplicaPhase:
        """Its phase as the step counts it: a ready replica warned of its reclaim is
        draining there (replaced at once) while it still serves until its drain
        (``decide.plan.ReplicaView.still_serving``)."""
        return counted_phase(self.phase(), warned=self.heeded)

    def reclaim_at(self) -> datetime | None:
        """When its reclaim comes as its warning says (``None``: not said, or no reclaim)."""
        if not self.reclaim_known or self.interrupt_s is None:
            return None
        return as_datetime(EPOCH_S + self.interrupt_s)

    @property
    def refilling(self) -> bool:
        """A warm-pool refill on its way to its first park: never routed."""
        return self.prefill and self.resumed_s is None and self.park_mode is None

    def stopped_seconds(self, t: float) -> float:
        """Seconds its machine was stopped up to ``t`` (or its end)."""
        since = self.stopped_since_s
        if since is None:
            return self.stopped_s
        stop = t if self.ended_s is None else min(t, self.ended_s)
        return self.stopped_s + max(0.0, stop - since)

    def stop_credit_usd(self, t: float) -> float:
        """What its time stopped cost less than the same time running."""
        if self.stopped_usd_per_hour is None:
            return 0.0
        return self.stopped_seconds(t) * (self.usd_per_hour - self.stopped_usd_per_hour) / 3600.0

    def hourly_usd(self, t: float) -> float:
        """What it costs an hour at ``t``: its disk while stopped, else its machine."""
        if self.ended_s is not None:
            return 0.0
        if self.stopped_since_s is not None and self.stopped_usd_per_hour is not None:
            return self.stopped_usd_per_hour
        return self.usd_per_hour


@dataclass(frozen=True, slots=True)
class Sample:
    """The timeline at one moment."""

    t: float
    request_rate: float
    ready: int
    booting: int
    draining: int
    desired: int
    ttft_p95_s: float | None
    usd_per_hour: float
    parked: int = 0
    """Replicas parking or parked (asleep or stopped)."""


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    t: float
    kind: str
    detail: str


@dataclass(slots=True)
class Outcomes:
    """What a run produced: every request, the timeline, the events and the bill."""

    records: list[RecordOutcome]
    timeline: list[Sample]
    events: list[ScaleEvent]
    cost_usd: float
    gpu_hours: float
    end_s: float
    prefix_queries_tokens: int = 0
    """Prompt tokens the engines looked up in their prefix caches (``autoscaler.sim.prefix``)."""
    prefix_hits_tokens: int = 0
    """Of those, the tokens found cached (no prefill)."""
    hot_spot_requests: float = 0.0
    """The highest per-minute ratio of the busiest replica's mean outstanding requests to
    the fleet's mean (``autoscaler.sim.prefix.HotSpotMeter``; 0 when never measured)."""
    hot_spot_work: float = 0.0
    """The same ratio for the balancer's outstanding work (prompt tokens awaiting prefill)."""
    parked_usd: float = 0.0
    """Of ``cost_usd``, what parked and parking replicas cost (asleep: the machine's
    price; stopped: the disk's; stopping: the machine's)."""
    start_times: dict[str, list[float]] = field(default_factory=dict)
    """Seconds from asking to ready of every boot, by start path (sorted)."""
    resumes: dict[str, int] = field(default_factory=dict)
    """Resumes by start path (``wake``, ``start``)."""


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    input_tokens: int
    arrival_s: float
    ttft_s: float | None
    outcome: Outcome
    tpot_s: float = math.nan
    """Time per output token after the first (``nan``: not measured)."""
    cold_path: str | None = None
    """For a request that arrived with no replica ready (scale from zero), the start
    path of the replica that served it (``None``: another request, or never served)."""


@dataclass(frozen=True, slots=True)
class CloudSettings:
    """The simulated cloud's behaviour for a run (seeded separately)."""

    boot_median_s: float = 180.0
    boot_sigma: float = 0.35
    stockout_probability: float = 0.02
    stockout_s: float = 900.0
    spot_interruptions_per_hour: float = 0.2
    start_median_s: float = START_MEDIAN_S
    """A stopped machine's start until it serves: median and lognormal spread
    (``autoscaler.sim.warm``)."""
    start_sigma: float = START_SIGMA
    stop_s: float = STOP_S


class World:
    """One run of one policy on one trace."""

    def __init__(
        self,
        *,
        workload: SimWorkload,
        offers: Sequence[Offer],
        policy: Policy,
        requests: Sequence[TraceRequest],
        seed: int,
        cloud: CloudSettings,
        allow_spot: bool,
        initial_replicas: int,
        initial_mix: tuple[float, float] | None = None,
        knobs: StepKnobs | None = None,
        routing: Routing = DEFAULT_ROUTING,
    ) -> None:
        self.workload = workload
        self.spec = with_spot(workload, allow_spot).spec
        self.offers = tuple(offers)
        self._placements = PlacementMemo()
        """The offers indexed once for the run; a tick's placements shared within it."""
        self.policy = policy
        self.requests = requests
        self.clock = SimClock(EPOCH_S)
        self.cloud = SimulatedCloud(
            clock=self.clock,
            config=SimulationConfig(
                seed=seed,
                boot_time=LogNormalBootTime(cloud.boot_median_s, cloud.boot_sigma),
                stockout_probability=cloud.stockout_probability,
                stockout_seconds=cloud.stockout_s,
                spot_interruptions_per_hour=cloud.spot_interruptions_per_hour,
                start_time=LogNormalBootTime(cloud.start_median_s, cloud.start_sigma),
                stop_seconds=cloud.stop_s,
            ),
        )
        self.gateway = SimGateway(
            rng=random.Random(seed + 1), epoch_s=EPOCH_S, cap=replica_cap(self.spec.per_worker)
        )
        self.router = PrefixRouter(routing, self.gateway.rng)
        """The gateway's routing and index, and each engine's prefix cache."""
        self.hot_spots = HotSpotMeter()
        self._work: dict[int, int] = {}
        """Each request's outstanding work on its replica until its first token, by index."""
        self._cached: dict[int, int] = {}
        """Each request's prompt tokens its engine found cached, by index, until answered."""
        self.replicas: dict[str, SimReplica] = {}
        self._spot: list[SimReplica] = []
        """Every spot machine bought, ended ones too: the record the measured spot
        interruption rate reads (``decide.spot_rate``), as the ledger's rows are."""
        self.unavailable: dict[str, datetime] = {}
        self._memory = ScaleMemory()
        """A baseline's step memory (a replacement on a cheaper offer under way): the
        controller's own is its policy's."""
        self.events: list[ScaleEvent] = []
        self.timeline: list[Sample] = []
        self.records = [
            RequestRecord(i, r.arrival_s, r.input_tokens, r.output_tokens)
            for i, r in enumerate(requests)
        ]
        auto = workload.autoscaling
        self.knobs = StepKnobs() if knobs is None else knobs
        """The controller's settings, at their defaults unless a run says otherwise."""
        self.cloud_settings = cloud
        self.keep_s = max(
            60.0,
            auto.scale_up_time_window_sec if auto else 0.0,
            auto.scale_down_time_window_sec if auto else 0.0,
        )
        self._launches = 0
        self._desired = initial_replicas
        self._warm_count = initial_replicas
        """The count the controller holds before time 0 (:data:`WARM_FLEET_REASON`)."""
        # When each serving engine next produces a first token or a finish. Engines are
        # advanced lazily (only when due or when a request is submitted), which is exact:
        # between its own events an engine's state evolves deterministically.
        self._due: dict[str, float] = {}
        # What the event loop reads of the fleet at every event (the replicas serving,
        # whether any is ready, the next boot or interruption), recomputed only after a
        # replica is bought, becomes ready, drains or ends (:meth:`_fleet_changed`).
        self._fleet_stale = True
        self._serving: list[SimReplica] = []
        self._any_ready = False
        self._machine_due = math.inf
        self._initial_mix = initial_mix
        self._pool_gpus = pool_gpu_kinds(self.spec, self.offers)
        # Warm pools (``autoscaler.sim.warm`` holds the times and prices assumed).
        warm = warm_policy_of(self.spec)
        self._warm = warm
        self._sleep_level = 1 if warm is None else warm.sleep_level
        self._can_sleep = may_sleep(self.spec)
        """As the provisioner boots them: able to sleep when the pool may put them to sleep."""
        self._weights_bytes = workload.params_b * 1e9 * workload.bytes_per_param
        self._starts: dict[str, list[float]] = {path: [] for path in START_PATHS}
        """Seconds from asking to ready of every boot so far, by path, sorted."""
        self._samples: deque[StartSample] = deque(maxlen=START_SAMPLES)
        """The most recent boots, as the controller keeps them for the step."""
        self._cold: set[int] = set()
        """Requests (by index) that arrived with no replica ready."""
        self._cold_path: dict[int, str] = {}
        self._resumes: dict[str, int] = {}
        self._demand_at_zero = False
        """A request arrived with no replica ready since the last controller pass."""
        self._notice_due = False
        """A spot warning came since the last controller pass."""
        self._ticked_s = -math.inf
        self._warm_start(initial_replicas)

    # --- time -------------------------------------------------------------------------

    @property
    def t(self) -> float:
        return self.clock.t - EPOCH_S

    def _set_time(self, t: float) -> None:
        self.clock.t = EPOCH_S + t

    def run(self) -> Outcomes:
        """Replay the trace (with the cyclic collector paused: ``autoscaler.sim.gcpause``)."""
        with paused_gc():
            return self._run()

    def _run(self) -> Outcomes:
        start_cost: float | None = None  # spent by time 0, where billing starts
        start_parked = 0.0
        pending = list(self.records)
        n, i = len(pending), 0
        next_tick = 0.0
        next_sample = 0.0
        horizon = (self.requests[-1].arrival_s if self.requests else 0.0) + 7200.0
        due = self._due
        while True:
            if self._fleet_stale:
                self._refresh_fleet()
            engine_due = min(due.values(), default=math.inf)
            machine_due = self._machine_due
            t = min(
                pending[i].arrival_s if i < n else math.inf,
                next_tick,
                next_sample,
                machine_due,
                engine_due,
            )
            if t > horizon:
                break
            self.gateway.observe_until(t)
            if t >= self.hot_spots.due_s:
                self.hot_spots.observe_until(t, self._serving_loads())
            self._set_time(t)
            if start_cost is None and t >= 0.0:
                # The warm fleet, and anything the controller bought or ended before time
                # 0 (a warning heeded), is billed from time 0: this moment, since the
                # first sample and the replay's first step are at time 0.
                start_cost, start_parked = self.cloud.cost_usd(), self._parked_usd(t)
            if engine_due <= t:
                self._engine_events(t)
            if machine_due <= t:
                self._machine_events(t)
            while i < n and pending[i].arrival_s <= t:
                self._arrive(pending[i], t)
                i += 1
            self.gateway.expire(t)
            self._dispatch(t)
            if self._notice_due:
                # A warning wakes the controller at once, as the instance's report through
                # the boot callback (or the provider's queue) wakes the reconciler's loop;
                # before time 0 too: the controller runs while the warm fleet waits for
                # the traffic, and from the first warning on it steps as always.
                self._notice_due = False
                next_tick = min(next_tick, t)
            if self._demand_at_zero:
                # The gateway tells the controller at once of a request with no replica
                # ready (``Gateway(on_demand=...)`` wakes its loop), once a second at most.
                self._demand_at_zero = False
                next_tick = min(next_tick, max(t, self._ticked_s + DEMAND_INTERVAL_S))
            if t >= next_tick:
                requeue = self._tick(t)
                self._ticked_s = t
                next_tick = t + min(self.policy.interval_s, requeue or math.inf)
                if t < 0.0:
                    next_tick = min(next_tick, 0.0)  # the replay's first step is at time 0
            if t >= next_sample:
                self._sample(t)
                next_sample = t + SAMPLE_INTERVAL_S
            if i >= n and not self.gateway.waiting and self.gateway.in_flight == 0:
                break
        end = self.t
        self._sample(end)
        queries, hits = self.router.hits()
        return Outcomes(
            records=[
                RecordOutcome(
                    r.input_tokens,
                    r.arrival_s,
                    r.ttft_s,
                    r.outcome,
                    tpot_s(
                        first_token_s=r.first_token_s,
                        finished_s=r.finished_s,
                        output_tokens=r.output_tokens,
                    )
                    if r.outcome is Outcome.SERVED
                    else math.nan,
                    self._cold_path.get(r.index, UNSERVED if r.index in self._cold else None),
                )
                for r in self.records
            ],
            timeline=self.timeline,
            events=self.events,
            cost_usd=0.0 if start_cost is None else self.cloud.cost_usd() - start_cost,
            gpu_hours=self._gpu_hours(end),
            end_s=end,
            prefix_queries_tokens=queries,
            prefix_hits_tokens=hits,
            hot_spot_requests=self.hot_spots.worst_requests,
            hot_spot_work=self.hot_spots.worst_work,
            parked_usd=self._parked_usd(end) - start_parked,
            start_times={path: list(times) for path, times in self._starts.items()},
            resumes=dict(self._resumes),
        )

    def _serving_loads(self) -> list[tuple[str, int, int]]:
        return [
            (r.launch_id, len(r.requests), r.work)
            for r in self.replicas.values()
            if r.engine is not None and r.ended_s is None and r.drain_s is None
        ]

    def _gpu_hours(self, end: float) -> float:
        """GPU-hours held (a stopped machine holds none)."""
        total = 0.0
        for r in self.replicas.values():
            stop = min(x for x in (r.ended_s, r.interrupt_s, end) if x is not None)
            held = max(0.0, stop - max(r.intent_s, 0.0)) - r.stopped_seconds(stop)
            total += max(0.0, held) * r.offer.gpu_count
        return total / 3600.0

    def _parked_usd(self, t: float) -> float:
        """What parked and parking replicas cost up to ``t``."""
        total = 0.0
        for r in self.replicas.values():
            span = r.parked_span_s
            if r.park_asked_s is not None:
                stop = t if r.ended_s is None else min(t, r.ended_s)
                span += max(0.0, stop - r.park_asked_s)
            total += span * r.usd_per_hour / 3600.0 - r.stop_credit_usd(t)
        return total

    def start_times(self) -> StartTimes:
        """The measured median seconds to ready per start path, as the controller reads
        them (``decide.warm.start_times_from`` over the workload's
        ``reconcile.ledger.START_SAMPLES`` most recent boots; its defaults for a path not
        measured)."""
        return start_times_from(list(self._samples)) or DEFAULT_START_TIMES

    # --- events -----------------------------------------------------------------------

    def _fleet_changed(self) -> None:
        """A replica was bought, became ready, was drained or ended."""
        self._fleet_stale = True

    def _refresh_fleet(self) -> None:
        """The replicas serving, whether any is ready, and the next boot or interruption."""
        serving: list[SimReplica] = []
        any_ready = False
        soonest = math.inf
        for r in self.replicas.values():
            if r.ended_s is not None:
                continue
            if r.park_mode is not None:
                if not r.parked and r.park_done_s is not None:
                    soonest = min(soonest, r.park_done_s)
            elif r.engine is None:
                soonest = min(soonest, r.running_s)
            elif not r.refilling:
                serving.append(r)
                any_ready = any_ready or r.drain_s is None
            if r.interrupt_s is not None:
                soonest = min(soonest, r.interrupt_s)
            if r.notice_s is not None and not r.noticed:
                soonest = min(soonest, r.notice_s)
        self._serving, self._any_ready, self._machine_due = serving, any_ready, soonest
        self._fleet_stale = False

    def _refresh_due(self, r: SimReplica) -> None:
        due = None if r.engine is None or r.ended_s is not None else r.engine.next_event_s()
        if due is None:
            self._due.pop(r.launch_id, None)
        else:
            self._due[r.launch_id] = due

    def _engine_events(self, t: float) -> None:
        for launch_id in [k for k, due in self._due.items() if due <= t]:
            r = self.replicas[launch_id]
            assert r.engine is not None
            self._replica_events(r, t)
            self._refresh_due(r)

    def _replica_events(self, r: SimReplica, t: float) -> None:
        engine = r.engine
        assert engine is not None
        now = engine.now_s
        events = engine.advance(now if now > t else t)  # max(t, now)
        if not events:
            return
        requests, gateway = r.requests, self.gateway
        for event in events:
            record = requests.get(event.request_id)
            if record is None:
                continue
            if event.kind is _FIRST_TOKEN:
                record.first_token_s = event.at_s
                gateway.first_token(record, t=event.at_s)
                r.work -= self._work.pop(record.index, 0)  # its prefill is done
            else:  # finished
                record.finished_s = event.at_s
                record.outcome = Outcome.SERVED
                cached = self._cached.pop(record.index, 0)
                gateway.finish(record, t=event.at_s, cached_tokens=cached)
                del requests[event.request_id]
                gateway.left(record)

    def _machine_events(self, t: float) -> None:
        for r in list(self.replicas.values()):
            if r.ended_s is not None:
                continue
            if r.notice_s is not None and not r.noticed and r.notice_s <= t:
                r.noticed = r.interrupted = True
                self._notice_due = True
                self._fleet_changed()
                self.events.append(
                    ScaleEvent(t, "notice", f"{r.launch_id} {r.offer.key}: {self._warning(r)}")
                )
            if r.interrupt_s is not None and r.interrupt_s <= t:
                r.interrupted = True
                self._end(r, t, why="spot interruption")
                # Spot reclaimed: its market is avoided a while, as the reconciler does
                # (``reconcile.liveness``).
                mark_unavailable(
                    self.unavailable,
                    offer=r.offer,
                    spot=True,
                    worker_id=None,
                    now=as_datetime(EPOCH_S + t),
                    knobs=self.knobs,
                )
                self.events.append(ScaleEvent(t, "interrupted", f"{r.launch_id} {r.offer.key}"))
                continue
            if r.park_mode is not None:
                if not r.parked and r.park_done_s is not None and r.park_done_s <= t:
                    r.parked = True
                    if r.park_mode is ParkMode.STOPPED:
                        r.stopped_since_s = r.park_done_s
                    self._fleet_changed()
                    self.events.append(
                        ScaleEvent(t, "parked", f"{r.launch_id} {r.park_mode.value}")
                    )
                continue
            if r.engine is None and r.running_s <= t:
                r.engine = BatchEngine(self.workload.profile(r.offer), start_s=t, timings=False)
                took = r.running_s - r.boot_asked_s
                bisect.insort(self._starts[r.path], took)
                self._samples.append(StartSample(r.offer.key, _STEP_PATH[r.path], took))
                self._fleet_changed()
                self.events.append(
                    ScaleEvent(t, "ready", f"{r.launch_id} {r.offer.key} ({r.path})")
                )

    @staticmethod
    def _warning(r: SimReplica) -> str:
        assert r.notice_s is not None and r.interrupt_s is not None
        warning = f"{r.offer.provider.value} spot interruption warning"
        if not r.reclaim_known:
            return f"{warning}: reclaim time not given"
        return f"{warning}: reclaimed in {r.interrupt_s - r.notice_s:.0f} s"

    def _heed_notices(self, t: float) -> None:
        """Act on the spot warnings before the step, as the reconciler's pass does
        (``reconcile.workload``): at a warning, skip the machine's spot market for
        ``unavailable_sec`` and terminate the replica if it still boots or is parked in
        the warm pool (no start path: the pool is refilled elsewhere); a ready one
        keeps serving until ``decide.plan.heed_spot_notice`` drains it (here at the
        margin before its reclaim; the step's plan drains it once its replacement
        serves). The step counts it no more and launches its replacement."""
        now = as_datetime(EPOCH_S + t)
        for r in self.replicas.values():
            if not r.noticed or r.ended_s is not None or r.interrupt_s is None:
                continue
            if r.heeded and r.plan_phase() is not ReplicaPhase.DRAINING:
                continue
            if r.heeded and r.drain_s is not None:
                continue
            if not r.heeded:
                r.heeded = True
                self._fleet_changed()
                mark_unavailable(
                    self.unavailable,
                    offer=r.offer,
                    spot=True,
                    worker_id=None,
                    now=now,
                    knobs=self.knobs,
                )
            reason = f"{SPOT_NOTICE}{self._warning(r)}"
            action = heed_spot_notice(
                r.launch_id,
                r.phase(),
                reason=reason,
                now=now,
                reclaim_at=r.reclaim_at(),
            )
            if isinstance(action, Terminate):
                self.cloud.terminate(r.instance_id)
                self._end(r, t, why=reason)
                self.events.append(ScaleEvent(t, "terminate", f"{r.launch_id}: {reason}"))
            elif isinstance(action, Drain):
                r.drain_s = t
                self._fleet_changed()
                self.events.append(ScaleEvent(t, "drain", f"{r.launch_id}: {action.reason}"))

    def _end(self, r: SimReplica, t: float, *, why: str) -> None:
        r.ended_s = t
        if r.stopped_since_s is not None:
            r.stopped_s += max(0.0, t - r.stopped_since_s)
            r.stopped_since_s = None
        if r.park_asked_s is not None:
            r.parked_span_s += max(0.0, t - r.park_asked_s)
            r.park_asked_s = None
        self._drop_engine(r, t)

    def _drop_engine(self, r: SimReplica, t: float) -> None:
        """Its engine stops serving (ended, asleep or stopped): its prefix cache is gone,
        requests not yet answered go back to the queue, answered ones are cut."""
        self.router.ended(r.launch_id)
        self._fleet_changed()
        for record in r.requests.values():
            self._work.pop(record.index, None)
            self._cached.pop(record.index, None)
            self.gateway.left(record)
            if record.first_token_s is None:
                self.gateway.requeue(record, t=t)
            else:
                record.outcome = Outcome.CUT
                record.finished_s = t
        r.requests.clear()
        r.work = 0
        r.engine = None
        self._due.pop(r.launch_id, None)

    def _arrive(self, record: RequestRecord, t: float) -> None:
        if record.input_tokens + record.output_tokens > self.workload.max_context_tokens:
            record.outcome = Outcome.REFUSED
            self.gateway.seen(t)  # the gateway saw it, then refused it
            return
        if self._fleet_stale:
            self._refresh_fleet()
        if not self._any_ready:
            self._cold.add(record.index)
            self._demand_at_zero = True
        self.gateway.arrive(record, t=t, any_ready=self._any_ready)

    def _dispatch(self, t: float) -> None:
        gateway = self.gateway
        if not gateway.waiting:
            return
        if self._fleet_stale:
            self._refresh_fleet()
        serving = self._serving
        if not serving:
            return
        by_key = {r.launch_id: r for r in serving}
        loads = [
            ReplicaLoad(
                r.launch_id, len(r.requests), self.gateway.cap, r.drain_s is not None, r.work
            )
            for r in serving
        ]
        index = {load.key: n for n, load in enumerate(loads)}
        while gateway.waiting:
            head = gateway.peek()
            assert head is not None  # one is waiting
            blocks = self.requests[head.index].hash_ids
            placed = self.router.choose(loads, blocks=blocks, prompt_tokens=head.input_tokens)
            if placed is None:
                return
            chosen = placed.replica
            record = gateway.pop()
            assert record is head
            replica = by_key[chosen.key]
            assert replica.engine is not None
            if replica.engine.now_s < t:
                self._replica_events(replica, t)  # nothing is due before t: no events
            # The engine prefills only what its prefix cache lacks.
            prefill = self.router.serve(
                replica.launch_id,
                kv_capacity_tokens=replica.engine.profile.kv_capacity_tokens,
                blocks=blocks,
                prompt_tokens=record.input_tokens,
            )
            engine_id = replica.engine.submit(
                input_tokens=prefill, output_tokens=record.output_tokens
            )
            replica.requests[engine_id] = record
            self.gateway.sent(record, replica.launch_id)
            if record.index in self._cold:
                self._cold_path[record.index] = replica.path
            # The gateway weighs a request by its body's length / 4 characters per
            # token, about its prompt tokens (less what it expects cached there): the
            # simulator passes the prompt's tokens.
            work = placed.work
            self._work[record.index] = work
            self._cached[record.index] = record.input_tokens - prefill
            replica.work += work
            self._refresh_due(replica)
            n = index[chosen.key]
            loads[n] = ReplicaLoad(
                chosen.key, chosen.outstanding + 1, chosen.cap, chosen.draining, chosen.work + work
            )

    # --- the controller ---------------------------------------------------------------

    def _fleet(self) -> FleetCounts:
        """As the step counts them (``decide.step.fleet_counts``): no warm pool refill."""
        phases = [
            r.plan_phase() for r in self.replicas.values() if not (self._warm and r.refilling)
        ]
        return FleetCounts(
            ready=phases.count(ReplicaPhase.READY),
            booting=phases.count(ReplicaPhase.BOOTING),
            draining=phases.count(ReplicaPhase.DRAINING),
        )

    def _tick(self, t: float) -> float | None:
        """One controller step (``decide.step``, as the reconciler runs it) and its plan
        carried out on the simulated cloud."""
        self._heed_notices(t)
        now = as_datetime(self.clock.t)
        view = self._view_now(t)
        shipped = isinstance(self.policy, ControllerPolicy) and self.policy.shipped
        count = None
        if t < 0.0:
            # Before time 0 (a warning woke the controller) there is no traffic to
            # measure: the count is the warm fleet's, which the policy held for the
            # traffic before the trace, and the step replaces what the cloud takes of it.
            count = (self._warm_count, WARM_FLEET_REASON)
        elif not shipped:
            want = self.policy.desired(
                ControlView(
                    now_s=t,
                    now=now,
                    signals=view.measured.signals,
                    fleet=fleet_counts(view.replicas, warm=self._warm),
                    gateway=self.gateway,
                )
            )
            count = (want.count, want.reason)
        memory = (
            self.policy.memory
            if shipped and isinstance(self.policy, ControllerPolicy)
            else self._memory
        )
        self._placements.next_pass()
        result = step(
            view,
            memory=memory,
            unavailable=self.unavailable,
            now=now,
            knobs=self.knobs,
            count=count,
            memo=self._placements,
        )
        if shipped and isinstance(self.policy, ControllerPolicy):
            self.policy.memory = result.decision.memory
        else:
            self._memory = result.decision.memory
        desired = result.decision.desired
        if desired != self._desired:
            kind = "scale-up" if desired > self._desired else "scale-down"
            self.events.append(
                ScaleEvent(t, kind, f"{self._desired} -> {desired}: {result.decision.reason}")
            )
            self._desired = desired
        for refusal in result.plan.refusals:
            self.events.append(ScaleEvent(t, "refused", refusal.reason))
        launched: list[Placement] = []
        for action in result.plan.actions:
            if isinstance(action, Launch):
                placement = result.placement
                if launched or placement is None:
                    placement = place_next(
                        view,
                        unavailable=self.unavailable,
                        now=now,
                        knobs=self.knobs,
                        launched=launched,
                        memo=self._placements,
                    )
                if not placement.found:
                    self.events.append(
                        ScaleEvent(t, "refused", unplaced_reason(placement, result.headroom))
                    )
                    break
                if not self._launch(placement, t, prefill=action.prefill):
                    break  # the market is marked unavailable: place again next step
                launched.append(placement)
            elif isinstance(action, Park):
                self._park(self.replicas[action.launch_id], action.mode, t)
                self.events.append(
                    ScaleEvent(
                        t, "park", f"{action.launch_id} {action.mode.value}: {action.reason}"
                    )
                )
            elif isinstance(action, Resume):
                r = self.replicas[action.launch_id]
                path = self._resume(r, t)
                if path is not None:
                    self.events.append(
                        ScaleEvent(t, "resume", f"{action.launch_id} {path}: {action.reason}")
                    )
            elif isinstance(action, Drain):
                self.replicas[action.launch_id].drain_s = t
                self._fleet_changed()
                self.events.append(ScaleEvent(t, "drain", f"{action.launch_id}: {action.reason}"))
            elif isinstance(action, Terminate):
                r = self.replicas[action.launch_id]
                self.cloud.terminate(r.instance_id)
                self._end(r, t, why=action.reason)
                self.events.append(
                    ScaleEvent(t, "terminate", f"{action.launch_id}: {action.reason}")
                )
        return result.plan.requeue_after

    def _park(self, r: SimReplica, mode: ParkMode, t: float) -> None:
        """Put a drained replica's engine to sleep, or stop its machine (a sleeping one's
        too): it leaves routing now and is parked once the sleep or the stop completes
        (``autoscaler.sim.warm``)."""
        if r.park_mode is None:
            self._drop_engine(r, t)
            r.drain_s = None
            r.park_asked_s = t
        if mode is ParkMode.SLEEPING:
            took = sleep_seconds(
                weights_bytes=self._weights_bytes, offer=r.offer, level=self._sleep_level
            )
        else:
            took = self.cloud_settings.stop_s
            self.cloud.stop(r.instance_id)  # billed as running until the stop completes
        r.park_mode, r.parked, r.park_done_s = mode, False, t + took
        self._fleet_changed()

    def _resume(self, r: SimReplica, t: float) -> str | None:
        """Wake a sleeping replica or start a stopped one; it is ready after the modelled
        wake or the cloud's start draw (``autoscaler.sim.warm``). Returns the path taken
        (``None``: the start found its offer stocked out; the machine stays stopped)."""
        assert r.park_mode is not None and r.parked
        if r.park_mode is ParkMode.SLEEPING:
            path = WAKE
            took = wake_seconds(
                weights_bytes=self._weights_bytes, offer=r.offer, level=self._sleep_level
            )
        else:
            path = START
            try:
                self.cloud.start(r.instance_id)
            except (InsufficientCapacity, QuotaExceeded) as exc:
                self.events.append(ScaleEvent(t, "stock-out", str(exc)))
                return None
            machine = next(m for m in self.cloud.visible() if m.instance_id == r.instance_id)
            took = machine.running_at - EPOCH_S - t
            if r.stopped_since_s is not None:
                r.stopped_s += max(0.0, t - r.stopped_since_s)
                r.stopped_since_s = None
        if r.park_asked_s is not None:
            r.parked_span_s += max(0.0, t - r.park_asked_s)
        r.park_mode, r.parked, r.park_done_s, r.park_asked_s = None, False, None, None
        r.path, r.boot_asked_s, r.resumed_s = path, t, t
        self._resumes[path] = self._resumes.get(path, 0) + 1
        r.running_s = t + took
        self._fleet_changed()
        return path

    def _view_now(self, t: float) -> WorkloadView:
        """The workload as the controller observes it: the replicas not ended, and the
        gateway's ``SignalSnapshot`` as the controller reads it (``decide.inputs.
        measured_of``; samples older than the rules' longest window are not converted).
        Until a request is answered, the mix is the first minute's, which the gateway
        had measured when the warm fleet was placed."""
        live = [r for r in self.replicas.values() if r.ended_s is None]
        self.gateway.window.replica_cache_blocks = {
            r.launch_id: self.router.index.blocks_held(r.launch_id) for r in live
        }
        measured = measured_of(self.gateway.snapshot(t), samples_since=EPOCH_S + t - self.keep_s)
        if measured.token_mix is None:
            measured = replace(measured, token_mix=TokenMix.of(self._initial_mix))
        return WorkloadView(
            spec=self.spec,
            generation=1,
            replicas=[self._state(r) for r in live],
            measured=measured,
            offers=self.offers,
            fleet_usd_per_hour=sum(r.hourly_usd(t) for r in live),
            pool_gpus=self._pool_gpus,
            start_times=self.start_times(),
            spot_rate=spot_rate(map(_spot_life, self._spot), now=as_datetime(EPOCH_S + t)),
        )

    def _state(self, r: SimReplica) -> ReplicaState:
        stopped = r.stopped_since_s is not None
        return ReplicaState(
            view=ReplicaView(
                launch_id=r.launch_id,
                phase=r.plan_phase(),
                generation=1,
                offer_key=r.offer.key,
                usd_per_hour=r.hourly_usd(self.t),
                intent_at=as_datetime(EPOCH_S + r.intent_s),
                ready_at=None if r.engine is None else as_datetime(EPOCH_S + r.running_s),
                drain_requested_at=(
                    None if r.drain_s is None else as_datetime(EPOCH_S + r.drain_s)
                ),
                in_flight=0,
                park_mode=r.park_mode,
                parked_at=(
                    as_datetime(EPOCH_S + r.park_done_s)
                    if r.parked and r.park_done_s is not None
                    else None
                ),
                resumed_at=None if r.resumed_s is None else as_datetime(EPOCH_S + r.resumed_s),
                running_usd_per_hour=r.usd_per_hour if stopped else None,
                stopped_usd_per_hour=r.stopped_usd_per_hour,
                can_sleep=self._can_sleep,
                prefill=r.prefill,
                warned=r.heeded,
                reclaim_at=r.reclaim_at() if r.heeded else None,
            ),
            zone=r.offer.zone,
            shape=shape_of(r.offer),
            spot=r.spot,
        )

    def _launch(self, placement: Placement, t: float, *, prefill: bool = False) -> bool:
        """Buy the placed replica; on a stock-out or quota refusal, mark its market
        unavailable (as the provisioner does) and return ``False``."""
        assert placement.offer is not None and placement.market is not None
        spot = placement.market is Market.SPOT
        try:
            self._buy(
                placement.offer, spot=spot, price=placement.usd_per_hour, t=t, prefill=prefill
            )
        except (InsufficientCapacity, QuotaExceeded) as exc:
            mark_unavailable(
                self.unavailable,
                offer=placement.offer,
                spot=spot,
                worker_id=None,
                now=as_datetime(self.clock.t),
                knobs=self.knobs,
            )
            self.events.append(ScaleEvent(t, "stock-out", str(exc)))
            return False
        return True

    def _buy(
        self, offer: Offer, *, spot: bool, price: float, t: float, prefill: bool = False
    ) -> None:
        self._launches += 1
        launch_id = f"l-{self._launches:05d}"
        request = LaunchRequest(
            offer=offer,
            spot=spot,
            boot=replace(_BOOT, model_id=self.spec.model),
            launch_id=launch_id,
            tags=instance_tags(
                cluster_id="sim", project="sim", workload=self.spec.slug, launch_id=launch_id
            ),
        )
        instance = self.cloud.launch(request)
        machine = next(m for m in self.cloud.visible() if m.instance_id == instance.instance_id)
        self._fleet_changed()
        self.replicas[launch_id] = replica = SimReplica(
            launch_id=launch_id,
            instance_id=instance.instance_id,
            offer=offer,
            spot=spot,
            usd_per_hour=price,
            intent_s=t,
            running_s=machine.running_at - EPOCH_S,
            interrupt_s=None if machine.interrupt_at is None else machine.interrupt_at - EPOCH_S,
            notice_s=None if machine.notice_at is None else machine.notice_at - EPOCH_S,
            boot_asked_s=t,
            prefill=prefill,
            stopped_usd_per_hour=None if spot else stopped_usd_per_hour(offer),
        )
        if spot:
            self._spot.append(replica)
        market = "spot" if spot else "on-demand"
        refill = " (warm pool refill)" if prefill else ""
        self.events.append(
            ScaleEvent(t, "launch", f"{launch_id} {offer.key} {market} ${price:.4g}/h{refill}")
        )

    def first_placement(self) -> Offer | None:
        """The offer placement picks for a first replica."""
        now = as_datetime(self.clock.t)
        view = self._view_now(self.t)
        placement = place_next(
            view, unavailable=self.unavailable, now=now, knobs=self.knobs, launched=()
        )
        return placement.offer

    def _warm_start(self, count: int) -> None:
        """``count`` replicas bought before time 0, so a run starts with a serving fleet;
        a stocked-out market is skipped and the next offer tried."""
        self._set_time(-WARM_LEAD_S)
        now = as_datetime(self.clock.t)
        bought = 0
        for _ in range(count * WARM_START_ATTEMPTS):
            if bought >= count:
                break
            placement = place_next(
                self._view_now(self.t),
                unavailable=self.unavailable,
                now=now,
                knobs=self.knobs,
                launched=(),
            )
            if not placement.found:
                self.events.append(ScaleEvent(self.t, "refused", placement.reason))
                break
            if self._launch(placement, self.t):
                bought += 1
        self._set_time(0.0)
        if count:
            # The fleet was serving before the trace began.
            self.gateway.window.last_request_at = EPOCH_S

    def _sample(self, t: float) -> None:
        fleet = self._fleet()
        live = [r for r in self.replicas.values() if r.ended_s is None]
        self.timeline.append(
            Sample(
                t=t,
                request_rate=self.gateway.rate(t, window_s=60.0),
                ready=fleet.ready,
                booting=fleet.booting,
                draining=fleet.draining,
                desired=self._desired,
                ttft_p95_s=self.gateway.ttft_quantile(t, window_s=60.0, q=0.95),
                usd_per_hour=self.cloud.hourly_spend_usd(),
                parked=sum(1 for r in live if r.park_mode is not None),
            )
        )


_FIRST_TOKEN = EventKind.FIRST_TOKEN

_STEP_PATH = {FRESH: StartPath.LAUNCH, START: StartPath.START, WAKE: StartPath.WAKE}


_BOOT = BootSpec(
    image="vllm/vllm-openai", command=("serve",), port=8000, health_path="/health", model_id="m"
)


def _spot_life(r: SimReplica) -> SpotLife:
    """A spot machine's record as the reconciler reads a ledger row's
    (``autoscaler.reconcile.liveness.spot_life``): launched when bought, exposed until the
    controller began to drain or end it or the cloud ended it."""
    ends = [x for x in (r.drain_s, r.ended_s) if x is not None]
    return SpotLife(
        started_at=as_datetime(EPOCH_S + r.intent_s),
        ended_at=as_datetime(EPOCH_S + min(ends)) if ends else None,
        interrupted=r.interrupted,
    )


def with_spot(workload: SimWorkload, allow_spot: bool) -> SimWorkload:
    """The workload with spot allowed or not (the benchmark runs both)."""
    policy = workload.autoscaling
    if policy is None or policy.allow_spot_instances == allow_spot:
        return workload
    config = policy.model_copy(update={"allow_spot_instances": allow_spot})
    spec = workload.spec.model_copy(update={"execution_policy_config": config})
    return SimWorkload(
        spec, workload.params_b, workload.bytes_per_param, workload.max_context_tokens
    )
