"""Replica groups, the pure part: a model no single machine of the pool holds is placed
as a group of machines of one offer (one shape, one zone), priced whole, with the
engine's parallel flags across the nodes."""

from __future__ import annotations

from typing import Any

import pytest

from autoscaler.decide.budget import BudgetLimits, check_launch
from autoscaler.decide.inputs import model_size
from autoscaler.decide.placement import Placement, group_size_for, place_replica
from autoscaler.reconcile.provisioner import workload_boot
from autoscaler.spec import WorkloadSpec
from catalog.model import Offer
from catalog.sizing import estimate_model_memory
from catalog.snapshot import load_bundled
from providers.engines import engine_argv
from tests.decide.test_parallel import H100, NOW, _flag, _spec

BF16_405B = "meta-llama/Llama-3.1-405B-Instruct"


def _place(spec: WorkloadSpec, **extra: Any) -> Placement:
    memory = estimate_model_memory(spec.model, spec.command, hint_gib=spec.model_memory_gib)
    size = model_size(spec)
    return place_replica(
        spec=spec,
        offers=load_bundled().offers,
        unavailable={},
        now=NOW,
        params_b=None if size is None else size.params_b,
        bytes_per_param=2.0 if size is None else size.bytes_per_param,
        model_memory_gib=memory.gib,
        **{"allow_groups": True, **extra},
    )


def test_405b_in_bf16_on_h100s_is_a_group_of_two_8_gpu_machines_priced_whole() -> None:
    spec = _spec(BF16_405B, [H100])
    placed = _place(spec)
    offer = placed.offer
    assert offer is not None and placed.group_size == 2, placed.reason
    assert (offer.gpu, offer.gpu_count) == (H100, 8)
    assert placed.usd_per_hour == pytest.approx(2 * offer.on_demand_usd_per_hour)
    assert placed.market is not None and placed.market.value == "on-demand"
    assert "no single machine holds the model: a group of 2 x" in placed.reason
    argv = workload_boot(spec, gpu_count=8, nodes=2).command
    assert _flag(argv, "--tensor-parallel-size") == "8"
    assert _flag(argv, "--pipeline-parallel-size") == "2"
    assert _flag(argv, "--distributed-executor-backend") == "ray"


def test_a_model_one_machine_holds_is_never_a_group() -> None:
    fp8 = _place(_spec("meta-llama/Llama-3.1-405B-Instruct-FP8", [H100]))
    assert fp8.offer is not None and (fp8.offer.gpu_count, fp8.group_size) == (8, 1)
    small = _place(_spec("meta-llama/Llama-3.1-70B-Instruct", [H100]))
    assert small.group_size == 1


def test_without_groups_allowed_nothing_fits() -> None:
    spec = _spec(BF16_405B, [H100])
    assert _place(spec, allow_groups=False).offer is None


def test_the_group_is_priced_whole_against_the_headroom() -> None:
    """Headroom for one member but not the group: no group is chosen, and the reason says
    the group was over it."""
    spec = _spec(BF16_405B, [H100])
    whole = _place(spec)
    assert whole.offer is not None
    member = whole.offer.on_demand_usd_per_hour
    refused = _place(spec, max_usd_per_hour=member * 1.5)
    assert refused.offer is None
    assert "as a group: no offer fits" in refused.reason and "headroom" in refused.reason
    verdict = check_launch(
        live_usd_per_hour=[],
        new_usd_per_hour=whole.usd_per_hour,
        limits=BudgetLimits(workload_usd_per_hour=member * 1.5),
    )
    assert not verdict.allowed and "would exceed the workload ceiling" in verdict.reason


def test_groups_buy_on_demand_even_where_spot_is_allowed() -> None:
    spec = _spec(BF16_405B, [H100])
    config = spec.execution_policy_config.model_copy(update={"allow_spot_instances": True})
    placed = _place(spec.model_copy(update={"execution_policy_config": config}))
    assert placed.group_size == 2 and placed.market is not None
    assert placed.market.value == "on-demand"


def test_a_users_split_and_a_backend_without_multi_node_serving_get_no_group() -> None:
    split = _place(_spec(BF16_405B, [H100], command="--tensor-parallel-size 8"))
    assert split.offer is None
    ollama = _place(_spec(BF16_405B, [H100], backend="ollama"))
    assert ollama.offer is None


def test_sglang_spans_the_group_with_one_tensor_parallel_group() -> None:
    placed = _place(_spec(BF16_405B, [H100], backend="sglang"))
    assert placed.group_size == 2
    argv = engine_argv(backend="sglang", model=BF16_405B, gpu_count=8, nodes=2)
    assert (_flag(argv, "--tp"), _flag(argv, "--nnodes")) == ("16", "2")
    assert _flag(argv, "--node-rank") == "0"
    assert _flag(argv, "--dist-init-addr") == "${GROUP_LEADER_ADDRESS}:20000"
    worker = engine_argv(backend="sglang", model=BF16_405B, gpu_count=8, nodes=3, node_rank=2)
    assert (_flag(worker, "--tp"), _flag(worker, "--nnodes")) == ("24", "3")
    assert _flag(worker, "--node-rank") == "2"
    assert "--pipeline-parallel-size" not in worker and "ray" not in worker


def test_the_group_size_is_the_fewest_machines_that_hold_the_model() -> None:
    [p5] = [o for o in load_bundled().offers if o.key == "aws/us-east-1a/p5.48xlarge"]
    size = model_size(_spec(BF16_405B, [H100]))
    assert size is not None
    assert group_size_for(p5, memory_gib=900, params_b=size.params_b) == 2
    assert group_size_for(p5, memory_gib=1500, params_b=None) == 3
    assert group_size_for(p5, memory_gib=10_000, params_b=None) is None
    unknown = Offer(
        provider=p5.provider, region=p5.region, zone=p5.zone, instance_type="x",
        gpu="Mystery GPU", gpu_count=8, vcpus=1, memory_gib=1, on_demand_usd_per_hour=1.0,
    )  # fmt: skip
    assert group_size_for(unknown, memory_gib=900, params_b=None) is None


def test_the_fewest_machines_win_and_a_tighter_budget_takes_more_smaller_ones() -> None:
    spec = _spec(BF16_405B, [H100])
    roomy = _place(spec)
    assert roomy.group_size == 2
    tight = _place(spec, max_usd_per_hour=150.0)
    assert tight.offer is not None and tight.group_size > 2, tight.reason
    assert tight.usd_per_hour <= 150.0
    assert tight.usd_per_hour == pytest.approx(
        tight.group_size * tight.offer.on_demand_usd_per_hour
    )
