"""The simulated cloud keeps the provider contract and behaves reproducibly for a seed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from catalog.model import Offer, ProviderName
from catalog.storage import stopped_usd_per_hour
from providers.base import (
    SPOT_NOTICE_LEAD_S,
    InstanceState,
    InsufficientCapacity,
    ManualClock,
    Provider,
    ProviderError,
    QuotaExceeded,
    Transient,
    utc,
)
from providers.simulated import (
    FixedBootTime,
    LogNormalBootTime,
    SimulatedCloud,
    SimulationConfig,
)
from tests.providers.contract import (
    Capability,
    ErrorKind,
    ProviderContract,
    ProviderHarness,
    make_request,
)

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

OFFER = Offer(
    provider=ProviderName.SIMULATED,
    region="sim-east",
    zone="sim-east-1a",
    instance_type="sim.a10g.1",
    gpu="NVIDIA A10G",
    gpu_count=1,
    vcpus=4,
    memory_gib=16,
    on_demand_usd_per_hour=1.2,
    spot_usd_per_hour=0.36,
)


class SimulatedHarness:
    offer = OFFER
    capabilities: frozenset[Capability] = frozenset({"capacity", "quota", "throttle", "preempt"})

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.cloud = SimulatedCloud(clock=self.clock, config=SimulationConfig(seed=7))

    def new_provider(self) -> Provider:
        return self.cloud.provider()

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        self.cloud.launch_error = None
        self.cloud.restock(OFFER.key)
        self.cloud.config = SimulationConfig(seed=7)
        if kind == "capacity":
            self.cloud.stock_out(OFFER.key)
        elif kind == "quota":
            self.cloud.config = SimulationConfig(seed=7, gpu_quota=0)
        elif kind == "throttle":
            self.cloud.launch_error = Transient

    async def preempt(self, instance_id: str) -> None:
        self.cloud.interrupt(instance_id)

    async def settle(self) -> None:
        self.clock.advance(3600)


class TestSimulatedContract(ProviderContract):
    @pytest.fixture
    def harness(self) -> ProviderHarness:
        return SimulatedHarness()


def _cloud(config: SimulationConfig | None = None) -> tuple[ManualClock, SimulatedCloud]:
    clock = ManualClock()
    return clock, SimulatedCloud(clock=clock, config=config)


async def _boot_times(seed: int) -> list[float]:
    clock, cloud = _cloud(SimulationConfig(seed=seed))
    provider = cloud.provider()
    ids = [
        (await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))).instance_id
        for _ in range(5)
    ]
    times = {}
    for _ in range(720):
        clock.advance(5)
        for instance in await provider.list("c"):
            if instance.state is InstanceState.RUNNING and instance.instance_id not in times:
                times[instance.instance_id] = clock.now()
    return [times[i] for i in ids]


async def test_boot_times_are_reproducible_for_a_seed_and_vary_across_seeds() -> None:
    first, again, other = await _boot_times(1), await _boot_times(1), await _boot_times(2)

    assert first == again
    assert first != other
    assert len(set(first)) == 5


def test_default_boot_times_centre_on_three_minutes() -> None:
    import random

    rng = random.Random(0)
    samples = sorted(LogNormalBootTime().sample(rng) for _ in range(2001))
    assert 160 < samples[1000] < 200
    assert samples[-1] > 2 * samples[0]


async def test_an_instance_runs_once_its_boot_time_has_elapsed() -> None:
    clock, cloud = _cloud(SimulationConfig(boot_time=FixedBootTime(90)))
    provider = cloud.provider()
    instance = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))

    clock.advance(89)
    assert (await provider.describe(instance.instance_id)).state is InstanceState.PENDING
    clock.advance(1)
    assert (await provider.describe(instance.instance_id)).state is InstanceState.RUNNING


async def test_a_random_stockout_lasts_its_duration_then_the_offer_recovers() -> None:
    clock, cloud = _cloud(SimulationConfig(seed=3, stockout_probability=1.0, stockout_seconds=600))
    provider = cloud.provider()
    with pytest.raises(InsufficientCapacity, match="sim-east-1a"):
        await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))

    cloud.config = SimulationConfig(seed=3, stockout_seconds=600)
    clock.advance(599)
    with pytest.raises(InsufficientCapacity, match="stocked out"):
        await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    clock.advance(1)
    instance = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    assert instance.state is InstanceState.PENDING


async def test_stockouts_at_a_probability_hit_some_launches_not_all() -> None:
    _, cloud = _cloud(SimulationConfig(seed=11, stockout_probability=0.3, stockout_seconds=0))
    provider = cloud.provider()
    outcomes = []
    for _ in range(200):
        try:
            await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
            outcomes.append(True)
        except InsufficientCapacity:
            outcomes.append(False)
    assert 30 < outcomes.count(False) < 90


async def test_spot_instances_are_interrupted_at_the_configured_hazard() -> None:
    clock, cloud = _cloud(
        SimulationConfig(seed=5, spot_interruptions_per_hour=1.0, boot_time=FixedBootTime(1))
    )
    provider = cloud.provider()
    for _ in range(100):
        await provider.launch(make_request(SimulatedHarness(), cluster_id="c", spot=True))
    on_demand = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))

    clock.advance(3600)

    reported = await provider.interruptions("c")
    # One hour at one interruption per hour: about 1 - 1/e = 63 % are gone.
    assert 45 < len(reported) < 80
    assert on_demand.instance_id not in {r.instance_id for r in reported}
    states = {i.instance_id: i.state for i in await provider.list("c")}
    assert all(states[r.instance_id] is InstanceState.INTERRUPTED for r in reported)


def _harness_of(provider: ProviderName) -> SimulatedHarness:
    """A harness whose requests are for the offer sold by ``provider``."""
    harness = SimulatedHarness()
    harness.offer = replace(OFFER, provider=provider)
    return harness


@pytest.mark.parametrize(
    ("provider", "lead"), [(ProviderName.AWS, 120.0), (ProviderName.GCP, 30.0)]
)
async def test_a_reclaim_is_warned_of_its_providers_lead_ahead_and_reported_once(
    provider: ProviderName, lead: float
) -> None:
    assert SPOT_NOTICE_LEAD_S[provider] == lead
    clock, cloud = _cloud(SimulationConfig(boot_time=FixedBootTime(1)))
    sim = cloud.provider()
    harness = _harness_of(provider)
    spot = await sim.launch(make_request(harness, cluster_id="c", spot=True))
    await sim.launch(make_request(harness, cluster_id="c"))
    reclaim = clock.now() + 600
    cloud.reclaim_at(spot.instance_id, reclaim)

    clock.advance(600 - lead - 1)
    assert await sim.spot_notices("c") == []  # not yet in the window

    clock.advance(2)
    [notice] = await sim.spot_notices("c")
    assert notice.instance_id == spot.instance_id and notice.launch_id == spot.launch_id
    assert notice.noticed_at == utc(reclaim - lead)
    assert notice.reclaim_at == utc(reclaim)
    assert f"(in {lead:.0f} s)" in notice.reason
    assert (await sim.describe(spot.instance_id)).state is InstanceState.RUNNING
    assert await sim.spot_notices("c") == []  # each warning once
    assert await sim.spot_notices("another-cluster") == []

    clock.advance(lead)
    assert (await sim.describe(spot.instance_id)).state is InstanceState.INTERRUPTED
    assert [i.instance_id for i in await sim.interruptions("c")] == [spot.instance_id]


async def test_seeded_reclaims_are_warned_and_a_reclaim_at_once_or_a_late_read_is_not() -> None:
    clock, cloud = _cloud(
        SimulationConfig(seed=3, spot_interruptions_per_hour=6.0, boot_time=FixedBootTime(1))
    )
    sim = cloud.provider()
    harness = _harness_of(ProviderName.AWS)
    launched = [
        await sim.launch(make_request(harness, cluster_id="c", spot=True)) for _ in range(20)
    ]
    warned: set[str] = set()
    for _ in range(3600 // 10):  # read every 10 s for an hour
        clock.advance(10)
        warned |= {n.instance_id for n in await sim.spot_notices("c")}
    reclaimed = {i.instance_id for i in await sim.interruptions("c")}
    assert len(reclaimed) >= 15 and reclaimed <= warned  # every reclaim was warned of
    assert warned <= {i.instance_id for i in launched}

    now_gone = await sim.launch(make_request(harness, cluster_id="c", spot=True))
    cloud.interrupt(now_gone.instance_id)  # reclaimed at once: no warning
    unread = await sim.launch(make_request(harness, cluster_id="c", spot=True))
    cloud.reclaim_at(unread.instance_id, clock.now() + 60)
    clock.advance(61)  # the warning was never read before the machine went
    assert {n.instance_id for n in await sim.spot_notices("c")} & {
        now_gone.instance_id,
        unread.instance_id,
    } == set()


async def test_cost_accrues_at_the_market_price_until_termination() -> None:
    clock, cloud = _cloud()
    provider = cloud.provider()
    on_demand = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    await provider.launch(make_request(SimulatedHarness(), cluster_id="c", spot=True))
    assert cloud.hourly_spend_usd() == pytest.approx(1.2 + 0.36)

    clock.advance(1800)
    await provider.terminate(on_demand.instance_id)
    clock.advance(1800)

    assert cloud.cost_usd() == pytest.approx(0.6 + 0.36)
    assert cloud.hourly_spend_usd() == pytest.approx(0.36)


async def test_the_gpu_quota_counts_live_instances_only() -> None:
    _, cloud = _cloud(SimulationConfig(gpu_quota=1))
    provider = cloud.provider()
    first = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    with pytest.raises(QuotaExceeded, match="GPU quota 1"):
        await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))

    await provider.terminate(first.instance_id)

    await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))


async def test_gone_instances_leave_the_listing_after_a_while() -> None:
    clock, cloud = _cloud(SimulationConfig(gone_visible_seconds=600))
    provider = cloud.provider()
    instance = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    await provider.terminate(instance.instance_id)

    clock.advance(601)

    assert await provider.list("c") == []
    with pytest.raises(ProviderError):
        await provider.describe(instance.instance_id)


async def test_a_stopped_machine_bills_its_disk_only() -> None:
    clock, cloud = _cloud(SimulationConfig(boot_time=FixedBootTime(60), stop_seconds=30))
    provider = cloud.provider()
    instance = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    clock.advance(3600)
    await provider.stop(instance.instance_id)
    clock.advance(30)  # stopping: billed as running
    assert cloud.cost_usd() == pytest.approx(1.2 * 3630 / 3600)

    clock.advance(3600)

    disk = stopped_usd_per_hour(OFFER, 200)  # the simulated cloud's disk, at the EC2 rate
    assert disk == pytest.approx(0.08 * 200 / 730)
    assert cloud.hourly_spend_usd() == pytest.approx(disk)
    assert cloud.cost_usd() == pytest.approx(1.2 * 3630 / 3600 + disk)
    await provider.start(instance.instance_id)
    assert cloud.hourly_spend_usd() == pytest.approx(1.2)


async def test_a_start_takes_a_start_time_draw_and_leaves_launch_draws_alone() -> None:
    config = SimulationConfig(seed=4, start_time=FixedBootTime(40), stop_seconds=0)

    async def later_boot(*, stop_and_start: bool) -> float:
        clock, cloud = _cloud(config)
        provider = cloud.provider()
        first = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
        clock.advance(3600)
        if stop_and_start:
            await provider.stop(first.instance_id)
            started = await provider.start(first.instance_id)
            assert started.state is InstanceState.PENDING
            clock.advance(39)
            assert (await provider.describe(first.instance_id)).state is InstanceState.PENDING
            clock.advance(1)
            assert (await provider.describe(first.instance_id)).state is InstanceState.RUNNING
        second = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
        while (await provider.describe(second.instance_id)).state is InstanceState.PENDING:
            clock.advance(1)
        return clock.now() - second.launched_at.timestamp()

    assert await later_boot(stop_and_start=True) == await later_boot(stop_and_start=False)


async def test_a_stopped_machine_cannot_start_while_its_offer_is_stocked_out() -> None:
    clock, cloud = _cloud(SimulationConfig(boot_time=FixedBootTime(1), stop_seconds=0))
    provider = cloud.provider()
    instance = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    clock.advance(5)
    await provider.stop(instance.instance_id)
    cloud.stock_out(OFFER.key, for_seconds=600)

    with pytest.raises(InsufficientCapacity, match="stocked out"):
        await provider.start(instance.instance_id)

    assert (await provider.describe(instance.instance_id)).state is InstanceState.STOPPED
    clock.advance(600)
    assert (await provider.start(instance.instance_id)).state is InstanceState.PENDING


async def test_a_stopped_machine_holds_no_gpu_quota() -> None:
    clock, cloud = _cloud(SimulationConfig(gpu_quota=1, boot_time=FixedBootTime(1)))
    provider = cloud.provider()
    parked = await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))
    clock.advance(5)
    await provider.stop(parked.instance_id)

    await provider.launch(make_request(SimulatedHarness(), cluster_id="c"))

    clock.advance(60)
    with pytest.raises(QuotaExceeded, match="GPU quota 1"):
        await provider.start(parked.instance_id)


def test_bad_config_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="stockout_probability"):
        SimulationConfig(stockout_probability=1.5)
