"""The serving profile: calibration to published figures, and the laws it must obey."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.gpus import all_gpus
from catalog.perf import ModelDoesNotFit, gpu_spec, known_gpus, serving_profile

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
L4 = "NVIDIA L4"


@pytest.mark.parametrize(
    ("gpu", "low", "high"),
    [(H100, 25_000, 33_000), (A100, 9_000, 11_000), (L4, 3_000, 4_000)],
)
def test_8b_prefill_matches_published_figures(gpu: str, low: float, high: float) -> None:
    assert low <= serving_profile(gpu, 1, 8.0).prefill_tokens_per_s <= high


def test_8b_decode_at_batch_one_follows_memory_bandwidth() -> None:
    h100 = serving_profile(H100, 1, 8.0)
    assert 150 <= h100.decode_tokens_per_s <= 200
    # Per-sequence speed falls as the batch grows, but slowly: no cliff at the batch limit.
    at_max = h100.decode_tokens_per_s_at(h100.max_batch)
    assert h100.decode_tokens_per_s / 4 < at_max < h100.decode_tokens_per_s
    # The replica's total output grows with the batch.
    assert at_max * h100.max_batch > 20 * h100.decode_tokens_per_s


def test_batch_is_bounded_by_kv_memory() -> None:
    assert serving_profile(L4, 1, 8.0).max_batch < serving_profile(A100, 1, 8.0).max_batch
    assert serving_profile(A100, 1, 8.0).max_batch <= 256
    assert serving_profile(A100, 1, 8.0, max_batch=4).max_batch == 4


def test_the_step_budget_is_vllms_openai_server_default_for_the_gpu() -> None:
    # vLLM's EngineArgs.get_batch_defaults: 8,192 on a GPU of 70 GiB or more, the A100
    # excepted; 2,048 elsewhere.
    assert serving_profile(H100, 1, 8.0).max_batched_tokens == 8192
    assert serving_profile("NVIDIA H200", 1, 8.0).max_batched_tokens == 8192
    assert serving_profile(A100, 1, 8.0).max_batched_tokens == 2048
    assert serving_profile(L4, 1, 8.0).max_batched_tokens == 2048
    assert serving_profile(L4, 1, 8.0, max_batched_tokens=512).max_batched_tokens == 512
    # A budget alone lowers the default sequence cap to it (vLLM's EngineArgs: "if
    # orig_max_num_seqs is None: max_num_seqs = min(max_num_seqs, max_num_batched_tokens)");
    # a cap given beside a smaller budget is refused, as vLLM's SchedulerConfig does.
    assert serving_profile(A100, 1, 8.0, max_batched_tokens=16).max_batch == 16
    with pytest.raises(ValueError, match="at least the batch"):
        serving_profile(A100, 1, 8.0, max_batched_tokens=16, max_batch=32)


def test_a_step_with_a_prompt_chunk_is_one_pass_for_the_decodes_and_the_chunk() -> None:
    a100 = serving_profile(A100, 1, 8.0)
    decode = a100.decode_step_seconds(8)
    assert a100.step_seconds(decodes=8, prefill_tokens=0) == decode
    assert a100.step_seconds(decodes=0, prefill_tokens=1500) == a100.prefill_seconds(1500)
    # A big chunk is compute-bound: the decodes ride on it for the compute of their
    # tokens, not a second read of the weights.
    mixed = a100.step_seconds(decodes=8, prefill_tokens=1500)
    assert a100.prefill_seconds(1500) < mixed < a100.prefill_seconds(1510) + 0.001
    assert mixed < decode + a100.prefill_seconds(1500) - decode / 2
    # A small chunk hides in the decode step's memory time.
    assert a100.step_seconds(decodes=8, prefill_tokens=10) == decode
    # More work in a step never makes it faster.
    steps = [a100.step_seconds(decodes=8, prefill_tokens=c) for c in range(0, 4000, 50)]
    assert steps == sorted(steps)


def test_model_sizes_scale_prefill_by_compute_and_decode_by_bytes() -> None:
    small = serving_profile(H100, 1, 8.0)
    large = serving_profile(H100, 1, 32.0)
    fp8 = serving_profile(H100, 1, 8.0, 1.0)
    assert large.prefill_tokens_per_s == pytest.approx(small.prefill_tokens_per_s / 4)
    assert large.decode_tokens_per_s < small.decode_tokens_per_s / 3
    assert fp8.decode_tokens_per_s > 1.7 * small.decode_tokens_per_s


def test_aliases_resolve_to_the_same_profile() -> None:
    assert serving_profile("A100-80GB", 1, 8.0) == serving_profile(A100, 1, 8.0)
    assert serving_profile("NVIDIA RTX 6000 Ada Generation", 1, 8.0).gpu == (
        "NVIDIA RTX 6000 Ada Generation"
    )


def test_unknown_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no performance figures for GPU 'H900'.*did you mean"):
        serving_profile("H900", 1, 8.0)


def test_model_too_large_names_the_gpu_and_the_weights() -> None:
    with pytest.raises(
        ModelDoesNotFit, match=r"70B model .*\(140.0 GB of weights\) .* 1 x NVIDIA L4"
    ):
        serving_profile(L4, 1, 70.0)
    assert serving_profile(H100, 4, 70.0).max_batch > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_count": 0}, "gpu_count"),
        ({"params_b": -1.0}, "params_b"),
        ({"bytes_per_param": 0.0}, "bytes_per_param"),
    ],
)
def test_bad_sizes_are_named(kwargs: dict[str, float], message: str) -> None:
    arguments: dict[str, float] = {"gpu_count": 1, "params_b": 8.0, "bytes_per_param": 2.0}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        serving_profile(
            A100,
            int(arguments["gpu_count"]),
            arguments["params_b"],
            arguments["bytes_per_param"],
        )


@pytest.mark.parametrize("gpu_count", [True, 1.0])
def test_a_gpu_count_not_a_whole_number_is_refused_after_a_good_one(gpu_count: object) -> None:
    """The profiles kept for their arguments do not let a count equal to 1 but not a
    whole number (``True``, ``1.0``) through once 1 GPU was asked for."""
    assert serving_profile(A100, 1, 8.0).gpu_count == 1
    with pytest.raises(ValueError, match="gpu_count"):
        serving_profile(A100, gpu_count, 8.0)


def test_every_gpu_in_the_table_has_figures_that_agree_on_memory() -> None:
    for gpu in all_gpus():
        spec = gpu_spec(gpu.display_name)
        assert spec.vram_gib == pytest.approx(gpu.vram_gib), gpu.display_name


# --- properties --------------------------------------------------------------------------

_SERVING_GPUS = [name for name in known_gpus() if gpu_spec(name).vram_gib >= 40]
gpus = st.sampled_from(_SERVING_GPUS)
tokens = st.integers(min_value=0, max_value=200_000)
model_sizes = st.sampled_from([0.5, 1.0, 3.0, 8.0, 14.0])


@given(gpu=gpus, params_b=model_sizes, a=tokens, b=tokens)
def test_prefill_time_is_monotonic_in_tokens(gpu: str, params_b: float, a: int, b: int) -> None:
    profile = serving_profile(gpu, 1, params_b)
    low, high = sorted((a, b))
    assert profile.prefill_seconds(low) <= profile.prefill_seconds(high)
    assert profile.ttft_seconds(low, queued_prefill_tokens=high) >= profile.prefill_seconds(low)


@given(gpu=gpus, params_b=model_sizes, inputs=tokens, a=tokens, b=tokens)
def test_request_time_is_monotonic_in_output_and_batch(
    gpu: str, params_b: float, inputs: int, a: int, b: int
) -> None:
    profile = serving_profile(gpu, 1, params_b)
    low, high = sorted((a, b))
    assert profile.request_seconds(input_tokens=inputs, output_tokens=low) <= (
        profile.request_seconds(input_tokens=inputs, output_tokens=high)
    )
    small, large = sorted((1 + a % 256, 1 + b % 256))
    assert profile.decode_step_seconds(small) <= profile.decode_step_seconds(large)


@given(
    pair=st.tuples(gpus, gpus),
    params_b=model_sizes,
    n=st.integers(min_value=20_000, max_value=200_000),
)
def test_a_faster_gpu_prefills_sooner(pair: tuple[str, str], params_b: float, n: int) -> None:
    first, second = (gpu_spec(name) for name in pair)
    if first.tflops == second.tflops:
        return
    fast, slow = sorted(pair, key=lambda name: -gpu_spec(name).tflops)
    assert serving_profile(fast, 1, params_b).prefill_seconds(n) < (
        serving_profile(slow, 1, params_b).prefill_seconds(n)
    )


@settings(max_examples=60)
@given(
    gpu=gpus,
    params_b=model_sizes,
    count=st.sampled_from([1, 2, 4]),
    inputs=st.integers(min_value=1, max_value=8000),
    outputs=st.integers(min_value=1, max_value=2000),
)
def test_more_gpus_serve_more(
    gpu: str, params_b: float, count: int, inputs: int, outputs: int
) -> None:
    fewer = serving_profile(gpu, count, params_b)
    more = serving_profile(gpu, count * 2, params_b)
    assert more.capacity_rps(input_tokens=inputs, output_tokens=outputs) > (
        fewer.capacity_rps(input_tokens=inputs, output_tokens=outputs)
    )
    assert more.prefill_tokens_per_s > fewer.prefill_tokens_per_s
    assert more.max_batch >= fewer.max_batch


@given(gpu=gpus, inputs=st.integers(0, 8000), a=st.integers(0, 4000), b=st.integers(0, 4000))
def test_capacity_falls_as_requests_grow(gpu: str, inputs: int, a: int, b: int) -> None:
    profile = serving_profile(gpu, 1, 8.0)
    low, high = sorted((a, b))
    if inputs + low == 0:
        return
    assert profile.capacity_rps(input_tokens=inputs, output_tokens=low) >= (
        profile.capacity_rps(input_tokens=inputs, output_tokens=high)
    )
