"""Model memory estimates: known models, names, quantisation, context length, hints."""

from __future__ import annotations

import pytest

from catalog.sizing import (
    BatchLimits,
    Confidence,
    command_batch_limits,
    command_flags,
    estimate_model_memory,
)


def test_known_model_is_high_confidence_and_fits_where_it_really_fits() -> None:
    estimate = estimate_model_memory("meta-llama/Llama-3.1-8B-Instruct")
    assert estimate.confidence is Confidence.HIGH
    assert 16 < estimate.gib < 22.5  # runs on one 24 GB L4/A10G at 8k context, not on a T4
    assert "8192 tokens" in estimate.explanation


def test_max_model_len_in_the_command_grows_the_kv_cache() -> None:
    short = estimate_model_memory("meta-llama/Llama-3.1-8B-Instruct", "vllm serve m")
    long = estimate_model_memory(
        "meta-llama/Llama-3.1-8B-Instruct", "vllm serve m --max-model-len 32768"
    )
    # 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes = 128 KiB per token.
    assert long.kv_cache_gib == pytest.approx(4.0, abs=0.01)
    assert long.gib - short.gib == pytest.approx(3.0, abs=0.11)
    assert "--max-model-len" in long.explanation


def test_quantisation_suffix_shrinks_the_weights() -> None:
    awq = estimate_model_memory("Qwen/Qwen2.5-72B-Instruct-AWQ")
    full = estimate_model_memory("Qwen/Qwen2.5-72B-Instruct")
    assert awq.weights_gib < full.weights_gib / 3
    assert "4-bit" in awq.explanation
    fp8 = estimate_model_memory("Qwen/Qwen2.5-72B-Instruct", "--quantization fp8")
    assert "8-bit" in fp8.explanation


@pytest.mark.parametrize(
    ("model_id", "params"),
    [("acme/foo-13b-chat", "13B"), ("org/SmolLM-135M", "0.135B"), ("x/Foo-8x7B", "56B")],
)
def test_parameter_count_is_read_from_unknown_names(model_id: str, params: str) -> None:
    estimate = estimate_model_memory(model_id)
    assert estimate.confidence is Confidence.MEDIUM
    assert estimate.explanation.startswith(f"{params} parameters (from the name)")


def test_whisper_is_small_and_has_no_big_kv_cache() -> None:
    estimate = estimate_model_memory("openai/whisper-large-v3")
    assert estimate.confidence is Confidence.HIGH
    assert estimate.gib < 6
    assert estimate.kv_cache_gib == 0


def test_unrecognisable_model_says_so_and_asks_for_a_hint() -> None:
    estimate = estimate_model_memory("acme/mystery")
    assert estimate.confidence is Confidence.LOW
    assert "model_memory_gib" in estimate.explanation


def test_hint_overrides_the_estimate() -> None:
    estimate = estimate_model_memory("meta-llama/Llama-3.1-70B", hint_gib=150)
    assert (estimate.gib, estimate.confidence) == (150, Confidence.GIVEN)
    with pytest.raises(ValueError, match="model_memory_gib must be > 0"):
        estimate_model_memory("m", hint_gib=0)


def test_bad_max_model_len_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--max-model-len must be a whole number, got 'lots'"):
        estimate_model_memory("meta-llama/Llama-3.1-8B", "--max-model-len lots")


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-num-batched-tokens", "512", "--max-num-seqs", "64"],
        ["--max-num-batched-tokens=512", "--max-num-seqs=64"],
        ["--chunked-prefill-size", "512", "--max-running-requests", "64"],
    ],
    ids=["vllm-spaced", "vllm-equals", "sglang"],
)
def test_batch_limits_are_read_in_either_spelling(argv: list[str]) -> None:
    limits = command_batch_limits(command_flags(["vllm", "serve", "m", *argv]))
    assert limits == BatchLimits(max_batched_tokens=512, max_num_seqs=64)


def test_batch_limits_unset_or_chunking_off_read_as_the_engines_defaults() -> None:
    assert command_batch_limits(command_flags(["--max-model-len", "4096"])) == BatchLimits()
    off = command_batch_limits(command_flags(["--chunked-prefill-size", "-1"]))
    assert off.max_batched_tokens is None


def test_a_budget_below_the_sequence_cap_is_refused_in_vllms_words() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(128\)") as refused:
        command_batch_limits(
            command_flags(["--max-num-batched-tokens", "128", "--max-num-seqs", "256"])
        )
    assert str(refused.value) == (
        "max_num_batched_tokens (128) must be greater than or equal to max_num_seqs (256)."
    )
    with pytest.raises(ValueError, match="--max-num-seqs must be a whole number"):
        command_batch_limits(command_flags(["--max-num-seqs", "lots"]))


def test_a_budget_below_the_context_is_refused_only_with_chunked_prefill_off() -> None:
    argv = ["--max-num-batched-tokens", "2048", "--max-model-len", "8192"]
    assert command_batch_limits(command_flags(argv)).max_batched_tokens == 2048
    with pytest.raises(ValueError, match=r"is smaller than max_model_len \(8192\)"):
        command_batch_limits(command_flags([*argv, "--no-enable-chunked-prefill"]))
