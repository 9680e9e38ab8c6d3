"""The controller process: builds the reconcilers' dependencies from the configuration
and runs :func:`autoscaler.reconcile.loop.reconcile_once` in a loop, as leader.

* **Providers** from :class:`autoscaler.config.ControllerConfig`: AWS, GCP, and this
  machine (engine-sim processes by default; the only provider when there is no config).
* **Offers**: the catalog snapshot's offers of the configured providers (AWS regions and
  GCP zones of the config), the simulated cloud's (the catalog's, relabeled ``simulated``)
  when it is configured, plus an offer for this machine when the local provider is on.
  The snapshot is live (:class:`autoscaler.catalog_sync.LiveCatalog`): a sync, scheduled
  here or run by hand into the data dir, reaches the next placement without a restart.
* **Preflight**: providers with a start check (the GCP firewall in ``check`` mode) are
  asked before the first pass; a failed check stops the controller with what to fix.
* **Signals**: the gateway's, from this process (:class:`GatewaySignals`: the gateway in
  process, or its worker processes' merged) or over HTTP from
  ``GET /internal/signals`` when the gateway runs apart (:class:`HttpSignals`): TTFT
  samples, load, and the token mix with the gateway's per-replica concurrency cap
  (``decide.inputs.measured_of``), which the reconciler turns into a capacity figure and placement's
  prompt length (``decide.inputs``).
* **Leader election** on PostgreSQL: ``pg_try_advisory_lock`` on a dedicated
  connection. The lock lives as long as that session, so a standby takes over when the
  leader's process or connection dies; a leader that loses its connection stops
  reconciling at once. On SQLite there is one controller and no election.
* **Sharding** on PostgreSQL with ``sharding.enabled``: instead of one leader, every
  controller reconciles the workloads of the shards it holds leases on
  (:mod:`autoscaler.reconcile.shards`), renewed by a task beside the passes; taking a
  shard starts a pass at once. The holder of shard 0 runs the fleet-wide duties.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from autoscaler.catalog_sync import (
    CatalogSync,
    LiveCatalog,
    Syncer,
    SyncSchedule,
    schedule_sync,
    start_scheduler,
)
from autoscaler.config import ConfigError, ControllerConfig, LocalSettings
from autoscaler.decide.inputs import SignalsRead, measured_of
from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile.deps import (
    Deps,
    HealthChecker,
    HttpHealthChecker,
    NoSignals,
    ProviderEntry,
    ProviderRegistry,
    Settings,
    SignalsSource,
    ledger_secrets,
    log,
)
from autoscaler.reconcile.engine_metrics import EngineScraper
from autoscaler.reconcile.loop import reconcile_once
from autoscaler.reconcile.shards import LeaseSettings, ShardMember
from autoscaler.reconcile.timeouts import TimedProvider
from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot, load_catalog
from gateway.window import SignalsView
from providers.base import Clock, Provider, ProviderError, SystemClock
from providers.local import (
    DockerLauncher,
    EngineLauncher,
    EngineSimLauncher,
    HostProcessLauncher,
    LocalProvider,
    offer_for_this_machine,
)
from providers.local_engines import AutoLauncher
from providers.simulated import LogNormalBootTime
from providers.simulated_engines import SimulatedBootLauncher, simulated_offers

LEADER_LOCK_ID = 7_264_002
"""The advisory lock id leaders hold on PostgreSQL (migrations use 7_264_001)."""


class GatewaySignals:
    """Signals from a gateway this process runs: in process (``gateway.app.Gateway
    .signals``) or its worker processes' merged (``gateway.workers.WorkerPool.signals``,
    incomplete when a worker does not answer)."""

    def __init__(self, snapshots: Callable[[], Awaitable[SignalsView]]) -> None:
        self._snapshots = snapshots

    async def signals(self) -> SignalsRead:
        return read_of(await self._snapshots())


def read_of(view: SignalsView) -> SignalsRead:
    """The decisions' reading of one read of the gateway (``decide.inputs.measured_of``
    per workload), incomplete where the read was."""
    return SignalsRead(
        measured={ref: measured_of(snap) for ref, snap in view.snapshots.items()},
        incomplete=view.incomplete,
    )


class HttpSignals:
    """Signals from a gateway apart: ``GET {url}/internal/signals`` with an admin token."""

    def __init__(self, *, url: str, token: str, timeout_sec: float = 5.0) -> None:
        self._url = url.rstrip("/") + "/internal/signals"
        self._client = httpx.AsyncClient(
            timeout=timeout_sec, trust_env=False, headers={"Authorization": f"Bearer {token}"}
        )

    async def signals(self) -> SignalsRead:
        from gateway.app import signals_from_json

        response = await self._client.get(self._url)
        response.raise_for_status()
        return read_of(signals_from_json(response.content))

    async def aclose(self) -> None:
        await self._client.aclose()


# --- building the dependencies -------------------------------------------------------


def build_registry(
    config: ControllerConfig,
    *,
    sessions: async_sessionmaker[AsyncSession],
    data_dir: Path,
    clock: Clock,
) -> ProviderRegistry:
    """The providers the configuration names, each call under a deadline
    (:class:`autoscaler.reconcile.timeouts.TimedProvider`)."""
    entries: dict[str, ProviderEntry] = {}
    p = config.providers

    def timed(provider: Provider) -> Provider:
        return TimedProvider(
            provider,
            call_timeout_sec=config.provider_call_timeout_sec,
            launch_timeout_sec=config.provider_launch_timeout_sec,
        )

    if p.aws is not None:
        from providers.aws import AwsProvider

        entries[ProviderName.AWS.value] = ProviderEntry(
            timed(AwsProvider(p.aws.provider_config(), clock=clock)),
            engine_address=p.aws.engine_address,
            public=p.aws.address == "public",
            disk_gib=p.aws.root_volume_gib,
        )
    if p.gcp is not None:
        from providers.gcp import GcpProvider

        gcp_config = p.gcp.provider_config()
        entries[ProviderName.GCP.value] = ProviderEntry(
            timed(GcpProvider(gcp_config)),
            engine_address=p.gcp.engine_address,
            public=p.gcp.address == "public",
            disk_gib=gcp_config.boot_disk_gib,
        )
    if p.simulated is not None:
        entries[ProviderName.SIMULATED.value] = ProviderEntry(
            timed(
                LocalProvider(
                    state_dir=p.simulated.state_dir or data_dir / "simulated-instances",
                    launcher=SimulatedBootLauncher(
                        sim=EngineSimLauncher(time_scale=p.simulated.time_scale),
                        boot_time=LogNormalBootTime(
                            p.simulated.boot_median_sec, p.simulated.boot_sigma
                        ),
                        boot_time_scale=p.simulated.boot_time_scale,
                        seed=p.simulated.seed,
                    ),
                    secrets=ledger_secrets(sessions),
                    clock=clock,
                    grace_seconds=5.0,
                    provider_name=ProviderName.SIMULATED,
                )
            )
        )
    if p.local is not None:
        entries[ProviderName.LOCAL.value] = ProviderEntry(
            timed(
                LocalProvider(
                    state_dir=p.local.state_dir or data_dir / "local-instances",
                    launcher=_launcher(p.local),
                    secrets=ledger_secrets(sessions),
                    clock=clock,
                    grace_seconds=5.0,
                )
            )
        )
    return ProviderRegistry(entries)


def _launcher(local: LocalSettings) -> EngineLauncher:
    if local.launcher == "host":
        return HostProcessLauncher()
    if local.launcher == "docker":
        return DockerLauncher()
    sim = EngineSimLauncher(time_scale=local.time_scale, gpu=local.gpu)
    return AutoLauncher(sim=sim, mode=local.engine, vllm_python=local.vllm_python)


def offers_for(config: ControllerConfig, catalog: Snapshot) -> tuple[Offer, ...]:
    """The offers placement may choose from under this configuration."""
    p = config.providers
    aws_regions = set(p.aws.regions) if p.aws else set()
    gcp_zones = set(p.gcp.zones) if p.gcp else set()
    chosen = [
        o
        for o in catalog.offers
        if (o.provider is ProviderName.AWS and o.region in aws_regions)
        or (o.provider is ProviderName.GCP and o.zone in gcp_zones)
    ]
    if p.simulated is not None:
        regions = None if p.simulated.regions is None else set(p.simulated.regions)
        chosen += simulated_offers(catalog.offers, clouds=p.simulated.clouds, regions=regions)
    if p.local is not None:
        chosen.append(offer_for_this_machine(gpu=p.local.gpu, gpu_count=p.local.gpu_count))
    return tuple(chosen)


def config_syncer(config: ControllerConfig, *, data_dir: Path) -> Syncer | None:
    """The sync of the configured clouds' regions into ``data_dir`` (``None`` without a
    cloud). Credentials as for ``autoscaler catalog sync``: the AWS environment, GCP's
    application default credentials (or ``credentials_file``), the Cloud Billing API
    key from ``$GOOGLE_API_KEY``."""
    p = config.providers
    if p.aws is None and p.gcp is None:
        return None
    from catalog.sync.aws import AwsSyncConfig
    from catalog.sync.base import NullProgress
    from catalog.sync.gcp import GcpSyncConfig
    from catalog.sync.run import SyncRequest, sync_catalog

    aws = None
    if p.aws is not None:
        endpoints = {"ec2": p.aws.endpoint_url} if p.aws.endpoint_url else {}
        aws = AwsSyncConfig(regions=tuple(p.aws.regions), endpoints=endpoints)
    gcp = None
    if p.gcp is not None:
        gcp = GcpSyncConfig(
            project=p.gcp.project,
            regions=tuple(sorted({zone.rsplit("-", 1)[0] for zone in p.gcp.zones})),
            credentials=p.gcp.provider_config().credentials,
            compute_endpoint=p.gcp.endpoint,
            billing_api_key=os.environ.get("GOOGLE_API_KEY"),
        )
    request = SyncRequest(data_dir=data_dir, aws=aws, gcp=gcp)

    async def sync(now: datetime) -> Snapshot:
        result = await sync_catalog(request, progress=NullProgress(), now=now)
        return dataclasses.replace(result.snapshot, location=str(result.path))

    return sync


@dataclass
class Controller:
    """A controller ready to run: its dependencies, the live catalog it places from, and
    the scheduled catalog sync (``None`` when nothing is synced)."""

    deps: Deps
    live: LiveCatalog
    sync: CatalogSync | None = None
    schedule: SyncSchedule | None = None
    leading: bool = False
    catalog_max_age_sec: float = 7 * 86400.0

    @property
    def catalog(self) -> Snapshot:
        return self.live.snapshot

    async def step(self) -> float:
        """One pass (if leader); seconds until the next."""
        self.live.refresh()
        self.deps.metrics.catalog_age.set(
            self.catalog.age(now=datetime.fromtimestamp(self.deps.clock.now(), UTC))
        )
        self.deps.metrics.catalog_max_age.set(self.catalog_max_age_sec)
        return await reconcile_once(self.deps)

    async def preflight(self) -> None:
        """Run each provider's start check; ``ConfigError`` says what to fix."""
        for name, entry in self.deps.providers.entries.items():
            check = getattr(entry.provider, "preflight", None)
            if check is None:
                continue
            try:
                await check(self.deps.settings.cluster_id)
            except ProviderError as exc:
                raise ConfigError(f"providers.{name}: {exc}") from None

    def schedule_jobs(self, scheduler: Any) -> None:
        """Add the catalog sync to ``scheduler`` (at once when the catalog is already
        older than the interval, so a standby taking over a stale catalog syncs)."""
        if self.sync is None or self.schedule is None:
            return
        job = schedule_sync(scheduler, self.sync, self.schedule)
        now = datetime.fromtimestamp(self.deps.clock.now(), UTC)
        if self.catalog.age(now=now) > self.schedule.interval_sec:
            job.modify(next_run_time=datetime.now(UTC))

    async def stop_local_replicas(self) -> None:
        """Stop the engine processes this machine runs for the cluster: on a laptop the
        replicas end with the service (the ledger learns it on the next start, and
        replaces them). The simulated cloud's machines are processes here too.

        All are signalled at once, not one after another: shutdown gives this step a
        fixed time (``STOP_STEP_SEC``), which a row of engines each taking its SIGTERM
        grace would overrun, leaving the rest running."""
        stops = []
        for name in (ProviderName.LOCAL.value, ProviderName.SIMULATED.value):
            entry = self.deps.providers.get(name)
            if entry is None:
                continue
            for instance in await entry.provider.list(self.deps.settings.cluster_id):
                if not instance.state.is_gone:
                    stops.append(entry.provider.terminate(instance.instance_id))
        await asyncio.gather(*stops)

    async def close(self) -> None:
        """Release clients (HTTP health checks, gateway signals, cloud SDK clients)."""
        for thing in (self.deps.health, self.deps.signals, self.deps.engines, self.deps.wakes):
            closer = getattr(thing, "aclose", None)
            if closer is not None:
                await closer()
        for entry in self.deps.providers.entries.values():
            close = getattr(entry.provider, "close", None)
            if close is not None:
                close()


def build_controller(
    config: ControllerConfig,
    *,
    sessions: async_sessionmaker[AsyncSession],
    data_dir: Path,
    signals: SignalsSource | None = None,
    notify_change: Callable[[], None] = lambda: None,
    dry_run: bool = False,
    clock: Clock | None = None,
    health: HealthChecker | None = None,
    metrics: ControllerMetrics | None = None,
    catalog: Snapshot | None = None,
    syncer: Syncer | None = None,
) -> Controller:
    clock = clock or SystemClock()
    metrics = metrics or ControllerMetrics()
    live = LiveCatalog(
        catalog or load_catalog(data_dir),
        data_dir=data_dir,
        select=lambda snapshot: offers_for(config, snapshot),
        metrics=metrics,
    )
    deps = Deps(
        sessions=sessions,
        providers=build_registry(config, sessions=sessions, data_dir=data_dir, clock=clock),
        clock=clock,
        signals=signals or NoSignals(),
        health=health or HttpHealthChecker(timeout_sec=config.health_timeout_sec),
        offers=live.offers,
        settings=Settings(
            cluster_id=config.cluster_id,
            fleet_max_hourly_cost_usd=config.fleet_max_hourly_cost_usd,
            tick_sec=config.tick_sec,
            resync_sec=config.resync_sec,
            sweep_sec=config.sweep_sec,
            orphan_grace_sec=config.orphan_grace_sec,
            unavailable_sec=config.unavailable_sec,
            unhealthy_grace_sec=config.unhealthy_grace_sec,
            visibility_grace_sec=config.visibility_grace_sec,
            dry_run=dry_run,
            callback_url=config.callback_url,
            max_replicas_per_workload=config.max_replicas_per_workload,
            group_providers=frozenset(config.group_providers),
            schedule_offset_sec=config.schedule_offset_sec,
        ),
        metrics=metrics,
        notify_change=notify_change,
        engines=(
            EngineScraper(interval_sec=config.engine_metrics_sec)
            if config.engine_metrics_sec > 0
            else None
        ),
    )
    controller = Controller(deps=deps, live=live, catalog_max_age_sec=config.catalog_max_age_sec)
    interval = config.catalog_sync.interval_sec
    syncer = syncer or config_syncer(config, data_dir=data_dir)
    if syncer is not None and interval is not None:
        controller.sync = CatalogSync(
            live=live,
            syncer=syncer,
            data_dir=data_dir,
            clock=clock,
            metrics=metrics,
            is_leader=lambda: controller.leading,
        )
        controller.schedule = SyncSchedule(
            interval_sec=interval, jitter_sec=config.catalog_sync.jitter_sec
        )
    return controller


# --- running --------------------------------------------------------------------------


class LeaderLock:
    """Leadership among controllers sharing a store.

    PostgreSQL: ``pg_try_advisory_lock`` on a connection kept open for as long as this
    controller leads. SQLite: always the leader (one controller per file).
    """

    def __init__(self, engine: AsyncEngine, *, lock_id: int = LEADER_LOCK_ID) -> None:
        self._engine = engine
        self._lock_id = lock_id
        self._conn: AsyncConnection | None = None

    @property
    def shared(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    async def hold(self) -> bool:
        """True while this controller is the leader (acquiring the lock if free)."""
        if not self.shared:
            return True
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT 1"))
                return True
            except Exception:
                log.warning("lost the leader connection; standing down")
                await self.release()
                return False
        conn = await self._engine.connect()
        try:
            got = await conn.scalar(text(f"SELECT pg_try_advisory_lock({self._lock_id})"))
            await conn.commit()
        except Exception:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return False
        self._conn = conn
        log.info("leader lock acquired")
        return True

    async def release(self) -> None:
        """End the leader's session (not just return it to the pool): the lock goes with
        it, so a standby takes over on its next try."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.invalidate()
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


def check_sharding(config: ControllerConfig, engine: AsyncEngine) -> None:
    """Refuse sharding on a store only one controller can use."""
    if config.sharding.enabled and engine.dialect.name != "postgresql":
        raise ConfigError(
            "sharding.enabled: true needs a PostgreSQL store shared by the controllers "
            "(--db postgresql+asyncpg://…); on SQLite one controller reconciles every "
            "workload: set it to false"
        )


async def run_controller(
    controller: Controller,
    *,
    engine: AsyncEngine,
    stopping: asyncio.Event,
    wake: asyncio.Event | None = None,
    standby_poll_sec: float = 5.0,
    sharding: LeaseSettings | None = None,
    member_id: str | None = None,
) -> None:
    """Reconcile until ``stopping`` is set; ``wake`` cuts a wait short (a new workload).

    ``sharding``: share the workloads with the other controllers of the store
    (PostgreSQL) under these lease timings, as ``member_id`` (else a fresh id); else
    reconcile every workload while leader. A stop releases the leases; a cancellation
    without ``stopping`` (a crash) leaves them to expire."""
    lock = LeaderLock(engine)
    wake = wake or asyncio.Event()
    metrics = controller.deps.metrics
    scheduler: AsyncIOScheduler | None = None
    last_failure: str | None = None
    member: ShardMember | None = None
    renewals: asyncio.Future[None] | None = None
    if sharding is not None:
        member = ShardMember(
            engine, settings=sharding, metrics=metrics, member_id=member_id, on_gain=wake.set
        )
        controller.deps.shards = member
        renewals = asyncio.ensure_future(member.run(stopping))
    try:
        while not stopping.is_set():
            if member is not None:
                leader, active = member.fleet_duties, bool(member.shards())
            else:
                try:
                    leader = await lock.hold()
                except Exception as exc:
                    log.warning("leader election failed: %s", exc)
                    leader = False
                active = leader
            controller.leading = leader
            metrics.leader.set(1 if leader else 0)
            if leader and scheduler is None:
                # Scheduled jobs start with leadership: a standby never syncs the catalog.
                scheduler = start_scheduler(controller.schedule_jobs)
            delay = standby_poll_sec
            if active:
                try:
                    delay = await controller.step()
                    last_failure = None
                except Exception as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    if failure != last_failure:  # the traceback once, then one line a pass
                        log.exception("reconcile pass failed")
                    else:
                        log.error("reconcile pass failed again: %s", failure)
                    last_failure = failure
                    delay = controller.deps.settings.tick_sec
            await _wait(stopping, wake, max(delay, 0.2))
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        controller.leading = False
        metrics.leader.set(0)
        await lock.release()
        if member is not None and renewals is not None:
            renewals.cancel()
            await asyncio.gather(renewals, return_exceptions=True)
            await (member.leave() if stopping.is_set() else member.close())


async def _wait(stopping: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    wake.clear()


@dataclass(frozen=True, slots=True)
class ControllerOptions:
    """How ``autoscaler controller`` runs (besides the configuration file)."""

    database_url: str
    data_dir: Path
    dry_run: bool = False
    gateway_url: str | None = None
    gateway_token: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464


async def serve_controller(config: ControllerConfig, options: ControllerOptions) -> None:
    """Run the controller alone until SIGINT or SIGTERM, with ``/metrics`` on its port."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from autoscaler.service import STOP_GRACE_SEC, announce_schedule_clock, install_stop_signals
    from autoscaler.store import sealed
    from autoscaler.store.db import open_store, session_factory

    local_store = options.database_url.startswith("sqlite")
    sealed.configure_from_environment(options.data_dir if local_store else None)
    async with open_store(options.database_url) as engine:
        check_sharding(config, engine)
        signals: SignalsSource | None = None
        if options.gateway_url and options.gateway_token:
            signals = HttpSignals(url=options.gateway_url, token=options.gateway_token)
        controller = build_controller(
            config,
            sessions=session_factory(engine),
            data_dir=options.data_dir,
            signals=signals,
            dry_run=options.dry_run,
        )
        try:
            await controller.preflight()
        except ConfigError:
            await controller.close()
            raise
        registry = controller.deps.metrics.registry

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        runner: web.AppRunner | None = None
        if options.metrics_port:
            app = web.Application()
            app.router.add_get("/metrics", metrics)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, options.metrics_host, options.metrics_port).start()
        stopping = asyncio.Event()
        install_stop_signals(stopping)
        print(
            f"controller for cluster {config.cluster_id} "
            f"(providers: {', '.join(controller.deps.providers.names) or 'none'}"
            f"{'; dry run' if options.dry_run else ''})\n{config.limits_summary()}",
            flush=True,
        )
        announce_schedule_clock(config)
        try:
            loop = asyncio.ensure_future(
                run_controller(
                    controller,
                    engine=engine,
                    stopping=stopping,
                    sharding=config.sharding.leases(),
                )
            )
            await asyncio.wait(
                [loop, asyncio.ensure_future(stopping.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            _, late = await asyncio.wait([loop], timeout=STOP_GRACE_SEC)
            for task in late:  # a pass stuck in a call: cancelled, as a crash would be
                task.cancel()
            await asyncio.gather(loop, return_exceptions=True)
        finally:
            if runner is not None:
                await runner.cleanup()
            await controller.close()
