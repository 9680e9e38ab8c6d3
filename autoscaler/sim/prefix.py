"""Prefix caching in the simulator: each replica's engine cache, the gateway's routing
over its index of them, and the hot-spot meter.

A serving replica's engine keeps an LRU of prompt blocks (``catalog.prefix.PrefixCache``)
sized by the KV memory its serving profile leaves; a request's prefill costs its
uncached tokens (the engine is submitted only those). Routing is the gateway's:
:data:`Routing.PREFIX` runs ``gateway.balancing.choose_by_prefix`` over the gateway's
approximate index (``gateway.prefix.PrefixIndex``: the blocks it sent each replica, not
the engine's truth), :data:`Routing.LEAST_WORK` the prefix-blind least-work balancer.
A request without blocks (a CSV trace) is routed by least work either way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from catalog.prefix import PrefixCache, capacity_blocks
from gateway.balancing import ReplicaLoad, choose_by_prefix, choose_replica, request_work
from gateway.prefix import PrefixIndex


class Routing(StrEnum):
    """How the simulated gateway picks a replica (``autoscaler simulate --routing``)."""

    LEAST_WORK = "least-work"
    PREFIX = "prefix"


DEFAULT_ROUTING = Routing.PREFIX
"""What the gateway ships (``gateway.dispatch``)."""


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a request went and what the gateway weighs it at there."""

    replica: ReplicaLoad
    work: int
    """Its outstanding work on the replica: its prompt less the tokens the gateway
    expects cached there (the whole prompt under least-work routing)."""


@dataclass(slots=True)
class PrefixRouter:
    """The gateway's routing decision and index, and the engines' caches, for one run."""

    routing: Routing
    rng: random.Random
    index: PrefixIndex = field(default_factory=PrefixIndex)
    caches: dict[str, PrefixCache] = field(default_factory=dict)
    """Every replica's engine cache, ended replicas' too (their hits count)."""

    def choose(
        self, loads: Sequence[ReplicaLoad], *, blocks: Sequence[int], prompt_tokens: int
    ) -> Placed | None:
        if self.routing is Routing.LEAST_WORK or not blocks:
            chosen = choose_replica(loads, rng=self.rng)
            return None if chosen is None else Placed(chosen, request_work(prompt_tokens))
        cached = self.index.cached_tokens([r.key for r in loads], blocks, prompt_tokens)
        chosen = choose_by_prefix(
            loads, rng=self.rng, prompt_tokens=prompt_tokens, cached_tokens=cached
        )
        if chosen is None:
            return None
        return Placed(chosen, request_work(prompt_tokens - cached.get(chosen.key, 0)))

    def serve(
        self, replica: str, *, kv_capacity_tokens: int, blocks: Sequence[int], prompt_tokens: int
    ) -> int:
        """The request is sent to ``replica``: the gateway records its blocks there, and
        the engine looks them up. Returns the tokens the engine must prefill."""
        cache = self.caches.get(replica)
        if cache is None:
            cache = self.caches[replica] = PrefixCache(capacity_blocks(kv_capacity_tokens))
        if not blocks:
            cache.queries_tokens += prompt_tokens
            return prompt_tokens
        if self.routing is Routing.PREFIX:
            self.index.sent(replica, blocks, prompt_tokens, capacity_blocks=cache.capacity_blocks)
        return prompt_tokens - cache.serve(blocks, prompt_tokens)

    def ended(self, replica: str) -> None:
        """The replica is gone: the gateway forgets it (its engine's counts stay)."""
        self.index.forget(replica)

    def hits(self) -> tuple[int, int]:
        """Prompt tokens (looked up, found cached) over every engine of the run."""
        return (
            sum(c.queries_tokens for c in self.caches.values()),
            sum(c.hits_tokens for c in self.caches.values()),
        )

    def warmth(self, replica: str) -> int:
        """Blocks the replica's engine holds (0 if it never served)."""
        cache = self.caches.get(replica)
        return 0 if cache is None else len(cache)


HOT_SPOT_MIN_MEAN = 1.0
"""Minutes whose fleet mean is below one outstanding request are left out of the
hot-spot ratio: one request more or less on an idle fleet is noise, not a hot spot."""


@dataclass(slots=True)
class HotSpotMeter:
    """Once a second, each serving replica's outstanding requests and work; per minute,
    the busiest replica's mean over the fleet's mean (replicas serving the whole minute
    only). :attr:`worst_requests` and :attr:`worst_work` are the highest such ratios."""

    _next_s: float = 0.0
    _minute: int = 0
    _sums: dict[str, list[float]] = field(default_factory=dict)
    worst_requests: float = 0.0
    worst_work: float = 0.0
    minutes: int = 0

    @property
    def due_s(self) -> float:
        """When the next sample is due."""
        return self._next_s

    def observe_until(self, t: float, loads: Sequence[tuple[str, int, int]]) -> None:
        """Samples up to ``t`` of ``loads`` (key, outstanding requests, work), which
        held since the last call."""
        while self._next_s <= t:
            minute = int(self._next_s // 60)
            if minute != self._minute:
                self._close()
                self._minute = minute
            for key, requests, work in loads:
                sums = self._sums.setdefault(key, [0.0, 0.0, 0.0])
                sums[0] += 1
                sums[1] += requests
                sums[2] += work
            self._next_s += 1.0

    def _close(self) -> None:
        full = [s for s in self._sums.values() if s[0] >= 60]
        self._sums = {}
        if len(full) < 2:
            return
        requests = [s[1] / s[0] for s in full]
        work = [s[2] / s[0] for s in full]
        mean_requests = sum(requests) / len(requests)
        if mean_requests < HOT_SPOT_MIN_MEAN:
            return
        self.minutes += 1
        self.worst_requests = max(self.worst_requests, max(requests) / mean_requests)
        mean_work = sum(work) / len(work)
        if mean_work > 0:
            self.worst_work = max(self.worst_work, max(work) / mean_work)


def tpot_s(*, first_token_s: float | None, finished_s: float | None, output_tokens: int) -> float:
    """Time per output token after the first (``nan`` when it cannot be measured)."""
    if first_token_s is None or finished_s is None or output_tokens < 2:
        return math.nan
    return (finished_s - first_token_s) / (output_tokens - 1)
