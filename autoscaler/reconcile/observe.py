"""What the providers show, read once per pass and shared by every workload."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoscaler.reconcile.deps import Deps, log
from autoscaler.reconcile.notices import share_notices
from providers.base import (
    Instance,
    InstanceState,
    ProviderError,
    SpotInterruption,
    SpotNoticeSource,
    utc,
)


@dataclass(frozen=True, slots=True)
class Observation:
    """Each provider's instances of this cluster, by instance id.

    A provider whose ``list`` failed this pass is absent from ``by_provider``: nothing is
    concluded about its instances (no confirmation, no orphan) until it answers again.
    ``notices``: spot interruption warnings the providers reported this pass (an SQS
    queue of EC2 events), by instance id; with sharding, every warning stored for the
    controller that owns its instance, whoever read it (``reconcile.notices``).
    """

    by_provider: dict[str, dict[str, Instance]]
    states: dict[str, dict[str, InstanceState]]
    """The same instances' states, by provider and instance id: what a pass diffs against
    the last pass's (``reconcile.changes``)."""
    notices: dict[str, SpotInterruption] = field(default_factory=dict)

    def knows(self, provider: str) -> bool:
        return provider in self.by_provider


async def observe(deps: Deps) -> Observation:
    """List each provider's instances of this cluster once. O(instances listed): each
    instance is read once, for both maps (at tens of thousands of instances, reading
    each object again costs about as much as the first read)."""
    seen: dict[str, dict[str, Instance]] = {}
    states: dict[str, dict[str, InstanceState]] = {}
    for name, entry in deps.providers.entries.items():
        try:
            instances = await entry.provider.list(deps.settings.cluster_id)
        except ProviderError as exc:
            count_provider_error(deps, provider=name, operation="list", error=exc)
            log.warning("listing %s instances failed: %s", name, exc)
            continue
        by_id: dict[str, Instance] = {}
        state_of: dict[str, InstanceState] = {}
        for instance in instances:
            instance_id = instance.instance_id
            by_id[instance_id] = instance
            state_of[instance_id] = instance.state
        seen[name], states[name] = by_id, state_of
    received = await _notices(deps)
    if deps.shards is None:
        notices = {instance_id: notice for instance_id, (_, notice) in received.items()}
    else:  # a queue's message went to this controller, the instance's may be another
        notices = await share_notices(deps, received, now=utc(deps.clock.now()))
    return Observation(by_provider=seen, notices=notices, states=states)


async def _notices(deps: Deps) -> dict[str, tuple[str, SpotInterruption]]:
    """Instance id -> (provider, warning) of the warnings the providers gave this pass."""
    found: dict[str, tuple[str, SpotInterruption]] = {}
    for name, entry in deps.providers.entries.items():
        if not isinstance(entry.provider, SpotNoticeSource):
            continue
        try:
            notices = await entry.provider.spot_notices(deps.settings.cluster_id)
        except ProviderError as exc:
            count_provider_error(deps, provider=name, operation="spot_notices", error=exc)
            log.warning("reading %s spot interruption warnings failed: %s", name, exc)
            continue
        found.update((notice.instance_id, (name, notice)) for notice in notices)
    return found


def count_provider_error(deps: Deps, *, provider: str, operation: str, error: Exception) -> None:
    deps.metrics.provider_errors.labels(provider, operation, type(error).__name__).inc()
