"""Large models: the machine placement chooses and the parallel flags the engine gets.

Pure: the bundled catalog, the sizing estimate and placement as the reconciler calls them
(``_place``), and the boot spec the provisioner renders for the chosen offer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from autoscaler.admission import runnable_problems
from autoscaler.decide.inputs import model_size
from autoscaler.decide.placement import Placement, place_replica
from autoscaler.reconcile.provisioner import workload_boot
from autoscaler.spec import WorkloadSpec
from catalog.sizing import estimate_model_memory
from catalog.snapshot import load_bundled

NOW = datetime(2026, 11, 30, tzinfo=UTC)
H100 = "NVIDIA H100 80GB HBM3"
SMALL_POOL = ["NVIDIA L4", "NVIDIA A10G", "NVIDIA A100-SXM4-80GB", H100]


def _spec(model: str, pool: list[str], *, command: str | None = None, **extra: Any) -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {
            "name": "big",
            "slug": "big",
            "model": model,
            "backend": extra.pop("backend", "vllm"),
            "command": command,
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": 0,
                "max_workers": 2,
                "max_hourly_cost_usd": 500,
                "workers": {"source": "cloud", "cloud_pool": {"gpu_pool": pool}},
            },
            **extra,
        }
    )


def _place(spec: WorkloadSpec) -> Placement:
    """Placement with the inputs the reconciler gives it."""
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
    )


def _flag(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_an_8b_model_takes_one_gpu_and_no_parallel_flag() -> None:
    spec = _spec("meta-llama/Llama-3.1-8B-Instruct", SMALL_POOL)
    placed = _place(spec)
    assert placed.offer is not None and placed.offer.gpu_count == 1
    argv = workload_boot(spec, gpu_count=placed.offer.gpu_count).command
    assert "--tensor-parallel-size" not in argv


def test_a_70b_model_gets_a_multi_gpu_machine_and_tensor_parallelism_over_all_of_it() -> None:
    spec = _spec("meta-llama/Llama-3.1-70B-Instruct", [H100])
    placed = _place(spec)
    assert placed.offer is not None and placed.offer.gpu_count >= 2, placed.reason
    argv = workload_boot(spec, gpu_count=placed.offer.gpu_count).command
    assert _flag(argv, "--tensor-parallel-size") == str(placed.offer.gpu_count)


def test_405b_fits_one_8_gpu_h100_machine_only_in_fp8() -> None:
    bf16 = _place(_spec("meta-llama/Llama-3.1-405B-Instruct", [H100]))
    assert bf16.offer is None
    assert "fit" in bf16.reason or "GiB" in bf16.reason
    fp8_spec = _spec("meta-llama/Llama-3.1-405B-Instruct-FP8", [H100])
    fp8 = _place(fp8_spec)
    assert fp8.offer is not None and fp8.offer.gpu_count == 8, fp8.reason
    argv = workload_boot(fp8_spec, gpu_count=8).command
    assert _flag(argv, "--tensor-parallel-size") == "8"


def test_the_users_parallel_size_picks_the_machine_and_is_not_repeated() -> None:
    spec = _spec("meta-llama/Llama-3.1-70B-Instruct", [H100], command="--tensor-parallel-size 8")
    placed = _place(spec)
    assert placed.offer is not None and placed.offer.gpu_count == 8
    argv = workload_boot(spec, gpu_count=8).command
    assert argv.count("--tensor-parallel-size") == 1
    pipelined = _spec(
        "meta-llama/Llama-3.1-70B-Instruct",
        [H100],
        command="--tensor-parallel-size 2 --pipeline-parallel-size 2",
    )
    split = _place(pipelined)
    assert split.offer is not None and split.offer.gpu_count == 4


def test_sglang_gets_its_own_flag() -> None:
    spec = _spec("meta-llama/Llama-3.1-70B-Instruct", [H100], backend="sglang")
    argv = workload_boot(spec, gpu_count=4).command
    assert _flag(argv, "--tp") == "4"
    assert "--tensor-parallel-size" not in argv


@pytest.mark.parametrize(
    ("backend", "command", "size"),
    [("vllm", "--tensor-parallel-size 3", "3"), ("sglang", "--tp 16", "16")],
)
def test_a_parallel_size_no_machine_of_the_pool_has_is_refused_at_apply(
    backend: str, command: str, size: str
) -> None:
    spec = _spec("meta-llama/Llama-3.1-70B-Instruct", [H100], command=command, backend=backend)
    [problem] = [p for p in runnable_problems(spec) if "GPUs" in p.message]
    assert problem.path == "command"
    assert f"over {size} GPUs" in problem.message
    assert H100 in problem.message  # what the pool's machines do have
    assert problem.value == command


def test_a_parallel_size_the_pool_sells_is_accepted() -> None:
    spec = _spec("meta-llama/Llama-3.1-70B-Instruct", [H100], command="--tensor-parallel-size 8")
    assert runnable_problems(spec) == []
