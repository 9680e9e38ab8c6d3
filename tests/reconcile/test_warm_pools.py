"""Warm pools carried out: replicas parked (stopped machines, sleeping engines) and
resumed through the reconciler, on the fake cloud and a manual clock, with the money
invariants: nothing marked parked before the provider or engine confirms it, a stopped
machine's disks count against every ceiling, a stopped machine of ours is no orphan, and
a controller killed between asking and confirming converges from the ledger and the
provider."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from autoscaler.api.views import instance_view
from autoscaler.decide.signals import Signals
from autoscaler.decide.warm import DEFAULT_START_TIMES, start_times_from
from autoscaler.reconcile.ledger import fleet_usd_per_hour, recent_start_samples
from autoscaler.spec import WorkloadSpec
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase, phase_of
from catalog.storage import stopped_usd_per_hour
from gateway.routes import load_routes
from providers.base import Instance, InstanceState
from providers.fake import FakeProvider
from tests.reconcile.world import OFFERS, PROJECT, World, autoscaling

STOPPED_USD = stopped_usd_per_hour(OFFERS[0])  # every test offer is an EC2 one
FRESH_S = 150.0
"""How long the tests' fresh machines take to be ready: an automatic pool holds a parked
replica only while its path is faster than that (``decide.warm``'s hold rule reads the
measured start times)."""


class Crash(BaseException):
    """The controller dies here (as under SIGKILL): nothing after the call runs."""


class CrashingProvider(FakeProvider):
    """Does what it is asked, then kills the controller before the answer is used."""

    def __init__(self, world: World, *, on: str) -> None:
        super().__init__(world.cloud, name="aws")
        self.on = on

    async def stop(self, instance_id: str) -> None:
        await super().stop(instance_id)
        if self.on == "stop":
            raise Crash

    async def start(self, instance_id: str) -> Instance:
        if self.on == "start":
            raise Crash  # the resume is on record; the provider never heard of it
        return await super().start(instance_id)


def pooled(slug: str = "bot", *, backend: str = "vllm", **policy: Any) -> WorkloadSpec:
    """An autoscaling workload that scales to zero, with a warm pool (one stopped
    machine unless ``warm_pool`` says otherwise)."""
    config: dict[str, Any] = {
        "min_workers": 0,
        "scale_to_zero": True,
        "scale_to_zero_timeout_sec": 60,
        "warm_pool": {"stopped": 1},
    }
    config.update(policy)
    spec = autoscaling(slug, **config).model_dump(mode="json", exclude_unset=True)
    return WorkloadSpec.model_validate({**spec, "backend": backend})


def idle(world: World, slug: str = "bot") -> None:
    long_ago = world.now - timedelta(hours=1)
    world.signals.by_ref[(PROJECT, slug)] = Signals(last_request_at=long_ago)


def waiting(world: World, slug: str = "bot") -> None:
    world.signals.by_ref[(PROJECT, slug)] = Signals(queue_depth=1, last_request_at=world.now)


async def _parked(world: World, slug: str = "bot") -> LedgerRow:
    """Refill an explicit stopped pool of one: launched, ready, drained, stopped."""
    await world.apply(pooled(slug))
    idle(world, slug)
    for _ in range(6):
        await world.step(5)
        if await world.phases(slug) == [Phase.PARKED]:
            break
    [row] = await world.rows(slug)
    assert phase_of(row) is Phase.PARKED and row.park_mode == "stopped" and row.prefill
    return row


async def test_an_explicit_pool_is_refilled_and_its_machine_stopped(world: World) -> None:
    row = await _parked(world)
    [instance] = world.cloud.all()
    assert instance.state is InstanceState.STOPPED
    assert world.provider.calls_to("stop") and not world.provider.calls_to("terminate")
    # Billed for its disks from the provider's confirmation, its running price kept.
    assert row.hourly_usd == pytest.approx(STOPPED_USD)
    assert row.running_usd_per_hour is not None and row.running_usd_per_hour > 0.5
    [park] = await world.decisions("park")
    assert "warm pool" in park.reason and park.result["mode"] == "stopped"
    metrics = world.deps.metrics
    assert metrics.parked.labels(PROJECT, "bot", "stopped")._value.get() == 1
    assert metrics.parks.labels("aws", "stopped")._value.get() == 1


async def _routed(world: World) -> list[str]:
    """The launch ids the gateway routes the workload to (its route table's query)."""
    async with world.sessions() as s:
        routes = await load_routes(s, now=world.now)
    route = routes.get((PROJECT, "bot"))
    return [] if route is None else [r.key for r in route.replicas]


async def test_scale_up_resumes_the_stopped_machine_before_buying(world: World) -> None:
    parked = await _parked(world)
    assert await _routed(world) == []  # parked: off the routes
    waiting(world)
    changes = world.changes
    await world.step(5)
    [row] = await world.rows("bot")  # a parked replica is resumed, not a fresh one bought
    assert world.provider.calls_to("start") and len(world.provider.calls_to("launch")) == 1
    assert row.resumed_at is not None and row.hourly_usd == parked.running_usd_per_hour
    [resume] = await world.decisions("resume")
    assert "resume the stopped replica" in resume.reason
    await world.step(5)
    resumed, refill = await world.rows("bot")
    assert phase_of(resumed) is Phase.READY and world.changes > changes
    assert resumed.launch_id == parked.launch_id and resumed.park_requested_at is None
    assert refill.prefill  # the pool it left is refilled by a fresh replica
    assert await _routed(world) == [parked.launch_id]  # ready again: routed again
    instance = next(i for i in world.cloud.all() if i.launch_id == parked.launch_id)
    assert instance.state is InstanceState.RUNNING
    metrics = world.deps.metrics
    assert metrics.resumes.labels("aws", "stopped")._value.get() == 1
    assert metrics.resume_to_ready.labels("aws", "stopped")._sum.get() == 5
    # Measured per path from the ledger's facts: what the next step's hold rule reads.
    assert instance_view(resumed, world.now)["start"] == {"path": "start", "seconds": 5.0}
    async with world.sessions() as s:
        measured = start_times_from(await recent_start_samples(s, resumed.workload_id))
    assert measured is not None and measured.start_s == 5.0
    # Its launch sample gave way to its start; the new refill is not ready yet.
    assert measured.fresh_s == DEFAULT_START_TIMES.fresh_s
    assert measured.wake_s == DEFAULT_START_TIMES.wake_s  # nothing woken yet


async def test_scale_down_parks_instead_of_terminating(world: World) -> None:
    await world.apply(pooled(warm_pool="auto", backend="sglang"))
    waiting(world)
    await world.step()
    await world.step(FRESH_S)  # ready: a fresh machine's start is measured
    assert await world.phases("bot") == [Phase.READY]
    idle(world)
    for _ in range(4):
        await world.step(70)
    assert await world.phases("bot") == [Phase.PARKED]
    [row] = await world.rows("bot")
    assert row.park_mode == "stopped"  # sglang is not driven to sleep: stopped
    assert not world.provider.calls_to("terminate")
    [park] = await world.decisions("park")
    assert park.reason.startswith("drained: no request in flight")
    assert f"stopped at ${STOPPED_USD:.4g}/h instead of $1.86/h" in park.reason


async def test_a_stop_not_confirmed_is_not_marked_parked(world: World) -> None:
    world.cloud.stop_seconds = 120  # STOPPING for two minutes
    await world.apply(pooled())
    idle(world)
    for _ in range(4):
        await world.step(5)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKING
    assert row.parked_at is None and row.hourly_usd > 0.5  # still billed running
    assert await _routed(world) == []  # off the routes from the request on
    async with world.sessions() as s:
        assert await fleet_usd_per_hour(s) == pytest.approx(row.hourly_usd)
    await world.step(60)
    assert await world.phases("bot") == [Phase.PARKING]
    await world.step(61)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKED and row.hourly_usd == pytest.approx(STOPPED_USD)


async def test_a_controller_killed_between_stop_and_confirm_converges(world: World) -> None:
    world.deps = world.make_deps(provider=CrashingProvider(world, on="stop"))
    await world.apply(pooled())
    idle(world)
    await world.step(5)  # the refill is launched
    await world.step(5)  # ready: drained
    with pytest.raises(Crash):
        await world.step(5)  # drained: parked, the stop asked, the controller killed
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKING and row.parked_at is None  # asked, not confirmed
    world.deps = world.make_deps()  # a new controller: no memory but the ledger
    await world.step(5)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKED and row.hourly_usd == pytest.approx(STOPPED_USD)
    assert len(world.cloud.all()) == 1


async def test_a_controller_killed_between_resume_and_start_converges(world: World) -> None:
    await _parked(world)
    world.deps = world.make_deps(provider=CrashingProvider(world, on="start"))
    waiting(world)
    with pytest.raises(Crash):
        await world.step(5)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.BOOTING and row.resumed_at is not None
    assert world.cloud.all()[0].state is InstanceState.STOPPED
    world.deps = world.make_deps()
    await world.step(5)  # the machine is still stopped: started again
    await world.step(5)
    resumed = next(r for r in await world.rows("bot") if r.launch_id == row.launch_id)
    assert phase_of(resumed) is Phase.READY
    [instance] = [i for i in world.cloud.all() if i.launch_id == row.launch_id]
    assert instance.state is InstanceState.RUNNING
    assert len(world.provider.calls_to("start")) == 1  # the new controller's


async def test_a_stopped_machine_counts_its_disks_against_the_fleet_ceiling(
    tmp_path: Any,
) -> None:
    from autoscaler.store.db import open_store, session_factory

    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        # Room for one L40S and nothing more: the parked machine's disks take the rest.
        world = World(session_factory(engine), fleet_ceiling=1.86 + STOPPED_USD / 2)
        await _parked(world)
        async with world.sessions() as s:
            assert await fleet_usd_per_hour(s) == pytest.approx(STOPPED_USD)
        other = autoscaling(
            "other",
            min_workers=1,
            workers={"source": "cloud", "cloud_pool": {"gpu_pool": ["NVIDIA L40S"]}},
        )
        await world.apply(other)
        await world.step(5)
        assert await world.rows("other") == []
        [refused] = await world.decisions("refused")
        assert "fleet" in refused.reason


async def test_the_orphan_sweep_leaves_a_stopped_machine_of_ours_alone(world: World) -> None:
    await _parked(world)
    for _ in range(3):
        await world.step(400)  # past the orphan grace
    assert [i.state for i in world.cloud.all()] == [InstanceState.STOPPED]
    assert not world.provider.calls_to("terminate")
    assert await world.phases("bot") == [Phase.PARKED]


async def test_a_deleted_workload_terminates_its_stopped_machine(world: World) -> None:
    await _parked(world)
    await world.delete("bot")
    await world.step(5)
    await world.step(5)
    assert await world.phases("bot") == [Phase.TERMINATED]
    assert not world.live_instances()


async def test_an_engine_sleeps_and_wakes_through_the_reconciler(world: World) -> None:
    await world.apply(pooled(warm_pool="auto"))
    waiting(world)
    await world.step()
    await world.step(FRESH_S)  # ready: a fresh machine's start is measured
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.READY
    assert "--enable-sleep-mode" in (row.engine_command or [])  # booted able to sleep
    running = row.hourly_usd
    idle(world)
    for _ in range(4):
        await world.step(70)
        if await world.phases("bot") == [Phase.PARKED]:
            break
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKED and row.park_mode == "sleeping"
    assert row.url in world.sleeper.asleep and row.hourly_usd == running  # the machine runs
    assert not world.provider.calls_to("stop")

    waiting(world)
    await world.step(5)  # woken
    await world.step(1)  # its health checked
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.READY and row.url not in world.sleeper.asleep
    assert len(world.provider.calls_to("launch")) == 1
    assert world.deps.metrics.resume_to_ready.labels("aws", "sleeping")._sum.get() == 1


async def _asleep(world: World) -> LedgerRow:
    """An automatic pool's replica made ready by a fresh machine (its start measured),
    then idle until it is parked with its engine asleep."""
    await world.apply(pooled(warm_pool="auto"))
    waiting(world)
    await world.step()
    await world.step(FRESH_S)  # ready: a fresh machine's start is measured
    idle(world)
    for _ in range(4):
        await world.step(70)
        if await world.phases("bot") == [Phase.PARKED]:
            break
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKED and row.park_mode == "sleeping"
    return row


async def test_a_resumed_engine_that_still_sleeps_is_not_made_ready(world: World) -> None:
    await _asleep(world)
    world.sleeper.refuse = True  # the wake call fails: the engine sleeps on
    waiting(world)
    await world.step(5)
    await world.step(5)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.BOOTING  # a sleeping vLLM answers /health: not ready
    world.sleeper.refuse = False
    await world.step(5)
    assert await world.phases("bot") == [Phase.READY]


async def test_a_wake_that_outlasts_a_pass_is_asked_once_and_carried_on(world: World) -> None:
    # A level-2 wake of a large model reads its weights from disk for longer than a pass
    # waits; asked again each pass, the engine would queue a reload behind each reload.
    await _asleep(world)
    world.sleeper.wake_gate = asyncio.Event()
    world.deps.wakes.wait_sec = 0.01
    waiting(world)
    for _ in range(3):
        await world.step(5)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.BOOTING and row.last_error is None  # waking, not failed
    wakes = [call for call in world.sleeper.calls if call[0] == "wake"]
    assert wakes == [("wake", row.url)]  # once, carried on across the passes
    assert world.deps.wakes.under_way(row.launch_id)
    world.sleeper.wake_gate.set()
    await world.step(5)  # the wake's end learnt
    await world.step(1)  # its health checked
    assert await world.phases("bot") == [Phase.READY]
    assert [call for call in world.sleeper.calls if call[0] == "wake"] == wakes
    assert not world.deps.wakes.under_way(row.launch_id)
    assert len(world.provider.calls_to("launch")) == 1


async def test_a_sleep_not_confirmed_is_not_marked_parked(world: World) -> None:
    await world.apply(pooled(warm_pool="auto"))
    waiting(world)
    await world.step()
    await world.step(FRESH_S)  # ready: a fresh machine's start is measured
    world.sleeper.refuse = True  # the engine does not answer its sleep calls
    idle(world)
    for _ in range(2):
        await world.step(70)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKING and row.parked_at is None
    assert world.sleeper.calls[-1][0] == "is_sleeping"  # asked again each pass
    await world.step(70)  # past scaling_down_timeout_sec: given up, terminated
    assert await world.phases("bot") == [Phase.TERMINATING]
    [terminate] = await world.decisions("terminate")
    assert terminate.reason.startswith("park not confirmed: sleeping asked")


async def test_the_scale_decision_counts_no_refill_as_booting(world: World) -> None:
    await world.apply(pooled())
    idle(world)
    await world.step()  # the pool's refill is bought: it boots, to be parked, not served
    [refill] = await world.rows("bot")
    assert refill.prefill and phase_of(refill) is Phase.BOOTING

    waiting(world)  # a request comes: the scale-up does not wait for the refill
    await world.step(5)

    up = [d for d in await world.decisions("scale") if d.result["desired"] == 1]
    assert up and up[0].inputs["booting"] == 0 and up[0].inputs["ready"] == 0


async def test_a_parked_machine_started_in_a_console_is_billed_running_and_stopped_again(
    world: World,
) -> None:
    parked = await _parked(world)
    assert parked.instance_id is not None and parked.running_usd_per_hour is not None
    world.cloud.stop_seconds = 20  # a stop takes a while: seen STOPPING between passes
    world.cloud.start(parked.instance_id, action="console")  # not the controller's start
    await world.step(5)
    [row] = await world.rows("bot")
    # It bills its running price: every ceiling counts that until it shows stopped again.
    assert phase_of(row) is Phase.PARKING and row.parked_at is None
    assert row.hourly_usd == pytest.approx(parked.running_usd_per_hour)
    async with world.sessions() as s:
        assert await fleet_usd_per_hour(s) == pytest.approx(parked.running_usd_per_hour)
    assert await _routed(world) == []
    _first, again = await world.decisions("park")
    assert "started outside the controller" in again.reason
    assert again.cost_delta_usd_per_hour == pytest.approx(parked.running_usd_per_hour - STOPPED_USD)
    await world.step(25)
    [row] = await world.rows("bot")
    assert phase_of(row) is Phase.PARKED and row.hourly_usd == pytest.approx(STOPPED_USD)
    assert [i.state for i in world.cloud.all()] == [InstanceState.STOPPED]
    assert not world.provider.calls_to("terminate")


class MovingProvider(FakeProvider):
    """Starts the machine at a new address, then kills the controller before it reads it."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")

    async def start(self, instance_id: str) -> Instance:
        await super().start(instance_id)
        self.cloud.replace_instance(instance_id, private_address="10.9.9.9")
        raise Crash


async def test_a_resume_killed_after_the_start_reads_the_new_address(world: World) -> None:
    parked = await _parked(world)
    world.deps = world.make_deps(provider=MovingProvider(world))
    waiting(world)
    with pytest.raises(Crash):
        await world.step(5)  # started at a new address; the controller died before reading it
    world.deps = world.make_deps()
    await world.step(5)
    await world.step(5)
    resumed = next(r for r in await world.rows("bot") if r.launch_id == parked.launch_id)
    assert resumed.url is not None and resumed.url.startswith("http://10.9.9.9:")
    assert phase_of(resumed) is Phase.READY


async def test_a_spot_notice_on_an_engine_whose_sleep_fails_is_still_heeded(
    world: World,
) -> None:
    """The park settles before the pass reads the notices: a sleep call that failed in
    the pass that first saw a warning used to overwrite the warning with its own error,
    and the warned machine was never released nor its market skipped."""
    from sqlalchemy import update

    from autoscaler.store.phase import SPOT_NOTICE

    spec = pooled(
        allow_spot_instances=True,
        max_hourly_cost_usd=10.0,
        warm_pool={"stopped": 0, "sleeping": 1},
    )
    await world.apply(spec)
    waiting(world)
    await world.step()
    await world.step(5)  # ready
    world.sleeper.refuse = True  # its sleep calls fail from now on
    idle(world)
    for _ in range(4):
        await world.step(30)
        parking = [r for r in await world.rows("bot") if phase_of(r) is Phase.PARKING]
        if parking:
            break
    row = parking[0]
    assert row.spot
    notice = 'ec2 spot interruption notice: {"action": "terminate"}'
    async with world.sessions() as s, s.begin():
        await s.execute(
            update(LedgerRow)
            .where(LedgerRow.launch_id == row.launch_id)
            .values(last_error=f"{SPOT_NOTICE}{notice}")
        )

    await world.step(1)  # the sleep fails again in the pass that reads the notice

    warned = next(r for r in await world.rows("bot") if r.launch_id == row.launch_id)
    assert (warned.last_error or "").startswith(SPOT_NOTICE)
    assert f"{warned.offer_key}#spot" in world.deps.memory.unavailable
    assert warned.terminate_requested_at is not None  # released, not kept in the pool
