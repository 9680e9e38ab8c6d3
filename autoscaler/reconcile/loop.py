"""One reconcile pass over every workload: :func:`reconcile_once`.

A pass reads the providers once, the gateway's signals once, then reconciles each
workload in turn. One workload failing (a spec the code cannot handle, a store error, a
bug) is logged and counted and the others go on. The orphan sweep runs last, when every
intent of the pass is on record.

The caller sleeps between passes (``autoscaler.controller``), or the simulator advances
its clock: this module never sleeps and reads time only from ``deps.clock``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from autoscaler.decide.inputs import Measured
from autoscaler.reconcile.deps import Deps, WorkloadRef, log
from autoscaler.reconcile.ledger import fleet_usd_per_hour, workloads_to_reconcile
from autoscaler.reconcile.observe import observe
from autoscaler.reconcile.orphans import sweep_orphans
from autoscaler.reconcile.workload import reconcile_workload
from providers.base import utc


async def reconcile_once(deps: Deps) -> float:
    """Reconcile every workload once; seconds until the next pass is due."""
    started = time.perf_counter()
    now = utc(deps.clock.now())
    observed = await observe(deps)
    signals = await _signals(deps)
    async with deps.sessions() as s:
        workloads = [(w.id, w.project, w.slug) for w in await workloads_to_reconcile(s)]
    due = deps.settings.tick_sec
    for workload_id, project, slug in workloads:
        try:
            after = await reconcile_workload(
                deps, workload_id=workload_id, observed=observed, signals=signals, now=now
            )
        except Exception:  # isolate: one workload never stalls the others
            log.exception("reconciling %s/%s failed; the other workloads go on", project, slug)
            deps.metrics.reconcile_errors.labels(project, slug).inc()
            continue
        if after is not None:
            due = min(due, max(after, 0.0))
    try:
        await sweep_orphans(deps, observed=observed, now=now)
    except Exception:
        log.exception("orphan sweep failed")
    async with deps.sessions() as s:
        deps.metrics.fleet_usd.set(await fleet_usd_per_hour(s))
    deps.metrics.fleet_ceiling.set(deps.settings.fleet_max_hourly_cost_usd or 0)
    deps.metrics.reconcile_duration.observe(time.perf_counter() - started)
    deps.metrics.last_reconcile.set(deps.clock.now())
    return due


async def _signals(deps: Deps) -> Mapping[WorkloadRef, Measured]:
    try:
        return await deps.signals.signals()
    except Exception as exc:  # the controller acts without them rather than not at all
        log.warning("reading the gateway's signals failed: %s", exc)
        return {}
