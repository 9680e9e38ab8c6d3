"""Every provider call has a deadline: :class:`TimedProvider`.

A cloud API that never answers (a dropped connection, a stuck proxy) would otherwise hold
a workload's step, and with it the whole pass, for as long as the SDK's own read timeout
(botocore: 60 s per attempt). Wrapped, a call that runs past its deadline is cancelled
and raised as :class:`providers.errors.Transient`, which every caller already handles:
a launch stays a pending intent and is resolved by its launch id in a later pass (the
idempotency token makes that safe), a list leaves that provider out of the pass, a
terminate is sent again next pass, a describe concludes nothing.

``launch`` and ``start`` get a longer deadline than the lookups: GCP's insert and start
wait on a zone operation (a start that runs past it is a ``Transient``; starting again is
safe, as ``start`` returns a machine already on its way up). Anything else (``close``,
optional capabilities) is the inner provider's.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable
from typing import Any, TypeVar

from providers.base import Instance, LaunchRequest, Provider
from providers.errors import Transient

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT_SEC = 20.0
DEFAULT_LAUNCH_TIMEOUT_SEC = 90.0


class TimedProvider:
    """``inner`` with a deadline on every call."""

    def __init__(
        self,
        inner: Provider,
        *,
        call_timeout_sec: float = DEFAULT_CALL_TIMEOUT_SEC,
        launch_timeout_sec: float = DEFAULT_LAUNCH_TIMEOUT_SEC,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.call_timeout_sec = call_timeout_sec
        self.launch_timeout_sec = launch_timeout_sec

    async def launch(self, request: LaunchRequest) -> Instance:
        action = f"launching {request.offer.instance_type} in {request.offer.zone}"
        return await self._within(action, self.inner.launch(request), self.launch_timeout_sec)

    async def terminate(self, instance_id: str) -> None:
        await self._within(f"terminating {instance_id}", self.inner.terminate(instance_id))

    async def stop(self, instance_id: str) -> None:
        await self._within(f"stopping {instance_id}", self.inner.stop(instance_id))

    async def start(self, instance_id: str) -> Instance:
        return await self._within(
            f"starting {instance_id}", self.inner.start(instance_id), self.launch_timeout_sec
        )

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        return await self._within(f"listing {cluster_id}", self.inner.list(cluster_id))

    async def describe(self, instance_id: str) -> Instance:
        return await self._within(f"describing {instance_id}", self.inner.describe(instance_id))

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        return await self._within(
            f"looking up launch {launch_id}", self.inner.find_by_launch_id(cluster_id, launch_id)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _within(self, action: str, call: Awaitable[T], limit_sec: float | None = None) -> T:
        limit = self.call_timeout_sec if limit_sec is None else limit_sec
        try:
            return await asyncio.wait_for(call, timeout=limit)
        except TimeoutError:
            raise Transient(
                action, f"no answer from {self.name} within {limit:g}s", retry_after=limit
            ) from None
