"""The orphan sweep: tagged instances the ledger does not know are terminated.

An instance carrying this cluster's tag is an orphan when no open ledger row (one not
confirmed terminated) claims it: its launch id is unknown, its row was closed, or
another instance already holds that row. It is terminated once it is older than
``orphan_grace_sec``, which leaves time for a launch in flight elsewhere to be recorded.

A stopped machine is not gone (its disk is billed until it is deleted), so it is judged
like a running one: a stopped machine of a launch the ledger holds open is ours and left
alone, whatever its state; a stopped machine nobody claims is an orphan and terminated.
Only terminated and interrupted instances are passed over. (The grace runs from the
instance's ``launched_at``, which on EC2 is its last start.)
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from autoscaler.reconcile.deps import Deps, log
from autoscaler.reconcile.observe import Observation, count_provider_error
from autoscaler.store.models import Instance as LedgerRow
from providers.base import ProviderError


async def sweep_orphans(deps: Deps, *, observed: Observation, now: datetime) -> list[str]:
    """Terminate orphans past the grace period; the instance ids terminated."""
    async with deps.sessions() as s:
        rows = (
            await s.execute(
                select(LedgerRow.launch_id, LedgerRow.instance_id).where(
                    LedgerRow.terminated_confirmed_at.is_(None)
                )
            )
        ).all()
    claimed = dict(rows)
    terminated: list[str] = []
    for name, instances in observed.by_provider.items():
        entry = deps.providers.get(name)
        if entry is None:
            continue
        for instance in instances.values():
            if instance.state.is_gone:
                continue
            if instance.launch_id in claimed and claimed[instance.launch_id] in (
                None,
                instance.instance_id,
            ):
                continue
            age = (now - instance.launched_at).total_seconds()
            if age < deps.settings.orphan_grace_sec:
                continue
            deps.metrics.orphans.labels(name).inc()
            if deps.settings.dry_run:
                log.warning("dry-run: would terminate orphan %s", instance.instance_id)
                continue
            log.warning(
                "terminating orphan %s (launch %s, %.0fs old): the ledger does not know it",
                instance.instance_id,
                instance.launch_id or "?",
                age,
            )
            try:
                await entry.provider.terminate(instance.instance_id)
            except ProviderError as exc:
                count_provider_error(deps, provider=name, operation="terminate", error=exc)
                continue
            terminated.append(instance.instance_id)
    return terminated
