"""The engines' measurement beside the gateway's, once per scrape interval.

:func:`with_engines` scrapes every ready replica (when the interval is due) and adds each
workload's engine TTFT samples to the signals the decisions read
(:func:`autoscaler.decide.scaling.measured_ttft` takes the worse of the two).
:func:`record_measurements` keeps the latest of both per workload in the store
(``workload_signals``), where ``describe`` reads it. Work: one ledger query and one GET
per ready replica per interval, one upsert per measured workload.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from autoscaler.decide.inputs import SignalsRead
from autoscaler.decide.scaling import ttft_percentile
from autoscaler.decide.signals import EngineLoad, Signals, with_engine_ttft
from autoscaler.reconcile.deps import Deps, ReplicaTarget
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload, WorkloadSignals

__all__ = ["SUMMARY_WINDOW_SEC", "record_measurements", "summary", "with_engines"]

SUMMARY_WINDOW_SEC = 300.0
"""The window the stored summary's percentiles are taken over."""


async def with_engines(
    deps: Deps, signals: SignalsRead, *, now: datetime
) -> tuple[SignalsRead, bool]:
    """``signals`` with the engines' TTFT added, and whether a scrape ran this pass."""
    engines = deps.engines
    if engines is None:
        return signals, False
    scraped = engines.due(now.timestamp())
    if scraped:
        await engines.scrape(await _ready_replicas(deps), now=now.timestamp())
    merged = dict(signals.measured)
    for ref in {*signals.measured, *engines.refs()}:
        samples = engines.ttft_samples(ref)
        if samples:
            measured = signals.of(ref)
            merged[ref] = dataclasses.replace(
                measured, signals=with_engine_ttft(measured.signals, samples)
            )
    return dataclasses.replace(signals, measured=merged), scraped


async def _ready_replicas(deps: Deps) -> list[ReplicaTarget]:
    async with deps.sessions() as s:
        rows = await s.execute(
            select(
                LedgerRow.project,
                LedgerRow.workload_slug,
                LedgerRow.launch_id,
                LedgerRow.url,
                LedgerRow.engine_key,
            ).where(
                LedgerRow.ready_at.is_not(None),
                LedgerRow.url.is_not(None),
                LedgerRow.drain_requested_at.is_(None),
                LedgerRow.terminate_requested_at.is_(None),
                LedgerRow.terminated_confirmed_at.is_(None),
                # A replica group's engine runs on its leader; workers serve no metrics.
                LedgerRow.group_role.is_(None) | (LedgerRow.group_role != "worker"),
            )
        )
        return [
            ReplicaTarget(workload=(p, slug), launch_id=launch, url=url, engine_key=key)
            for p, slug, launch, url, key in rows
            if url and deps.owns(p, slug)  # this controller's workloads (all, alone)
        ]


async def record_measurements(deps: Deps, signals: SignalsRead, *, now: datetime) -> None:
    """Store each measured workload's summary (replacing the previous one)."""
    if not signals.measured:
        return
    async with deps.sessions() as s, s.begin():
        ids = {
            (p, slug): wid
            for wid, p, slug in await s.execute(
                select(Workload.id, Workload.project, Workload.slug).where(
                    Workload.deleted_at.is_(None)
                )
            )
        }
        for ref, measured in signals.measured.items():
            workload_id = ids.get(ref)
            if workload_id is None:
                continue
            load = deps.engines.load(ref) if deps.engines is not None else None
            data = summary(measured.signals, load, now=now)
            await s.merge(WorkloadSignals(workload_id=workload_id, at=now, data=data))


def summary(signals: Signals, load: EngineLoad | None, *, now: datetime) -> dict[str, Any]:
    """What ``describe`` shows of one workload's measurement (JSON-ready)."""
    since = now - timedelta(seconds=SUMMARY_WINDOW_SEC)
    gateway_n = sum(1 for at, _ in signals.ttft_samples if at > since)
    engine_n = sum(1 for at, _ in signals.engine_ttft_samples if at > since)
    return {
        "window_sec": SUMMARY_WINDOW_SEC,
        "gateway": {
            "ttft_p50_s": ttft_percentile(signals.ttft_samples, q=0.5, since=since),
            "ttft_p95_s": ttft_percentile(signals.ttft_samples, q=0.95, since=since),
            "ttft_samples": gateway_n,
            "unstreamed_answers": sum(1 for at, _ in signals.unstreamed_samples if at > since),
            "request_rate": signals.request_rate,
            "in_flight": signals.in_flight,
            "queued": signals.queue_depth,
        },
        "engines": None
        if load is None and not engine_n
        else {
            "replicas": 0 if load is None else load.replicas,
            "waiting": 0 if load is None else load.waiting,
            "running": 0 if load is None else load.running,
            "kv_cache_usage": None if load is None else load.kv_cache_usage,
            "ttft_p50_s": ttft_percentile(signals.engine_ttft_samples, q=0.5, since=since),
            "ttft_p95_s": ttft_percentile(signals.engine_ttft_samples, q=0.95, since=since),
            "ttft_samples": engine_n,
        },
    }
