"""What the providers show, read once per pass and shared by every workload."""

from __future__ import annotations

from dataclasses import dataclass

from autoscaler.reconcile.deps import Deps, log
from providers.base import Instance, ProviderError


@dataclass(frozen=True, slots=True)
class Observation:
    """Each provider's instances of this cluster, by instance id.

    A provider whose ``list`` failed this pass is absent from ``by_provider``: nothing is
    concluded about its instances (no confirmation, no orphan) until it answers again.
    """

    by_provider: dict[str, dict[str, Instance]]

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
    return Observation(by_provider=seen)


def count_provider_error(deps: Deps, *, provider: str, operation: str, error: Exception) -> None:
    deps.metrics.provider_errors.labels(provider, operation, type(error).__name__).inc()
