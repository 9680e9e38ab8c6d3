"""A small world for reconciler tests: a store, a fake cloud on a manual clock, fake
health and signals, and helpers to apply workloads and read the ledger."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.decide.inputs import Measured, SignalsRead, TokenMix
from autoscaler.decide.signals import Signals
from autoscaler.reconcile.deps import (
    Deps,
    ProviderEntry,
    ProviderRegistry,
    Settings,
    WorkloadRef,
)
from autoscaler.reconcile.loop import reconcile_once
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.models import Decision, Instance
from autoscaler.store.phase import Phase, phase_of
from autoscaler.store.workloads import delete_workload, ensure_workload
from catalog.model import Offer, ProviderName
from providers.base import ManualClock, utc
from providers.engine_sleep import EngineSleepFailed
from providers.fake import FakeCloud, FakeProvider

PROJECT = "acme"
CLUSTER = "test-cluster"


def offer(instance_type: str, gpu: str, price: float, zone: str = "us-east-1a") -> Offer:
    return Offer(
        provider=ProviderName.AWS,
        region=zone[:-1],
        zone=zone,
        instance_type=instance_type,
        gpu=gpu,
        gpu_count=1,
        vcpus=4,
        memory_gib=16,
        on_demand_usd_per_hour=price,
        spot_usd_per_hour=round(price * 0.4, 4),
    )


L4 = offer("g6.xlarge", "NVIDIA L4", 0.80)
A10G = offer("g5.xlarge", "NVIDIA A10G", 1.00)
L40S = offer("g6e.xlarge", "NVIDIA L40S", 1.86)
OFFERS = (L4, A10G, L40S)


class FakeHealth:
    """Engines answer when their URL is in ``healthy`` (or always, with ``all_healthy``)."""

    def __init__(self) -> None:
        self.all_healthy = True
        self.down: set[str] = set()
        self.asked: list[tuple[str, str | None]] = []
        self.only: str | None = None

    def down_but(self, url: str | None) -> None:
        """Only the engine at ``url`` answers (``None``: every engine, as before)."""
        self.only = url

    async def healthy(self, *, url: str, health_path: str, engine_key: str | None) -> bool:
        self.asked.append((url + health_path, engine_key))
        if self.only is not None and url != self.only:
            return False
        return self.all_healthy and url not in self.down


class FakeSleeper:
    """Engines that sleep and wake on request, by URL; ``refuse`` makes calls fail."""

    def __init__(self) -> None:
        self.asleep: set[str] = set()
        self.refuse = False
        self.calls: list[tuple[str, str]] = []
        self.wake_gate: asyncio.Event | None = None
        """When set, a wake takes until the event is set (a level-2 wake of a large model)."""

    def _check(self, url: str, action: str) -> None:
        self.calls.append((action, url))
        if self.refuse:
            raise EngineSleepFailed(f"{action} {url}", "the engine did not answer")

    async def sleep(self, *, url: str, level: int, engine_key: str | None) -> None:
        self._check(url, "sleep")
        self.asleep.add(url)

    async def wake(self, *, url: str, engine_key: str | None) -> None:
        self._check(url, "wake")
        if self.wake_gate is not None:
            await self.wake_gate.wait()
        self.asleep.discard(url)

    async def is_sleeping(self, *, url: str, engine_key: str | None) -> bool:
        self._check(url, "is_sleeping")
        return url in self.asleep


@dataclass
class FakeSignals:
    """Signals per workload, and the token mix the gateway measured for some."""

    by_ref: dict[WorkloadRef, Signals] = field(default_factory=dict)
    mixes: dict[WorkloadRef, TokenMix] = field(default_factory=dict)
    measured: dict[WorkloadRef, Measured] = field(default_factory=dict)
    """Whole measurements (as ``decide.inputs.measured_of`` reads a gateway's); these win."""
    incomplete: str | None = None
    """What the read misses (``SignalsRead.incomplete``; ``None``: it is complete)."""
    failure: Exception | None = None
    """Raised by the read instead of answering (a gateway that cannot be reached)."""

    async def signals(self) -> SignalsRead:
        if self.failure is not None:
            raise self.failure
        refs = set(self.by_ref) | set(self.mixes)
        found = {
            ref: Measured(signals=self.by_ref.get(ref, Signals()), token_mix=self.mixes.get(ref))
            for ref in refs
        }
        return SignalsRead(found | self.measured, incomplete=self.incomplete)


def fixed(slug: str, replicas: int = 1, **extra: Any) -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {
            "name": slug,
            "slug": slug,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "execution_policy": "fixed",
            "execution_policy_config": {"replicas": replicas},
            **extra,
        }
    )


def autoscaling(slug: str, **policy: Any) -> WorkloadSpec:
    config: dict[str, Any] = {
        "min_workers": 1,
        "max_workers": 4,
        "max_hourly_cost_usd": 10.0,
        "scale_up_time_window_sec": 30,
        "scale_down_time_window_sec": 60,
        "scaling_up_timeout_sec": 300,
        "scaling_down_timeout_sec": 60,
        "workers": {
            "source": "cloud",
            "cloud_pool": {"gpu_pool": ["NVIDIA L4", "NVIDIA A10G", "NVIDIA L40S"]},
        },
    }
    config.update(policy)
    return WorkloadSpec.model_validate(
        {
            "name": slug,
            "slug": slug,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "command": "--max-model-len 4096",
            "execution_policy": "autoscaling",
            "execution_policy_config": config,
        }
    )


class World:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        fleet_ceiling: float | None = None,
        orphan_grace_sec: float = 600.0,
        dry_run: bool = False,
    ) -> None:
        self.sessions = sessions
        self.clock = ManualClock(start=1_750_000_000.0)
        self.cloud = FakeCloud(clock=self.clock)
        self.provider = FakeProvider(self.cloud, name="aws")
        self.health = FakeHealth()
        self.sleeper = FakeSleeper()
        self.signals = FakeSignals()
        self.changes = 0
        self.deps = self.make_deps(
            fleet_ceiling=fleet_ceiling, orphan_grace_sec=orphan_grace_sec, dry_run=dry_run
        )

    def make_deps(
        self,
        *,
        provider: Any = None,
        fleet_ceiling: float | None = None,
        orphan_grace_sec: float = 600.0,
        dry_run: bool = False,
        **settings: Any,
    ) -> Deps:
        """``settings``: further :class:`Settings` fields (limits, shares, budgets)."""

        def notify() -> None:
            self.changes += 1

        return Deps(
            sessions=self.sessions,
            providers=ProviderRegistry({"aws": ProviderEntry(provider or self.provider)}),
            clock=self.clock,
            signals=self.signals,
            health=self.health,
            offers=lambda: OFFERS,
            settings=Settings(
                cluster_id=CLUSTER,
                fleet_max_hourly_cost_usd=fleet_ceiling,
                orphan_grace_sec=orphan_grace_sec,
                unavailable_sec=600,
                unhealthy_grace_sec=20,
                dry_run=dry_run,
                **settings,
            ),
            notify_change=notify,
            sleeper=self.sleeper,
        )

    @property
    def now(self) -> datetime:
        return utc(self.clock.now())

    async def apply(self, spec: WorkloadSpec) -> int:
        async with self.sessions() as s, s.begin():
            result = await ensure_workload(
                s, project=PROJECT, spec=spec, on_drift=OnDrift.RECONCILE, now=self.now
            )
            return result.workload.id

    async def delete(self, slug: str) -> None:
        async with self.sessions() as s, s.begin():
            await delete_workload(s, project=PROJECT, slug=slug, now=self.now)

    async def step(self, seconds: float = 0.0) -> float:
        if seconds:
            self.clock.advance(seconds)
        return await reconcile_once(self.deps)

    async def rows(self, slug: str | None = None) -> list[Instance]:
        async with self.sessions() as s:
            query = select(Instance).order_by(Instance.intent_at, Instance.launch_id)
            if slug is not None:
                query = query.where(Instance.workload_slug == slug)
            return list(await s.scalars(query))

    async def phases(self, slug: str) -> list[Phase]:
        return [phase_of(r) for r in await self.rows(slug)]

    async def decisions(self, kind: str | None = None) -> list[Decision]:
        async with self.sessions() as s:
            query = select(Decision).order_by(Decision.id)
            if kind is not None:
                query = query.where(Decision.kind == kind)
            return list(await s.scalars(query))

    def live_instances(self) -> list[Any]:
        return [i for i in self.cloud.all() if not i.state.is_gone]
