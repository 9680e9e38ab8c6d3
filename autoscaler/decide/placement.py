"""Where the next replica goes: a private worker, or the catalog offer that serves the
model's measured load at the lowest cost (per unit of capacity before any is measured).

The rules:

* **Private workers first.** A workload pinned to a worker (``worker_id``) or sourcing
  private workers goes to the named worker carrying the fewest of its replicas (ties in
  the order named), never to the cloud. Workers marked unavailable are skipped.
* **Cheapest for the load measured, else per capacity.** Every feasible offer (GPU
  pool, regions, CUDA pins, model memory: ``catalog.query``) is priced on each market
  it may use: spot when the policy allows it and the offer sells it, and on-demand
  always (the fallback when spot has just failed). Options are ranked by dollars per
  hour per request/s of serving capacity for this model (``catalog.perf``, the model
  engine-sim and the simulator use): a GPU a third the price that serves a tenth of the
  load is not cheaper. The capacity is the
  *usable* one: the batch is bounded by the gateway's per-replica concurrency cap
  (``concurrency_cap``, :data:`GATEWAY_CONCURRENCY_CAP` by default), because the gateway
  never sends a replica more requests at once, so a GPU whose KV cache could batch 220
  sequences serves like one that batches 64. Offers without performance figures rank
  after all those with figures, by raw price. Once the gateway has measured the load
  (``replicas_needed``, from the caller: the scaling rules' count for a fleet of that
  shape), the options no dearer per hour than the cheapest per capacity rank by what
  that fleet would cost, needed replicas times price, and per capacity only among
  equals: at 2.5 req/s an H100 that carries 14 req/s at $0.86/h per req/s is still a
  $12.22/h replica, where one 4 x L4 machine at $3.99/h carries the load. The load may
  step placement down to a smaller machine, never up to a dearer one: a burst that
  needs eight H100s is carried by more replicas (the scaling rules' part), not by one
  eight-GPU machine added to a fleet of one-GPU ones.
* **Prompts must fit the TTFT target.** Given the prompt length the gateway measures,
  an option whose prefill of a typical prompt alone takes more than
  :data:`PREFILL_SHARE_OF_TARGET` of ``upper_allowed_latency_sec`` ranks after every
  option that does not (fastest prefill first among them): a GPU that spends most of
  the target prefilling one prompt misses it as soon as two arrive together, and no
  number of replicas fixes that.
* **The tail too, not just the mean.** With the measured prompt lengths (the gateway's
  histogram of them once it holds :data:`TAIL_MIN_SAMPLES`; before that, the mean and
  squared coefficient of variation taken as lognormal as ``decide.scaling`` takes it),
  each GPU shape is judged by the share of prompts it prefills, alone, within the SLO's
  bound for that prompt: ``max(target, PREFILL_TTFT_FACTOR x`` its prefill on the
  fastest shape the workload may use``)`` (the simulator's SLO rule). A shape must serve
  :data:`TAIL_SHARE` of them (or, where no shape in the pool does, as many as the best
  one); shapes short of that rank after every shape that meets it, the highest share
  first. A prompt a faster shape would answer in time is a miss of the slow shape, not
  of the prompt: adding replicas of a shape whose prefill is too slow for the long
  prompts never helps them.
* **Skip recent failures.** ``unavailable`` maps :func:`unavailable_key` (offer and
  market, or a worker) to the time until which it is skipped: a spot stock-out leaves the
  same offer's on-demand market usable.
* **Spread on ties.** Among options of equal cost, the zone and then the
  region carrying fewest of the workload's replicas wins; then the offer key, so the same
  inputs always give the same answer.
* **Stay in the budget.** ``max_usd_per_hour`` (the headroom left under the ceilings)
  skips options that could not be bought anyway, so a cheaper-per-hour offer is chosen
  over a refusal.
* **Groups when no machine holds the model.** With ``allow_groups``, a model that no
  single feasible machine can hold (by the memory estimate and, where the model's size
  is known, the performance model) is placed as a replica group: the smallest number of
  machines of one offer (so one shape, in one zone) that together hold it, from 2 to
  :data:`MAX_GROUP_SIZE`, for backends that serve across nodes (:data:`GROUP_BACKENDS`).
  Groups of fewer machines win over cheaper groups of more (each member more is one more
  pipeline stage over the network and one more machine whose loss ends the group); among
  groups of one size, the usual cost per capacity.
  The group is priced whole (members x the offer's price), so the ceilings count every
  member before any is bought; its capacity is that of all its GPUs as one engine. Groups
  buy on-demand only: a spot interruption of any member would take the whole group down.
  A parallel split written in the user's command fixes the machine and disables groups.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from statistics import NormalDist

from autoscaler.decide.queueing import PREFILL_TTFT_FACTOR
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import Offer
from catalog.perf import (
    ModelDoesNotFit,
    ServingProfile,
    fastest_single_gpu,
    fits,
    serving_profile,
)
from catalog.query import Candidate, Market, OfferIndex, OfferRequest
from gateway.window import REPLICA_CONCURRENCY_CAP, share_within
from providers.engines import parallel_size

DEFAULT_INPUT_TOKENS = 1024.0
"""Mean prompt length assumed when ranking offers by serving capacity."""

DEFAULT_OUTPUT_TOKENS = 256.0
"""Mean completion length assumed when ranking offers by serving capacity."""

GATEWAY_CONCURRENCY_CAP = REPLICA_CONCURRENCY_CAP
"""The default of the gateway's per-replica concurrency cap (``gateway.window``, the pure
signals contract): the most requests a replica is ever given at once, so the most
sequences it ever batches. Callers that run another cap pass it."""

PREFILL_SHARE_OF_TARGET = 0.5
"""The most of the TTFT target a typical prompt's prefill may take on a preferred offer."""

MAX_GROUP_SIZE = 8
"""The most machines one replica group spans (a leader and up to seven workers)."""

GROUP_BACKENDS = frozenset({"vllm", "sglang"})
"""Backends that serve one model across machines (vLLM with Ray and pipeline
parallelism, SGLang with ``--nnodes``)."""

TAIL_SHARE = 0.99
"""The share of measured prompts a preferred GPU shape must prefill within their SLO bound
(the SLO's attainment target: a shape that cannot answer 1 % of prompts in time leaves no
room for a single queued request)."""

TAIL_MAX_TOKENS = 1_048_576
"""The longest prompt the tail search considers."""

TAIL_MIN_SAMPLES = 200
"""Prompts the gateway's histogram must hold before the tail rule reads the share from it
rather than from the lognormal model of the mean and spread: 1% of them is then two
prompts, not a fraction of one. The model's tail is a guess (a trace whose prompts stop at
7,437 tokens has a lognormal 99th percentile near 9,700); the histogram is the measured
one."""


@dataclass(frozen=True, slots=True)
class PlacementOption:
    """An offer that fits the workload, with one replica's capacity on it (requests/s for
    this model; ``None`` when the performance model has no figures for its GPU)."""

    offer: Offer
    capacity_rps: float | None
    prefill_s: float | None = None
    """Prefill of a typical prompt alone on one replica (``None``: not known)."""
    group_size: int = 1
    """Machines of ``offer`` one replica spans (a group from 2)."""
    tail_share: float | None = None
    """The share of measured prompts it prefills alone within their SLO bound
    (``None``: not known)."""
    replicas_needed: int | None = None
    """Replicas of this shape the measured load needs, by the scaling rules (``None``:
    no load measured): what a fleet of it would cost, where capacity per dollar says
    only what a saturated replica would."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a replica goes (an offer on a market, or a private worker), or why nowhere.

    ``offer`` and ``worker_id`` are both ``None`` when nothing fits; ``reason`` says why.
    ``group_size`` above 1 makes the replica a group of that many machines of ``offer``
    (a leader and workers); ``usd_per_hour`` is then the whole group's price.
    """

    reason: str
    offer: Offer | None = None
    market: Market | None = None
    usd_per_hour: float = 0.0
    capacity_rps: float | None = None
    worker_id: str | None = None
    group_size: int = 1
    short_of_tail: frozenset[tuple[str, int]] = frozenset()
    """The GPU shapes ``(gpu, count)`` of the pool that prefill too few of the measured
    prompts within their SLO bound (the tail rule): replicas on them are drained first
    and replaced (``decide.step``). Empty until the gateway's histogram holds
    :data:`TAIL_MIN_SAMPLES` prompts: a replica is moved on measured prompts, never on
    the lognormal model's guess at their tail."""

    @property
    def found(self) -> bool:
        return self.offer is not None or self.worker_id is not None


class PlacementMemo:
    """Placements shared within a pass, over one catalog load's offers.

    :func:`place_replica` keys each placement by every input it reads (the spec's offer
    request, policy fields and backend, the model's size and memory, the measured token
    mix and prompt histogram, the replicas the load needs per shape, the gateway's cap,
    the ceiling headroom, the zones of the workload's replicas, the markets marked
    unavailable now, the group options) over this memo's offers; a workload whose key
    equals an earlier one's gets the same :class:`Placement` (a frozen value), so
    workloads of one spec shape cost one ranking of the offers. The key holds values
    only, never the workload, so the memo is exact: inputs that differ in anything
    placement reads give keys that differ.

    The offers' :class:`~catalog.query.OfferIndex` is built when the memo first sees an
    offers object and kept while the same object (by identity: a catalog load's tuple)
    is passed; another object is indexed anew and the placements kept are dropped; one
    that is not a tuple (it could change in place) is indexed anew for each call and
    shares nothing. :meth:`next_pass` drops the placements and keeps the index. Memory:
    one placement per distinct key of the pass, and the index's answers per distinct
    offer request (at most :data:`catalog.query.INDEX_REQUESTS`, kept across passes
    until the catalog is loaded again).
    """

    def __init__(self) -> None:
        self._offers: tuple[Offer, ...] | None = None
        self._index: OfferIndex | None = None
        self._placements: dict[object, Placement] = {}
        self.computed = 0
        """Placements computed since the last :meth:`next_pass`."""
        self.shared = 0
        """Placements handed out again since the last :meth:`next_pass`."""

    def index(self, offers: Iterable[Offer]) -> OfferIndex:
        """The index of ``offers``: kept for a tuple seen last time, else built (O(offers))."""
        if self._index is not None and offers is self._offers:
            return self._index
        index = OfferIndex(offers)
        if isinstance(offers, tuple):
            self._offers, self._index = offers, index
            self._placements = {}
        return index

    def keeps(self, offers: Iterable[Offer]) -> bool:
        """Whether placements over ``offers`` are kept: the tuple the index was built on."""
        return self._index is not None and offers is self._offers

    def placed(self, key: object) -> Placement | None:
        found = self._placements.get(key)
        if found is not None:
            self.shared += 1
        return found

    def keep(self, key: object, placement: Placement) -> None:
        self._placements[key] = placement
        self.computed += 1

    def next_pass(self) -> None:
        """Drop the placements kept (the inputs of the next pass differ): O(1)."""
        self._placements = {}
        self.computed = self.shared = 0


def unavailable_key(offer: Offer, market: Market) -> str:
    """The key that marks one market of one offer unavailable after a failed launch."""
    return offer.key if market is Market.ON_DEMAND else f"{offer.key}#spot"


def worker_key(worker_id: str) -> str:
    """The key that marks a private worker unavailable."""
    return f"private/{worker_id}"


def replica_capacity_rps(
    offer: Offer,
    *,
    params_b: float,
    bytes_per_param: float = 2.0,
    input_tokens: float = DEFAULT_INPUT_TOKENS,
    output_tokens: float = DEFAULT_OUTPUT_TOKENS,
    concurrency_cap: int = GATEWAY_CONCURRENCY_CAP,
) -> float | None:
    """Requests/s one replica on ``offer`` serves for the model, its batch bounded by the
    gateway's ``concurrency_cap``; 0 when it does not fit; ``None`` when the GPU has no
    performance figures."""
    try:
        profile = serving_profile(
            offer.gpu, offer.gpu_count, params_b, bytes_per_param, max_batch=_cap(concurrency_cap)
        )
    except ModelDoesNotFit:
        return 0.0
    except ValueError:
        return None
    return profile.capacity_rps(input_tokens=input_tokens, output_tokens=output_tokens)


def choose_private_worker(
    *,
    worker_ids: Sequence[str],
    replicas_per_worker: Mapping[str, int],
    unavailable: Mapping[str, datetime],
    now: datetime,
) -> Placement:
    """The named worker carrying the fewest replicas of the workload, skipping unavailable
    ones; ties go to the worker named first."""
    usable = [w for w in worker_ids if not _blocked(unavailable, worker_key(w), now)]
    if not usable:
        return Placement(
            reason=f"no private worker available: {', '.join(worker_ids)} all marked unavailable"
        )
    chosen = min(usable, key=lambda w: (replicas_per_worker.get(w, 0), worker_ids.index(w)))
    load = replicas_per_worker.get(chosen, 0)
    return Placement(
        reason=f"private worker {chosen} ({load} replica(s) of this workload on it already)",
        worker_id=chosen,
    )


@dataclass(frozen=True, slots=True)
class _Priced:
    option: PlacementOption
    market: Market
    usd_per_hour: float

    @property
    def cost_per_capacity(self) -> float:
        capacity = self.option.capacity_rps
        return self.usd_per_hour / capacity if capacity else math.inf

    @property
    def fleet_usd_per_hour(self) -> float | None:
        """What the replicas the measured load needs would cost on this option."""
        needed = self.option.replicas_needed
        return None if needed is None else needed * self.usd_per_hour

    def too_slow(self, budget_s: float | None) -> bool:
        prefill = self.option.prefill_s
        return budget_s is not None and prefill is not None and prefill > budget_s

    def short_of_tail(self, required: float | None) -> bool:
        share = self.option.tail_share
        return required is not None and share is not None and share < required - 1e-9


def choose_offer(
    *,
    options: Iterable[PlacementOption],
    allow_spot: bool,
    unavailable: Mapping[str, datetime],
    now: datetime,
    current_zones: Sequence[str] = (),
    max_usd_per_hour: float | None = None,
    prefill_budget_s: float | None = None,
    tail_share_required: float | None = None,
) -> Placement:
    """The option with the lowest cost per capacity, by the rules in the module docstring.

    ``current_zones`` holds the zone of each of the workload's live replicas. Options
    whose ``tail_share`` is below ``tail_share_required`` rank after all others (the
    highest share first), then those whose ``prefill_s`` exceeds ``prefill_budget_s``.
    """
    skipped: Counter[str] = Counter()
    priced: list[_Priced] = []
    for option in options:
        if option.capacity_rps is not None and option.capacity_rps <= 0:
            skipped["model does not fit"] += 1
            continue
        spot_ok = allow_spot and option.group_size == 1
        for market, member_price in _markets(option.offer, allow_spot=spot_ok):
            price = member_price * option.group_size
            if _blocked(unavailable, unavailable_key(option.offer, market), now):
                skipped[f"{market.value} marked unavailable"] += 1
            elif max_usd_per_hour is not None and price > max_usd_per_hour:
                skipped[f"{market.value} over the ${max_usd_per_hour:.2f}/h headroom"] += 1
            else:
                priced.append(_Priced(option, market, price))
    if not priced:
        return Placement(reason=f"no offer fits: {_counts(skipped) or 'no candidate offers'}")
    zones = Counter(current_zones)
    regions = Counter(_region_of(z, priced) for z in current_zones)
    orders = functools.partial(
        _orders,
        zones=zones,
        regions=regions,
        required=tail_share_required,
        budget_s=prefill_budget_s,
    )
    best = _first_least(priced, orders(priced, by_fleet=False))
    # The measured load may step down to a smaller replica that carries it for less,
    # never up to a dearer one: more load is more replicas (the scaling rules' part).
    smaller = [p for p in priced if p.usd_per_hour <= best.usd_per_hour + 1e-9]
    if any(p.fleet_usd_per_hour is not None for p in smaller):
        best = _first_least(smaller, orders(smaller, by_fleet=True))
    reason = _chosen_reason(best, among=len(priced), zones=zones, skipped=skipped)
    reason += _tail_reason(best, priced, tail_share_required, prefill_budget_s)
    if best.too_slow(prefill_budget_s):
        reason += (
            f"; no option prefills a typical prompt within {prefill_budget_s:.3g}s "
            f"(this one takes {best.option.prefill_s:.3g}s): the fastest was taken"
        )
    return Placement(
        reason=reason,
        offer=best.option.offer,
        market=best.market,
        usd_per_hour=best.usd_per_hour,
        capacity_rps=best.option.capacity_rps,
        group_size=best.option.group_size,
    )


def _markets(offer: Offer, *, allow_spot: bool) -> list[tuple[Market, float]]:
    markets = [(Market.ON_DEMAND, offer.on_demand_usd_per_hour)]
    if allow_spot and offer.spot_usd_per_hour is not None:
        markets.insert(0, (Market.SPOT, offer.spot_usd_per_hour))
    return markets


def _blocked(unavailable: Mapping[str, datetime], key: str, now: datetime) -> bool:
    until = unavailable.get(key)
    return until is not None and until > now


_Order = tuple[tuple[bool, float], tuple[bool, float], tuple[object, ...]]


def _orders(
    priced: Sequence[_Priced],
    *,
    zones: Counter[str],
    regions: Counter[str],
    required: float | None,
    budget_s: float | None,
    by_fleet: bool,
) -> list[_Order]:
    """Each option's place in :func:`choose_offer`'s order, the one home of that order:
    first the tail rule (options serving the ``required`` share of prompts in time; short
    of it, the highest share first), then the prefill budget (options within
    ``budget_s``; beyond it, the fastest first), then price and spread: known capacity,
    the measured load's fleet price (``by_fleet``), the cost per capacity, the fewest
    replicas already in the zone and the region, the price, then the offer's key and
    market for a stable tie. Prices are rounded so that float noise does not break a tie
    that should spread zones. A short tail, a slow prefill, the fleet price and the cost
    per capacity are the options' own (:class:`_Priced`). One O(options) pass (placement
    ranks every feasible offer on every pass of the controller)."""
    orders: list[_Order] = []
    for p in priced:
        option, usd = p.option, p.usd_per_hour
        offer, capacity, share, prefill = (
            option.offer,
            option.capacity_rps,
            option.tail_share,
            option.prefill_s,
        )
        fleet = p.fleet_usd_per_hour if by_fleet else None
        orders.append(
            (
                (True, -(share or 0.0)) if p.short_of_tail(required) else (False, 0.0),
                (True, prefill or 0.0) if p.too_slow(budget_s) else (False, 0.0),
                (
                    capacity is None,
                    fleet is None,
                    round(fleet or 0.0, 9),
                    round(p.cost_per_capacity, 9) if capacity else round(usd, 9),
                    zones.get(offer.zone, 0),
                    regions.get(offer.region, 0),
                    usd,
                    offer.key,
                    p.market.value,
                ),
            )
        )
    return orders


def _first_least(priced: Sequence[_Priced], orders: Sequence[_Order]) -> _Priced:
    """The first option of least order, as ``min(priced, key=...)`` picks it."""
    return priced[min(range(len(orders)), key=orders.__getitem__)]


def _tail_reason(
    best: _Priced, priced: Sequence[_Priced], required: float | None, budget_s: float | None
) -> str:
    """What the tail rule did, with the shares compared; empty when it changed nothing."""
    if required is None or best.option.tail_share is None:
        return ""
    share = best.option.tail_share
    if best.short_of_tail(required):
        return (
            f"; it prefills {share:.2%} of prompts within their TTFT bound, short of the "
            f"{required:.2%} required, and no option does better"
        )
    # The order without the tail rule and the spread: what would have come first.
    orders = [
        order[1:]
        for order in _orders(
            priced,
            zones=Counter(),
            regions=Counter(),
            required=None,
            budget_s=budget_s,
            by_fleet=False,
        )
    ]
    mine = orders[priced.index(best)]
    passed_over = [
        (order, i)
        for i, (p, order) in enumerate(zip(priced, orders, strict=True))
        if p.short_of_tail(required) and order < mine
    ]
    if not passed_over:
        return ""
    cheaper = priced[min(passed_over)[1]]
    offer = cheaper.option.offer
    return (
        f"; {offer.gpu_count} x {offer.gpu} is cheaper per capacity but prefills only "
        f"{cheaper.option.tail_share or 0.0:.2%} of prompts within their TTFT bound "
        f"(< {required:.2%} required; this one {share:.2%})"
    )


def _region_of(zone: str, priced: Sequence[_Priced]) -> str:
    for p in priced:
        if p.option.offer.zone == zone:
            return p.option.offer.region
    return zone


def _chosen_reason(best: _Priced, *, among: int, zones: Counter[str], skipped: Counter[str]) -> str:
    offer = best.option.offer
    what = (
        f"{offer.gpu_count} x {offer.gpu} {offer.key} {best.market.value} "
        f"${best.usd_per_hour:.4g}/h"
    )
    n = best.option.group_size
    if n > 1:
        what = (
            f"a group of {n} x {offer.key} (1 leader, {n - 1} worker(s); "
            f"{n * offer.gpu_count} x {offer.gpu}) {best.market.value} "
            f"${best.usd_per_hour:.4g}/h for the group"
        )
    fleet = best.fleet_usd_per_hour
    if best.option.capacity_rps and fleet is not None:
        why = (
            f"lowest cost for the measured load: {best.option.replicas_needed} replica(s) "
            f"of it carry it, ${fleet:.4g}/h ({best.option.capacity_rps:.3g} req/s per "
            f"replica, ${best.cost_per_capacity:.4g}/h per req/s)"
        )
    elif best.option.capacity_rps:
        why = (
            f"lowest cost per capacity: ${best.cost_per_capacity:.4g}/h per req/s "
            f"({best.option.capacity_rps:.3g} req/s per replica)"
        )
    else:
        why = "cheapest per hour (no capacity figure: model size or GPU figures unknown)"
    text = (
        f"{what}: {why} of {among} option(s); zone {offer.zone} has {zones[offer.zone]} replica(s)"
    )
    return f"{text}; skipped {_counts(skipped)}" if skipped else text


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counter.items()))


# --- from a workload spec and the catalog ------------------------------------------------


def place_replica(
    *,
    spec: WorkloadSpec,
    offers: Iterable[Offer],
    unavailable: Mapping[str, datetime],
    now: datetime,
    current_zones: Sequence[str] = (),
    replicas_per_worker: Mapping[str, int] | None = None,
    params_b: float | None = None,
    bytes_per_param: float = 2.0,
    model_memory_gib: float | None = None,
    max_usd_per_hour: float | None = None,
    input_tokens: float | None = None,
    output_tokens: float | None = None,
    concurrency_cap: int = GATEWAY_CONCURRENCY_CAP,
    allow_groups: bool = False,
    input_scv: float | None = None,
    group_providers: Collection[str] | None = None,
    input_histogram: Mapping[int, int] | None = None,
    replicas_needed: Callable[[tuple[str, int]], int | None] | None = None,
    memo: PlacementMemo | None = None,
) -> Placement:
    """Where the workload's next replica goes.

    Private workers where the spec names them; otherwise the catalog ``offers`` filtered
    by the cloud pool (GPU names, CUDA pins), the policy's regions and the model's memory
    (``spec.model_memory_gib``, else ``model_memory_gib``), ranked per capacity for a
    ``params_b``-billion model (by raw price when ``params_b`` is not known).
    ``input_tokens`` and ``output_tokens`` are the measured mean prompt and completion
    lengths (defaults :data:`DEFAULT_INPUT_TOKENS`, :data:`DEFAULT_OUTPUT_TOKENS`); with
    a measured prompt length, offers too slow to prefill it within the TTFT target rank
    last. ``concurrency_cap`` is the gateway's per-replica cap: no replica's capacity is
    counted at a batch larger than it. ``allow_groups`` lets a model no single machine
    holds be placed as a replica group (see the module docstring), on offers of
    ``group_providers`` only when given. ``input_scv`` is the
    measured prompt-length spread (variance over squared mean); with it and a measured
    prompt length, shapes are judged by the share of prompts they serve in time (the
    tail rule of the module docstring).

    ``memo``: the pass's :class:`PlacementMemo`. Its index answers the catalog's part
    (the feasible offers and shapes of the spec's request) in O(1) after its first time,
    and a workload whose placement inputs equal an earlier one's (the key below: every
    input this function reads) gets that placement, not a new one. Cost: O(shapes) for
    the key (the shapes' figures are kept by value, ``replicas_needed`` is asked per
    shape) plus O(unavailable markets + current zones); then O(feasible offers) to rank
    them when the key is new. Without a memo, O(offers) as well to index them.
    """
    _cap(concurrency_cap)
    policy = spec.execution_policy_config
    autoscaling = policy if isinstance(policy, AutoscalingPolicy) else None
    workers = [spec.worker_id] if spec.worker_id else []
    workers += autoscaling.private_worker_ids if autoscaling else []
    if workers:
        return choose_private_worker(
            worker_ids=list(dict.fromkeys(workers)),
            replicas_per_worker=replicas_per_worker or {},
            unavailable=unavailable,
            now=now,
        )
    memory_gib = spec.model_memory_gib or model_memory_gib
    user_split = parallel_size(backend=spec.backend.value, command=spec.engine_command)
    request = _offer_request(autoscaling, memory_gib=memory_gib, gpu_count=user_split)
    index = memo.index(offers) if memo is not None else OfferIndex(offers)
    mix = (input_tokens or DEFAULT_INPUT_TOKENS, output_tokens or DEFAULT_OUTPUT_TOKENS)
    # One profile per GPU shape, not per offer: a catalog repeats shapes across zones.
    shapes = {
        shape: (
            (None, None, None)
            if params_b is None
            else _shape_figures(
                shape,
                params_b=params_b,
                bytes_per_param=bytes_per_param,
                mix=mix,
                concurrency_cap=concurrency_cap,
            )
        )
        for shape in index.shapes(request)
    }
    needs: dict[tuple[str, int], int | None] = {}
    if replicas_needed is not None:
        needs = {k: replicas_needed(k) if v[0] else None for k, v in shapes.items()}
    key = None
    if memo is not None and memo.keeps(offers):
        key = (
            request,
            None
            if autoscaling is None
            else (autoscaling.allow_spot_instances, autoscaling.upper_allowed_latency_sec),
            spec.backend.value,
            allow_groups,
            None if group_providers is None else frozenset(group_providers),
            memory_gib,
            params_b,
            bytes_per_param,
            input_tokens,
            output_tokens,
            input_scv,
            None if input_histogram is None else tuple(sorted(input_histogram.items())),
            concurrency_cap,
            max_usd_per_hour,
            tuple(sorted(current_zones)),
            frozenset(k for k, until in unavailable.items() if until > now),
            tuple(sorted(needs.items())),
        )
        shared = memo.placed(key)
        if shared is not None:
            return shared
    placement = _place_on_offers(
        index,
        request,
        shapes=shapes,
        needs=needs,
        spec=spec,
        autoscaling=autoscaling,
        unavailable=unavailable,
        now=now,
        current_zones=current_zones,
        params_b=params_b,
        bytes_per_param=bytes_per_param,
        memory_gib=memory_gib,
        max_usd_per_hour=max_usd_per_hour,
        input_tokens=input_tokens,
        mix=mix,
        concurrency_cap=concurrency_cap,
        allow_groups=allow_groups,
        input_scv=input_scv,
        group_providers=group_providers,
        input_histogram=input_histogram,
    )
    if memo is not None and key is not None:
        memo.keep(key, placement)
    return placement


def _place_on_offers(
    index: OfferIndex,
    request: OfferRequest,
    *,
    shapes: Mapping[tuple[str, int], _Figures],
    needs: Mapping[tuple[str, int], int | None],
    spec: WorkloadSpec,
    autoscaling: AutoscalingPolicy | None,
    unavailable: Mapping[str, datetime],
    now: datetime,
    current_zones: Sequence[str],
    params_b: float | None,
    bytes_per_param: float,
    memory_gib: float | None,
    max_usd_per_hour: float | None,
    input_tokens: float | None,
    mix: tuple[float, float],
    concurrency_cap: int,
    allow_groups: bool,
    input_scv: float | None,
    group_providers: Collection[str] | None,
    input_histogram: Mapping[int, int] | None,
) -> Placement:
    """:func:`place_replica` on the catalog's offers, ``shapes`` the figures of the GPU
    shapes ``request`` admits and ``needs`` the replicas of each the measured load needs:
    O(feasible offers) to price and rank, O(shapes) for the tail rule, and, when no
    single machine fits, O(offers) for the groups and the catalog's rejections."""
    feasible = index.feasible(request)
    budget = None
    tails: dict[tuple[str, int], float] = {}
    required = None
    if autoscaling is not None and input_tokens is not None:
        budget = PREFILL_SHARE_OF_TARGET * autoscaling.upper_allowed_latency_sec
        if input_scv is not None:
            profiles = {k: v[2] for k, v in shapes.items() if v[2] is not None}
            tails = tail_shares(
                profiles,
                fastest=_fastest_single_gpu(
                    profiles, params_b=params_b, bytes_per_param=bytes_per_param
                ),
                mean_tokens=input_tokens,
                scv=input_scv,
                target_s=autoscaling.upper_allowed_latency_sec,
                histogram=input_histogram,
            )
            if tails:
                required = min(TAIL_SHARE, max(tails.values()))
    options: list[PlacementOption] = []
    for c in feasible:
        shape = (c.offer.gpu, c.offer.gpu_count)
        capacity, prefill, _ = shapes[shape]
        options.append(
            PlacementOption(
                offer=c.offer,
                capacity_rps=capacity,
                prefill_s=prefill,
                tail_share=tails.get(shape),
                replicas_needed=needs.get(shape),
            )
        )
    placement = choose_offer(
        options=options,
        allow_spot=autoscaling.allow_spot_instances if autoscaling else False,
        unavailable=unavailable,
        now=now,
        current_zones=current_zones,
        max_usd_per_hour=max_usd_per_hour,
        prefill_budget_s=budget,
        tail_share_required=required,
    )
    if required is not None and _measured_tail(input_histogram):
        short = frozenset(k for k, v in tails.items() if v < required - 1e-9)
        placement = replace(placement, short_of_tail=short)
    if placement.found:
        return placement
    single_fits = any(o.capacity_rps is None or o.capacity_rps > 0 for o in options)
    groups_apply = (
        allow_groups
        and request.gpu_count is None
        and spec.backend.value in GROUP_BACKENDS
        and memory_gib is not None
        and not single_fits
    )
    if groups_apply and memory_gib is not None:
        candidates = index.feasible(replace(request, min_vram_gib=None))
        group_options = _group_options(
            [
                c
                for c in candidates
                if group_providers is None or c.offer.provider.value in group_providers
            ],
            memory_gib=memory_gib,
            params_b=params_b,
            bytes_per_param=bytes_per_param,
            mix=mix,
            concurrency_cap=concurrency_cap,
        )
        grouped = Placement(reason="no offer fits: no candidate offers")
        for size in sorted({o.group_size for o in group_options}):  # fewest machines first
            grouped = choose_offer(
                options=[o for o in group_options if o.group_size == size],
                allow_spot=False,
                unavailable=unavailable,
                now=now,
                current_zones=current_zones,
                max_usd_per_hour=max_usd_per_hour,
                prefill_budget_s=budget,
            )
            if grouped.found:
                return replace(
                    grouped, reason=f"no single machine holds the model: {grouped.reason}"
                )
        if group_options:
            placement = replace(
                placement, reason=f"{placement.reason}; as a group: {grouped.reason}"
            )
    rejected = index.rejected(request)  # the explanation: only when nothing was placed
    if not rejected:
        return placement
    counts = Counter({reason.value: n for reason, n in rejected.items()})
    return Placement(reason=f"{placement.reason}; catalog rejected {_counts(counts)}")


def group_size_for(
    offer: Offer,
    *,
    memory_gib: float,
    params_b: float | None,
    bytes_per_param: float = 2.0,
    max_size: int = MAX_GROUP_SIZE,
) -> int | None:
    """The fewest machines of ``offer`` (2 to ``max_size``) that together hold the model:
    their GPU memory covers ``memory_gib``, and, where ``params_b`` is known, the
    performance model fits it on all their GPUs. ``None`` when even ``max_size`` cannot."""
    try:
        vram = resolve_gpu(offer.gpu).vram_gib * offer.gpu_count
    except UnknownGpuError:
        return None
    for n in range(2, max_size + 1):
        if n * vram < memory_gib:
            continue
        if params_b is None or _fits(offer, n, params_b, bytes_per_param):
            return n
    return None


def _fits(offer: Offer, n: int, params_b: float, bytes_per_param: float) -> bool:
    """Whether ``n`` machines of ``offer`` hold the model by the performance model (by
    the memory estimate alone where the GPU has no performance figures)."""
    try:
        return fits(offer.gpu, n * offer.gpu_count, params_b, bytes_per_param)
    except ValueError:
        return True


def _group_options(
    candidates: Iterable[Candidate],
    *,
    memory_gib: float,
    params_b: float | None,
    bytes_per_param: float,
    mix: tuple[float, float],
    concurrency_cap: int,
) -> list[PlacementOption]:
    """One group option per feasible offer that some group of its machines can form."""
    options = []
    for c in candidates:
        n = group_size_for(
            c.offer, memory_gib=memory_gib, params_b=params_b, bytes_per_param=bytes_per_param
        )
        if n is None:
            continue
        capacity, prefill = (None, None)
        if params_b is not None:
            capacity, prefill, _ = _shape_figures(
                (c.offer.gpu, n * c.offer.gpu_count),
                params_b=params_b,
                bytes_per_param=bytes_per_param,
                mix=mix,
                concurrency_cap=concurrency_cap,
            )
        options.append(
            PlacementOption(offer=c.offer, capacity_rps=capacity, prefill_s=prefill, group_size=n)
        )
    return options


def pool_gpu_kinds(
    spec: WorkloadSpec, offers: Iterable[Offer], *, memo: PlacementMemo | None = None
) -> list[str]:
    """The GPU kinds of ``offers`` the workload may use (its cloud pool, regions and CUDA
    pins, as placement filters them): where the SLO's reference GPU is chosen from. The
    reconciler and the simulator both ask this, so they judge prompts by the same GPU.
    O(offers of the pool's GPU kinds); O(kinds) for a pool ``memo``'s index has seen."""
    policy = spec.execution_policy_config
    autoscaling = policy if isinstance(policy, AutoscalingPolicy) else None
    request = _offer_request(autoscaling, memory_gib=None, gpu_count=None)
    index = memo.index(offers) if memo is not None else OfferIndex(offers)
    return sorted({gpu for gpu, _ in index.shapes(request)})


_Figures = tuple[float | None, float | None, ServingProfile | None]


@functools.lru_cache(maxsize=4096)
def _shape_figures(
    shape: tuple[str, int],
    *,
    params_b: float,
    bytes_per_param: float,
    mix: tuple[float, float],
    concurrency_cap: int,
) -> _Figures:
    """One replica's usable capacity (requests/s, batch bounded by ``concurrency_cap``) at
    ``mix`` on ``shape`` (GPU, count), its prefill of the mean prompt, and its serving
    profile. Kept for the last 4,096 arguments: a pure function of values, asked for the
    same few shapes and models by every placement."""
    try:
        profile = serving_profile(
            shape[0], shape[1], params_b, bytes_per_param, max_batch=concurrency_cap
        )
    except ModelDoesNotFit:
        return 0.0, None, None
    except ValueError:
        return None, None, None
    capacity = profile.capacity_rps(input_tokens=mix[0], output_tokens=mix[1])
    return capacity, profile.prefill_seconds(round(mix[0])), profile


def _fastest_single_gpu(
    profiles: Mapping[tuple[str, int], ServingProfile],
    *,
    params_b: float | None,
    bytes_per_param: float,
) -> ServingProfile | None:
    """One GPU of the fastest-prefilling kind among ``profiles``' shapes, as the SLO rule
    takes it (``catalog.perf.fastest_single_gpu``); the fastest shape where the model
    fits on no single GPU of the pool."""
    single = None
    if params_b is not None:
        single = fastest_single_gpu((shape[0] for shape in profiles), params_b, bytes_per_param)
    if single is not None:
        return single
    return max(profiles.values(), key=lambda p: p.prefill_tokens_per_s, default=None)


def tail_shares(
    profiles: Mapping[tuple[str, int], ServingProfile],
    *,
    fastest: ServingProfile | None,
    mean_tokens: float,
    scv: float,
    target_s: float,
    histogram: Mapping[int, int] | None = None,
) -> dict[tuple[str, int], float]:
    """Per GPU shape, the share of prompts it prefills alone within their SLO bound:
    ``max(target_s, PREFILL_TTFT_FACTOR x`` the prompt's prefill on ``fastest``)``, the
    SLO rule's bound with one GPU of the fastest kind the workload may use. The prompts
    are the measured ones (``histogram``, the gateway's prompt-length buckets) once it
    holds :data:`TAIL_MIN_SAMPLES`, else a lognormal of mean ``mean_tokens`` and squared
    coefficient of variation ``scv``."""
    if not profiles or fastest is None or mean_tokens <= 0:
        return {}
    measured = histogram if _measured_tail(histogram) else None

    def share(profile: ServingProfile) -> float:
        longest = _longest_in_time(profile, fastest, target_s)
        if measured is not None:
            return share_within(measured, longest) or 0.0
        return prompt_share_below(longest, mean_tokens, scv)

    return {shape: share(p) for shape, p in profiles.items()}


@functools.lru_cache(maxsize=1024)
def _longest_in_time(profile: ServingProfile, fastest: ServingProfile, target_s: float) -> int:
    """The longest prompt ``profile`` prefills alone within its SLO bound, ``max(target_s,
    PREFILL_TTFT_FACTOR x`` its prefill on ``fastest``)`` (:func:`longest_within`).

    It depends on the two profiles (frozen values) and the target only, not on the
    prompts measured, so it is kept: a bisection of O(log TAIL_MAX_TOKENS) prefill times
    the first time a shape is judged against a target, O(1) after (placement judges every
    shape on every pass)."""

    def within(tokens: int) -> bool:
        bound = max(target_s, PREFILL_TTFT_FACTOR * fastest.prefill_seconds(tokens))
        return profile.prefill_seconds(tokens) <= bound

    return longest_within(within)


def _measured_tail(histogram: Mapping[int, int] | None) -> bool:
    """Whether ``histogram`` holds enough prompts to read the tail from
    (:data:`TAIL_MIN_SAMPLES`)."""
    return bool(histogram) and sum((histogram or {}).values()) >= TAIL_MIN_SAMPLES


def longest_within(ok: Callable[[int], bool]) -> int:
    """The longest prompt (tokens, up to :data:`TAIL_MAX_TOKENS`) for which ``ok`` holds,
    ``ok`` holding for every shorter one; 0 if it fails for one token."""
    if not ok(1):
        return 0
    if ok(TAIL_MAX_TOKENS):
        return TAIL_MAX_TOKENS
    low, high = 1, TAIL_MAX_TOKENS  # ok(low), not ok(high)
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def prompt_share_below(tokens: int, mean_tokens: float, scv: float) -> float:
    """The share of prompts no longer than ``tokens``, lengths lognormal of mean
    ``mean_tokens`` and squared coefficient of variation ``scv`` (``sigma^2 = ln(1 +
    scv)``, as ``decide.scaling.prefill_quantile``); a spread of 0 is one length."""
    if tokens <= 0:
        return 0.0
    if tokens >= TAIL_MAX_TOKENS:
        return 1.0
    sigma = math.sqrt(math.log1p(max(scv, 0.0)))
    if sigma == 0:
        return 1.0 if tokens >= mean_tokens else 0.0
    mu = math.log(mean_tokens) - sigma * sigma / 2.0
    return NormalDist().cdf((math.log(tokens) - mu) / sigma)


def _cap(concurrency_cap: int) -> int:
    """``concurrency_cap``, checked: a bad cap must not pass for a GPU without figures."""
    if concurrency_cap < 1:
        raise ValueError(
            f"concurrency_cap (the gateway's per-replica cap) must be >= 1, got {concurrency_cap}"
        )
    return concurrency_cap


def _offer_request(
    policy: AutoscalingPolicy | None, *, memory_gib: float | None, gpu_count: int | None
) -> OfferRequest:
    """What an offer must be: in the pool, with the memory, and, where the user's command
    splits a replica over ``gpu_count`` GPUs, a machine with exactly that many (an engine
    started with ``--tensor-parallel-size 8`` needs eight GPUs and uses no more)."""
    pool = policy.cloud_pool if policy else None
    return OfferRequest(
        gpus=tuple(pool.gpu_pool) if pool else (),
        min_vram_gib=memory_gib,
        gpu_count=gpu_count,
        regions=tuple(policy.regions or ()) if policy else (),
        cuda_versions=tuple(pool.allowed_cuda_versions or ()) if pool else (),
    )
