"""Reconcilers on a fake cloud and a manual clock: step, reconcile once, assert."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from autoscaler.decide.signals import Signals
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase
from providers.base import (
    CLUSTER_TAG,
    BootSpec,
    Instance,
    InsufficientCapacity,
    LaunchRequest,
    Transient,
    instance_tags,
)
from providers.fake import FakeProvider
from tests.reconcile.world import A10G, CLUSTER, L4, L40S, PROJECT, World, autoscaling, fixed


class IntentCheckingProvider(FakeProvider):
    """Asserts, inside every launch, that the ledger already holds the intent."""

    def __init__(self, world: World) -> None:
        super().__init__(world.cloud, name="aws")
        self.world = world
        self.rows_seen: list[LedgerRow] = []

    async def launch(self, request: LaunchRequest) -> Instance:
        async with self.world.sessions() as s:
            row = await s.get(LedgerRow, request.launch_id)
        assert row is not None, f"launch {request.launch_id} called before its intent row"
        self.rows_seen.append(row)
        return await super().launch(request)


async def test_intent_row_is_written_before_the_provider_is_called(world: World) -> None:
    checking = IntentCheckingProvider(world)
    world.deps = world.make_deps(provider=checking)
    await world.apply(fixed("bot", 2))
    await world.step()
    assert len(checking.rows_seen) == 2
    assert all(r.instance_id is None and r.hourly_usd > 0 for r in checking.rows_seen)
    rows = await world.rows("bot")
    assert {r.instance_id for r in rows} == {i.instance_id for i in world.cloud.all()}
    for instance in world.cloud.all():
        assert instance.tags[CLUSTER_TAG] == CLUSTER
        assert instance.tags["autoscaler:workload"] == "bot"
        assert instance.tags["autoscaler:launch-id"] == instance.launch_id


async def test_a_refused_launch_leaves_a_closed_row_and_places_elsewhere(world: World) -> None:
    await world.apply(fixed("bot", 1))
    world.provider.fail_next("launch", InsufficientCapacity)
    await world.step()
    [failed] = await world.rows("bot")
    assert failed.offer_key == L40S.key  # the first choice, per cost per capacity
    assert failed.instance_id is None
    assert failed.terminated_confirmed_at is not None  # the provider bought nothing
    assert "launch failed" in (failed.last_error or "")
    [logged] = await world.decisions("launch_failed")
    assert "skipped for 600s" in logged.reason
    await world.step(5)
    rows = await world.rows("bot")
    assert len(rows) == 2
    assert rows[1].offer_key != L40S.key and rows[1].instance_id is not None
    assert len(world.live_instances()) == 1


async def test_a_transient_launch_error_is_resolved_by_launch_id(world: World) -> None:
    await world.apply(fixed("bot", 1))
    world.provider.fail_next("launch", Transient)
    await world.step()
    [row] = await world.rows("bot")
    assert row.instance_id is None and row.terminated_confirmed_at is None
    await world.step(5)
    [row] = await world.rows("bot")
    assert row.instance_id is not None
    assert len(world.cloud.all()) == 1


class CrashingProvider(FakeProvider):
    """The cloud buys the machine, then the controller dies before it hears back."""

    async def launch(self, request: LaunchRequest) -> Instance:
        await super().launch(request)
        raise RuntimeError("controller killed mid-launch")


async def test_crash_during_launch_resumes_by_launch_id_without_a_duplicate(
    world: World,
) -> None:
    world.deps = world.make_deps(provider=CrashingProvider(world.cloud, name="aws"))
    await world.apply(fixed("bot", 1))
    await world.step()
    [row] = await world.rows("bot")
    assert row.instance_id is None and len(world.cloud.all()) == 1
    # A new controller: fresh provider object and memory, the same cloud and ledger.
    fresh = FakeProvider(world.cloud, name="aws")
    world.deps = world.make_deps(provider=fresh, orphan_grace_sec=0)
    await world.step(5)
    [row] = await world.rows("bot")
    [instance] = world.cloud.all()
    assert row.instance_id == instance.instance_id
    assert fresh.calls_to("find_by_launch_id")
    assert not fresh.calls_to("launch")
    assert not fresh.calls_to("terminate")  # adopted, not swept as an orphan


async def test_a_replica_not_ready_in_time_is_terminated_and_its_offer_avoided(
    world: World,
) -> None:
    world.health.all_healthy = False
    await world.apply(autoscaling("bot", scaling_up_timeout_sec=120))
    await world.step()
    [first] = await world.rows("bot")
    await world.step(60)
    assert await world.phases("bot") == [Phase.BOOTING]
    await world.step(61)
    rows = await world.rows("bot")
    assert rows[0].terminate_requested_at is not None
    assert world.provider.calls_to("terminate")
    [replacement] = [r for r in rows if r.launch_id != first.launch_id]
    assert replacement.offer_key != first.offer_key
    [terminated] = await world.decisions("terminate")
    assert "scaling_up_timeout_sec" in terminated.reason
    await world.step(5)
    assert (await world.rows("bot"))[0].terminated_confirmed_at is not None


async def test_a_replica_that_dies_is_replaced(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    assert row.ready_at is not None
    world.health.down.add(row.url or "")
    world.cloud.forget(row.instance_id or "")  # the machine vanished without a trace
    await world.step(5)
    # Absence is not confirmation: the row stays open (and counted) for the grace.
    assert (await world.rows("bot"))[0].terminated_confirmed_at is None
    await world.step(world.deps.settings.visibility_grace_sec)
    rows = await world.rows("bot")
    assert rows[0].terminated_confirmed_at is not None  # after a terminate by id succeeded
    assert row.instance_id in [c.argument for c in world.provider.calls_to("terminate")]
    assert "died" in (rows[0].last_error or "")
    await world.step(5)
    rows = await world.rows("bot")
    assert len(rows) == 2 and rows[1].terminated_confirmed_at is None


async def test_an_engine_that_stops_answering_is_replaced(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    world.health.down.add(row.url or "")
    await world.step(5)
    assert (await world.rows("bot"))[0].terminate_requested_at is None  # within the grace
    await world.step(25)
    rows = await world.rows("bot")
    assert rows[0].terminate_requested_at is not None
    assert "unhealthy" in (await world.decisions("terminate"))[0].reason
    assert len([r for r in rows if r.terminate_requested_at is None]) == 1


async def test_ready_replicas_carry_the_engine_key_to_health_checks(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    [row] = await world.rows("bot")
    assert row.engine_key and len(row.engine_key) >= 24
    assert (f"{row.url}/health", row.engine_key) in world.health.asked


async def test_deleting_drains_then_terminates_after_requests_finish(world: World) -> None:
    await world.apply(fixed("bot", 2))
    await world.step()
    await world.step(5)
    assert await world.phases("bot") == [Phase.READY, Phase.READY]
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=3)
    changes = world.changes
    await world.delete("bot")
    await world.step(5)
    assert await world.phases("bot") == [Phase.DRAINING, Phase.DRAINING]
    assert world.changes > changes  # the gateway was told to stop routing
    assert not world.provider.calls_to("terminate")
    await world.step(30)  # requests still in flight, within scaling_down_timeout
    assert await world.phases("bot") == [Phase.DRAINING, Phase.DRAINING]
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)
    await world.step(5)
    assert await world.phases("bot") == [Phase.TERMINATING, Phase.TERMINATING]
    await world.step(5)
    assert await world.phases("bot") == [Phase.TERMINATED, Phase.TERMINATED]
    assert not world.live_instances()
    await world.step(5)  # nothing left: the deleted workload is no longer reconciled
    assert len(world.provider.calls_to("terminate")) == 2


async def test_a_drain_ends_at_the_scaling_down_timeout(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=1)
    await world.delete("bot")
    await world.step(5)
    await world.step(121)  # the default scaling_down_timeout_sec is 120
    assert await world.phases("bot") == [Phase.TERMINATING]
    assert "drain timeout" in (await world.decisions("terminate"))[0].reason


async def test_orphans_are_terminated_after_the_grace_period(world: World) -> None:
    boot = BootSpec(image="x", command=("x",), port=8000, health_path="/health", model_id="m")

    def request(cluster: str, launch_id: str) -> LaunchRequest:
        return LaunchRequest(
            offer=L4,
            spot=False,
            boot=boot,
            launch_id=launch_id,
            tags=instance_tags(
                cluster_id=cluster, project=PROJECT, workload="ghost", launch_id=launch_id
            ),
        )

    orphan = world.cloud.create(request(CLUSTER, "ln-unknown"), "aws")
    foreign = world.cloud.create(request("other-cluster", "ln-foreign"), "aws")
    await world.step()
    assert not world.provider.calls_to("terminate")
    await world.step(601)
    assert [c.argument for c in world.provider.calls_to("terminate")] == [orphan.instance_id]
    assert not world.cloud.get(foreign.instance_id).state.is_gone
    metric = world.deps.metrics.orphans.labels("aws")._value.get()
    assert metric == 1


async def test_terminated_is_set_only_when_the_provider_confirms(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    await world.delete("bot")
    world.signals.by_ref[(PROJECT, "bot")] = Signals(in_flight=0)
    await world.step(5)  # drain
    world.provider.fail_next("terminate", Transient)
    await world.step(5)
    [row] = await world.rows("bot")
    assert row.terminate_requested_at is not None and row.terminated_confirmed_at is None
    world.provider.fail_next("list", Transient)
    await world.step(5)  # terminated now, but the provider's list did not answer
    [row] = await world.rows("bot")
    assert row.terminated_confirmed_at is None
    await world.step(5)  # still running: the termination is sent again
    await world.step(5)
    [row] = await world.rows("bot")
    assert row.terminated_confirmed_at is not None
    assert world.cloud.get(row.instance_id or "").state.is_gone


async def test_a_failing_workload_does_not_stall_another(world: World) -> None:
    broken = await world.apply(fixed("broken", 1))
    await world.apply(fixed("fine", 1))
    async with world.sessions() as s, s.begin():
        await s.execute(update(Workload).where(Workload.id == broken).values(spec={"bad": 1}))
    await world.step()
    assert await world.phases("fine") == [Phase.BOOTING]
    assert await world.rows("broken") == []
    errors = world.deps.metrics.reconcile_errors.labels(PROJECT, "broken")._value.get()
    assert errors == 1
    await world.step(3)  # reported once while it stays so, not once per pass
    [invalid] = await world.decisions("invalid_spec")
    assert not invalid.acted and "unknown field 'bad'" in invalid.reason
    assert world.deps.metrics.reconcile_errors.labels(PROJECT, "broken")._value.get() == 1


async def test_a_stored_command_the_engine_refuses_buys_nothing_and_says_why_once(
    world: World,
) -> None:
    # Stored past the API's admission (written before the check existed).
    await world.apply(fixed("bot", 1, command="autoscaler engine-sim --model x"))
    for _ in range(3):
        await world.step(5)
    assert await world.rows("bot") == []
    assert world.live_instances() == []
    [invalid] = await world.decisions("invalid_spec")
    assert invalid.reason.startswith("generation 1 cannot run, nothing launched: command:")
    assert "'autoscaler'" in invalid.reason


async def test_a_scale_up_over_the_ceiling_is_refused_logged_and_not_bought(
    world: World,
) -> None:
    await world.apply(fixed("bot", 3))
    world.deps = world.make_deps(fleet_ceiling=2.0)
    await world.step()
    [row] = await world.rows("bot")  # one L40S at $1.86/h; a second would cross $2/h
    assert row.offer_key == L40S.key
    [refused] = await world.decisions("refused")
    assert not refused.acted
    assert "fleet ceiling" in refused.reason
    assert world.deps.metrics.refused.labels(PROJECT, "bot", "fleet_ceiling")._value.get() == 1
    assert world.deps.metrics.blocked.labels(PROJECT, "bot", "fleet_ceiling")._value.get() == 1
    await world.step(5)  # the same refusal is not logged again every pass
    assert len(await world.decisions("refused")) == 1
    assert len(world.live_instances()) == 1


async def test_placement_stays_within_the_headroom(world: World) -> None:
    await world.apply(fixed("bot", 2))
    world.deps = world.make_deps(fleet_ceiling=1.85)
    await world.step()
    await world.step(5)
    rows = await world.rows("bot")
    # L40S ($1.86) is the cheapest per capacity but over the headroom: an A10G ($1.00),
    # then an L4 ($0.80) in the $0.85 left.
    assert [r.offer_key for r in rows] == [A10G.key, L4.key]
    assert sum(r.hourly_usd for r in rows) <= 1.85


async def test_dry_run_logs_decisions_and_buys_nothing(world: World) -> None:
    world.deps = world.make_deps(dry_run=True)
    await world.apply(fixed("bot", 2))
    await world.step()
    await world.step(5)
    assert world.cloud.all() == []
    assert await world.rows("bot") == []
    decisions = await world.decisions()
    assert {d.kind for d in decisions} == {"scale", "launch"}
    assert all(not d.acted and d.reason.startswith("dry-run") for d in decisions)
    assert len(await world.decisions("launch")) == 2  # logged once, not every pass


async def test_ttft_breach_scales_up_and_describes_why(world: World) -> None:
    await world.apply(autoscaling("bot"))
    await world.step()
    await world.step(5)
    assert await world.phases("bot") == [Phase.READY]

    def slow(now: float) -> Signals:
        samples = tuple((t, 3.0) for t in range(int(now) - 120, int(now), 2))
        return Signals.from_epoch(
            ttft_samples=samples,
            request_rate=5.0,
            in_flight=4,
            queue_depth=0,
            last_request_at=now,
        )

    for _ in range(8):
        world.signals.by_ref[(PROJECT, "bot")] = slow(world.clock.now())
        await world.step(5)
    phases = await world.phases("bot")
    assert len(phases) >= 2
    scale = [d for d in await world.decisions("scale") if d.result["direction"] == "up"]
    assert scale and scale[0].inputs["ttft_up_s"] == pytest.approx(3.0)


async def test_a_private_worker_placement_writes_an_assignment_only(world: World) -> None:
    await world.apply(fixed("bot", 1, worker_id="wrk_0123456789abcdef"))
    await world.step()
    [row] = await world.rows("bot")
    assert row.worker_id == "wrk_0123456789abcdef" and row.engine_key
    assert not world.provider.calls_to("launch")


async def test_decisions_are_listed_for_describe(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    async with world.sessions() as s:
        kinds = list(await s.scalars(select(LedgerRow.offer_key)))
    assert kinds == [L40S.key]
    launch = (await world.decisions("launch"))[0]
    assert launch.cost_delta_usd_per_hour == pytest.approx(L40S.on_demand_usd_per_hour)
    assert launch.result["launch_id"]


async def test_a_spot_interruption_is_replaced_away_from_that_spot_market(world: World) -> None:
    spec = autoscaling("bot", allow_spot_instances=True)
    await world.apply(spec)
    await world.step()
    [row] = await world.rows("bot")
    assert row.spot
    world.cloud.interrupt(row.instance_id or "")
    await world.step(5)
    rows = await world.rows("bot")
    assert "interrupted" in (rows[0].last_error or "")
    assert rows[0].terminated_confirmed_at is not None
    replacement = rows[1]
    assert (replacement.offer_key, replacement.spot) != (row.offer_key, True)


async def test_a_drain_waits_while_a_gateway_worker_does_not_answer(world: World) -> None:
    """The worker that did not answer may hold the draining replicas' requests: they are
    not terminated until a read reaches every worker, and the decision log says why."""
    await world.apply(fixed("bot", 2))
    await world.step()
    await world.step(5)
    missing = "1 of 4 gateway workers did not answer (worker 2)"
    world.signals.incomplete = missing
    await world.delete("bot")
    await world.step(5)
    assert await world.phases("bot") == [Phase.DRAINING, Phase.DRAINING]
    await world.step(5)  # the workers that answered count nothing on them
    assert await world.phases("bot") == [Phase.DRAINING, Phase.DRAINING]
    assert not world.provider.calls_to("terminate")
    said = [d.reason for d in await world.decisions("scale")]
    assert any(f"signals incomplete ({missing}): drain of" in r for r in said), said
    world.signals.incomplete = None
    await world.step(5)
    assert await world.phases("bot") == [Phase.TERMINATING, Phase.TERMINATING]
    assert "drained: no request in flight" in (await world.decisions("terminate"))[0].reason


async def test_a_failed_signals_read_ends_no_drain_before_its_timeout(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await world.step()
    await world.step(5)
    world.signals.failure = ConnectionError("gateway unreachable")
    await world.delete("bot")
    await world.step(5)
    await world.step(30)
    assert await world.phases("bot") == [Phase.DRAINING]
    await world.step(121)  # the default scaling_down_timeout_sec is 120
    assert await world.phases("bot") == [Phase.TERMINATING]
    [ended] = await world.decisions("terminate")
    assert "requests in flight not known" in ended.reason
    assert "reading the gateway's signals failed: gateway unreachable" in ended.reason
