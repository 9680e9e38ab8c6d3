"""The measured token mix reaches the controller's count and placement, as in the simulator."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from autoscaler.decide.inputs import ModelSize, TokenMix, measured_of, model_size, replica_capacity
from autoscaler.decide.scaling import ScaleMemory
from autoscaler.decide.signals import Signals
from autoscaler.decide.step import step
from autoscaler.sim.gateway import RequestRecord, as_datetime
from autoscaler.sim.policies import ControllerPolicy
from autoscaler.sim.workload import sim_workload
from autoscaler.sim.world import CloudSettings
from autoscaler.sim.world import World as SimWorld
from gateway.signals import Metrics
from gateway.signals import Signals as GatewaySignals
from tests.reconcile.world import OFFERS, PROJECT, World, autoscaling

REF = (PROJECT, "bot")
LONG_PROMPTS = TokenMix(input_tokens=8000, output_tokens=300)


def two_gpus(**policy: Any) -> Any:
    """A pool where placement's answer depends on the prompt length: A10G is cheaper per
    request at placement's default mix, L4 at long prompts (and prefills them faster)."""
    pool = {"source": "cloud", "cloud_pool": {"gpu_pool": ["NVIDIA L4", "NVIDIA A10G"]}}
    return autoscaling("bot", workers=pool, **policy)


def calm_but_busy(now: float, *, rate: float) -> Signals:
    """Fast answers (TTFT well under the 1 s upper bound) at ``rate`` requests/s."""
    return Signals.from_epoch(
        ttft_samples=[(t, 0.3) for t in range(int(now) - 60, int(now))],
        request_rate=rate,
        in_flight=2,
        queue_depth=0,
        last_request_at=now,
    )


async def test_measured_heavy_load_scales_up_at_once_and_places_for_the_mix(
    world: World,
) -> None:
    await world.apply(two_gpus())
    await world.step()
    await world.step(5)
    [first] = await world.rows("bot")
    assert first.instance_type == "g5.xlarge"  # A10G: nothing measured yet

    world.signals.by_ref[REF] = calm_but_busy(world.clock.now(), rate=2.0)
    world.signals.mixes[REF] = LONG_PROMPTS
    await world.step(5)  # one pass: no TTFT window has to pass first

    [up] = [d for d in await world.decisions("scale") if d.result["direction"] == "up"]
    assert "load" in up.reason
    assert up.inputs["ttft_up_s"] == pytest.approx(0.3)  # no breach
    assert (up.inputs["input_tokens"], up.inputs["output_tokens"]) == (8000, 300)
    expected = replica_capacity(
        ("NVIDIA A10G", 1), model=ModelSize(8.03), mix=LONG_PROMPTS, concurrency_cap=64
    )
    assert expected is not None
    assert up.inputs["capacity"]["requests_per_s"] == pytest.approx(expected.requests_per_s)
    assert up.inputs["capacity_gpu"] == "1 x NVIDIA A10G"
    rows = await world.rows("bot")
    assert len(rows) == up.result["desired"] > 1
    # Placement saw the measured prompts: the new replicas go to the L4.
    assert {r.instance_type for r in rows[1:]} == {"g6.xlarge"}


async def test_the_same_load_with_short_prompts_needs_fewer_replicas(world: World) -> None:
    await world.apply(two_gpus())
    await world.step()
    await world.step(5)
    world.signals.by_ref[REF] = calm_but_busy(world.clock.now(), rate=2.0)
    world.signals.mixes[REF] = TokenMix(input_tokens=200, output_tokens=50)
    await world.step(5)
    assert len(await world.rows("bot")) == 1  # A10G carries 2 req/s of short requests


def _per_request_mix(n: int) -> list[tuple[int, int]]:
    rng = random.Random(7)
    return [(rng.randint(500, 6000), rng.randint(50, 400)) for _ in range(n)]


async def test_simulator_and_reconciler_take_the_same_inputs_from_one_measurement(
    world: World,
) -> None:
    spec = two_gpus()
    requests = _per_request_mix(40)

    # The real gateway's window measures the requests; the controller reads its snapshot.
    window = GatewaySignals(window_sec=900.0, metrics=Metrics(), concurrency_cap=64)
    now = world.clock.now()
    for tokens_in, tokens_out in requests:
        window.answered(REF, now=now, input_tokens=tokens_in, output_tokens=tokens_out)
    measured = measured_of(window.snapshot(now=now)[REF])
    assert measured.token_mix is not None and measured.token_mix.input_scv is not None
    world.signals.measured[REF] = measured
    await world.apply(spec)
    await world.step()
    [decision] = await world.decisions("scale")
    reconciler = decision.inputs

    # The simulator's gateway answers the same requests; its world maps them.
    sim = SimWorld(
        workload=sim_workload(spec),
        offers=OFFERS,
        policy=ControllerPolicy(spec=spec),
        requests=[],
        seed=1,
        cloud=CloudSettings(),
        allow_spot=False,
        initial_replicas=0,
    )
    for index, (tokens_in, tokens_out) in enumerate(requests):
        sim.gateway.finish(RequestRecord(index, 0.0, tokens_in, tokens_out), t=0.0)
    shown = step(  # the step the simulator runs, on what its world observes
        sim._view_now(sim.t),
        memory=ScaleMemory(),
        unavailable={},
        now=as_datetime(sim.clock.now()),
        knobs=sim.knobs,
    )
    capacity = shown.inputs.capacity

    assert capacity is not None
    assert reconciler["capacity"] == pytest.approx(dataclasses.asdict(capacity))
    assert reconciler["capacity_gpu"] == "1 x NVIDIA L4"  # both placed for long prompts
    assert reconciler["input_tokens"] == pytest.approx(measured.token_mix.input_tokens)
    assert model_size(spec) == ModelSize(sim.workload.params_b, sim.workload.bytes_per_param)
