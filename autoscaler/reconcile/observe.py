"""What the providers show, read once per pass and shared by every workload."""

from __future__ import annotations

from dataclasses import dataclass, field

from autoscaler.reconcile.deps import Deps, log
from providers.base import Instance, ProviderError, SpotInterruption, SpotNoticeSource


@dataclass(frozen=True, slots=True)
class Observation:
    """Each provider's instances of this cluster, by instance id.

    A provider whose ``list`` failed this pass is absent from ``by_provider``: nothing is
    concluded about its instances (no confirmation, no orphan) until it answers again.
    ``notices``: spot interruption warnings the providers reported this pass (an SQS
    queue of EC2 events), by instance id.
    """

    by_provider: dict[str, dict[str, Instance]]
    notices: dict[str, SpotInterruption] = field(default_factory=dict)

    def knows(self, provider: str) -> bool:
        return provider in self.by_provider


async def observe(deps: Deps) -> Observation:
    seen: dict[str, dict[str, Instance]] = {}
    for name, entry in deps.providers.entries.items():
        try:
            instances = await entry.provider.list(deps.settings.cluster_id)
        except ProviderError as exc:
            count_provider_error(deps, provider=name, operation="list", error=exc)
            log.warning("listing %s instances failed: %s", name, exc)
            continue
        seen[name] = {i.instance_id: i for i in instances}
    return Observation(by_provider=seen, notices=await _notices(deps))


async def _notices(deps: Deps) -> dict[str, SpotInterruption]:
    found: dict[str, SpotInterruption] = {}
    for name, entry in deps.providers.entries.items():
        if not isinstance(entry.provider, SpotNoticeSource):
            continue
        try:
            notices = await entry.provider.spot_notices(deps.settings.cluster_id)
        except ProviderError as exc:
            count_provider_error(deps, provider=name, operation="spot_notices", error=exc)
            log.warning("reading %s spot interruption warnings failed: %s", name, exc)
            continue
        found.update((notice.instance_id, notice) for notice in notices)
    return found


def count_provider_error(deps: Deps, *, provider: str, operation: str, error: Exception) -> None:
    deps.metrics.provider_errors.labels(provider, operation, type(error).__name__).inc()
