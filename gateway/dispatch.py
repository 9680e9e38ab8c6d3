"""Leases on replicas: balancing, per-replica caps, the bounded wait queue, cold starts.

A replica is sent at most its workload's cap at once: the spec's ``per_worker``, else the
gateway's ``replica_concurrency_cap`` (``gateway.window.replica_cap``). Where several
worker processes serve the gateway's port (``gateway.workers``), each sends a replica at
most its share of that cap (``gateway.window.worker_share``).

A request takes a :class:`Lease` on one replica and gives it back when its response is
done. A lease carries the request's estimated prompt tokens until its first token comes
back (:meth:`Dispatcher.prefilled`), so the balancer weighs each replica's outstanding
prefill work (``gateway.balancing``). When no replica can take it, the
request waits in its workload's FIFO queue: for a replica with room (bounded by
``queue_timeout_sec``), or, when the workload has no ready replica at all, for a cold
start (bounded by the workload's cold-start deadline, after demand is recorded so the
controller scales from zero). Waiters are served in arrival order among those the same
replicas may serve: a replica a waiter may use is held for it, so neither a later waiter
nor a newcomer takes it first. A waiter no replica with room may serve holds back only
the replicas it may use, so a request for an adapter no ready replica has yet does not
stall the rest of its workload's traffic.

A request whose prompt blocks are known (``catalog.prefix``: the proxy hashes chat and
completions bodies) is routed by ``gateway.balancing.choose_by_prefix`` over the
workload's :class:`~gateway.prefix.PrefixIndex` of the blocks sent to each replica, and
weighs on its replica as its prompt less the tokens expected cached there; the others by
least work.

A request for a LoRA adapter (``Prompt.adapter``) is leased only a replica whose engine
was started with it; while none that is ready has it (a rollout that adds the adapter,
before its first new replica is ready), it waits as for a cold start.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from gateway.balancing import (
    ReplicaLoad,
    admit_to_queue,
    choose_by_prefix,
    choose_replica,
    request_work,
)
from gateway.errors import GatewayError
from gateway.prefix import PrefixIndex
from gateway.routes import Replica, WorkloadRef, WorkloadRoute
from gateway.signals import Signals
from gateway.window import batch_reserve, replica_cap, worker_share


@dataclass(frozen=True, slots=True)
class DispatchLimits:
    replica_concurrency_cap: int
    max_queued_per_workload: int
    queue_timeout_sec: float
    cold_start_timeout_sec: Callable[[WorkloadRef], float]
    cold_start_retry_after_sec: float
    refused_cooldown_sec: float
    workers: int = 1
    """Gateway processes serving the same port; each takes its share of every cap."""


@dataclass(slots=True)
class Lease:
    ref: WorkloadRef
    replica: Replica
    work: int = 1
    """The request's :func:`~gateway.balancing.request_work` while its prefill is
    outstanding; 0 once its first token is back."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the balancer knows of a request's prompt: its estimated tokens (0 when
    unknown) and its prefix blocks (empty when not hashed)."""

    tokens: int = 0
    blocks: tuple[int, ...] = ()
    adapter: str | None = None
    """The LoRA adapter the request names: only replicas started with it may take it."""


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Lease]
    cold: bool
    prompt: Prompt


@dataclass(slots=True)
class _WorkloadState:
    outstanding: dict[str, int] = field(default_factory=dict)
    work: dict[str, int] = field(default_factory=dict)
    cooling_until: dict[str, float] = field(default_factory=dict)
    waiters: deque[_Waiter] = field(default_factory=deque)
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)


class Dispatcher:
    """Hands out leases on the replicas of the current route table."""

    def __init__(
        self,
        *,
        limits: DispatchLimits,
        signals: Signals,
        on_cold_start: Callable[[WorkloadRef], None],
        rng: random.Random | None = None,
    ) -> None:
        self._limits = limits
        self._signals = signals
        self._on_cold_start = on_cold_start
        self._rng = rng or random.Random()
        self._routes: dict[WorkloadRef, WorkloadRoute] = {}
        self._states: dict[WorkloadRef, _WorkloadState] = {}

    # -- route changes -------------------------------------------------------------

    def update(self, routes: dict[WorkloadRef, WorkloadRoute]) -> None:
        """Adopt a new route table and serve whoever it lets through; those waiting on a
        workload that cannot be placed now get its reason at once."""
        self._routes = routes
        for ref, state in self._states.items():
            route = routes.get(ref)
            keys = set() if route is None else {r.key for r in route.replicas}
            state.prefixes.keep_only(keys)
            warmth = self._signals.window(ref).replica_cache_blocks
            for key in [k for k in warmth if k not in keys]:
                del warmth[key]
            if state.waiters:
                self._serve_waiters(ref)
            if self._blocked(ref) is not None:
                for waiter in state.waiters:
                    if not waiter.future.done():
                        waiter.future.set_exception(self._blocked(ref) or GatewayError(503, ""))

    def _blocked(self, ref: WorkloadRef) -> GatewayError | None:
        """The 503 for a workload with no ready replica that the controller cannot
        place now, or ``None``."""
        route = self._routes.get(ref)
        if route is None or route.blocked is None or route.ready:
            return None
        return GatewayError(
            503,
            f"workload {ref[1]!r} has no replica and none can be started now: {route.blocked}",
            code="cannot_place",
            retry_after=self._limits.cold_start_retry_after_sec,
        )

    # -- leases --------------------------------------------------------------------

    async def acquire(
        self,
        ref: WorkloadRef,
        *,
        excluded: Collection[str] = (),
        prompt_tokens: int = 0,
        blocks: tuple[int, ...] = (),
        adapter: str | None = None,
    ) -> Lease:
        """A lease on a replica of ``ref``, waiting in line if none has room.

        ``excluded`` are replicas this request already tried; a retry never waits.
        ``prompt_tokens`` is the request's estimated prompt (0 when unknown), ``blocks``
        its prefix blocks (``catalog.prefix.text_blocks``; empty when not hashed),
        ``adapter`` the LoRA adapter it names (only replicas started with it may take it).
        """
        state = self._state(ref)
        prompt = Prompt(prompt_tokens, blocks, adapter)
        held = self._held_for_waiters(ref, state)
        lease = self._try_lease(ref, state, prompt=prompt, excluded={*excluded, *held})
        if lease is not None:
            return lease
        if (blocked := self._blocked(ref)) is not None:
            self._on_cold_start(ref)  # the demand stands: the controller tries again
            raise blocked
        if excluded:
            raise GatewayError(
                502,
                "no replica of this workload accepted the connection",
                code="upstream_unavailable",
            )
        return await self._wait(ref, state, prompt=prompt)

    def release(self, lease: Lease) -> None:
        state = self._state(lease.ref)
        key = lease.replica.key
        count = state.outstanding.get(key, 0) - 1
        if count > 0:
            state.outstanding[key] = count
            state.work[key] = state.work.get(key, 0) - lease.work
        else:
            state.outstanding.pop(key, None)
            state.work.pop(key, None)
        window = self._signals.window(lease.ref)
        window.leave(key)
        if state.waiters:
            self._serve_waiters(lease.ref)

    def prefilled(self, lease: Lease) -> None:
        """The request's first token is back: its prefill no longer weighs on the replica."""
        if lease.work:
            state = self._state(lease.ref)
            key = lease.replica.key
            if key in state.work:
                state.work[key] -= lease.work
            lease.work = 0

    def refused(self, lease: Lease) -> None:
        """The replica refused a connection: send it nothing for a short while."""
        state = self._state(lease.ref)
        state.cooling_until[lease.replica.key] = (
            time.monotonic() + self._limits.refused_cooldown_sec
        )
        loop = asyncio.get_running_loop()
        loop.call_later(self._limits.refused_cooldown_sec, self._serve_waiters, lease.ref)

    # -- internals -----------------------------------------------------------------

    def _state(self, ref: WorkloadRef) -> _WorkloadState:
        state = self._states.get(ref)
        if state is None:
            state = self._states[ref] = _WorkloadState()
        return state

    def _try_lease(
        self,
        ref: WorkloadRef,
        state: _WorkloadState,
        *,
        prompt: Prompt,
        excluded: Collection[str] = (),
    ) -> Lease | None:
        route = self._routes.get(ref)
        if route is None or not route.replicas:
            return None
        replicas = _serving(route, prompt.adapter)
        skip = set(excluded)
        if state.cooling_until:
            now = time.monotonic()
            for key, until in list(state.cooling_until.items()):
                if until > now:
                    skip.add(key)
                else:
                    del state.cooling_until[key]
        cap = self._cap(route)
        loads = [
            ReplicaLoad(
                key=r.key,
                outstanding=state.outstanding.get(r.key, 0),
                cap=cap,
                draining=r.draining,
                work=state.work.get(r.key, 0),
            )
            for r in replicas
        ]
        if prompt.blocks:
            cached = state.prefixes.cached_tokens(
                [r.key for r in replicas], prompt.blocks, prompt.tokens
            )
            chosen = choose_by_prefix(
                loads,
                rng=self._rng,
                prompt_tokens=prompt.tokens,
                cached_tokens=cached,
                excluded=skip,
            )
        else:
            cached = {}
            chosen = choose_replica(loads, rng=self._rng, excluded=skip)
        if chosen is None:
            return None
        work = request_work(prompt.tokens - cached.get(chosen.key, 0))
        if prompt.blocks:
            state.prefixes.sent(chosen.key, prompt.blocks, prompt.tokens)
            self._signals.window(ref).replica_cache_blocks[chosen.key] = state.prefixes.blocks_held(
                chosen.key
            )
        replica = next(r for r in replicas if r.key == chosen.key)
        state.outstanding[replica.key] = chosen.outstanding + 1
        state.work[replica.key] = chosen.work + work
        self._signals.window(ref).enter(replica.key)
        return Lease(ref=ref, replica=replica, work=work)

    def _is_cold(self, ref: WorkloadRef, adapter: str | None = None) -> bool:
        route = self._routes.get(ref)
        return route is None or not any(not r.draining for r in _serving(route, adapter))

    async def _wait(self, ref: WorkloadRef, state: _WorkloadState, *, prompt: Prompt) -> Lease:
        cold = self._is_cold(ref, prompt.adapter)
        limits = self._limits
        if not admit_to_queue(queued=len(state.waiters), limit=limits.max_queued_per_workload):
            if cold:
                raise GatewayError(
                    503,
                    "the workload is starting and its wait queue is full; retry later",
                    code="cold_start_queue_full",
                    retry_after=limits.cold_start_retry_after_sec,
                )
            raise GatewayError(
                429,
                "every replica is at its concurrency cap and the wait queue is full",
                code="queue_full",
                retry_after=1,
            )
        timeout = limits.cold_start_timeout_sec(ref) if cold else limits.queue_timeout_sec
        if cold:
            self._on_cold_start(ref)
        waiter = _Waiter(
            future=asyncio.get_running_loop().create_future(), cold=cold, prompt=prompt
        )
        state.waiters.append(waiter)
        window = self._signals.window(ref)
        window.queued += 1
        window.cold_start_waiting += cold
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                lease = await waiter.future
        except TimeoutError:
            if not _holds_lease(waiter):
                raise self._timed_out(cold=cold, timeout=timeout) from None
            lease = waiter.future.result()  # served just as the deadline passed
        except asyncio.CancelledError:
            if _holds_lease(waiter):
                self.release(waiter.future.result())
            raise
        finally:
            window.queued -= 1
            window.cold_start_waiting -= cold
            if not waiter.future.done():
                waiter.future.cancel()
            if waiter in state.waiters:
                state.waiters.remove(waiter)
        waited = time.monotonic() - started
        histogram = (
            self._signals.metrics.cold_start_wait if cold else self._signals.metrics.queue_wait
        )
        histogram.labels(*ref).observe(waited)
        return lease

    def _timed_out(self, *, cold: bool, timeout: float) -> GatewayError:
        if cold:
            return GatewayError(
                503,
                f"no replica of this workload became ready within {timeout:g} s; it is "
                "scaling up from zero, retry later",
                code="cold_start_timeout",
                retry_after=self._limits.cold_start_retry_after_sec,
            )
        return GatewayError(
            503,
            f"every replica stayed at its concurrency cap for {timeout:g} s",
            code="queue_timeout",
            retry_after=1,
        )

    def _held_for_waiters(self, ref: WorkloadRef, state: _WorkloadState) -> set[str]:
        """The replicas some waiter of ``ref`` may use: a newcomer takes none of them
        (it would overtake that waiter). A waiter for an adapter no replica has holds
        none."""
        route = self._routes.get(ref)
        if route is None or not state.waiters:
            return set()
        return {
            r.key
            for waiter in state.waiters
            if not waiter.future.done()
            for r in _serving(route, waiter.prompt.adapter)
        }

    def _serve_waiters(self, ref: WorkloadRef) -> None:
        """Serve the waiters in arrival order. One that cannot be served now holds the
        replicas it may use, so those behind it are served only on the others."""
        state = self._state(ref)
        route = self._routes.get(ref)
        held: set[str] = set()
        served: list[_Waiter] = []
        for waiter in state.waiters:
            if waiter.future.done():
                served.append(waiter)
                continue
            lease = self._try_lease(ref, state, prompt=waiter.prompt, excluded=held)
            if lease is None:
                if route is not None:
                    held.update(r.key for r in _serving(route, waiter.prompt.adapter))
                continue
            served.append(waiter)
            waiter.future.set_result(lease)
        for waiter in served:
            state.waiters.remove(waiter)

    def has_room(self, ref: WorkloadRef, *, batch: bool = False) -> bool:
        """Whether a base-model request of ``ref`` would get a replica now without
        waiting: one has room under its cap and no waiter may use it (a waiter for an
        adapter no replica has holds none). A batch line also leaves each replica's
        reserve for live traffic (``gateway.window.batch_reserve``)."""
        state = self._state(ref)
        route = self._routes.get(ref)
        if route is None:
            return False
        held = self._held_for_waiters(ref, state)
        cap = self._cap(route)
        if batch:
            cap -= batch_reserve(cap)
        return any(
            not r.draining and r.key not in held and state.outstanding.get(r.key, 0) < cap
            for r in route.replicas
        )

    def _cap(self, route: WorkloadRoute) -> int:
        """The most requests this process sends one replica of ``route`` at once."""
        limits = self._limits
        return worker_share(
            replica_cap(route.per_worker, limits.replica_concurrency_cap), limits.workers
        )

    def queued(self, ref: WorkloadRef) -> int:
        state = self._states.get(ref)
        return 0 if state is None else len(state.waiters)


def _serving(route: WorkloadRoute, adapter: str | None) -> tuple[Replica, ...]:
    """The replicas of ``route`` that may serve a request for ``adapter`` (all for none)."""
    if adapter is None:
        return route.replicas
    return tuple(r for r in route.replicas if adapter in r.adapters)


def _holds_lease(waiter: _Waiter) -> bool:
    return waiter.future.done() and not waiter.future.cancelled()
