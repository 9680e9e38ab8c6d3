"""The reconciler and the simulator run one workload step (``decide.step``): driven
through the same script (load up, a stock-out, a drain with requests still in flight, a
scale-down; on spot, machines reclaimed), they buy, drain and terminate the same
replicas at the same steps, and feed the step the same measured spot interruption rate
(``decide.spot_rate``), the reconciler from its ledger, the simulator from its machines."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from autoscaler.decide.inputs import measured_of
from autoscaler.decide.spot_rate import SpotRate
from autoscaler.reconcile import provisioner
from autoscaler.reconcile.liveness import spot_record
from autoscaler.sim.gateway import SimGateway
from autoscaler.sim.policies import ControllerPolicy
from autoscaler.sim.workload import sim_workload
from autoscaler.sim.world import CloudSettings
from autoscaler.sim.world import World as SimWorld
from autoscaler.spec import WorkloadSpec
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from gateway.window import SIGNAL_WINDOW_SEC, SignalSnapshot
from providers.base import Instance, InsufficientCapacity, LaunchRequest, SpotInterruption
from providers.fake import FakeProvider
from tests.reconcile.world import OFFERS, PROJECT, World, autoscaling

Action = tuple[str, ...]


def snapshot(now: float, **fields: Any) -> SignalSnapshot:
    """What the gateway answers at ``now`` (epoch seconds): nothing but ``fields``."""
    empty = SignalSnapshot(
        project=PROJECT,
        workload="bot",
        at=now,
        window_sec=SIGNAL_WINDOW_SEC,
        ttft_samples=(),
        requests_in_window=0,
        in_flight=0,
        queued=0,
        cold_start_waiting=0,
        async_queue_depth=0,
        last_request_at=now,
    )
    return replace(empty, **fields)


def idle(now: float) -> SignalSnapshot:
    return snapshot(now)


def busy(now: float) -> SignalSnapshot:
    """Ten requests a second answered over the last minute and 200 queued."""
    samples = tuple((now - (599 - i) * 0.1, 0.4) for i in range(600))
    return snapshot(
        now,
        ttft_samples=samples,
        requests_in_window=round(10.0 * SIGNAL_WINDOW_SEC),
        in_flight=40,
        queued=200,
    )


@dataclass(frozen=True)
class Beat:
    """One step of the script: seconds since the last, the gateway's signals, requests
    in flight on each draining replica, and whether the step's first launch stocks out."""

    after_s: float
    signals: Callable[[float], SignalSnapshot]
    draining_in_flight: int = 0
    stockout: bool = False
    interrupt: int | None = None
    """The replica (by the order it was bought in) the provider reclaims before the step."""
    warn: int | None = None
    """The replica (by the order it was bought in) its provider warns, before the step,
    that it reclaims the machine in :data:`WARNING_LEAD_S`."""
    untimed: bool = False
    """That warning does not say when (a provider of unknown lead: the reconciler has
    the notice recorded with no ``reclaim_at``, as the boot callback records one)."""


WARNING_LEAD_S = 120.0
"""EC2's lead between its spot interruption warning and the reclaim."""


SCRIPT = (
    Beat(0, idle, stockout=True),  # min_workers 1; the first choice is stocked out
    Beat(5, idle),  # placed elsewhere
    Beat(5, busy),  # load up: several launches in one step
    *(Beat(5, idle) for _ in range(13)),  # calm for the scale-down window: drain two
    Beat(5, idle, draining_in_flight=2),  # the drained replicas still serve: kept
    Beat(5, idle),  # their requests are done: terminated
)


SPOT_SCRIPT = (
    Beat(0, idle),  # one spot replica
    Beat(5, busy),  # load up
    Beat(1800, busy),  # half an hour of spot machine-hours
    Beat(5, busy, interrupt=0),  # reclaimed: replaced away from its market
    Beat(1800, busy),
    Beat(5, busy, interrupt=2),
    Beat(600, busy),
    Beat(5, idle),
)


POOL_SCRIPT = (
    Beat(0, idle),  # woken from zero: one spot replica serves
    Beat(5, idle),  # the pool's refill: one more
    Beat(5, idle),  # the refill is ready: drained
    Beat(5, idle),  # drained: put to sleep
    Beat(5, idle, warn=1),  # warned asleep: released, the pool refilled on another market
    Beat(5, idle),
    Beat(5, idle),
    Beat(5, busy),  # load: the new pool member is woken, never the warned one
)


UNTIMED_SCRIPT = (
    Beat(0, idle),  # woken from zero: one spot replica
    Beat(5, idle),  # it serves; the pool's refill is bought
    Beat(5, idle, warn=0, untimed=True),  # warned, no time given: drained at once
    Beat(5, idle),
    Beat(5, idle),
    Beat(5, idle),
)


UNTIMED_WARNING = "spot interruption warning: reclaim time not given"


def spec(*, spot: bool = False) -> WorkloadSpec:
    return autoscaling(
        "bot", max_workers=4, scale_down_time_window_sec=60, allow_spot_instances=spot
    )


def pooled_spec(*, spot: bool = True) -> WorkloadSpec:
    """Scales to zero and keeps one sleeping engine as warm capacity (vLLM)."""
    base = autoscaling(
        "bot",
        min_workers=0,
        max_workers=4,
        scale_to_zero=True,
        scale_to_zero_timeout_sec=60,
        scale_down_time_window_sec=60,
        allow_spot_instances=spot,
        warm_pool={"sleeping": 1},
    ).model_dump(mode="json", exclude_unset=True)
    return WorkloadSpec.model_validate({**base, "backend": "vllm"})


def measured(rate: SpotRate) -> tuple[int, float]:
    return rate.interruptions, round(rate.hours, 9)


@dataclass
class Ordinals:
    """Launch ids by the order they were bought in (the two sides name launches apart)."""

    ids: list[str] = field(default_factory=list)

    def of(self, launch_id: str) -> str:
        return f"#{self.ids.index(launch_id)}"


KINDS = ("drain", "terminate", "park", "resume")
"""The decisions compared, besides launches."""


class WarningProvider(FakeProvider):
    """The fake cloud with a spot notice queue (EC2's through EventBridge and SQS)."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")
        self.queue: list[SpotInterruption] = []

    async def spot_notices(self, cluster_id: str) -> list[SpotInterruption]:
        read, self.queue = self.queue, []
        return read


async def run_reconciler(
    world: World,
    script: tuple[Beat, ...] = SCRIPT,
    *,
    spot: bool = False,
    workload: WorkloadSpec | None = None,
) -> tuple[list[list[Action]], list[tuple[int, float]]]:
    """The actions of each step, and the spot record each step read."""
    ref = (PROJECT, "bot")
    warnings = WarningProvider(world)
    world.provider = warnings
    world.deps = world.make_deps(provider=warnings)
    workload_id = await world.apply(workload or spec(spot=spot))
    bought = Ordinals()
    seen_calls = 0
    seen_decisions = 0
    steps: list[list[Action]] = []
    rates: list[tuple[int, float]] = []
    for beat in script:
        world.clock.advance(beat.after_s)
        if beat.interrupt is not None:
            [row] = [
                r for r in await world.rows("bot") if r.launch_id == bought.ids[beat.interrupt]
            ]
            world.cloud.interrupt(row.instance_id or "")
        if beat.warn is not None and beat.untimed:
            async with world.sessions() as s, s.begin():
                await s.execute(
                    update(LedgerRow)
                    .where(LedgerRow.launch_id == bought.ids[beat.warn])
                    .values(last_error=f"{SPOT_NOTICE}{UNTIMED_WARNING}")
                )
        elif beat.warn is not None:
            [row] = [r for r in await world.rows("bot") if r.launch_id == bought.ids[beat.warn]]
            instance = world.cloud.get(row.instance_id or "")
            warnings.queue.append(
                SpotInterruption(
                    instance_id=instance.instance_id,
                    launch_id=row.launch_id,
                    zone=instance.zone,
                    instance_type=instance.instance_type,
                    noticed_at=world.now,
                    reclaim_at=world.now + timedelta(seconds=WARNING_LEAD_S),
                    reason="EC2 Spot Instance Interruption Warning",
                )
            )
        rows = await world.rows("bot")
        draining = [r.launch_id for r in rows if phase_of(r) is Phase.DRAINING]
        answer = beat.signals(world.now.timestamp())
        in_flight = dict.fromkeys(draining, beat.draining_in_flight)
        world.signals.measured[ref] = measured_of(replace(answer, replica_in_flight=in_flight))
        if beat.stockout:
            world.provider.fail_next("launch", InsufficientCapacity)
        await world.step()
        actions: list[Action] = []
        rows_by_id = {r.launch_id: r for r in await world.rows("bot")}
        for call in world.provider.calls_to("launch")[seen_calls:]:
            assert isinstance(call.argument, LaunchRequest)
            request = call.argument
            ok = rows_by_id[request.launch_id].instance_id is not None
            if ok:
                bought.ids.append(request.launch_id)
            actions.append(("launch", request.offer.key, str(request.spot), str(ok)))
        seen_calls = len(world.provider.calls_to("launch"))
        decisions = await world.decisions()
        for decision in decisions[seen_decisions:]:
            if decision.kind in KINDS:
                actions.append((decision.kind, bought.of(decision.inputs["launch_id"])))
        seen_decisions = len(decisions)
        steps.append(actions)
        async with world.sessions() as s:
            rates.append(measured(await spot_record(s, workload_id, now=world.now)))
    return steps, rates


class ScriptedGateway(SimGateway):
    """The simulator's gateway with the script's answers."""

    script: SignalSnapshot | None = None

    def snapshot(self, t: float) -> SignalSnapshot:
        assert self.script is not None
        return self.script


def run_simulator(
    script: tuple[Beat, ...] = SCRIPT, *, spot: bool = False, workload: WorkloadSpec | None = None
) -> tuple[list[list[Action]], list[tuple[int, float]]]:
    workload = workload or spec(spot=spot)
    world = SimWorld(
        workload=sim_workload(workload),
        offers=OFFERS,
        policy=ControllerPolicy(spec=workload),
        requests=[],
        seed=0,
        cloud=CloudSettings(
            boot_median_s=1.0,
            boot_sigma=0.0,
            stockout_probability=0.0,
            spot_interruptions_per_hour=0.0,
        ),
        allow_spot=spot,
        initial_replicas=0,
    )
    gateway = ScriptedGateway(rng=world.gateway.rng, epoch_s=world.gateway.epoch_s)
    world.gateway = gateway
    calls: list[tuple[LaunchRequest, bool]] = []
    stockout = [False]
    launch = world.cloud.launch

    def scripted_launch(request: LaunchRequest) -> Instance:
        if stockout[0]:
            stockout[0] = False
            calls.append((request, False))
            raise InsufficientCapacity("launch", "injected")
        calls.append((request, True))
        return launch(request)

    world.cloud.launch = scripted_launch  # type: ignore[method-assign]
    bought = Ordinals()
    t = 0.0
    seen_calls = 0
    seen_events = 0
    steps: list[list[Action]] = []
    rates: list[tuple[int, float]] = []
    for beat in script:
        t += beat.after_s
        world._set_time(t)
        if beat.interrupt is not None:
            world.replicas[bought.ids[beat.interrupt]].interrupt_s = t
        if beat.warn is not None:
            warned = world.replicas[bought.ids[beat.warn]]
            warned.notice_s, warned.interrupt_s = t, t + WARNING_LEAD_S
            warned.reclaim_known = not beat.untimed
        world._machine_events(t)
        draining = [
            r.launch_id
            for r in world.replicas.values()
            if r.ended_s is None and r.drain_s is not None
        ]
        in_flight = dict.fromkeys(draining, beat.draining_in_flight)
        gateway.script = replace(beat.signals(world.clock.t), replica_in_flight=in_flight)
        stockout[0] = beat.stockout
        world._tick(t)
        actions: list[Action] = []
        for request, ok in calls[seen_calls:]:
            if ok:
                bought.ids.append(request.launch_id)
            actions.append(("launch", request.offer.key, str(request.spot), str(ok)))
        seen_calls = len(calls)
        for event in world.events[seen_events:]:
            if event.kind in KINDS:
                launch_id = event.detail.split(":")[0].split()[0]  # "l-00001 sleeping: …"
                actions.append((event.kind, bought.of(launch_id)))
        seen_events = len(world.events)
        steps.append(actions)
        rates.append(measured(world._view_now(t).spot_rate))
    return steps, rates


async def test_the_reconciler_and_the_simulator_act_alike_on_one_script(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Launch ids as the simulator names them: drains of equal price and age go in launch
    # id order, so both sides must name their launches alike to pick the same ones.
    names = (f"l-{n:05d}" for n in itertools.count(1))
    monkeypatch.setattr(provisioner, "new_launch_id", lambda: next(names))
    reconciler, _ = await run_reconciler(world)
    simulator, _ = run_simulator()

    assert reconciler == simulator
    launches = [a for step in reconciler for a in step if a[0] == "launch"]
    # The stocked-out market is skipped and the launch placed elsewhere a step later.
    assert launches[0][3] == "False" and reconciler[1] and launches[1][1] != launches[0][1]
    # Load up: more than one launch in one step, each placed in turn.
    assert len([a for a in reconciler[2] if a[0] == "launch"]) >= 2
    drains = [a for step in reconciler for a in step if a[0] == "drain"]
    terminations = [a for step in reconciler for a in step if a[0] == "terminate"]
    assert drains, reconciler
    # Drained replicas with requests in flight are kept; terminated once they are done.
    assert not [a for a in reconciler[-2] if a[0] == "terminate"]
    assert sorted(a[1] for a in reconciler[-1] if a[0] == "terminate") == sorted(
        a[1] for a in drains
    )
    assert len(terminations) == len(drains)


async def test_on_spot_both_measure_the_same_interruption_rate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Machines reclaimed by the provider: each side counts them, and the spot
    machine-hours, from its own record; the step reads the same rate on both."""
    names = (f"l-{n:05d}" for n in itertools.count(1))
    monkeypatch.setattr(provisioner, "new_launch_id", lambda: next(names))
    reconciler, reconciler_rates = await run_reconciler(world, SPOT_SCRIPT, spot=True)
    simulator, simulator_rates = run_simulator(SPOT_SCRIPT, spot=True)

    assert reconciler == simulator
    assert reconciler_rates == simulator_rates
    launches = [a for step in reconciler for a in step if a[0] == "launch"]
    assert launches and all(a[2] == "True" for a in launches[:4])  # bought on spot
    interruptions, hours = reconciler_rates[-1]
    assert interruptions == 2
    assert hours > 2.0  # four machines for most of an hour, and more
    assert [n for n, _ in reconciler_rates] == [0, 0, 0, 1, 1, 2, 2, 2]
    registry = world.deps.metrics.registry
    labels = {"project": PROJECT, "workload": "bot"}
    fed = registry.get_sample_value(
        "autoscaler_controller_workload_spot_interruptions_per_hour", labels
    )
    assert fed == pytest.approx(SpotRate(interruptions, hours).per_hour)


async def test_a_warned_spot_engine_asleep_in_the_pool_is_released_alike(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spot machine whose engine sleeps in the warm pool is warned of its reclaim: on
    both sides its market is skipped, it is terminated (not kept, never woken) and the
    pool refilled on another market; the load then wakes the new member."""
    names = (f"l-{n:05d}" for n in itertools.count(1))
    monkeypatch.setattr(provisioner, "new_launch_id", lambda: next(names))
    reconciler, _ = await run_reconciler(world, POOL_SCRIPT, workload=pooled_spec())
    simulator, _ = run_simulator(POOL_SCRIPT, spot=True, workload=pooled_spec())

    assert reconciler == simulator
    spot_market = reconciler[1][0][1:3]
    assert reconciler[1] == [("launch", *spot_market, "True")] and spot_market[1] == "True"
    assert reconciler[2:4] == [[("drain", "#1")], [("park", "#1")]]
    # At the warning: released, and the pool's refill bought away from its spot market.
    warned_step = reconciler[4]
    assert ("terminate", "#1") in warned_step
    [refill] = [a for a in warned_step if a[0] == "launch"]
    assert refill[1:3] != spot_market
    everything = [a for step in reconciler for a in step]
    assert ("resume", "#1") not in everything
    assert ("resume", "#2") in reconciler[-1]  # the load woke the pool's new member
    # Ended as any replica is: the provider asked, the row closed on its word.
    [decision] = await world.decisions("terminate")
    assert "parked in the warm pool: released, not resumed" in decision.reason
    [warned] = [r for r in await world.rows("bot") if r.launch_id == decision.inputs["launch_id"]]
    assert [c.argument for c in world.provider.calls_to("terminate")] == [warned.instance_id]
    assert warned.terminated_confirmed_at is not None
    registry = world.deps.metrics.registry
    assert (
        registry.get_sample_value(
            "autoscaler_controller_spot_notices_total", {"provider": "aws", "source": "queue"}
        )
        == 1
    )


async def test_a_spot_warning_without_a_time_drains_at_once_and_never_parks_alike(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving spot replica is warned with no reclaim time while its warm pool has room:
    on both sides it is drained at once and terminated once drained, never put to sleep
    in the pool; the pool is filled by its own refill."""
    names = (f"l-{n:05d}" for n in itertools.count(1))
    monkeypatch.setattr(provisioner, "new_launch_id", lambda: next(names))
    reconciler, _ = await run_reconciler(world, UNTIMED_SCRIPT, workload=pooled_spec())
    simulator, _ = run_simulator(UNTIMED_SCRIPT, spot=True, workload=pooled_spec())

    assert reconciler == simulator
    # At the warning: replaced (off its skipped spot market), drained and, empty, ended.
    warned_step = reconciler[2]
    assert [a[0] for a in warned_step if a[1] == "#0"] == ["drain", "terminate"]
    [replacement] = [a for a in warned_step if a[0] == "launch"]
    assert replacement[2] == "False"
    everything = [a for step in reconciler for a in step]
    assert ("park", "#0") not in everything
    assert ("park", "#1") in everything  # the pool had room: its refill fills it
    [warned] = [r for r in await world.rows("bot") if (r.last_error or "").startswith(SPOT_NOTICE)]
    assert warned.reclaim_at is None and warned.park_requested_at is None
    [ended] = [
        d for d in await world.decisions("terminate") if d.inputs["launch_id"] == warned.launch_id
    ]
    assert "not parked: its machine is reclaimed at a time not known" in ended.reason
