"""Where the next replica goes: a private worker, or the catalog offer that serves the
model at the lowest cost per unit of capacity.

The rules:

* **Private workers first.** A workload pinned to a worker (``worker_id``) or sourcing
  private workers goes to the named worker carrying the fewest of its replicas (ties in
  the order named), never to the cloud. Workers marked unavailable are skipped.
* **Cheapest per capacity.** Every feasible offer (GPU pool, regions, CUDA pins, model
  memory: ``catalog.query``) is priced on each market it may use: spot when the policy
  allows it and the offer sells it, and on-demand always (the fallback when spot has
  just failed). Options are ranked by dollars per hour per request/s of serving capacity
  for this model (``catalog.perf``, the model engine-sim and the simulator use): a GPU a
  third the price that serves a tenth of the load is not cheaper. The capacity is the
  *usable* one: the batch is bounded by the gateway's per-replica concurrency cap
  (``concurrency_cap``, :data:`GATEWAY_CONCURRENCY_CAP` by default), because the gateway
  never sends a replica more requests at once, so a GPU whose KV cache could batch 220
  sequences serves like one that batches 64. Offers without performance figures rank
  after all those with figures, by raw price.
* **Prompts must fit the TTFT target.** Given the prompt length the gateway measures,
  an option whose prefill of a typical prompt alone takes more than
  :data:`PREFILL_SHARE_OF_TARGET` of ``upper_allowed_latency_sec`` ranks after every
  option that does not (fastest prefill first among them): a GPU that spends most of
  the target prefilling one prompt misses it as soon as two arrive together, and no
  number of replicas fixes that.
* **Skip recent failures.** ``unavailable`` maps :func:`unavailable_key` (offer and
  market, or a worker) to the time until which it is skipped: a spot stock-out leaves the
  same offer's on-demand market usable.
* **Spread on ties.** Among options of equal cost per capacity, the zone and then the
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
  The group is priced whole (members x the offer's price), so the ceilings count every
  member before any is bought; its capacity is that of all its GPUs as one engine. Groups
  buy on-demand only: a spot interruption of any member would take the whole group down.
  A parallel split written in the user's command fixes the machine and disables groups.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from autoscaler.spec import AutoscalingPolicy, WorkloadSpec
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import Offer
from catalog.perf import ModelDoesNotFit, fits, serving_profile
from catalog.query import Candidate, Market, OfferRequest, select_offers
from providers.engines import parallel_size

DEFAULT_INPUT_TOKENS = 1024.0
"""Mean prompt length assumed when ranking offers by serving capacity."""

DEFAULT_OUTPUT_TOKENS = 256.0
"""Mean completion length assumed when ranking offers by serving capacity."""

GATEWAY_CONCURRENCY_CAP = 64
"""The default of the gateway's per-replica concurrency cap
(``gateway.app.GatewaySettings.replica_concurrency_cap``): the most requests a replica is
ever given at once, so the most sequences it ever batches. Decisions do not import the
gateway; callers that run another cap pass it."""

PREFILL_SHARE_OF_TARGET = 0.5
"""The most of the TTFT target a typical prompt's prefill may take on a preferred offer."""

MAX_GROUP_SIZE = 8
"""The most machines one replica group spans (a leader and up to seven workers)."""

GROUP_BACKENDS = frozenset({"vllm", "sglang"})
"""Backends that serve one model across machines (vLLM with Ray and pipeline
parallelism, SGLang with ``--nnodes``)."""


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

    @property
    def found(self) -> bool:
        return self.offer is not None or self.worker_id is not None


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

    def too_slow(self, budget_s: float | None) -> bool:
        prefill = self.option.prefill_s
        return budget_s is not None and prefill is not None and prefill > budget_s


def choose_offer(
    *,
    options: Iterable[PlacementOption],
    allow_spot: bool,
    unavailable: Mapping[str, datetime],
    now: datetime,
    current_zones: Sequence[str] = (),
    max_usd_per_hour: float | None = None,
    prefill_budget_s: float | None = None,
) -> Placement:
    """The option with the lowest cost per capacity, by the rules in the module docstring.

    ``current_zones`` holds the zone of each of the workload's live replicas. Options
    whose ``prefill_s`` exceeds ``prefill_budget_s`` rank after all others.
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
    best = min(
        priced,
        key=lambda p: (_speed_rank(p, prefill_budget_s), _rank(p, zones=zones, regions=regions)),
    )
    reason = _chosen_reason(best, among=len(priced), zones=zones, skipped=skipped)
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


def _rank(
    p: _Priced, *, zones: Counter[str], regions: Counter[str]
) -> tuple[bool, float, int, int, float, str, str]:
    offer = p.option.offer
    return (
        p.option.capacity_rps is None,
        # Rounded so that float noise does not break a tie that should spread zones.
        round(p.cost_per_capacity, 9) if p.option.capacity_rps else round(p.usd_per_hour, 9),
        zones[offer.zone],
        regions[offer.region],
        p.usd_per_hour,
        offer.key,
        p.market.value,
    )


def _speed_rank(p: _Priced, budget_s: float | None) -> tuple[bool, float]:
    """Options within the prefill budget first; beyond it, the fastest first."""
    if p.too_slow(budget_s):
        return True, p.option.prefill_s or 0.0
    return False, 0.0


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
    if best.option.capacity_rps:
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
    holds be placed as a replica group (see the module docstring).
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
    user_split = parallel_size(backend=spec.backend.value, command=spec.command)
    request = _offer_request(autoscaling, memory_gib=memory_gib, gpu_count=user_split)
    offers = tuple(offers)
    selection = select_offers(offers, request)
    mix = (input_tokens or DEFAULT_INPUT_TOKENS, output_tokens or DEFAULT_OUTPUT_TOKENS)
    # One profile per GPU shape, not per offer: a catalog repeats shapes across zones.
    shapes: dict[tuple[str, int], tuple[float | None, float | None]] = {}
    options: list[PlacementOption] = []
    for c in selection.feasible:
        shape = (c.offer.gpu, c.offer.gpu_count)
        if shape not in shapes:
            shapes[shape] = (
                (None, None)
                if params_b is None
                else _shape_figures(
                    c.offer,
                    params_b=params_b,
                    bytes_per_param=bytes_per_param,
                    mix=mix,
                    concurrency_cap=concurrency_cap,
                )
            )
        capacity, prefill = shapes[shape]
        options.append(PlacementOption(offer=c.offer, capacity_rps=capacity, prefill_s=prefill))
    budget = None
    if autoscaling is not None and input_tokens is not None:
        budget = PREFILL_SHARE_OF_TARGET * autoscaling.upper_allowed_latency_sec
    placement = choose_offer(
        options=options,
        allow_spot=autoscaling.allow_spot_instances if autoscaling else False,
        unavailable=unavailable,
        now=now,
        current_zones=current_zones,
        max_usd_per_hour=max_usd_per_hour,
        prefill_budget_s=budget,
    )
    if placement.found:
        return placement
    single_fits = any(o.capacity_rps is None or o.capacity_rps > 0 for o in options)
    groups_apply = (
        allow_groups
        and user_split is None
        and spec.backend.value in GROUP_BACKENDS
        and memory_gib is not None
        and not single_fits
    )
    if groups_apply and memory_gib is not None:
        group_options = _group_options(
            select_offers(offers, replace(request, min_vram_gib=None)).feasible,
            memory_gib=memory_gib,
            params_b=params_b,
            bytes_per_param=bytes_per_param,
            mix=mix,
            concurrency_cap=concurrency_cap,
        )
        grouped = choose_offer(
            options=group_options,
            allow_spot=False,
            unavailable=unavailable,
            now=now,
            current_zones=current_zones,
            max_usd_per_hour=max_usd_per_hour,
            prefill_budget_s=budget,
        )
        if grouped.found:
            return replace(grouped, reason=f"no single machine holds the model: {grouped.reason}")
        if group_options:
            placement = replace(
                placement, reason=f"{placement.reason}; as a group: {grouped.reason}"
            )
    if not selection.rejected:
        return placement
    rejected = Counter(r.reason.value for r in selection.rejected)
    return Placement(reason=f"{placement.reason}; catalog rejected {_counts(rejected)}")


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
            whole = replace(c.offer, gpu_count=n * c.offer.gpu_count)
            capacity, prefill = _shape_figures(
                whole,
                params_b=params_b,
                bytes_per_param=bytes_per_param,
                mix=mix,
                concurrency_cap=concurrency_cap,
            )
        options.append(
            PlacementOption(offer=c.offer, capacity_rps=capacity, prefill_s=prefill, group_size=n)
        )
    return options


def _shape_figures(
    offer: Offer,
    *,
    params_b: float,
    bytes_per_param: float,
    mix: tuple[float, float],
    concurrency_cap: int,
) -> tuple[float | None, float | None]:
    """One replica's usable capacity (requests/s, batch bounded by ``concurrency_cap``) at
    ``mix`` and its prefill of the mean prompt."""
    try:
        profile = serving_profile(
            offer.gpu, offer.gpu_count, params_b, bytes_per_param, max_batch=concurrency_cap
        )
    except ModelDoesNotFit:
        return 0.0, None
    except ValueError:
        return None, None
    capacity = profile.capacity_rps(input_tokens=mix[0], output_tokens=mix[1])
    return capacity, profile.prefill_seconds(round(mix[0]))


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
