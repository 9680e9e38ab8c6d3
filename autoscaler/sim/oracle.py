"""The oracle: the cheapest fleet plan we can find that meets the SLO, knowing the future.

It is clairvoyant about every arrival (time, prompt and completion length) and about
boot times (every boot takes the cloud's median, known in advance, so a replica is
launched exactly that early), and is never stocked out or interrupted. It is computed in
two stages.

**Stage A, the relaxed plan (a slot model).**

1. **Slots.** Time is cut into ``slot_s`` slots (60 s) from the first arrival.
2. **Need per slot.** For each slot and each replica count ``n``, the slot's requests are
   replayed on ``n`` replicas (``catalog.engine.BatchEngine``, least-outstanding-work
   balancing, the batch bounded by the replica's cap: the workload's ``per_worker``, else
   the gateway's) that first served the slot before, so the batch slots and queue it leaves
   behind count; only the slot's own requests' SLO misses are counted (``misses(n)``; the
   SLO is :class:`autoscaler.sim.workload.SloRule`). The slot's need is the fewest replicas
   whose misses are only those no fleet can avoid (prompts that miss even alone on an idle
   replica of this offer), searched from the slot before's need (:meth:`_Slot.need`).
3. **Spending the allowance.** The SLO allows ``1 - attainment`` of requests to miss
   (1 %). Repeatedly, the slot where one replica fewer adds the fewest misses gives up
   that replica, while the total stays within the allowance (the unavoidable misses are
   paid from it first).
4. **Hold or relaunch.** A replica costs its price from launch. The fleet is the
   cheapest that covers every slot's count: decomposed into unit layers (the k-th
   replica runs in the slots needing at least k), a gap in a layer is held through when
   holding for the gap costs less than a new boot, else the replica is released and
   relaunched. This is exact for the given counts.
5. **Cost.** (replica-seconds held + boot-seconds of each launch after time 0) x the
   offer's price, up to the last arrival (the last slot is billed only that far). The
   fleet of slot 0 is ready at time 0, as every policy's warm start is. Spot prices are
   used when the workload allows spot, with no interruption.

The slot model only carries backlog from the slot before and balances without the
gateway's central queue, so its plan can miss the SLO in the simulator: a slot left one
replica short by step 3 leaves a backlog that the next slots inherit.

**Stage B, the repair (when a ``replay`` is given, as ``autoscaler.sim.run`` does).**
The plan is replayed through the simulator on the oracle's own terms (its offer only,
boots exactly the median and launched that far ahead, the replicas booting at time 0 for
the first slots ready at time 0, no stock-outs, no interruptions). If more requests miss
than the allowance, capacity is added where the misses concentrate: ranked by misses in
excess of their slot's share of the allowance, slots get one replica more than they
held until the slots chosen carry the whole excess; steps 4-5 re-run and the plan is
replayed again, up to :data:`REPAIR_ROUNDS` times. The oracle is the first plan whose
replay meets the SLO; its attainment and the simulator's bill are kept with it
(:attr:`OraclePlan.replayed`), so a plan that does not meet the SLO is never reported
as if it did.

**Offer.** Stage A runs for the :data:`SHAPES_TRIED` GPU shapes cheapest per usable
capacity (batch bounded by the replica's cap) for this trace's mean token mix, each at
its cheapest price, among those that can meet the SLO at all (a shape whose
single-request prefill already misses more than the allowance is skipped). Shapes are
taken in order of a cost floor (:func:`cost_floor`: one replica in every slot with
requests, less the slots the allowance could give up), each planned (stage A) and
repaired (stage B) in turn; a shape whose floor, or whose relaxed cost, is not below the
cheapest repaired plan that met the SLO so far is skipped (repair only adds capacity, so
both bound its repaired cost from below). The cheapest repaired plan that meets the SLO
wins: the same plan as planning and repairing every shape, found without sizing the
slots of shapes that cannot win (on a day, most of the oracle's time).

**In what sense it is a bound.** The oracle knows what no policy can (the future, the
boot time) and pays nothing for stock-outs or interruptions, so a policy under the same
cloud should not reach the SLO for less. It is *the cheapest plan this search finds in
its family* (one offer; a replica count per 60 s slot; replicas bought exactly a boot
ahead), not a proven global optimum: a plan of mixed offers, or counts found by an
exhaustive search, could cost less. The relaxed cost (stage A) is the bound of the
relaxed slot model; the repaired cost is what a plan that really meets the SLO in the
simulator costs.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from autoscaler.sim.gcpause import paused_gc
from autoscaler.sim.trace import TraceRequest
from autoscaler.sim.workload import SimWorkload, SloRule
from catalog.engine import BatchEngine, EventKind
from catalog.model import Offer
from catalog.perf import ServingProfile
from gateway.balancing import request_work
from gateway.window import replica_cap

SLOT_S = 60.0
SHAPES_TRIED = 4
"""GPU shapes (cheapest per usable capacity first) the oracle plans for."""

REPAIR_ROUNDS = 16
"""Replays of a plan (capacity added after each that misses) before the repair stops."""


@dataclass(frozen=True, slots=True)
class WarmCosts:
    """What a stopped machine costs the oracle (``autoscaler.sim.warm``): stopping takes
    ``stop_s`` and starting ``start_s``, both billed at the machine's price; stopped, it
    pays ``stopped_usd_per_hour`` for its disk."""

    stop_s: float
    start_s: float
    stopped_usd_per_hour: float

    def bridge_cheaper(self, gap_s: float, *, usd_per_hour: float, boot_s: float) -> bool:
        """Whether stopping through a gap of ``gap_s`` costs less than both holding the
        machine through it and releasing it and buying a fresh one after it."""
        busy = self.stop_s + self.start_s
        if gap_s < busy:
            return False
        bridged = busy * usd_per_hour + (gap_s - busy) * self.stopped_usd_per_hour
        return bridged < min(gap_s, boot_s) * usd_per_hour


@dataclass(frozen=True, slots=True)
class Bridged:
    """A fleet per slot covering the counts, and how its gaps are bridged."""

    fleet: list[int]
    launches: int
    """Fresh launches after slot 0."""
    stops: int = 0
    """Gaps a machine spends stopped (with ``warm``)."""
    stopped_s: float = 0.0
    """Machine-seconds stopped, each billed at the disk's price."""


REPAIR_STALL_ROUNDS = 3
"""The repair also stops when this many rounds in a row added capacity without the
misses falling below their fewest so far: that shape's misses are not for want of
replicas (on Mooncake, prompts queued on one H100 behind another long prefill)."""


@dataclass(frozen=True, slots=True)
class Replayed:
    """A fleet plan replayed in the simulator on the oracle's own terms: per slot (by
    arrival), the requests counted and those missing the SLO; and what the simulator
    billed for the run (launch to termination, until the last request finished)."""

    requests: tuple[int, ...]
    misses: tuple[int, ...]
    billed_usd: float

    @property
    def total_requests(self) -> int:
        return sum(self.requests)

    @property
    def total_misses(self) -> int:
        return sum(self.misses)

    @property
    def attainment(self) -> float:
        total = self.total_requests
        return 1.0 - self.total_misses / total if total else 1.0


@dataclass(frozen=True, slots=True)
class OraclePlan:
    """The oracle's fleet per slot, its offer and its bill."""

    offer: Offer
    spot: bool
    usd_per_hour: float
    slot_s: float
    boot_s: float
    need: tuple[int, ...]
    """Replicas each slot is planned for: stage A's count (after the miss allowance was
    spent), raised where the repair added capacity."""
    fleet: tuple[int, ...]
    """Replicas held in each slot (need, with short gaps held through)."""
    launches: int
    """Launches after time 0."""
    misses: int
    """Requests missing the SLO: in the replay when there was one, else in the slot model."""
    cost_usd: float
    gpu_hours: float
    end_s: float = 0.0
    """The last arrival: the plan is billed up to it."""
    allowance: int = 0
    """Misses the SLO allows on this trace: ``floor((1 - attainment) x requests)``."""
    relaxed_cost_usd: float | None = None
    """The cost of stage A's plan, before the repair added capacity."""
    replayed: Replayed | None = None
    """The plan replayed in the simulator (``None``: not replayed)."""
    repair_rounds: int = 0
    """Times capacity was added after a replay missed the SLO."""
    warm: WarmCosts | None = None
    """Gaps may be bridged by stopped machines (``None``: fresh machines only)."""
    stops: int = 0
    """Gaps bridged by a stopped machine (started again a start ahead of its slot)."""

    @property
    def meets_slo(self) -> bool | None:
        """Whether the replayed plan met the SLO (``None``: not replayed)."""
        return None if self.replayed is None else self.replayed.total_misses <= self.allowance


Replay = Callable[[OraclePlan], Replayed]
"""Replays a plan through the simulator on the oracle's own terms."""


def slot_misses(
    profile: ServingProfile,
    requests: Sequence[TraceRequest],
    *,
    replicas: int,
    slo: SloRule,
    seed: int = 0,
    warmup: Sequence[TraceRequest] = (),
) -> int:
    """Requests of one slot missing the SLO on ``replicas`` replicas that first served
    ``warmup`` (the slot before: the batch slots and queue it leaves behind are real)."""
    if not requests:
        return 0
    counted_from = requests[0].arrival_s
    requests = [*warmup, *requests]
    start = requests[0].arrival_s
    engines = [BatchEngine(profile, start_s=start, timings=False) for _ in range(replicas)]
    outstanding = [0] * replicas
    work = [0] * replicas
    owner: list[dict[int, TraceRequest]] = [{} for _ in range(replicas)]
    rng = random.Random(seed)
    misses = 0
    due = [math.inf] * replicas  # each engine's next event; only the touched ones change
    bounds = slo.bounds()
    everyone = range(replicas)
    first_token = EventKind.FIRST_TOKEN

    def settle(k: int, until: float) -> int:
        found = 0
        owned = owner[k]
        for event in engines[k].advance(until):
            if event.kind is first_token:
                r = owned[event.request_id]
                work[k] -= request_work(r.input_tokens)  # its prefill is done
                if (
                    r.arrival_s >= counted_from
                    and event.at_s - r.arrival_s > bounds[r.input_tokens]
                ):
                    found += 1
            else:  # finished
                outstanding[k] -= 1
                del owned[event.request_id]
        return found

    for r in requests:
        arrival = r.arrival_s
        for k in everyone:
            if due[k] <= arrival:
                misses += settle(k, arrival)
                due[k] = engines[k].next_event_s() or math.inf
        # The gateway's rule (gateway.balancing): least outstanding work, then requests.
        least = min(zip(work, outstanding, strict=True))
        choice = rng.choice(
            [k for k in everyone if work[k] == least[0] and outstanding[k] == least[1]]
        )
        misses += settle(choice, arrival)  # nothing due, but the engine must reach now
        engine = engines[choice]
        request_id = engine.submit(input_tokens=r.input_tokens, output_tokens=r.output_tokens)
        due[choice] = engine.next_event_s() or math.inf
        owner[choice][request_id] = r
        outstanding[choice] += 1
        work[choice] += request_work(r.input_tokens)
    for k in everyone:
        for event in engines[k].drain():
            if event.kind is first_token:
                r = owner[k][event.request_id]
                if (
                    r.arrival_s >= counted_from
                    and event.at_s - r.arrival_s > bounds[r.input_tokens]
                ):
                    misses += 1
    return misses


class _Slot:
    """Misses of one slot by replica count, computed on demand."""

    def __init__(
        self,
        profile: ServingProfile,
        requests: list[TraceRequest],
        slo: SloRule,
        seed: int,
        warmup: Sequence[TraceRequest] = (),
    ) -> None:
        self.profile = profile
        self.requests = requests
        self.warmup = warmup
        self.slo = slo
        self.seed = seed
        self._memo: dict[int, int] = {}
        self.unavoidable = _unavoidable(profile, requests, slo)

    def misses(self, n: int) -> int:
        if n <= 0:
            return len(self.requests)
        if n not in self._memo:
            self._memo[n] = slot_misses(
                self.profile,
                self.requests,
                replicas=n,
                slo=self.slo,
                seed=self.seed,
                warmup=self.warmup,
            )
        return self._memo[n]

    def need(self, hint: int | None = None) -> int:
        """The fewest replicas whose misses are only the unavoidable ones: a count ``n``
        that leaves only those while ``n - 1`` leaves more (or 1).

        Searched from ``hint`` when given (the slot before's need: the rate moves little
        from one minute to the next, so two counts usually settle it, where a search
        from one replica sizes four or five), else by doubling from one replica; then
        bisection. Both find the same count where misses fall as replicas are added."""
        if not self.requests:
            return 0
        top = len(self.requests)
        if hint is not None and hint >= 1:
            hint = min(hint, top)
            if self.misses(hint) <= self.unavoidable:
                if hint == 1 or self.misses(hint - 1) > self.unavoidable:
                    return hint
                low, high = 1, hint - 1
            else:
                low, high = hint + 1, min(hint * 2, top)
                while self.misses(high) > self.unavoidable and high < top:
                    low, high = high + 1, min(high * 2, top)
            return self._bisect(low, high)
        high = 1
        while self.misses(high) > self.unavoidable and high < top:
            high = min(high * 2, top)
        low = high // 2 + 1 if high > 1 else 1
        return self._bisect(low, high)

    def _bisect(self, low: int, high: int) -> int:
        """The fewest count in ``[low, high]`` that leaves only the unavoidable misses,
        ``high`` known to (or the most there is), ``low - 1`` known not to."""
        while low < high:
            mid = (low + high) // 2
            if self.misses(mid) > self.unavoidable:
                low = mid + 1
            else:
                high = mid
        return high


@functools.lru_cache(maxsize=8192)
def _slot(
    profile: ServingProfile,
    requests: tuple[TraceRequest, ...],
    slo: SloRule,
    seed: int,
    warmup: tuple[TraceRequest, ...],
) -> _Slot:
    """One slot's misses, shared by runs that replay the same requests on the same shape
    (the benchmark's runs with and without spot)."""
    return _Slot(profile, list(requests), slo, seed, warmup)


def _unavoidable(profile: ServingProfile, requests: Sequence[TraceRequest], slo: SloRule) -> int:
    """Requests missing the SLO even alone on an idle replica of ``profile``."""
    missed = _MISSED_ALONE.get((profile, slo))
    if missed is None:
        if len(_MISSED_ALONE) >= 64:
            _MISSED_ALONE.clear()
        missed = _MISSED_ALONE[(profile, slo)] = {}
    count = 0
    for r in requests:
        tokens = r.input_tokens
        alone = missed.get(tokens)
        if alone is None:
            alone = missed[tokens] = not slo.met(
                ttft_s=profile.prefill_seconds(tokens), input_tokens=tokens
            )
        count += alone
    return count


_MISSED_ALONE: dict[tuple[ServingProfile, SloRule], dict[int, bool]] = {}
"""By shape and SLO, whether a prompt of each length misses alone on an idle replica:
:func:`_unavoidable` is asked for every slot the oracle sizes (a pure memo)."""


def _slots(requests: Sequence[TraceRequest], slot_s: float) -> list[list[TraceRequest]]:
    if not requests:
        return []
    count = int(requests[-1].arrival_s // slot_s) + 1
    slots: list[list[TraceRequest]] = [[] for _ in range(count)]
    for r in requests:
        slots[int(r.arrival_s // slot_s)].append(r)
    return slots


def spend_allowance(
    slots: list[_Slot], need: list[int], *, allowance: int
) -> tuple[list[int], int]:
    """Drop replicas where one fewer adds the fewest misses, within ``allowance``."""
    counts = list(need)
    misses = sum(s.misses(n) if n else 0 for s, n in zip(slots, counts, strict=True))
    # Misses no fleet of this offer avoids are spent from the allowance too: an offer too
    # slow for the long prompts does not get them for free.
    spent = misses
    heap: list[tuple[int, int]] = []
    for k, s in enumerate(slots):
        if counts[k] > 0:
            heapq.heappush(heap, (s.misses(counts[k] - 1) - s.misses(counts[k]), k))
    while heap:
        extra, k = heapq.heappop(heap)
        if spent + extra > allowance:
            break
        spent += extra
        counts[k] -= 1
        misses += extra
        if counts[k] > 0:
            s = slots[k]
            heapq.heappush(heap, (s.misses(counts[k] - 1) - s.misses(counts[k]), k))
    return counts, misses


def hold_or_relaunch(need: Sequence[int], *, slot_s: float, boot_s: float) -> tuple[list[int], int]:
    """The cheapest fleet covering ``need``: per unit layer, hold through a gap when that
    costs less than a new boot. Returns the fleet per slot and the launches after slot 0."""
    bridged = bridge_gaps(need, slot_s=slot_s, boot_s=boot_s)
    return bridged.fleet, bridged.launches


def bridge_gaps(
    need: Sequence[int],
    *,
    slot_s: float,
    boot_s: float,
    warm: WarmCosts | None = None,
    usd_per_hour: float = 1.0,
) -> Bridged:
    """The cheapest fleet covering ``need``: per unit layer, each gap is held through,
    bridged by a stopped machine (with ``warm``, where that is cheapest), or the machine
    is released and a fresh one bought after it. Linear in slots times the peak."""
    fleet = list(need)
    launches = stops = 0
    stopped_s = 0.0
    for level in range(1, max(need, default=0) + 1):
        on = [n >= level for n in need]
        k = 0
        started = on[0] if on else False
        while k < len(on):
            if on[k]:
                k += 1
                continue
            gap_start = k
            while k < len(on) and not on[k]:
                k += 1
            if gap_start == 0 or k == len(on):
                continue  # no layer before the gap, or nothing after it to relaunch for
            gap_s = (k - gap_start) * slot_s
            if warm is not None and warm.bridge_cheaper(
                gap_s, usd_per_hour=usd_per_hour, boot_s=boot_s
            ):
                stops += 1
                stopped_s += gap_s - warm.stop_s - warm.start_s
            elif gap_s < boot_s:
                for g in range(gap_start, k):
                    fleet[g] = max(fleet[g], level)
            else:
                launches += 1
        if not started and any(on):
            launches += 1
    return Bridged(fleet=fleet, launches=launches, stops=stops, stopped_s=stopped_s)


def oracle_for_offer(
    *,
    requests: Sequence[TraceRequest],
    profile: ServingProfile,
    offer: Offer,
    spot: bool,
    slo: SloRule,
    attainment: float,
    boot_s: float,
    slot_s: float = SLOT_S,
    seed: int = 0,
) -> OraclePlan:
    """Stage A (steps 1-5 of the module docstring) for one offer."""
    groups = _slots(requests, slot_s)
    slots = [
        _slot(profile, tuple(group), slo, seed + k, tuple(groups[k - 1]) if k else ())
        for k, group in enumerate(groups)
    ]
    need: list[int] = []
    hint: int | None = None  # the last slot's need that was not zero
    for s in slots:
        need.append(s.need(hint=hint))
        hint = need[-1] or hint
    allowance = math.floor((1.0 - attainment) * len(requests))
    counts, misses = spend_allowance(slots, need, allowance=allowance)
    plan = priced_plan(
        counts,
        offer=offer,
        spot=spot,
        slot_s=slot_s,
        boot_s=boot_s,
        end_s=requests[-1].arrival_s if requests else 0.0,
        misses=misses,
        allowance=allowance,
    )
    return replace(plan, relaxed_cost_usd=plan.cost_usd)


def priced_plan(
    counts: Sequence[int],
    *,
    offer: Offer,
    spot: bool,
    slot_s: float,
    boot_s: float,
    end_s: float,
    misses: int,
    allowance: int,
    warm: WarmCosts | None = None,
) -> OraclePlan:
    """Steps 4-5: the cheapest fleet covering ``counts`` per slot, and its bill (with
    ``warm``, gaps may be bridged by stopped machines: a spot machine cannot stop)."""
    price = offer.price(spot=spot)
    warm = None if spot else warm
    bridged = bridge_gaps(counts, slot_s=slot_s, boot_s=boot_s, warm=warm, usd_per_hour=price)
    fleet, launches = bridged.fleet, bridged.launches
    # The last slot is billed only up to the last arrival: the trace ends there.
    lengths = [slot_s] * len(fleet)
    if lengths:
        lengths[-1] = max(end_s - slot_s * (len(fleet) - 1), 0.0)
    replica_s = sum(n * length for n, length in zip(fleet, lengths, strict=True))
    replica_s += launches * boot_s
    stopped_usd = 0.0
    if warm is not None:
        replica_s += bridged.stops * (warm.stop_s + warm.start_s)
        stopped_usd = bridged.stopped_s / 3600.0 * warm.stopped_usd_per_hour
    return OraclePlan(
        offer=offer,
        spot=spot,
        usd_per_hour=price,
        slot_s=slot_s,
        boot_s=boot_s,
        need=tuple(counts),
        fleet=tuple(fleet),
        launches=launches,
        misses=misses,
        cost_usd=replica_s / 3600.0 * price + stopped_usd,
        gpu_hours=replica_s / 3600.0 * offer.gpu_count,
        end_s=end_s,
        allowance=allowance,
        warm=warm,
        stops=bridged.stops,
    )


def repair(plan: OraclePlan, *, replay: Replay, rounds: int = REPAIR_ROUNDS) -> OraclePlan:
    """Stage B: replay ``plan``; while more requests miss than its allowance, add a
    replica to the slots where the misses concentrate and replay again. Returns the
    first plan that meets the SLO, or the last one tried (its ``replayed`` says how far
    short it is) after ``rounds`` additions or :data:`REPAIR_STALL_ROUNDS` without
    progress."""
    relaxed = plan.relaxed_cost_usd if plan.relaxed_cost_usd is not None else plan.cost_usd
    current = plan
    fewest, stalled = math.inf, 0
    for done in range(rounds + 1):
        result = replay(current)
        current = replace(
            current,
            replayed=result,
            misses=result.total_misses,
            relaxed_cost_usd=relaxed,
            repair_rounds=done,
        )
        stalled = 0 if result.total_misses < fewest else stalled + 1
        fewest = min(fewest, result.total_misses)
        if (
            result.total_misses <= current.allowance
            or done == rounds
            or stalled >= REPAIR_STALL_ROUNDS
        ):
            return current
        counts = more_where_missed(current.fleet, current.need, result, allowance=current.allowance)
        current = priced_plan(
            counts,
            offer=current.offer,
            spot=current.spot,
            slot_s=current.slot_s,
            boot_s=current.boot_s,
            end_s=current.end_s,
            misses=result.total_misses,
            allowance=current.allowance,
            warm=current.warm,
        )
    return current


def with_warm_pools(plan: OraclePlan, *, warm: WarmCosts, replay: Replay | None) -> OraclePlan:
    """The oracle ``plan`` (fresh machines only) with its gaps bridged by stopped machines
    where that is cheaper, repaired again when ``replay`` is given: its shape and its
    per-slot counts, so a second oracle costs one replay or a few, not a second search.
    Sleeping engines are not used: asleep, a machine costs what it costs awake, and awake
    it serves at once, so a planner that knows the future holds it awake instead."""
    warmed = priced_plan(
        plan.need,
        offer=plan.offer,
        spot=plan.spot,
        slot_s=plan.slot_s,
        boot_s=plan.boot_s,
        end_s=plan.end_s,
        misses=plan.misses,
        allowance=plan.allowance,
        warm=warm,
    )
    warmed = replace(warmed, relaxed_cost_usd=warmed.cost_usd)
    if replay is None or warmed.warm is None:
        return replace(warmed, replayed=plan.replayed, repair_rounds=plan.repair_rounds)
    return repair(warmed, replay=replay)


def more_where_missed(
    fleet: Sequence[int], counts: Sequence[int], replayed: Replayed, *, allowance: int
) -> list[int]:
    """``counts`` with one replica more than ``fleet`` held in the slots whose misses
    most exceed their share of ``allowance``, until the slots chosen carry the excess."""
    total = max(replayed.total_requests, 1)
    excess = replayed.total_misses - allowance
    over = sorted(
        (
            (missed - allowance * n / total, k)
            for k, (missed, n) in enumerate(zip(replayed.misses, replayed.requests, strict=True))
            if missed > allowance * n / total and k < len(fleet)
        ),
        reverse=True,
    )
    more = list(counts)
    carried = 0
    for _, k in over:
        if carried >= excess:
            break
        more[k] = max(more[k], fleet[k] + 1)
        carried += replayed.misses[k]
    return more


def oracle(
    *,
    workload: SimWorkload,
    offers: Sequence[Offer],
    requests: Sequence[TraceRequest],
    slo: SloRule,
    attainment: float,
    boot_s: float,
    allow_spot: bool,
    slot_s: float = SLOT_S,
    seed: int = 0,
    replay: Replay | None = None,
) -> OraclePlan:
    """The cheapest oracle over the GPU shapes cheapest per capacity for this trace;
    with ``replay``, repaired until its replay in the simulator meets the SLO. A replica's
    batch is bounded by the workload's ``per_worker`` where set, else the gateway's cap."""
    with paused_gc():  # ``autoscaler.sim.gcpause``: the same plan, sooner
        return _oracle(
            workload=workload,
            offers=offers,
            requests=requests,
            slo=slo,
            attainment=attainment,
            boot_s=boot_s,
            allow_spot=allow_spot,
            slot_s=slot_s,
            seed=seed,
            replay=replay,
        )


def _oracle(
    *,
    workload: SimWorkload,
    offers: Sequence[Offer],
    requests: Sequence[TraceRequest],
    slo: SloRule,
    attainment: float,
    boot_s: float,
    allow_spot: bool,
    slot_s: float,
    seed: int,
    replay: Replay | None,
) -> OraclePlan:
    served = [
        r for r in requests if r.input_tokens + r.output_tokens <= workload.max_context_tokens
    ]
    mean_in = sum(r.input_tokens for r in served) / max(len(served), 1)
    mean_out = sum(r.output_tokens for r in served) / max(len(served), 1)
    cap = replica_cap(workload.spec.per_worker)
    cheapest: dict[tuple[str, int], tuple[float, Offer, bool]] = {}
    for offer in offers:
        spot = allow_spot and offer.spot_usd_per_hour is not None
        price = offer.price(spot=spot)
        shape = (offer.gpu, offer.gpu_count)
        if shape not in cheapest or price < cheapest[shape][0]:
            cheapest[shape] = (price, offer, spot)
    allowance = math.floor((1.0 - attainment) * len(served))
    ranked: list[tuple[float, Offer, bool, ServingProfile]] = []
    for price, offer, spot in cheapest.values():
        profile = workload.profile(offer)
        # The gateway never gives a replica more than its cap at once: the batch is bounded.
        profile = replace(profile, max_batch=min(profile.max_batch, cap))
        if _unavoidable(profile, served, slo) > allowance:
            continue  # even an idle replica per request misses too many long prompts
        rps = profile.capacity_rps(input_tokens=mean_in, output_tokens=mean_out)
        ranked.append((price / rps, offer, spot, profile))
    ranked.sort(key=lambda item: (item[0], item[1].key))
    if not ranked:
        raise ValueError(
            f"workload {workload.spec.slug}: no offer can meet the SLO for "
            f"{attainment:.0%} of this trace's requests, whatever the fleet"
        )
    groups = _slots(served, slot_s)
    bounded = sorted(
        (
            (
                cost_floor(
                    groups,
                    profile=profile,
                    slo=slo,
                    price=offer.price(spot=spot),
                    slot_s=slot_s,
                    allowance=allowance,
                ),
                offer.key,
                offer,
                spot,
                profile,
            )
            for _, offer, spot, profile in ranked[:SHAPES_TRIED]
        ),
        key=lambda item: (item[0], item[1]),
    )
    plans: list[OraclePlan] = []
    repaired: list[OraclePlan] = []
    for floor, _, offer, spot, profile in bounded:
        # Stage A is most of the oracle's time on a day: a shape whose cost floor is
        # already above a plan that met the SLO (or, without a replay, above the
        # cheapest relaxed plan) cannot win, so its slots are not sized at all.
        best = _best_cost(repaired if replay is not None else plans, met_only=replay is not None)
        if best is not None and floor >= best:
            continue
        plan = oracle_for_offer(
            requests=served,
            profile=profile,
            offer=offer,
            spot=spot,
            slo=slo,
            attainment=attainment,
            boot_s=boot_s,
            slot_s=slot_s,
            seed=seed,
        )
        plans.append(plan)
        if replay is None:
            continue
        # Repair only adds capacity: a relaxed plan dearer than a met one cannot win.
        if best is not None and plan.cost_usd >= best:
            continue
        repaired.append(repair(plan, replay=replay))
    if replay is None:
        return min(plans, key=lambda p: (p.cost_usd, p.offer.key))
    return min(repaired, key=_preference)


def _best_cost(plans: Sequence[OraclePlan], *, met_only: bool) -> float | None:
    costs = [p.cost_usd for p in plans if p.meets_slo or not met_only]
    return min(costs, default=None)


def cost_floor(
    groups: Sequence[Sequence[TraceRequest]],
    *,
    profile: ServingProfile,
    slo: SloRule,
    price: float,
    slot_s: float,
    allowance: int,
) -> float:
    """A cost no plan of this shape (relaxed or repaired) goes below: one replica in
    every slot with requests, except the slots that giving up entirely fits in the
    allowance (a slot left with no replica misses every request no fleet would have
    served, and the allowance pays for those), each counted a full slot."""
    avoidable = sorted(len(group) - _unavoidable(profile, group, slo) for group in groups if group)
    dropped, spent = 0, 0
    for extra in avoidable:
        if spent + extra > allowance:
            break
        spent += extra
        dropped += 1
    return max(len(avoidable) - dropped, 0) * slot_s / 3600.0 * price


def _preference(plan: OraclePlan) -> tuple[bool, float, float, str]:
    """Plans that meet the SLO first, cheapest first; else the closest to meeting it."""
    attained = plan.replayed.attainment if plan.replayed is not None else 0.0
    met = bool(plan.meets_slo)
    return (not met, plan.cost_usd if met else -attained, plan.cost_usd, plan.offer.key)
