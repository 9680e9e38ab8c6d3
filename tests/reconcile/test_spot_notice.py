"""A spot interruption notice, as the boot callback records it, is acted on before the
provider takes the machine: drained, replaced at once away from that spot market."""

from __future__ import annotations

from sqlalchemy import update

from autoscaler.decide.plan import SPOT_DRAIN_MARGIN_S
from autoscaler.decide.signals import Signals
from autoscaler.reconcile.liveness import TERMINATING, interrupted, spot_record
from autoscaler.reconcile.notices import NOTICE_KEEP_SEC, share_notices
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from gateway.routes import load_routes
from providers.base import SpotInterruption, utc
from providers.errors import Transient
from providers.simulated import FixedBootTime, SimulatedCloud, SimulationConfig
from tests.reconcile.world import PROJECT, World, autoscaling

NOTICE = 'ec2 spot interruption notice: {"action": "terminate", "time": "2025-06-15T15:10:00Z"}'


async def _notice(world: World, launch_id: str, *, drain: bool) -> None:
    """What ``POST /v1/boot/{launch_id}/status`` with ``interrupted`` stores."""
    values: dict[str, object] = {"last_error": f"{SPOT_NOTICE}{NOTICE}"}
    if drain:
        values["drain_requested_at"] = world.now
    async with world.sessions() as s, s.begin():
        await s.execute(update(LedgerRow).where(LedgerRow.launch_id == launch_id).values(**values))


async def test_a_notice_on_a_serving_replica_replaces_it_before_the_machine_goes(
    world: World,
) -> None:
    await world.apply(autoscaling("bot", allow_spot_instances=True, max_hourly_cost_usd=10.0))
    await world.step()
    await world.step(5)  # healthy: ready
    [doomed] = await world.rows("bot")
    assert doomed.spot and phase_of(doomed) is Phase.READY
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=2)  # requests still on it
    await _notice(world, doomed.launch_id, drain=True)

    await world.step(1)

    old, replacement = await world.rows("bot")
    assert phase_of(old) is Phase.DRAINING  # still serving its two requests
    assert doomed.instance_id in {i.instance_id for i in world.live_instances()}
    assert phase_of(replacement) in (Phase.PENDING, Phase.BOOTING)
    assert (replacement.offer_key, replacement.spot) != (doomed.offer_key, True)
    assert f"{doomed.offer_key}#spot" in world.deps.memory.unavailable
    [drain] = await world.decisions("drain")
    assert drain.reason.startswith(f"{SPOT_NOTICE}{NOTICE}; replaced now")
    registry = world.deps.metrics.registry
    counted = {"provider": "aws", "source": "instance"}
    assert registry.get_sample_value("autoscaler_controller_spot_notices_total", counted) == 1

    await world.step(1)  # the same notice, seen again: acted on once
    assert len(await world.rows("bot")) == 2
    assert len(await world.decisions("drain")) == 1
    assert registry.get_sample_value("autoscaler_controller_spot_notices_total", counted) == 1

    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)  # they finished
    await world.step(1)
    old = (await world.rows("bot"))[0]
    assert old.terminate_requested_at is not None


async def test_a_notice_on_a_booting_replica_terminates_it_and_launches_another(
    world: World,
) -> None:
    world.health.all_healthy = False
    await world.apply(autoscaling("bot", allow_spot_instances=True))
    await world.step()
    [doomed] = await world.rows("bot")
    assert doomed.spot and phase_of(doomed) is Phase.BOOTING
    await _notice(world, doomed.launch_id, drain=False)

    await world.step(1)

    old, replacement = await world.rows("bot")
    assert old.terminate_requested_at is not None
    assert phase_of(replacement) in (Phase.PENDING, Phase.BOOTING)
    assert (replacement.offer_key, replacement.spot) != (doomed.offer_key, True)
    [terminate] = await world.decisions("terminate")
    assert terminate.reason == f"{SPOT_NOTICE}{NOTICE}"


async def test_a_notice_on_a_ready_replica_the_callback_could_not_drain_is_drained(
    world: World,
) -> None:
    await world.apply(autoscaling("bot", allow_spot_instances=True))
    await world.step()
    await world.step(5)
    [doomed] = await world.rows("bot")
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=1)
    await _notice(world, doomed.launch_id, drain=False)  # noticed while it booted

    await world.step(1)

    old, _replacement = await world.rows("bot")
    assert phase_of(old) is Phase.DRAINING
    assert world.changes > 0  # the gateway was told to stop routing to it


async def test_stored_queue_warnings_are_kept_for_a_while_and_up_to_a_number(
    world: World,
) -> None:
    """With sharding, warnings no step has matched yet wait in the store: each for
    NOTICE_KEEP_SEC after it was first stored, and only the newest ``kept``."""

    def read(*names: str) -> dict[str, tuple[str, SpotInterruption]]:
        return {
            f"i-{n}": (
                "aws",
                SpotInterruption(
                    instance_id=f"i-{n}",
                    launch_id=f"l-{n}",
                    zone="us-east-1a",
                    instance_type="g5.xlarge",
                    noticed_at=world.now,
                    reason=f"warning {n}",
                ),
            )
            for n in names
        }

    async def share(*names: str) -> dict[str, SpotInterruption]:
        return await share_notices(world.deps, read(*names), now=world.now, kept=3)

    first = await share("a", "b")
    assert sorted(first) == ["i-a", "i-b"] and first["i-a"].reason == "warning a"
    world.clock.advance(NOTICE_KEEP_SEC / 2)
    kept = await share("c", "d", "a")  # "a" read again: stored once, from its first time
    assert len(kept) == 3 and {"i-c", "i-d"} <= set(kept)  # the newest three
    world.clock.advance(NOTICE_KEEP_SEC / 2 + 1)
    assert sorted(await share()) == ["i-c", "i-d"]  # "a" and "b" expired
    world.clock.advance(NOTICE_KEEP_SEC / 2)
    assert await share() == {}


async def test_a_failed_terminate_keeps_the_notice_the_rate_counts(world: World) -> None:
    """A terminate call the provider refuses, again and again, leaves the recorded notice
    in place (the measured interruption rate counts it: ``liveness.interrupted``) with
    the latest failure after it, not one more per try."""
    world.health.all_healthy = False
    workload_id = await world.apply(autoscaling("bot", allow_spot_instances=True))
    await world.step()
    [doomed] = await world.rows("bot")
    await _notice(world, doomed.launch_id, drain=False)
    for _ in range(3):
        world.provider.fail_next("terminate", Transient)
    tries = len(world.provider.calls_to("terminate"))
    for _ in range(6):
        await world.step(60)
    assert len(world.provider.calls_to("terminate")) - tries >= 3
    [old] = [r for r in await world.rows("bot") if r.launch_id == doomed.launch_id]
    assert old.last_error is not None
    assert old.last_error.startswith(f"{SPOT_NOTICE}{NOTICE}{TERMINATING}")
    assert old.last_error.count(TERMINATING) == 1
    assert interrupted(old)
    async with world.sessions() as s:
        assert (await spot_record(s, workload_id, now=world.now)).interruptions == 1


async def _warned(world: World, *, boot_s: float) -> tuple[SimulatedCloud, LedgerRow, float]:
    """A ready spot replica against the simulated cloud, its reclaim set 600 s ahead;
    replacements boot in ``boot_s``."""
    cloud = SimulatedCloud(
        clock=world.clock, config=SimulationConfig(boot_time=FixedBootTime(boot_s))
    )
    world.deps = world.make_deps(provider=cloud.provider("aws"))
    await world.apply(autoscaling("bot", allow_spot_instances=True, max_hourly_cost_usd=40.0))
    await world.step()
    await world.step(boot_s)  # booted and healthy: ready
    [doomed] = await world.rows("bot")
    assert doomed.spot and phase_of(doomed) is Phase.READY and doomed.instance_id
    reclaim = world.clock.now() + 600
    cloud.reclaim_at(doomed.instance_id, reclaim)
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=2)  # requests on it
    return cloud, doomed, reclaim


async def _routed(world: World, launch_id: str) -> bool:
    """Whether the gateway's route table (as loaded now) sends new requests to it."""
    async with world.sessions() as s:
        routes = await load_routes(s, now=world.now)
    return launch_id in {r.key for r in routes[(PROJECT, "bot")].ready}


async def test_the_simulated_clouds_warning_is_heeded_before_its_reclaim(world: World) -> None:
    """Against the simulated cloud, whose provider reports a warning from its notice until
    the reclaim (``providers.simulated``), the reconciler launches the replacement in the
    pass that reads it, away from that spot market; the warned replica keeps serving
    (the gateway routes to it) and, its replacement still booting, is drained 30 s
    before the reclaim, when the pass wakes for it."""
    _, doomed, reclaim = await _warned(world, boot_s=200)
    world.health.down_but(doomed.url)  # the replacement's engine is still loading
    await world.step(600 - 121)  # a second before the warning: nothing to heed yet
    assert len(await world.rows("bot")) == 1
    await world.step(2)  # in the warning window (EC2: 120 s ahead)

    old, replacement = await world.rows("bot")
    assert phase_of(old) is Phase.READY and old.drain_requested_at is None
    assert (old.last_error or "").startswith(f"{SPOT_NOTICE}simulated aws spot interruption")
    assert old.reclaim_at == utc(reclaim)
    assert await _routed(world, old.launch_id)
    assert phase_of(replacement) in (Phase.PENDING, Phase.BOOTING)
    assert (replacement.offer_key, replacement.spot) != (doomed.offer_key, True)
    assert f"{doomed.offer_key}#spot" in world.deps.memory.unavailable
    registry = world.deps.metrics.registry
    counted = {"provider": "aws", "source": "queue"}
    assert registry.get_sample_value("autoscaler_controller_spot_notices_total", counted) == 1

    drain_at = reclaim - SPOT_DRAIN_MARGIN_S
    wake = await world.step()
    assert world.clock.now() + wake <= drain_at + 1e-6  # the pass wakes for the drain
    await world.step(drain_at - 1 - world.clock.now())
    old = (await world.rows("bot"))[0]
    assert phase_of(old) is Phase.READY and await _routed(world, old.launch_id)
    await world.step(1)  # 30 s before the reclaim: drained, the replacement still boots
    old, replacement = await world.rows("bot")
    assert phase_of(old) is Phase.DRAINING and old.drain_requested_at == utc(drain_at)
    assert not await _routed(world, old.launch_id)
    assert phase_of(replacement) is Phase.BOOTING
    assert old.terminate_requested_at is None  # its two requests finish first

    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)
    world.health.down_but(None)
    await world.step(125)  # past the reclaim: the replacement serves, the old row closes
    old, replacement = await world.rows("bot")
    assert old.terminated_confirmed_at is not None and interrupted(old)
    assert phase_of(replacement) is Phase.READY


async def test_a_warned_replica_is_drained_once_its_replacement_is_ready(world: World) -> None:
    _, doomed, reclaim = await _warned(world, boot_s=20)
    world.health.down_but(doomed.url)  # the replacement's engine loads
    await world.step(600 - 119)  # the warning: the replacement is bought
    old, replacement = await world.rows("bot")
    assert phase_of(old) is Phase.READY and phase_of(replacement) is Phase.BOOTING
    await world.step(10)  # the replacement still boots: the warned replica serves
    assert phase_of((await world.rows("bot"))[0]) is Phase.READY
    assert await _routed(world, old.launch_id)
    world.health.down_but(None)
    await world.step(15)  # booted and healthy: ready, so the warned one drains
    old, replacement = await world.rows("bot")
    assert phase_of(replacement) is Phase.READY
    assert phase_of(old) is Phase.DRAINING and old.drain_requested_at == world.now
    assert world.clock.now() < reclaim - SPOT_DRAIN_MARGIN_S
    assert not await _routed(world, old.launch_id)
    assert await _routed(world, replacement.launch_id)
    [*_, drain] = await world.decisions("drain")
    assert "its replacement serves" in drain.reason


async def test_the_gateway_routes_no_request_past_the_drain_margin(world: World) -> None:
    """The controller late (no pass at the margin), the route table loaded past it
    sends the warned replica no new request."""
    _, doomed, reclaim = await _warned(world, boot_s=200)
    world.health.down_but(doomed.url)
    await world.step(600 - 119)
    old = (await world.rows("bot"))[0]
    assert await _routed(world, old.launch_id)
    world.clock.advance(reclaim - SPOT_DRAIN_MARGIN_S - world.clock.now())
    assert not await _routed(world, old.launch_id)
