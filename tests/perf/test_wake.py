"""Sleep-mode timing: a pass over the weights across the host link, or a reload from disk."""

from __future__ import annotations

import pytest

from catalog.wake import (
    copy_seconds,
    reload_weights_seconds,
    sleep_seconds,
    wake_seconds,
    wake_up_seconds,
    weights_bytes,
)

A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"
LLAMA_8B = weights_bytes(8.0)  # 16 GB in bf16


def test_a_level_1_wake_copies_the_weights_back_over_the_gpus_pcie_link() -> None:
    # 16 GB over PCIe Gen4 x16 (31.5 GB/s) at 80 %: 0.63 s, plus the call's 0.1 s.
    seconds = wake_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=1)

    assert seconds == pytest.approx(0.1 + 16e9 / (31.5e9 * 0.8))
    # Gen5 on the H100 halves the copy.
    assert wake_seconds(weights_bytes=LLAMA_8B, gpu=H100, level=1) < seconds * 0.6


def test_a_level_2_wake_reads_the_weights_from_disk_and_is_much_slower() -> None:
    level1 = wake_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=1)
    level2 = wake_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=2)

    # wake weights + reload (16 GB at 3.5 GB/s from disk, then the copy) + wake kv_cache
    assert level2 == pytest.approx(
        0.1 + reload_weights_seconds(weights_bytes=LLAMA_8B, gpu=A100) + 0.1
    )
    assert level2 > 16e9 / 3.5e9 > level1


def test_going_to_sleep_costs_the_copy_out_only_at_level_1() -> None:
    copy = copy_seconds(weights_bytes=LLAMA_8B, gpu=A100)

    assert sleep_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=1) == pytest.approx(0.1 + copy)
    assert sleep_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=2) == pytest.approx(0.1)
    assert sleep_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=0) == pytest.approx(0.1)


def test_gpus_copy_their_shares_at_once_two_to_a_host_uplink() -> None:
    one = copy_seconds(weights_bytes=LLAMA_8B, gpu=A100, gpu_count=1)

    assert copy_seconds(weights_bytes=LLAMA_8B, gpu=A100, gpu_count=2) == pytest.approx(one)
    assert copy_seconds(weights_bytes=LLAMA_8B, gpu=A100, gpu_count=4) == pytest.approx(one / 2)


def test_waking_only_the_kv_cache_moves_no_weights() -> None:
    kv_only = wake_up_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=1, tags=["kv_cache"])

    assert kv_only == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("params_b", "bytes_per_param", "gpu", "gpus", "level", "low", "high"),
    [
        # vLLM blog 2025-10-26: level-1 wakes 0.1-6 s, level-2 wakes 0.8-2.6 s (small models).
        (0.6, 2.0, "NVIDIA A10", 1, 1, 0.1, 0.4),
        (235.0, 1.0, A100, 4, 1, 2.0, 6.0),
        (0.6, 2.0, "NVIDIA A10", 1, 2, 0.6, 1.2),
        (4.2, 2.0, "NVIDIA A10", 1, 2, 2.0, 3.3),
    ],
)
def test_the_model_lands_near_vllms_published_wake_times(
    params_b: float,
    bytes_per_param: float,
    gpu: str,
    gpus: int,
    level: int,
    low: float,
    high: float,
) -> None:
    size = weights_bytes(params_b, bytes_per_param)
    assert level in (1, 2)
    seconds = wake_seconds(
        weights_bytes=size, gpu=gpu, level=1 if level == 1 else 2, gpu_count=gpus
    )

    assert low <= seconds <= high


def test_names_and_levels_are_checked() -> None:
    assert wake_seconds(weights_bytes=LLAMA_8B, gpu="A100-80GB", level=1) == wake_seconds(
        weights_bytes=LLAMA_8B, gpu=A100, level=1
    )
    with pytest.raises(ValueError, match="Quantum 9000"):
        wake_seconds(weights_bytes=LLAMA_8B, gpu="Quantum 9000", level=1)
    with pytest.raises(ValueError, match="sleep level must be 0, 1 or 2, got 3"):
        wake_seconds(weights_bytes=LLAMA_8B, gpu=A100, level=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights_bytes must be > 0"):
        sleep_seconds(weights_bytes=0.0, gpu=A100, level=2)
