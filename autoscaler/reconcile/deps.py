"""What a reconcile pass depends on, passed in explicitly (no globals, no sleeps).

``autoscaler run`` and ``autoscaler controller`` build a :class:`Deps` with the wall
clock, real providers, the gateway's signals and HTTP health checks; the tests build one
with a manual clock and the fake provider. The trace simulator builds none: it runs the
pure workload step (``autoscaler.decide.step``) on its own simulated cloud.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.decide.inputs import SignalsRead
from autoscaler.decide.placement import PlacementMemo
from autoscaler.decide.scaling import ScaleMemory
from autoscaler.decide.signals import EngineLoad
from autoscaler.decide.spot_rate import SpotLife
from autoscaler.decide.step import (
    GROUP_PROVIDERS,
    MAX_LAUNCHES_PER_STEP,
    UNAVAILABLE_SEC,
    StepKnobs,
)
from autoscaler.decide.warm import StartTimes
from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile.fleet import FleetCache, WorkloadFacts
from autoscaler.spec import DEFAULT_MAX_REPLICAS, WorkloadSpec
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.secrets import hf_token_of
from catalog.model import Offer
from catalog.storage import LAUNCH_DISK_GIB
from providers import engine_sleep
from providers.base import Clock, Instance, InstanceState, LaunchRequest, Provider
from providers.engines import ENGINE_KEY_SECRET, HF_TOKEN_SECRET
from providers.local import SecretSource

log = logging.getLogger("autoscaler.controller")

WorkloadRef = tuple[str, str]
"""(project, slug)"""

# The controller's defaults: ``Settings`` and ``autoscaler.config.ControllerConfig`` read
# them from here (the workload step's own knobs are in ``autoscaler.decide.step``).
TICK_SEC = 5.0
ORPHAN_GRACE_SEC = 600.0
UNHEALTHY_GRACE_SEC = 30.0
VISIBILITY_GRACE_SEC = 300.0
HEALTH_TIMEOUT_SEC = 3.0
RESYNC_SEC = 600.0
SWEEP_SEC = 30.0


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """One ready replica whose engine metrics are read."""

    workload: WorkloadRef
    launch_id: str
    url: str
    engine_key: str | None = None


class LeaseLost(Exception):
    """This controller no longer holds the lease of the workload's shard: it stops
    acting on the workload (``autoscaler.reconcile.shards``)."""


class ShardOwnership(Protocol):
    """Which workloads this controller acts on when several controllers share the store
    (``autoscaler.reconcile.shards.ShardMember``)."""

    def owns(self, project: str, slug: str) -> bool:
        """Whether this controller may act on the workload now."""
        ...

    @property
    def fleet_duties(self) -> bool:
        """Whether this controller runs the fleet-wide duties (the orphan sweep)."""
        ...

    async def fence(self, session: AsyncSession, *, project: str, slug: str) -> None:
        """Hold the workload's lease in ``session``'s transaction; :class:`LeaseLost`
        when it is no longer this controller's, or no longer under the lease the running
        step began under."""
        ...

    def step_scope(self, project: str, slug: str) -> AbstractContextManager[None]:
        """Around a workload's step: its launches are fenced against the lease held when
        it began."""
        ...


class SignalsSource(Protocol):
    """What the gateway measured, per workload: its scaling signals and token mix, and
    whether the read reached the whole gateway (``SignalsRead.incomplete``)."""

    async def signals(self) -> SignalsRead: ...


class NoSignals:
    """No gateway: every workload looks idle."""

    async def signals(self) -> SignalsRead:
        return SignalsRead()


class EngineMetricsSource(Protocol):
    """The engines' own measurement (``autoscaler.reconcile.engine_metrics``)."""

    interval_sec: float

    def due(self, now: float) -> bool: ...

    async def scrape(self, targets: Iterable[ReplicaTarget], *, now: float) -> None: ...

    def refs(self) -> list[WorkloadRef]: ...

    def ttft_samples(self, ref: WorkloadRef) -> tuple[tuple[float, float], ...]: ...

    def load(self, ref: WorkloadRef) -> EngineLoad | None: ...


class HealthChecker(Protocol):
    """Whether a replica's engine answers its health path."""

    async def healthy(self, *, url: str, health_path: str, engine_key: str | None) -> bool: ...


class HttpHealthChecker:
    """GET ``url + health_path`` with the engine key; healthy on a 2xx answer."""

    def __init__(self, *, timeout_sec: float = HEALTH_TIMEOUT_SEC) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_sec, trust_env=False)

    async def healthy(self, *, url: str, health_path: str, engine_key: str | None) -> bool:
        headers = {"Authorization": f"Bearer {engine_key}"} if engine_key else {}
        try:
            response = await self._client.get(url.rstrip("/") + health_path, headers=headers)
        except httpx.HTTPError:
            return False
        return response.is_success

    async def aclose(self) -> None:
        await self._client.aclose()


class EngineSleeper(Protocol):
    """Puts a replica's engine to sleep and wakes it (vLLM's sleep mode); raises
    ``providers.engine_sleep.EngineSleepError`` when a call did not do what was asked."""

    async def sleep(self, *, url: str, level: int, engine_key: str | None) -> None: ...

    async def wake(self, *, url: str, engine_key: str | None) -> None: ...

    async def is_sleeping(self, *, url: str, engine_key: str | None) -> bool: ...


ENGINE_SLEEP_CALL_TIMEOUT_SEC = 15.0
"""The longest one sleep call to an engine may take, and the longest a reconcile pass
waits for a wake.

``catalog.wake`` models a level-1 sleep or wake (one copy of the weights over the host
link) of a 70B bf16 model at 2.9 s on one H100 and 5.6 s on one A100, and of a 405B bf16
model over 8 A100s at 8.1 s: 15 s leaves about twice that as margin. A park's calls (two
questions and the sleep) then fit in the workload's share of a pass
(``Settings.workload_share_sec``, 30 s) instead of ``providers.engine_sleep``'s 300 s
default per call. A sleep call that times out raises ``EngineSleepFailed``: the replica is
not parked on record, its ``last_error`` says why, and the next pass asks again
(``reconcile.park``). A wake may take longer than a pass: see :class:`EngineWakes`."""

ENGINE_WAKE_CALL_TIMEOUT_SEC = engine_sleep.DEFAULT_TIMEOUT_S
"""The longest one call of a wake may take (300 s): a level-2 wake reads the weights from
disk (``catalog.wake``: 16 s for 25B bf16, 43 s for 70B, about 236 s for 405B over eight
GPUs), longer than a pass waits, so it runs beside the passes (:class:`EngineWakes`)."""

WAKE_OUTCOMES_KEPT = 1024
"""Finished wakes no pass has asked about yet (their replica was terminated meanwhile)
are kept up to this many, the oldest dropped first."""

ENGINE_SLEEP_QUERY_TIMEOUT_SEC = 5.0
"""``GET /is_sleeping`` and ``GET /metrics``: no work on the engine, answered at once."""


class HttpEngineSleeper:
    """The engines' own sleep routes (``providers.engine_sleep``), each call bounded by
    :data:`ENGINE_SLEEP_CALL_TIMEOUT_SEC` (``client``: for tests)."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client

    async def sleep(self, *, url: str, level: int, engine_key: str | None) -> None:
        await engine_sleep.sleep_engine(
            url,
            level,
            api_key=engine_key,
            timeout_s=ENGINE_SLEEP_CALL_TIMEOUT_SEC,
            client=self._client,
        )

    async def wake(self, *, url: str, engine_key: str | None) -> None:
        await engine_sleep.wake_engine(
            url, api_key=engine_key, timeout_s=ENGINE_WAKE_CALL_TIMEOUT_SEC, client=self._client
        )

    async def is_sleeping(self, *, url: str, engine_key: str | None) -> bool:
        return await engine_sleep.is_sleeping(
            url, api_key=engine_key, timeout_s=ENGINE_SLEEP_QUERY_TIMEOUT_SEC, client=self._client
        )


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """A provider and how its engines are reached.

    ``engine_address`` (``host`` or ``host:port``) replaces every instance's address (a
    tunnel, a local proxy, tests); else the private (or ``public``) address is used.
    ``disk_gib``: the boot disk each launch asks for (``root_volume_gib`` on EC2,
    ``boot_disk_gib`` on GCE); a stopped machine bills this disk
    (``catalog.storage.stopped_usd_per_hour``).
    """

    provider: Provider
    engine_address: str | None = None
    public: bool = False
    disk_gib: float = LAUNCH_DISK_GIB

    def engine_url(self, instance: Instance, *, port: int) -> str | None:
        address = self.engine_address or (
            instance.public_address if self.public else instance.private_address
        )
        if not address:
            return None
        host_port = address if _has_port(address) else f"{address}:{port}"
        return f"http://{host_port}"


def _has_port(address: str) -> bool:
    if address.startswith("["):
        return "]:" in address
    return address.count(":") == 1


@dataclass(frozen=True, slots=True)
class ProviderRegistry:
    """Providers by name (``catalog.model.ProviderName`` values: ``aws``, ``local``…)."""

    entries: Mapping[str, ProviderEntry]

    def get(self, name: str) -> ProviderEntry | None:
        return self.entries.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)


@dataclass(frozen=True, slots=True)
class Settings:
    """The controller's knobs (from :class:`autoscaler.config.ControllerConfig`)."""

    cluster_id: str
    fleet_max_hourly_cost_usd: float | None = None
    tick_sec: float = TICK_SEC
    orphan_grace_sec: float = ORPHAN_GRACE_SEC
    unavailable_sec: float = UNAVAILABLE_SEC
    unhealthy_grace_sec: float = UNHEALTHY_GRACE_SEC
    visibility_grace_sec: float = VISIBILITY_GRACE_SEC
    """How long an instance the provider does not show is taken as "not visible yet"."""
    refusal_log_interval_sec: float = 300.0
    dry_run: bool = False
    callback_url: str | None = None  # the management API as cloud instances reach it
    max_replicas_per_workload: int = DEFAULT_MAX_REPLICAS
    """The most replicas planned for one workload, whatever its stored spec says."""
    max_launches_per_pass: int = MAX_LAUNCHES_PER_STEP
    """Launches one workload may make in one pass; the rest follow in the next passes."""
    group_providers: frozenset[str] = GROUP_PROVIDERS
    """Providers whose machines can form replica groups (``decide.step.GROUP_PROVIDERS``)."""
    workload_share_sec: float = 30.0
    """The longest one workload's step may take in a pass before it is cut."""
    pass_budget_sec: float = 60.0
    """A pass starts no new workload after this long; the rest go first in the next."""
    quarantine_max_sec: float = 600.0
    """The longest wait between tries of a workload the controller keeps failing on."""
    schedule_offset_sec: float = 0.0
    """Scheduled workloads are read at the clock's time plus this (a rehearsal of a
    schedule; 0 in production): ``ControllerConfig.schedule_offset_sec``."""
    resync_sec: float = RESYNC_SEC
    """Every workload is stepped in full at least this often, changed or not
    (``autoscaler.reconcile.changes``); each between half and all of it, spread by id."""
    sweep_sec: float = SWEEP_SEC
    """The orphan sweep and the fleet-spend metric's SUM run at most this often (both
    O(the fleet)); the spend metric follows each pass's read in between."""

    @property
    def knobs(self) -> StepKnobs:
        """The settings a workload step reads (``autoscaler.decide.step``)."""
        return StepKnobs(
            fleet_max_hourly_cost_usd=self.fleet_max_hourly_cost_usd,
            max_replicas_per_workload=self.max_replicas_per_workload,
            max_launches_per_pass=self.max_launches_per_pass,
            unavailable_sec=self.unavailable_sec,
            group_providers=self.group_providers,
            schedule_offset_sec=self.schedule_offset_sec,
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """A workload the controller failed on: how often in a row, the last error, and
    when to try it again."""

    attempts: int
    message: str
    retry_at: datetime


@dataclass(frozen=True, slots=True)
class BootBackoff:
    """A workload whose replicas keep failing to boot: how many in a row, and when it
    may launch again (``tick_sec`` doubled per failure, up to ``quarantine_max_sec``)."""

    failures: int
    retry_at: datetime


@dataclass(frozen=True, slots=True)
class Seen:
    """A workload as the last pass that looked at it left it (``reconcile.changes``)."""

    facts: WorkloadFacts
    """Its row and open rows as that pass read them (before its step, if it had one)."""
    quiet: bool
    """Its last full step planned nothing and had nothing refused."""
    due_at: datetime | None
    """When a timer of its own falls due (a plan's timeout, a schedule's change)."""
    resync_at: datetime
    """When it is stepped in full whatever changed (``Settings.resync_sec``)."""
    start_times: StartTimes | None = None
    """The measured start times its last full step planned a warm pool with (``None``:
    it read none, having no warm pool). They are read from closed rows too, which a
    pass does not read; they change only when one of its rows becomes ready or is
    resumed, which changes its facts first."""
    spot_closed: tuple[SpotLife, ...] | None = None
    """The closed spot machines its last full step measured the interruption rate with
    (``None``: it read none, not allowing spot). They change only when one of its rows
    closes, which changes its facts first; its open ones are in its facts."""


@dataclass
class Memory:
    """What the controller remembers between passes. Losing it (a restart) is harmless:
    hysteresis restarts, an unavailable offer may be tried once more, a refusal is
    logged again."""

    scale: dict[int, ScaleMemory] = field(default_factory=dict)
    unavailable: dict[str, datetime] = field(default_factory=dict)
    unhealthy_since: dict[str, datetime] = field(default_factory=dict)
    not_visible_since: dict[str, datetime] = field(default_factory=dict)
    """Launch id -> when this controller first found no trace of its instance (losing it
    only restarts the visibility grace)."""
    terminate_sent: dict[str, datetime] = field(default_factory=dict)
    """Launch id -> when this controller last re-sent its terminate from the sync (losing
    it only makes the row's ``terminate_requested_at`` the last request)."""
    spot_noticed: set[str] = field(default_factory=set)
    """Launch ids whose spot interruption notice was acted on (counted and logged once)."""
    last_desired: dict[int, int] = field(default_factory=dict)
    waiting_on_signals: set[int] = field(default_factory=set)
    """Workloads whose last scale decision logged a wait on incomplete signals
    (``ScaleDecision.waits``): logged again only once it ends and starts anew."""
    last_refusal: dict[int, tuple[str, datetime]] = field(default_factory=dict)
    dry_run_plans: dict[int, tuple[str, ...]] = field(default_factory=dict)
    unrunnable: dict[int, str] = field(default_factory=dict)
    """Per workload, why its stored spec cannot run (logged once while it stays so)."""
    failures: dict[int, Failure] = field(default_factory=dict)
    launch_retry_at: dict[str, datetime] = field(default_factory=dict)
    """Per pending launch id: not to be tried again before this (a Transient's
    ``retry_after``; throttling above all)."""
    resume_after: int | None = None
    """The workload id a pass cut for time stopped after; the next pass starts past it."""
    started_at: datetime | None = None
    """This controller's first pass: failed boots closed before it were reported by an
    earlier controller (``autoscaler.reconcile.boot_failures``)."""
    boots_reported: set[str] = field(default_factory=set)
    """Launch ids whose failed boot has its decision."""
    boot_backoff: dict[int, BootBackoff] = field(default_factory=dict)
    """Per workload, failed boots in a row and when it may launch again."""
    seen: dict[int, Seen] = field(default_factory=dict)
    """Per workload, what the last pass saw of it: a workload absent here is stepped in
    full (losing it only costs one full pass)."""
    specs: dict[int, tuple[str, WorkloadSpec | None]] = field(default_factory=dict)
    """Per workload, its stored spec parsed (``None``: not valid), by spec hash."""
    engine_keys: dict[str, str | None] = field(default_factory=dict)
    """Per open launch id, its engine key (read once: a row's key never changes)."""
    sleep_flags: dict[str, bool] = field(default_factory=dict)
    """Per open launch id, whether its engine booted able to sleep (read once: a row's
    engine command never changes)."""
    pass_inputs: tuple[Settings, object] | None = None
    """The settings and the offers (by identity) the last pass ran with; a pass that
    finds either changed steps every workload."""
    fleet: FleetCache | None = None
    """The fleet as the last pass read it; the next reads only the rows written since
    (``reconcile.fleet``). ``None``: the next pass reads it whole."""
    fleet_full_at: datetime | None = None
    """When the fleet is next read whole (every ``Settings.resync_sec``)."""
    attention: set[int] = field(default_factory=set)
    """The workloads the last pass queued for a full step: compared again this pass."""
    timers: list[tuple[datetime, int]] = field(default_factory=list)
    """A heap of the workloads' own timers (``Seen.due_at``), with stale entries."""
    resyncs: list[tuple[datetime, int]] = field(default_factory=list)
    """A heap of the workloads' resync times (``Seen.resync_at``), with stale entries."""
    autoscaling: set[int] = field(default_factory=set)
    """The workloads whose cached spec autoscales (their pure step runs every pass)."""
    listed: dict[str, dict[str, InstanceState]] | None = None
    """Each provider's instances' states as the last pass's ``list`` showed them."""
    passes: int = 0
    """Passes run: which slice of the ready replicas is probed (``reconcile.changes``)."""
    swept_at: datetime | None = None
    """When the orphan sweep and the fleet-spend SUM last ran (``Settings.sweep_sec``)."""
    placements: PlacementMemo = field(default_factory=PlacementMemo)
    """The pass's placements, shared by steps whose placement inputs are equal, and the
    offers' index, kept while the catalog load's offers are the same object
    (``decide.placement.PlacementMemo``); its placements are dropped at each pass's
    start."""


@dataclass
class Deps:
    """Everything one reconcile pass uses."""

    sessions: async_sessionmaker[AsyncSession]
    providers: ProviderRegistry
    clock: Clock
    signals: SignalsSource
    health: HealthChecker
    offers: Callable[[], Sequence[Offer]]
    settings: Settings
    metrics: ControllerMetrics = field(default_factory=ControllerMetrics)
    notify_change: Callable[[], None] = lambda: None
    memory: Memory = field(default_factory=Memory)
    engines: EngineMetricsSource | None = None
    """Scrapes ready replicas' ``/metrics``; ``None``: the gateway's measurement only."""
    shards: ShardOwnership | None = None
    """The workloads this controller acts on when several share the store; ``None``:
    every workload (one controller)."""

    def owns(self, project: str, slug: str) -> bool:
        """Whether this controller acts on the workload (always, without sharding)."""
        return self.shards is None or self.shards.owns(project, slug)

    sleeper: EngineSleeper = field(default_factory=HttpEngineSleeper)
    """Puts parked replicas' engines to sleep and wakes them (warm pools)."""
    wakes: EngineWakes = field(default_factory=lambda: EngineWakes())
    """Wakes under way, one per replica, carried on across passes."""


class EngineWakes:
    """Engine wakes that outlast a pass, one per replica at a time.

    A pass waits up to ``wait_sec`` (:data:`ENGINE_SLEEP_CALL_TIMEOUT_SEC`) for a wake; one
    not done by then goes on beside the passes (each of its calls bounded by
    :data:`ENGINE_WAKE_CALL_TIMEOUT_SEC`), and later passes ask how it went instead of
    waking again. Asking again would be wrong, not only wasteful: a level-2 wake reloads
    the weights from disk, and the engine runs a second reload after the first, so a wake
    re-sent every pass that each outlast (a 70B model's, 43 s) would never finish.

    Held in memory: a controller that restarts loses its wakes (they die with it) and
    wakes the engine once more. Every method is O(1); :meth:`aclose` cancels what is
    under way (the controller's shutdown)."""

    def __init__(self, *, wait_sec: float = ENGINE_SLEEP_CALL_TIMEOUT_SEC) -> None:
        self.wait_sec = wait_sec
        self._running: dict[str, asyncio.Task[None]] = {}
        self._outcomes: dict[str, BaseException | None] = {}

    def under_way(self, launch_id: str) -> bool:
        """Whether a wake of this replica is running now."""
        return launch_id in self._running

    async def wake(self, launch_id: str, call: Callable[[], Awaitable[None]]) -> bool:
        """Whether the replica's engine is awake: its wake's outcome when one finished
        since the last question, else ``call()`` started (unless one runs) and waited for
        up to ``wait_sec``. Raises what a finished wake raised."""
        if launch_id not in self._outcomes and launch_id not in self._running:
            task = asyncio.ensure_future(call())
            self._running[launch_id] = task
            task.add_done_callback(lambda done: self._finished(launch_id, done))
        task_now = self._running.get(launch_id)
        if task_now is not None:
            await asyncio.wait({task_now}, timeout=self.wait_sec)
            if not task_now.done():
                return False
            self._finished(launch_id, task_now)
        error = self._outcomes.pop(launch_id)
        if error is not None:
            raise error
        return True

    def _finished(self, launch_id: str, task: asyncio.Task[None]) -> None:
        if self._running.get(launch_id) is not task:
            return
        del self._running[launch_id]
        self._outcomes[launch_id] = (
            engine_sleep.EngineSleepFailed(f"waking replica {launch_id}", "the wake was cancelled")
            if task.cancelled()
            else task.exception()
        )
        while len(self._outcomes) > WAKE_OUTCOMES_KEPT:
            del self._outcomes[next(iter(self._outcomes))]

    async def aclose(self) -> None:
        """Cancel the wakes under way."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._running.clear()
        self._outcomes.clear()


def ledger_secrets(
    sessions: async_sessionmaker[AsyncSession], *, environ: Mapping[str, str] | None = None
) -> SecretSource:
    """A :data:`providers.local.SecretSource` that reads each replica's engine key from
    its ledger row (so a launch resumed after a restart gets the same key), and the
    Hugging Face token from the stored secret its workload's ``hf_token_secret`` names,
    else from the environment."""
    env = os.environ if environ is None else environ

    async def secrets(request: LaunchRequest) -> Mapping[str, str]:
        async with sessions() as s:
            row = await s.get(LedgerRow, request.launch_id)
            workload = None if row is None else await s.get(Workload, row.workload_id)
            hf_token = await hf_token_of(s, workload) or env.get(HF_TOKEN_SECRET)
        found: dict[str, str] = {}
        key = None if row is None else row.engine_key
        if key and ENGINE_KEY_SECRET in request.boot.secret_env_names:
            found[ENGINE_KEY_SECRET] = key
        if HF_TOKEN_SECRET in request.boot.secret_env_names and hf_token:
            found[HF_TOKEN_SECRET] = hf_token
        return found

    return secrets
