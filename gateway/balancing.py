"""Which replica takes the next request: a pure decision over replica load.

Least outstanding work among replicas that accept work (ready, not draining, under
their concurrency cap, not excluded for this request). A replica's work is the
estimated prompt tokens (:func:`request_work`) of its requests still awaiting their first
token, ties broken by fewer outstanding requests: a short prompt is not sent behind a
replica busy prefilling a long one, which counting requests alone would do (prefill time
grows with the prompt, and a request's first token waits for the prefills ahead of it).
A request whose first token is back weighs only as one outstanding request. With equal
prompts this is least outstanding requests. Beyond :data:`TWO_CHOICES_THRESHOLD`
eligible replicas an exact scan is replaced by the power of two choices: two random
candidates, the less loaded wins, which keeps the choice O(1) and avoids herding onto
one replica that every gateway sees as the least loaded. No I/O here; the caller passes
the random source.

Prefix-aware balancing (:func:`choose_by_prefix`, the gateway's default routing): a
request whose prompt's leading blocks a replica already holds in its prefix cache skips
that prefill there. Each replica is scored by its outstanding work plus the request's
work on it, its prompt tokens less the ones expected cached (``cached_tokens``, from the
gateway's approximate index of which blocks it sent where, ``gateway.prefix``); the
lowest score wins, then the larger cached share, then fewer outstanding requests. A warm
replica thus keeps winning a shared prefix until the prefill queued on it outweighs what
the cache saves. What it cannot see is decode: every request a replica takes joins its
decode batch, so affinity alone piles a hot prefix's traffic on one replica and its time
per output token suffers (the hot spots Dynamo's and llm-d's users report). The bound:
a replica may be chosen for its cache only while its outstanding requests, this one
included, stay within :data:`HOT_SPOT_FACTOR` times the eligible replicas' mean (rounded
up, so a fleet at one request each is not frozen); past it, the request goes to the
least-work replica. When no replica holds any of the prompt's blocks the choice is plain
least work (:func:`choose_replica`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

TWO_CHOICES_THRESHOLD = 64
"""Above this many eligible replicas, sample two instead of scanning them all. Below it
the scan is exact: it costs microseconds for 64 replicas, and with long-tailed prompts
the power of two choices routes short prompts behind long prefills that a scan avoids.
In the simulator on Mooncake's trace at 2x, single H100s met the SLO at 8 replicas
(99.2 %) and missed it at 9 to 12 (95.5-97.7 %) when two choices took over above 8;
scanning, 9 and more meet it (``tests/sim/test_capacity.py``)."""


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica as the balancer sees it."""

    key: str
    outstanding: int
    cap: int
    draining: bool = False
    work: int = 0
    """The :func:`request_work` of its requests awaiting a first token (0 if unweighed)."""

    @property
    def has_room(self) -> bool:
        return not self.draining and self.outstanding < self.cap


def request_work(prompt_tokens: int) -> int:
    """A request's weight in a replica's outstanding work: its estimated prompt tokens,
    at least one so a request whose prompt is unknown still counts."""
    return max(prompt_tokens, 1)


def _load(replica: ReplicaLoad) -> tuple[int, int]:
    return replica.work, replica.outstanding


def eligible(
    replicas: Sequence[ReplicaLoad], *, excluded: Collection[str] = ()
) -> list[ReplicaLoad]:
    """Replicas that may take a new request now."""
    return [r for r in replicas if r.has_room and r.key not in excluded]


def choose_replica(
    replicas: Sequence[ReplicaLoad],
    *,
    rng: random.Random,
    excluded: Collection[str] = (),
) -> ReplicaLoad | None:
    """The replica for the next request, or None when none may take it.

    ``excluded`` holds replicas already tried for this request or refusing connections.
    Ties on outstanding work and requests are broken at random so equal replicas share
    the load.
    """
    candidates = eligible(replicas, excluded=excluded)
    if not candidates:
        return None
    if len(candidates) > TWO_CHOICES_THRESHOLD:
        first, second = rng.sample(candidates, 2)
        return first if _load(first) <= _load(second) else second
    least = min(_load(r) for r in candidates)
    return rng.choice([r for r in candidates if _load(r) == least])


HOT_SPOT_FACTOR = 1.3
"""A replica is chosen for its cache only while its outstanding requests, the new one
included, stay within this factor of the eligible replicas' mean (rounded up)."""


def prefix_bound(candidates: Sequence[ReplicaLoad], *, factor: float = HOT_SPOT_FACTOR) -> int:
    """The most outstanding requests a replica may hold after taking a request for its
    cache: ``factor`` times the mean after the request, rounded up."""
    total = sum(r.outstanding for r in candidates) + 1
    return math.ceil(factor * total / len(candidates) - 1e-9)


def choose_by_prefix(
    replicas: Sequence[ReplicaLoad],
    *,
    rng: random.Random,
    prompt_tokens: int,
    cached_tokens: Mapping[str, int],
    excluded: Collection[str] = (),
    factor: float = HOT_SPOT_FACTOR,
) -> ReplicaLoad | None:
    """The replica for a request of ``prompt_tokens`` whose expected cached tokens on
    each replica are ``cached_tokens`` (by key; absent means none), or None when none
    may take it. See the module docstring for the rule and its bound."""
    candidates = eligible(replicas, excluded=excluded)
    if not candidates:
        return None
    if not any(cached_tokens.get(r.key, 0) > 0 for r in candidates):
        return choose_replica(candidates, rng=rng)
    bound = prefix_bound(candidates, factor=factor)
    within = [r for r in candidates if r.outstanding + 1 <= bound]
    if not within:
        return choose_replica(candidates, rng=rng)

    def score(r: ReplicaLoad) -> tuple[int, int, int]:
        cached = min(cached_tokens.get(r.key, 0), prompt_tokens)
        return r.work + request_work(prompt_tokens - cached), -cached, r.outstanding

    best = min(score(r) for r in within)
    return rng.choice([r for r in within if score(r) == best])


def has_capacity(replicas: Sequence[ReplicaLoad], *, excluded: Collection[str] = ()) -> bool:
    return any(r.has_room and r.key not in excluded for r in replicas)


def admit_to_queue(*, queued: int, limit: int) -> bool:
    """Whether one more request may wait (the wait queue is bounded)."""
    return queued < limit
