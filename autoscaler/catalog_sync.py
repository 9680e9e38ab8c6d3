"""The catalog a running controller places from, and the scheduled sync that refreshes it.

* :class:`LiveCatalog` holds the active snapshot and the offers the configuration allows,
  and is replaced whole, so a pass sees one snapshot or the next, never a mix. Every
  reader (placement, the provisioner's offer lookup, the catalog-age metric) asks it at
  the moment it needs an answer, so a new snapshot takes effect on the next placement
  without a restart. :meth:`LiveCatalog.refresh` picks up a snapshot another process
  wrote into the data dir (``autoscaler catalog sync``, or the controller that ran the
  scheduled sync); it costs one ``stat`` when nothing changed. A snapshot that cannot be
  read leaves the previous one in place and is counted.
* :class:`CatalogSync` runs one sync as an apscheduler 3 interval job (``catalog_sync``
  in the configuration: interval, jitter). Only the leading controller syncs (the
  leader lock is the lock among controllers), and it holds an exclusive file lock in
  the data dir while it does, so a sync started by hand or by another process on the
  same data dir is never run twice at once. A failed sync (a fetch error, a snapshot that
  lost most of its offers) writes nothing: the previous snapshot stays, the failure is
  counted (``autoscaler_controller_catalog_syncs_total{result="failed"}``), and the
  ``CatalogStale`` alert fires once the snapshot outlives ``catalog_max_age_sec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from autoscaler.metrics import ControllerMetrics
from catalog.model import Offer
from catalog.snapshot import Snapshot, SnapshotError, read_snapshot, snapshot_path
from providers.base import Clock

log = logging.getLogger("autoscaler.catalog")

LOCK_FILE = ".catalog-sync.lock"

Syncer = Callable[[datetime], Awaitable[Snapshot]]
"""Fetches and writes a new snapshot into the data dir (``catalog.sync.run.sync_catalog``),
or raises; called with the time of the sync."""


class LiveCatalog:
    """The snapshot placement uses now, and the offers of it the configuration allows."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        data_dir: Path,
        select: Callable[[Snapshot], tuple[Offer, ...]],
        metrics: ControllerMetrics,
    ) -> None:
        self._data_dir = data_dir
        self._select = select
        self._metrics = metrics
        self._snapshot = snapshot
        self._offers = select(snapshot)
        self._seen = self._file_stamp()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def offers(self) -> tuple[Offer, ...]:
        return self._offers

    def replace(self, snapshot: Snapshot) -> None:
        """Use ``snapshot`` from now on (one assignment: readers see old or new)."""
        offers = self._select(snapshot)
        self._snapshot, self._offers = snapshot, offers
        self._seen = self._file_stamp()
        log.info(
            "catalog now %s (%d offers, %d usable here), taken %s",
            snapshot.location or snapshot.source,
            len(snapshot.offers),
            len(offers),
            snapshot.taken_at.isoformat(),
        )

    def refresh(self) -> bool:
        """Load the data dir's snapshot if it changed since last seen; True when replaced."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._seen:
            return False
        path = snapshot_path(self._data_dir)
        try:
            snapshot = read_snapshot(path)
        except (OSError, SnapshotError) as exc:
            self._seen = stamp  # count a damaged file once, not every pass
            self._metrics.catalog_syncs.labels("unreadable").inc()
            log.warning("catalog %s cannot be read; keeping the previous one: %s", path, exc)
            return False
        self.replace(snapshot)
        return True

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = snapshot_path(self._data_dir).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size


@dataclass(frozen=True, slots=True)
class SyncSchedule:
    """How often the catalog is synced: every ``interval_sec``, each run moved by up to
    ``jitter_sec`` either way so that many clusters do not call the clouds at once."""

    interval_sec: float
    jitter_sec: float = 0.0


class CatalogSync:
    """One scheduled catalog sync: leader only, under the data dir's file lock."""

    def __init__(
        self,
        *,
        live: LiveCatalog,
        syncer: Syncer,
        data_dir: Path,
        clock: Clock,
        metrics: ControllerMetrics,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self._live = live
        self._syncer = syncer
        self._data_dir = data_dir
        self._clock = clock
        self._metrics = metrics
        self._is_leader = is_leader

    async def run_once(self) -> str:
        """Sync now if this controller leads and no other sync holds the lock.

        Returns what happened: ``ok``, ``failed``, ``standby`` or ``busy``.
        """
        if not self._is_leader():
            return "standby"
        with _exclusive(self._data_dir / LOCK_FILE) as locked:
            if not locked:
                log.info("catalog sync skipped: another sync holds %s", LOCK_FILE)
                return "busy"
            now = datetime.fromtimestamp(self._clock.now(), UTC)
            try:
                snapshot = await self._syncer(now)
            except Exception as exc:  # the previous catalog stays, whatever went wrong
                self._metrics.catalog_syncs.labels("failed").inc()
                log.warning(
                    "catalog sync failed; keeping %s (taken %s): %s",
                    self._live.snapshot.location or self._live.snapshot.source,
                    self._live.snapshot.taken_at.isoformat(),
                    exc,
                )
                return "failed"
        self._live.replace(snapshot)
        self._metrics.catalog_syncs.labels("ok").inc()
        self._metrics.catalog_age.set(self._live.snapshot.age(now=now))
        return "ok"


def schedule_sync(scheduler: AsyncIOScheduler, sync: CatalogSync, schedule: SyncSchedule) -> Any:
    """Add the sync as an interval job (one run at a time; missed runs coalesce)."""
    return scheduler.add_job(
        sync.run_once,
        trigger=IntervalTrigger(seconds=schedule.interval_sec, jitter=schedule.jitter_sec or None),
        id="catalog-sync",
        name="catalog sync",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=max(60, int(schedule.interval_sec)),
        replace_existing=True,
    )


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive, non-blocking lock on ``path`` (True) or learn it is held (False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def start_scheduler(jobs: Callable[[AsyncIOScheduler], None]) -> AsyncIOScheduler:
    """An apscheduler 3 scheduler on the running event loop, with ``jobs`` added."""
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
    jobs(scheduler)
    scheduler.start()
    return scheduler


__all__ = [
    "CatalogSync",
    "LiveCatalog",
    "SyncSchedule",
    "Syncer",
    "schedule_sync",
    "start_scheduler",
]
