"""The reconciler measures its spot interruption rate from the ledger's rows
(``reconcile.liveness.spot_record``): a machine the provider showed interrupted and one
whose spot notice was recorded count, over the spot machine-hours the workload ran."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from autoscaler.decide.inputs import measured_of
from autoscaler.decide.spot_rate import DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR
from autoscaler.reconcile.liveness import DIED, spot_record
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from gateway.window import SignalSnapshot
from tests.reconcile.test_changes import stepped
from tests.reconcile.test_one_step import snapshot
from tests.reconcile.world import L4, PROJECT, World, autoscaling

RATE = "autoscaler_controller_workload_spot_interruptions_per_hour"


def gauge(world: World, slug: str) -> float | None:
    labels = {"project": PROJECT, "workload": slug}
    return world.deps.metrics.registry.get_sample_value(RATE, labels)


async def test_the_rate_fed_to_the_step_is_measured_from_the_ledger(world: World) -> None:
    workload_id = await world.apply(
        autoscaling("bot", allow_spot_instances=True, min_workers=2, max_workers=4)
    )
    await world.step()
    await world.step(5)  # ready
    first, second = await world.rows("bot")
    assert first.spot and second.spot and phase_of(first) is Phase.READY
    assert gauge(world, "bot") == pytest.approx(1 / (168 + 2 * 5 / 3600))

    await world.step(3600)
    # The boot callback records a spot notice on one; the provider reclaims the other.
    async with world.sessions() as s, s.begin():
        await s.execute(
            update(LedgerRow)
            .where(LedgerRow.launch_id == first.launch_id)
            .values(last_error=f"{SPOT_NOTICE}reclaimed in two minutes")
        )
    world.cloud.interrupt(second.instance_id or "")
    await world.step(5)  # both replaced (on demand: their spot market is avoided)

    async with world.sessions() as s:
        record = await spot_record(s, workload_id, now=world.now)
    assert record.interruptions == 2
    assert record.hours == pytest.approx(2 * 3610 / 3600)  # each until it was ended
    assert gauge(world, "bot") == pytest.approx(record.per_hour)
    assert record.per_hour == pytest.approx(3 / (168 + 2 * 3610 / 3600))
    assert record.per_hour > DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR
    # The workload's own on-demand replacements are no spot machine-hours.
    await world.step(3600)
    async with world.sessions() as s:
        assert await spot_record(s, workload_id, now=world.now) == record


async def test_a_workload_that_never_buys_spot_reads_no_record(world: World) -> None:
    await world.apply(autoscaling("bot"))
    await world.step()
    await world.step(5)
    assert gauge(world, "bot") is None


def steady(now: float) -> SignalSnapshot:
    """A request a second answered in 0.3 s over the last minute."""
    samples = tuple((now - (599 - i) * 0.1, 0.3) for i in range(600))
    return snapshot(now, ttft_samples=samples, requests_in_window=60, in_flight=1)


async def test_a_spot_workload_left_alone_weighs_the_rate_its_full_step_measured(
    world: World,
) -> None:
    """A pass that leaves a converged spot workload alone runs its pure step on the
    facts read (``reconcile.changes``, rule 5) with the rate its full step measured, the
    closed machines as that step read them and the open ones from the facts; with the
    prior instead it would disagree with the full step and step the workload in full
    every other pass."""
    workload_id = await world.apply(
        autoscaling("bot", allow_spot_instances=True, min_workers=1, max_workers=8)
    )
    async with world.sessions() as s, s.begin():
        for i in range(40):  # a market that reclaimed a machine every half hour it ran
            at = world.now - timedelta(hours=i + 1)
            s.add(
                LedgerRow(
                    launch_id=f"old-{i}",
                    workload_id=workload_id,
                    project=PROJECT,
                    workload_slug="bot",
                    provider=L4.provider.value,
                    instance_id=f"i-old-{i}",
                    spec_generation=1,
                    offer_key=L4.key,
                    region=L4.region,
                    zone=L4.zone,
                    instance_type=L4.instance_type,
                    gpu=L4.gpu,
                    gpu_count=1,
                    spot=True,
                    hourly_usd=0.32,
                    intent_at=at,
                    launched_at=at,
                    ready_at=at,
                    terminated_confirmed_at=at + timedelta(minutes=30),
                    last_error=f"{DIED}instance i-old-{i} is interrupted at the provider",
                )
            )

    async def step() -> None:
        world.signals.measured[(PROJECT, "bot")] = measured_of(steady(world.now.timestamp()))
        await world.step(30)

    for _ in range(3):  # bought, ready, looked at once more
        await step()
    fleet = await world.phases("bot")
    assert fleet.count(Phase.READY) >= 2  # the load needs one: a spare on top
    for _ in range(8):  # within the resync period
        await step()
        assert stepped(world) == (0, 1)
    assert await world.phases("bot") == fleet
    async with world.sessions() as s:
        record = await spot_record(s, workload_id, now=world.now)
    assert record.interruptions == 40
    assert gauge(world, "bot") == pytest.approx(record.per_hour)
