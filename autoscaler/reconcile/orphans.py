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

The claims are the pass's snapshot of the open rows (``reconcile.fleet``); an instance
that snapshot does not claim is looked up again in the store before it is judged (its
row may have been written during the pass), so a sweep of a fleet with no orphan reads
nothing more: O(instances listed).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import select

from autoscaler.reconcile.deps import Deps, log
from autoscaler.reconcile.observe import Observation, count_provider_error
from autoscaler.store.models import Instance as LedgerRow
from providers.base import ProviderError


async def sweep_orphans(
    deps: Deps,
    *,
    observed: Observation,
    now: datetime,
    claims: Mapping[str, str | None] | None = None,
) -> list[str]:
    """Terminate orphans past the grace period; the instance ids terminated.
    ``claims``: open rows' instance ids by launch id as the pass read them (``None``:
    read them all here)."""
    grace = deps.settings.orphan_grace_sec
    suspects = [
        (name, instance)
        for name, instances in observed.by_provider.items()
        if deps.providers.get(name) is not None
        for instance in instances.values()
        if not _claimed(claims, instance.launch_id, instance.instance_id)  # most are
        and not instance.state.is_gone
        and (now - instance.launched_at).total_seconds() >= grace
    ]
    if not suspects:
        return []
    async with deps.sessions() as s:
        query = select(LedgerRow.launch_id, LedgerRow.instance_id).where(
            LedgerRow.terminated_confirmed_at.is_(None)
        )
        if claims is not None:
            launches = {i.launch_id for _, i in suspects if i.launch_id}
            query = query.where(LedgerRow.launch_id.in_(launches))
        claimed = dict((await s.execute(query)).all())
    terminated: list[str] = []
    for name, instance in suspects:
        entry = deps.providers.get(name)
        if entry is None or _claimed(claimed, instance.launch_id, instance.instance_id):
            continue
        age = (now - instance.launched_at).total_seconds()
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


def _claimed(
    claims: Mapping[str, str | None] | None, launch_id: str | None, instance_id: str
) -> bool:
    """Whether an open row claims the instance: its launch id, with no instance id yet
    or this one."""
    if claims is None or launch_id is None or launch_id not in claims:
        return False
    return claims[launch_id] in (None, instance_id)
