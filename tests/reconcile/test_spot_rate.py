"""The reconciler measures its spot interruption rate from the ledger's rows
(``reconcile.liveness.spot_record``): a machine the provider showed interrupted and one
whose spot notice was recorded count, over the spot machine-hours the workload ran."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from autoscaler.decide.spot_rate import DEFAULT_SPOT_INTERRUPTIONS_PER_HOUR
from autoscaler.reconcile.liveness import SPOT_NOTICE, spot_record
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase, phase_of
from tests.reconcile.world import PROJECT, World, autoscaling

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
