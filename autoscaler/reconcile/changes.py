"""Which workloads a pass steps in full, and why leaving the others alone changes nothing.

A workload's full step (:func:`autoscaler.reconcile.workload.reconcile_workload`) costs
store round trips and a commit; most of a converged fleet's steps would find nothing to
do. :func:`work_for_pass` reads the fleet's state once (``reconcile.fleet``) and queues
for a full step only the workloads for which one of these holds:

1. **Not seen in the last pass, or changed since.** Anything it reads of its row and
   its open rows (``fleet.WorkloadFacts``) differs from what the last pass read: a new
   spec generation, a delete, a row added or closed, a boot callback's report, an agent's
   heartbeat, this controller's own writes in that pass. The settings or the offers
   (a catalog sync) changed: every workload.
2. **Its last full step had work**: it planned an action or had a launch refused
   (the refusal is counted, logged by interval, and tried again each pass).
3. **A timer is due**: the plan's ``requeue_after`` (a boot or drain deadline, more
   launches to come), a schedule's next change (``recheck_at``).
4. **A replica needs attention**, as the step itself would find it: a pending intent, a
   replica draining, being terminated or parking, one resumed whose engine is being
   woken, a parked replica of a group, an instance the provider does not list running
   (or starting, for a booting replica; stopped, for a replica parked with its machine
   stopped), an engine
   URL not learnt yet, a spot notice (queued or reported), a failed boot, a booting
   replica group, a replica group missing a member, a grace
   period running (not visible, unhealthy), a booting engine that now answers its
   health path or a ready one that does not (asked in one batch, at most
   :data:`PROBES_AT_ONCE` at a time; a ready replica of a workload not compared this
   pass is asked once every :data:`PROBE_EVERY` passes, below).
5. **Its decision reads the clock.** An autoscaling workload's count depends on time
   windows and idle timers, so its pure step (``decide.step.step``, no I/O) runs here
   on the facts read; it is queued when that step plans or refuses anything, changes
   the desired count, or begins or ends a wait on incomplete signals (a scale-down held:
   ``decide.step``), else its scaling memory is kept as the full step would keep it.
   One with a warm pool plans with the measured start times of its replicas, closed
   ones included, which the pass does not read: it runs with the ones its last full
   step read (``Seen.start_times``), which stay the same while its facts do (a row
   becomes a sample only when it is made ready or resumed, a change of its facts).
   One allowed spot machines weighs its measured interruption rate
   (``decide.spot_rate``): the closed spot machines its last full step read
   (``Seen.spot_closed``, which change only when a row closes, a change of its facts)
   and the open ones in its facts, at this pass's time, as the full step would.
6. **Quarantined or unrunnable** (the full step handles those), **deleted** (torn
   down), or **due for its resync**: every workload is stepped
   in full at least every ``Settings.resync_sec`` (600 s by default), each between half
   and all of it, spread by id, a safety net that does not depend on this list being
   complete.

A workload backing off after failed boots (``boot_failures``) is no exception: the
backoff only holds launches, and a step whose launches it held planned them, so it had
work (2) and is stepped every pass, its due time the backoff's end (3); one whose last
step planned no launch (scaled to zero, say) plans one only on a change of its facts
(1) or of its decision (5), and is then stepped in full, where the backoff holds it.

Why a workload none of these hold for would do nothing in its full step: its rows are
the ones its last full step read (1), and that step's plan was empty (2); sync, intent
resolution, group settlement, health, spot notices and failed-boot handling find nothing
(4; a closed row would have changed its facts, 1); a parked replica's park is settled
(a stopped machine the provider shows stopped, a sleeping engine's machine running: the
step's park settling then does nothing) and its hold time is a timer of the plan (5); a
fixed count never changes and a schedule's changes and the plan's timeouts are timers
(3), save a fixed fleet's replacement on a cheaper offer (``decide.step``), which the
clock alone can make due (a replica's age, a market's mark ending) and which waits for
the next resync (6); an autoscaling decision is computed here from the same inputs as the full step
would use (5). Its spend, the fleet's
and the offers only matter to a launch, which it does not plan.

**Only what may have moved is compared.** After an incremental read (``fleet.FleetCache``:
the rows written since the last pass), :func:`work_for_pass` checks the rules above only
for the workloads whose facts that read changed (1), those the last pass queued (2, 4,
6: quarantined, unrunnable and deleted ones are queued every pass), those whose own timer
or resync fell due (3, 6: two heaps of due times), those with an instance whose state
the providers' lists show otherwise than the last pass's lists (4: both diffed by
instance id and state) or a spot notice (4), and the autoscaling ones (5). Any other
workload was left alone by the last pass, which checked every rule for it, and none of
its inputs has moved since: its rows and row, its timers, its instances' states, its
notices, the settings and offers; so every rule gives the same answer. Its health is
the one input that moves unseen: its ready replicas are probed once every
:data:`PROBE_EVERY` passes (its id choosing the pass), its booting ones every pass. A
change of the settings, the offers, or the set of providers whose ``list`` answered, a
full read (the first pass, every ``Settings.resync_sec``, after a pass that raised), or
several controllers sharing the store: every workload is compared, every candidate's
replicas probed, as without the cache.

Cost per pass, incremental: O(changed + queued + due + moved workloads and their rows)
to compare, O(instances listed) to diff the providers' lists (their states, read by
``observe`` with the instances, compared at C speed), O(workloads) at C speed to pick
this pass's probe slice, the probes of a sixth of the ready replicas and of the booting
ones, an autoscaling workload's pure step, and one query for the engine keys and specs
this controller has not read yet. After a full read: O(workloads + open rows) in memory,
one health probe per ready or booting replica of a workload not queued for other
reasons.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from operator import attrgetter

from pydantic import ValidationError

from autoscaler.decide.inputs import Measured, SignalsRead
from autoscaler.decide.scaling import ScaleMemory
from autoscaler.decide.spot_rate import PRIOR_SPOT_RATE, SpotLife, SpotRate, spot_rate
from autoscaler.decide.step import Step, WorkloadView, step
from autoscaler.decide.warm import ParkMode, StartTimes
from autoscaler.reconcile.deps import Deps, Seen
from autoscaler.reconcile.fleet import (
    Fleet,
    RowFacts,
    WorkloadFacts,
    engine_keys,
    workload_specs,
)
from autoscaler.reconcile.liveness import BOOT_FAILED, open_spot_lives
from autoscaler.reconcile.observe import Observation
from autoscaler.reconcile.workload import due_after, replica_states, signals_for
from autoscaler.spec import AutoscalingPolicy, WorkloadSpec
from autoscaler.store.phase import SPOT_NOTICE, Phase
from providers.base import InstanceState
from providers.engines import engine_for

_RUNNING = frozenset({InstanceState.RUNNING})
_STARTING = frozenset({InstanceState.PENDING, InstanceState.RUNNING})
_SETTLED = frozenset({Phase.READY, Phase.BOOTING, Phase.PARKED})
_PROBED = frozenset({Phase.BOOTING, Phase.READY})
"""The phases whose replica a step may find nothing to do for (rule 4)."""
_PARKED: Mapping[str | None, frozenset[InstanceState]] = {
    ParkMode.STOPPED.value: frozenset({InstanceState.STOPPED}),
    ParkMode.SLEEPING.value: _RUNNING,
}
"""The states the provider must show a parked replica's machine in, by park mode."""

PROBES_AT_ONCE = 64
"""Health probes in flight at once in a pass's batch."""

_SPREAD = 0.6180339887  # the golden ratio's fraction: resync times spread evenly by id


@dataclass(frozen=True, slots=True)
class Work:
    """A pass's queue: the workloads to step in full (by id), and the earliest timer of
    those left alone (``None``: none pending)."""

    due: tuple[WorkloadFacts, ...]
    left_alone: int
    next_at: datetime | None


async def work_for_pass(
    deps: Deps,
    workloads: Sequence[WorkloadFacts],
    *,
    fleet: Fleet,
    observed: Observation,
    signals: SignalsRead,
    now: datetime,
) -> Work:
    """Split ``workloads`` into those stepped in full and those left alone (see the
    module docstring).

    After an incremental read (``fleet.changed``), only the workloads something may have
    moved for are compared: O(those + their rows), plus O(instances listed) to diff the
    providers' lists with the last pass's (states, at C speed but for the building of
    one dict), O(workloads) at C speed to pick this pass's slice of probes, and the
    probes of that slice. After a full read, with several controllers, or when the
    settings, the offers or the set of providers that answered changed: every workload,
    O(workloads + their rows) plus the candidates' health probes."""
    memory = deps.memory
    inputs = (deps.settings, deps.offers())
    full = fleet.changed is None or deps.shards is not None
    if memory.pass_inputs is None or not _same_inputs(memory.pass_inputs, inputs):
        memory.seen.clear()
        memory.timers.clear()
        memory.resyncs.clear()
        full = True
    memory.pass_inputs = inputs
    moved = _listing_moved(deps, observed)
    memory.passes += 1
    if full or moved is None or fleet.changed is None:
        considered: Sequence[WorkloadFacts] = workloads
        extra: list[WorkloadFacts] = []
    else:
        ids = _maybe_moved(deps, fleet, observed, moved=moved, changed=fleet.changed, now=now)
        considered = [fleet.by_id[i] for i in sorted(ids) if i in fleet.by_id]
        extra = [
            fleet.by_id[i]
            for i in _probe_turn(deps, fleet)
            if i not in ids and spec_of(deps, fleet.by_id[i]) is not None
        ]
    candidates = [w for w in considered if needs_step(deps, w, observed=observed, now=now) is None]
    await load_specs(deps, candidates)
    candidates = [w for w in candidates if spec_of(deps, w) is not None]
    answers = await probe(deps, [*candidates, *extra])
    due: list[WorkloadFacts] = []
    next_at: datetime | None = None
    alone = {w.id for w in candidates if health_as_left(w, answers)}
    for w in considered:
        if w.id not in alone or not _decision_quiet(deps, w, fleet=fleet, signals=signals, now=now):
            due.append(w)
            continue
        if considered is workloads:
            seen = memory.seen[w.id]
            if seen.due_at is not None and (next_at is None or seen.due_at < next_at):
                next_at = seen.due_at
    # The slice's workloads were left alone and nothing of theirs moved: only a probe
    # that contradicts a replica's phase queues one.
    due.extend(w for w in extra if not health_as_left(w, answers))
    if considered is not workloads:
        due.sort(key=_ID)
        next_at = _next_timer(deps, {w.id for w in due})
    if considered is workloads:
        _forget_gone(deps, workloads)
    else:
        _forget(deps, [i for i in fleet.changed or () if i not in fleet.by_id], fleet.closed)
    memory.attention = {w.id for w in due}
    return Work(due=tuple(due), left_alone=len(workloads) - len(due), next_at=next_at)


_ID = attrgetter("id")

PROBE_EVERY = 6
"""A ready replica of a workload left alone is probed once every this many passes
(booting ones every pass), its workload's id choosing which: a ready replica whose
engine stops answering is noticed within this many passes (30 s at the default 5 s
tick), then goes through ``Settings.unhealthy_grace_sec`` as before."""


def _probe_turn(deps: Deps, fleet: Fleet) -> list[int]:
    """The workloads whose replicas this pass probes though nothing of theirs moved:
    those whose id falls in this pass's turn, and those with a booting replica.
    O(workloads) at C speed."""
    turn = deps.memory.passes % PROBE_EVERY
    ids = [i for i in fleet.by_id if i % PROBE_EVERY == turn]
    ids.extend(i for i in fleet.booting if i % PROBE_EVERY != turn)
    return ids


def _listing_moved(deps: Deps, observed: Observation) -> set[str] | None:
    """The instance ids whose state the providers' lists show otherwise than last
    pass (new, gone or moved); ``None``: the set of providers that answered changed
    (every workload is compared). O(instances listed)."""
    memory = deps.memory
    states = observed.states
    last, memory.listed = memory.listed, states
    if last is None or last.keys() != states.keys():
        return None
    moved: set[str] = set()
    for name, now_states in states.items():
        before = last[name]
        if now_states != before:
            moved.update(instance_id for instance_id, _ in now_states.items() ^ before.items())
    return moved


def _maybe_moved(
    deps: Deps,
    fleet: Fleet,
    observed: Observation,
    *,
    moved: set[str],
    changed: AbstractSet[int],
    now: datetime,
) -> set[int]:
    """The workloads a pass after an incremental read compares: those whose facts
    changed, those the last pass queued, those whose own timer or resync fell due, whose
    instance moved at the provider or has a spot notice, those quarantined or
    unrunnable, and the autoscaling ones (their decision reads the clock). Every other
    one was left alone by the last pass and nothing it is judged on moved since.
    O(those + the timers that fell due)."""
    memory = deps.memory
    ids = set(changed)
    ids |= memory.attention
    ids |= memory.autoscaling
    ids.update(memory.failures)
    ids.update(memory.unrunnable)
    by_instance = fleet.by_instance
    for instance_id in (*moved, *observed.notices):
        owner = by_instance.get(instance_id)
        if owner is not None:
            ids.add(owner)
    for heap in (memory.timers, memory.resyncs):
        while heap and heap[0][0] <= now:
            ids.add(heapq.heappop(heap)[1])
    return ids


def _next_timer(deps: Deps, due: AbstractSet[int]) -> datetime | None:
    """The earliest own timer of a workload not in ``due``: O(stale and due entries
    at the heap's top · log of its size)."""
    memory = deps.memory
    heap = memory.timers
    held: list[tuple[datetime, int]] = []
    found: datetime | None = None
    while heap:
        at, wid = heap[0]
        seen = memory.seen.get(wid)
        if seen is None or seen.due_at != at:
            heapq.heappop(heap)  # stale: a later step or decision moved it
            continue
        if wid in due:
            held.append(heapq.heappop(heap))
            continue
        found = at
        break
    for entry in held:
        heapq.heappush(heap, entry)
    return found


def _remember(deps: Deps, workload_id: int, seen: Seen) -> None:
    """Store what a pass saw of a workload and push its timers: O(log timers). The
    heaps are rebuilt from what is remembered when stale entries outnumber it."""
    memory = deps.memory
    memory.seen[workload_id] = seen
    if seen.due_at is not None:
        heapq.heappush(memory.timers, (seen.due_at, workload_id))
    heapq.heappush(memory.resyncs, (seen.resync_at, workload_id))
    limit = 2 * len(memory.seen) + 1024
    if len(memory.timers) > limit or len(memory.resyncs) > limit:
        memory.timers = [(x.due_at, i) for i, x in memory.seen.items() if x.due_at is not None]
        memory.resyncs = [(x.resync_at, i) for i, x in memory.seen.items()]
        heapq.heapify(memory.timers)
        heapq.heapify(memory.resyncs)


def _forget(deps: Deps, gone: Sequence[int], closed: Sequence[str]) -> None:
    """Drop what is remembered of workloads gone and rows closed: O(those)."""
    memory = deps.memory
    for workload_id in gone:
        memory.seen.pop(workload_id, None)
        memory.specs.pop(workload_id, None)
        memory.autoscaling.discard(workload_id)
    for launch_id in closed:
        memory.engine_keys.pop(launch_id, None)


def record_step(
    deps: Deps,
    workload: WorkloadFacts,
    *,
    quiet: bool,
    after: float | None,
    now: datetime,
    start_times: StartTimes | None = None,
    spot_closed: tuple[SpotLife, ...] | None = None,
) -> None:
    """Remember what a full step of ``workload`` (as the pass read it) left: O(1).
    ``start_times``: those its warm pool was planned with (``None``: no warm pool);
    ``spot_closed``: the closed spot machines its interruption rate read (``None``: it
    does not allow spot)."""
    period = deps.settings.resync_sec * (0.5 + 0.5 * ((workload.id * _SPREAD) % 1.0))
    seen = Seen(
        facts=workload,
        quiet=quiet,
        due_at=None if after is None else now + timedelta(seconds=after),
        resync_at=now + timedelta(seconds=period),
        start_times=start_times,
        spot_closed=spot_closed,
    )
    _remember(deps, workload.id, seen)


def last_facts(deps: Deps) -> Callable[[int], WorkloadFacts | None]:
    """The facts the last passes saw of a workload, by id (``fleet.read_fleet``'s
    ``previous``): O(1) per call."""
    seen = deps.memory.seen

    def facts(workload_id: int) -> WorkloadFacts | None:
        found = seen.get(workload_id)
        return None if found is None else found.facts

    return facts


def forget_step(deps: Deps, workload_id: int) -> None:
    """A step that failed or was cut: the workload is stepped in full next pass."""
    deps.memory.seen.pop(workload_id, None)


def _same_inputs(last: tuple[object, object], now: tuple[object, object]) -> bool:
    return last[0] == now[0] and last[1] is now[1]


def needs_step(deps: Deps, w: WorkloadFacts, *, observed: Observation, now: datetime) -> str | None:
    """Why ``w`` is stepped in full this pass, as far as its facts alone tell (rules 1-4
    and 6 of the module docstring, health aside); ``None``: it may be left alone."""
    memory = deps.memory
    seen = memory.seen.get(w.id)
    if seen is None or (seen.facts is not w and seen.facts != w):
        return "new or changed"
    if not seen.quiet:
        return "its last step had work"
    if (seen.due_at is not None and now >= seen.due_at) or now >= seen.resync_at:
        return "a timer is due"
    if w.deleted or w.id in memory.failures:
        return "deleted or quarantined"
    if w.id in memory.unrunnable:
        return "its spec cannot run"
    return replica_needs_step(deps, w, observed=observed)


def replica_needs_step(deps: Deps, w: WorkloadFacts, *, observed: Observation) -> str | None:
    """O(its rows); the reason a replica gives for a full step, if any."""
    memory = deps.memory
    listed = observed.by_provider
    for r in w.rows:
        phase = r.phase
        if phase not in _SETTLED or (phase is not Phase.READY and r.group_id is not None):
            return f"replica {r.launch_id} is {phase.value}"
        if phase is Phase.BOOTING and r.resumed_at is not None and r.park_mode is not None:
            return f"replica {r.launch_id} is resuming"  # a sleeping engine is woken each step
        if r.group_id is not None and _group_short(w, r):
            return f"replica group {r.group_id} is missing a member"
        if r.last_error is not None and r.last_error.startswith((SPOT_NOTICE, BOOT_FAILED)):
            return f"replica {r.launch_id} reported: {r.last_error}"
        if r.launch_id in memory.not_visible_since or r.launch_id in memory.unhealthy_since:
            return f"a grace period of replica {r.launch_id} is running"
        if r.instance_id is not None and r.instance_id in observed.notices:
            return f"a spot notice for replica {r.launch_id}"
        if r.worker_id is None and r.provider in listed:
            instance = listed[r.provider].get(r.instance_id or "")
            allowed = _allowed_states(r)
            if instance is None or instance.state not in allowed:
                return f"the provider does not show replica {r.launch_id} running"
            if r.url is None:
                return f"the engine URL of replica {r.launch_id} is not known yet"
    return None


def _allowed_states(r: RowFacts) -> frozenset[InstanceState]:
    """The states in which the provider's machine of ``r`` gives its step nothing to do
    (none: a parked replica of no known park mode)."""
    if r.phase is Phase.READY:
        return _RUNNING
    if r.phase is Phase.BOOTING:
        return _STARTING
    return _PARKED.get(r.park_mode, frozenset())


def _group_short(w: WorkloadFacts, row: RowFacts) -> bool:
    """Whether ``row``'s replica group has fewer open members than its size."""
    members = sum(1 for r in w.rows if r.group_id == row.group_id)
    return members != (row.group_size or 1)


def spec_of(deps: Deps, w: WorkloadFacts) -> WorkloadSpec | None:
    cached = deps.memory.specs.get(w.id)
    return cached[1] if cached is not None and cached[0] == w.spec_hash else None


async def load_specs(deps: Deps, workloads: Iterable[WorkloadFacts]) -> None:
    """Parse the stored specs not cached yet (one query); an invalid one is cached as
    ``None`` and its workload stepped in full (which reports it)."""
    missing = [w for w in workloads if spec_of(deps, w) is None and w.id not in deps.memory.specs]
    missing += [
        w
        for w in workloads
        if w.id in deps.memory.specs and deps.memory.specs[w.id][0] != w.spec_hash
    ]
    if not missing:
        return
    async with deps.sessions() as s:
        stored = await workload_specs(s, [w.id for w in missing])
    for w in missing:
        try:
            spec: WorkloadSpec | None = WorkloadSpec.model_validate(stored.get(w.id))
        except ValidationError:
            spec = None
        deps.memory.specs[w.id] = (w.spec_hash, spec)
        if spec is not None and isinstance(spec.execution_policy_config, AutoscalingPolicy):
            deps.memory.autoscaling.add(w.id)
        else:
            deps.memory.autoscaling.discard(w.id)


def _probe_targets(
    deps: Deps, workloads: Iterable[WorkloadFacts]
) -> Iterator[tuple[RowFacts, str]]:
    """The replicas whose health a full step would ask, with their health path (made
    one at a time: a list of them would outlive the batch's collections)."""
    for w in workloads:
        spec = spec_of(deps, w)
        assert spec is not None
        path = engine_for(spec.backend.value).health_path
        for r in w.rows:
            if _probed(r):
                yield r, path


def _probed(r: RowFacts) -> bool:
    return r.url is not None and r.group_role != "worker" and r.phase in _PROBED


async def probe(deps: Deps, workloads: Sequence[WorkloadFacts]) -> dict[str, bool]:
    """Each candidate replica's health answer by launch id: one batch for the pass, at
    most :data:`PROBES_AT_ONCE` in flight."""
    keys = deps.memory.engine_keys
    unknown = [
        r.launch_id for w in workloads for r in w.rows if r.launch_id not in keys and _probed(r)
    ]
    if unknown:
        async with deps.sessions() as s:
            keys.update(await engine_keys(s, unknown))
    answers: dict[str, bool] = {}
    queue = _probe_targets(deps, workloads)

    async def worker() -> None:
        for row, path in queue:
            answers[row.launch_id] = await deps.health.healthy(
                url=row.url or "", health_path=path, engine_key=keys.get(row.launch_id)
            )

    await asyncio.gather(*(worker() for _ in range(PROBES_AT_ONCE)))
    return answers


def health_as_left(w: WorkloadFacts, answers: Mapping[str, bool]) -> bool:
    """Whether every probed replica answers as its phase says (ready ones healthy,
    booting ones not yet): the full step's health check would then change nothing."""
    for r in w.rows:
        answer = answers.get(r.launch_id)
        if answer is not None and answer != (r.phase is Phase.READY):
            return False
    return True


def step_on_facts(
    deps: Deps,
    w: WorkloadFacts,
    *,
    spec: WorkloadSpec,
    measured: Measured,
    fleet: Fleet,
    fleet_usd_per_hour: float,
    now: datetime,
    start_times: StartTimes | None = None,
    spot_rate: SpotRate = PRIOR_SPOT_RATE,
) -> Step:
    """The controller's pure step on a workload's facts and measurement as the pass read
    them, without a store read of its own: the quiet check here and a pass's batch of launches
    (``reconcile.batch``) both run it. ``fleet_usd_per_hour`` is the fleet total the
    step weighs against the fleet ceiling; it counts only where a ceiling is set."""
    settings = deps.settings
    view = WorkloadView(
        spec=spec,
        generation=w.generation,
        replicas=replica_states(w.rows),
        measured=measured,
        offers=deps.offers(),
        inherited_usd_per_hour=fleet.inherited_prices(w),
        fleet_usd_per_hour=(
            fleet_usd_per_hour if settings.fleet_max_hourly_cost_usd is not None else 0.0
        ),
        start_times=start_times,
        spot_rate=spot_rate,
    )
    return step(
        view,
        memory=deps.memory.scale.get(w.id, ScaleMemory()),
        unavailable=deps.memory.unavailable,
        now=now,
        knobs=settings.knobs,
        memo=deps.memory.placements,
    )


def _decision_quiet(
    deps: Deps,
    w: WorkloadFacts,
    *,
    fleet: Fleet,
    signals: SignalsRead,
    now: datetime,
) -> bool:
    """Rule 5: a fixed or scheduled count changes only at its timers; an autoscaling
    workload's pure step is run on the facts read, and must plan, refuse and change
    nothing (its scaling memory is then kept, as the full step keeps it)."""
    spec = spec_of(deps, w)
    assert spec is not None
    policy = spec.execution_policy_config
    if not isinstance(policy, AutoscalingPolicy):
        return True
    memory = deps.memory
    seen = memory.seen[w.id]
    if policy.warm_pool is not None and seen.start_times is None:
        return False  # its plan reads start times its last full step did not read
    rate = PRIOR_SPOT_RATE
    if policy.allow_spot_instances:
        if seen.spot_closed is None:
            return False  # its spares read a spot record its last full step did not read
        rate = spot_rate([*seen.spot_closed, *open_spot_lives(w.rows)], now=now)
        deps.metrics.spot_rate.labels(w.project, w.slug).set(rate.per_hour)
    result = step_on_facts(
        deps,
        w,
        spec=spec,
        measured=signals_for((w.project, w.slug), signals, last_request_at=w.last_request_at),
        fleet=fleet,
        fleet_usd_per_hour=fleet.usd_per_hour,
        now=now,
        start_times=seen.start_times,
        spot_rate=rate,
    )
    decision, plan = result.decision, result.plan
    if plan.actions or plan.refusals or memory.last_desired.get(w.id) != decision.desired:
        return False
    if (decision.waits is not None) != (w.id in memory.waiting_on_signals):
        return False  # a wait on incomplete signals begins or ends: the full step logs it
    # Stored only when changed: a pass over a quiet fleet makes no long-lived objects.
    if memory.scale.get(w.id) != decision.memory:
        memory.scale[w.id] = decision.memory
    after = due_after(plan, decision, now=now)
    due_at = None if after is None else now + timedelta(seconds=after)
    if due_at != seen.due_at:
        _remember(deps, w.id, replace(seen, due_at=due_at))
    return True


def _forget_gone(deps: Deps, workloads: Sequence[WorkloadFacts]) -> None:
    """Drop what is remembered of workloads and rows no longer open: O(workloads + rows)."""
    memory = deps.memory
    ids = {w.id for w in workloads}
    for table in (memory.seen, memory.specs):
        for gone in [i for i in table if i not in ids]:
            del table[gone]
    memory.autoscaling &= ids
    launches = {r.launch_id for w in workloads for r in w.rows}
    for gone_launch in [k for k in memory.engine_keys if k not in launches]:
        del memory.engine_keys[gone_launch]
