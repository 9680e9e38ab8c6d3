"""The ledger keeps the engine command each replica was asked to boot with; the API
shows it masked."""

from __future__ import annotations

import dataclasses

from autoscaler.api.views import instance_view
from tests.reconcile.world import L40S, World, fixed

HF = "hf_" + "Zq8" * 12
FOUR_L40S = dataclasses.replace(
    L40S, instance_type="g6e.12xlarge", gpu_count=4, on_demand_usd_per_hour=10.49
)


async def test_a_replica_reports_its_command_with_tensor_parallel_and_secrets_masked(
    world: World,
) -> None:
    """The ledger keeps the command a replica was asked to boot with (the engine key as
    a reference, never its value); the view masks it, a user's token included."""
    world.deps = dataclasses.replace(world.deps, offers=lambda: (FOUR_L40S,))
    await world.apply(fixed("bot", 1, command=f"--max-model-len 4096 --hf-token {HF}"))
    await world.step()
    [row] = await world.rows("bot")
    assert row.engine_command is not None and "--api-key" in row.engine_command
    assert row.engine_key is not None and row.engine_key not in row.engine_command
    view = instance_view(row, world.now)
    assert view["command"] == (
        "vllm serve meta-llama/Llama-3.1-8B-Instruct --host 0.0.0.0 --port 8000 "
        "--api-key **** --tensor-parallel-size 4 --max-model-len 4096 --hf-token ****"
    )
    assert (view["desired_phase"], view["actual_phase"]) == ("running", "booting")
