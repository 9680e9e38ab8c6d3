"""Which offers fit a request, cheapest first, and why the others do not.

PURE: values in, values out; no I/O library. ``select_offers`` checks every offer against
every constraint of an ``OfferRequest`` and returns the feasible ones ordered by the price
the request would pay (spot where allowed and sold, else on-demand), ties broken by the
offer's key so that the same catalog and request always give the same answer. Each
rejected offer carries the first constraint it failed, in the order of ``RejectReason``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from catalog.cuda import cuda_version, offer_cuda_problem
from catalog.gpus import UnknownGpuError, resolve_gpu
from catalog.model import GpuModel, Offer, ProviderName
from catalog.regions import RegionSet


class RejectReason(StrEnum):
    """Why an offer does not fit, in the order the constraints are checked."""

    PROVIDER = "provider"
    REGION = "region"
    GPU = "gpu"
    GPU_COUNT = "gpu-count"
    VRAM = "vram"
    CUDA = "cuda"
    UNAVAILABLE = "unavailable"
    OVER_CEILING = "over-ceiling"


class Market(StrEnum):
    ON_DEMAND = "on-demand"
    SPOT = "spot"


@dataclass(frozen=True, slots=True)
class OfferRequest:
    """What a workload needs from an offer. Empty tuples and ``None`` mean "any".

    ``gpus`` are GPU names (display names or aliases; canonicalised on construction).
    ``min_vram_gib`` is the instance's total GPU memory (per-GPU VRAM x count);
    ``gpu_count`` an exact number of GPUs. ``regions`` are cloud regions or macro
    regions (:mod:`catalog.regions`). ``spot`` allows (does not require) spot:
    offers that sell spot are priced at spot. ``unavailable`` holds ``Offer.key``s
    currently marked out of capacity.
    """

    gpus: tuple[str, ...] = ()
    min_vram_gib: float | None = None
    gpu_count: int | None = None
    providers: tuple[ProviderName, ...] = ()
    regions: tuple[str, ...] = ()
    spot: bool = False
    max_usd_per_hour: float | None = None
    cuda_versions: tuple[str, ...] = ()
    unavailable: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        canonical = tuple(dict.fromkeys(resolve_gpu(name).display_name for name in self.gpus))
        object.__setattr__(self, "gpus", canonical)
        for version in self.cuda_versions:
            cuda_version(version)  # raises naming the unknown version
        if self.min_vram_gib is not None and not self.min_vram_gib > 0:
            raise ValueError(f"min_vram_gib must be > 0, got {self.min_vram_gib}")
        if self.gpu_count is not None and self.gpu_count < 1:
            raise ValueError(f"gpu_count must be >= 1, got {self.gpu_count}")
        ceiling = self.max_usd_per_hour
        if ceiling is not None and not (ceiling > 0 and math.isfinite(ceiling)):
            raise ValueError(f"max_usd_per_hour must be a positive number, got {ceiling}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A feasible offer and the price the request would pay for it."""

    offer: Offer
    market: Market
    usd_per_hour: float

    @property
    def on_demand_usd_per_hour(self) -> float:
        return self.offer.on_demand_usd_per_hour

    @property
    def spot_usd_per_hour(self) -> float | None:
        return self.offer.spot_usd_per_hour


@dataclass(frozen=True, slots=True)
class Rejection:
    """An offer that does not fit, with the first constraint it failed."""

    offer: Offer
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Selection:
    """``feasible`` cheapest first; ``rejected`` in catalog order."""

    feasible: tuple[Candidate, ...]
    rejected: tuple[Rejection, ...]

    @property
    def best(self) -> Candidate | None:
        return self.feasible[0] if self.feasible else None


def price_for(offer: Offer, *, spot: bool) -> tuple[Market, float]:
    """The market and hourly price a request pays: spot when allowed and sold."""
    if spot and offer.spot_usd_per_hour is not None:
        return Market.SPOT, offer.spot_usd_per_hour
    return Market.ON_DEMAND, offer.on_demand_usd_per_hour


def select_offers(
    offers: Iterable[Offer], request: OfferRequest, *, explain: bool = True
) -> Selection:
    """The offers that satisfy ``request``, cheapest first, and why every other one does not.

    ``explain``: write each rejection's ``detail`` (the sentence a person reads); without
    it a rejection carries its reason alone (``detail`` empty), for callers that count
    reasons (placement on every launch). O(offers) either way, plus a sort of the
    feasible ones; the text is most of a check's cost.
    """
    checker = _Checker(request)
    feasible: list[Candidate] = []
    rejected: list[Rejection] = []
    for offer in offers:
        reason = checker.problem(offer)
        if reason is None:
            market, price = price_for(offer, spot=request.spot)
            feasible.append(Candidate(offer=offer, market=market, usd_per_hour=price))
        else:
            detail = checker.detail(offer, reason) if explain else ""
            rejected.append(Rejection(offer=offer, reason=reason, detail=detail))
    feasible.sort(key=_order)
    return Selection(feasible=tuple(feasible), rejected=tuple(rejected))


INDEX_REQUESTS = 4096
"""The most distinct offer requests an :class:`OfferIndex` keeps answers for."""


class OfferIndex:
    """One catalog load's offers, indexed once, for callers that ask many requests of the
    same offers (placement, for every launching workload of every pass).

    Built in O(offers): the offers grouped by GPU kind (canonical name; an unknown GPU
    fits no request). :meth:`feasible` answers as ``select_offers(...).feasible`` does,
    checking only the offers of the request's GPU kinds (every offer without a GPU pool):
    O(those) plus their sort the first time a request is asked, O(1) after (kept by the
    request, a frozen value). :meth:`rejected` counts the other offers by the first
    constraint each fails, O(offers) the first time a request is asked and O(1) after:
    it is the explanation, asked only when nothing fits. The offers are a tuple, so they
    cannot change under the index.
    """

    def __init__(self, offers: Iterable[Offer]) -> None:
        self.offers: tuple[Offer, ...] = tuple(offers)
        by_gpu: dict[str, list[Offer]] = {}
        for offer in self.offers:
            try:
                name = resolve_gpu(offer.gpu).display_name
            except UnknownGpuError:
                continue
            by_gpu.setdefault(name, []).append(offer)
        self._by_gpu = {name: tuple(group) for name, group in by_gpu.items()}
        self._feasible: dict[OfferRequest, tuple[Candidate, ...]] = {}
        self._shapes: dict[OfferRequest, tuple[tuple[str, int], ...]] = {}
        self._rejected: dict[OfferRequest, Mapping[RejectReason, int]] = {}
        self._by_key: dict[str, Offer] | None = None

    def by_key(self, key: str) -> Offer | None:
        """The first offer whose :attr:`~catalog.model.Offer.key` is ``key`` (``None``:
        none): O(offers) the first time, to index every key, O(1) after."""
        if self._by_key is None:
            by_key: dict[str, Offer] = {}
            for offer in self.offers:
                by_key.setdefault(offer.key, offer)
            self._by_key = by_key
        return self._by_key.get(key)

    def feasible(self, request: OfferRequest) -> tuple[Candidate, ...]:
        """The offers that satisfy ``request``, cheapest first (``select_offers``'s order)."""
        found = self._feasible.get(request)
        if found is None:
            self._bound()
            if request.gpus:
                pool = [o for gpu in request.gpus for o in self._by_gpu.get(gpu, ())]
            else:
                pool = list(self.offers)
            found = select_offers(pool, request, explain=False).feasible
            self._feasible[request] = found
        return found

    def shapes(self, request: OfferRequest) -> tuple[tuple[str, int], ...]:
        """The GPU shapes (GPU, count) of the offers that satisfy ``request``, each once,
        in the order of their first offer in :meth:`feasible`: O(1) after the first time."""
        found = self._shapes.get(request)
        if found is None:
            found = tuple(
                dict.fromkeys((c.offer.gpu, c.offer.gpu_count) for c in self.feasible(request))
            )
            self._shapes[request] = found
        return found

    def rejected(self, request: OfferRequest) -> Mapping[RejectReason, int]:
        """How many offers fail ``request``, by the first constraint each fails (a
        read-only view: the index keeps it)."""
        counts = self._rejected.get(request)
        if counts is None:
            self._bound()
            checker = _Checker(request)
            counts = Counter(
                reason for o in self.offers if (reason := checker.problem(o)) is not None
            )
            self._rejected[request] = MappingProxyType(counts)
        return self._rejected[request]

    def _bound(self) -> None:
        """Keep the caches to :data:`INDEX_REQUESTS` requests: a catalog that is never
        reloaded would otherwise keep every request ever asked (deleted workloads'
        too). Past the bound they are emptied and fill again from the requests in use."""
        if max(len(self._feasible), len(self._rejected)) >= INDEX_REQUESTS:
            self._feasible.clear()
            self._shapes.clear()
            self._rejected.clear()


def _order(candidate: Candidate) -> tuple[Any, ...]:
    # Offer.key's fields first (without building the string), then every other field, so
    # that even duplicate keys sort the same whatever the input order.
    offer = candidate.offer
    spot = offer.spot_usd_per_hour
    return (
        candidate.usd_per_hour,
        offer.on_demand_usd_per_hour,
        offer.provider.value,
        offer.zone,
        offer.instance_type,
        offer.gpu,
        offer.gpu_count,
        offer.labels,
        offer.region,
        -1.0 if spot is None else spot,
        offer.vcpus,
        offer.memory_gib,
    )


class _Checker:
    """One request's constraints, with per-call caches (GPU lookups, CUDA verdicts)."""

    def __init__(self, request: OfferRequest) -> None:
        self.request = request
        self.providers = frozenset(request.providers)
        self.regions = RegionSet.of(request.regions)
        self.gpus = frozenset(request.gpus)
        self._gpu_cache: dict[str, GpuModel | None] = {}
        self._cuda_cache: dict[tuple[ProviderName, str], str | None] = {}

    def problem(self, offer: Offer) -> RejectReason | None:
        """The first constraint ``offer`` fails (``None``: it fits); no text is built."""
        request = self.request
        if self.providers and offer.provider not in self.providers:
            return RejectReason.PROVIDER
        if not self.regions.admits(offer.region):
            return RejectReason.REGION
        gpu = self._gpu(offer.gpu)
        if gpu is None or (self.gpus and gpu.display_name not in self.gpus):
            return RejectReason.GPU
        if request.gpu_count is not None and offer.gpu_count != request.gpu_count:
            return RejectReason.GPU_COUNT
        if (
            request.min_vram_gib is not None
            and gpu.vram_gib * offer.gpu_count < request.min_vram_gib
        ):
            return RejectReason.VRAM
        if self._cuda(offer.provider, gpu) is not None:
            return RejectReason.CUDA
        if request.unavailable and offer.key in request.unavailable:
            return RejectReason.UNAVAILABLE
        ceiling = request.max_usd_per_hour
        if ceiling is not None and price_for(offer, spot=request.spot)[1] > ceiling:
            return RejectReason.OVER_CEILING
        return None

    def detail(self, offer: Offer, reason: RejectReason) -> str:
        """Why ``offer`` fails ``reason`` (from :meth:`problem`), in words."""
        request = self.request
        if reason is RejectReason.PROVIDER:
            allowed = ", ".join(sorted(p.value for p in self.providers))
            return f"provider {offer.provider.value} not in {allowed}"
        if reason is RejectReason.REGION:
            return f"region {offer.region} not in {self.regions.describe()}"
        if reason is RejectReason.UNAVAILABLE:
            return "marked unavailable (no capacity recently)"
        if reason is RejectReason.OVER_CEILING:
            market, price = price_for(offer, spot=request.spot)
            return f"${price:.4f}/h {market.value} > ceiling ${request.max_usd_per_hour:g}/h"
        gpu = self._gpu(offer.gpu)
        if gpu is None:
            return f"unknown GPU {offer.gpu!r}"
        if reason is RejectReason.GPU:
            return f"{gpu.display_name} not in the GPU pool"
        if reason is RejectReason.GPU_COUNT:
            return f"{offer.gpu_count} GPUs, need {request.gpu_count}"
        if reason is RejectReason.VRAM:
            vram = gpu.vram_gib * offer.gpu_count
            return f"{vram:g} GiB of GPU memory, need {request.min_vram_gib:g}"
        return self._cuda(offer.provider, gpu) or ""

    def _gpu(self, name: str) -> GpuModel | None:
        if name not in self._gpu_cache:
            try:
                self._gpu_cache[name] = resolve_gpu(name)
            except UnknownGpuError:
                self._gpu_cache[name] = None
        return self._gpu_cache[name]

    def _cuda(self, provider: ProviderName, gpu: GpuModel) -> str | None:
        key = (provider, gpu.display_name)
        if key not in self._cuda_cache:
            self._cuda_cache[key] = offer_cuda_problem(
                provider=provider, gpu=gpu, pins=self.request.cuda_versions
            )
        return self._cuda_cache[key]
