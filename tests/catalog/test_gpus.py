"""GPU name lookup: display names, aliases, provider names, and helpful failures."""

from __future__ import annotations

import pytest

from catalog.gpus import UnknownGpuError, all_gpus, gpu_from_aws, gpu_from_gcp, resolve_gpu


@pytest.mark.parametrize(
    ("name", "display"),
    [
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"),
        ("nvidia a100-sxm4-80gb", "NVIDIA A100-SXM4-80GB"),
        ("A100-80GB", "NVIDIA A100-SXM4-80GB"),
        ("a100-80gb", "NVIDIA A100-SXM4-80GB"),
        ("nvidia-a100-80gb", "NVIDIA A100-SXM4-80GB"),
        ("A100", "NVIDIA A100-SXM4-40GB"),
        ("H100", "NVIDIA H100 80GB HBM3"),
        ("nvidia-h100-mega-80gb", "NVIDIA H100 80GB HBM3"),
        ("T4", "Tesla T4"),
        ("nvidia-tesla-v100", "Tesla V100-SXM2-16GB"),
        ("  NVIDIA   L4 ", "NVIDIA L4"),
        ("a100_80gb", "NVIDIA A100-SXM4-80GB"),
    ],
)
def test_resolve_gpu_accepts_display_names_and_aliases(name: str, display: str) -> None:
    assert resolve_gpu(name).display_name == display


def test_unknown_gpu_suggests_the_closest_display_name() -> None:
    with pytest.raises(UnknownGpuError, match="did you mean 'NVIDIA A100-SXM4-80GB'"):
        resolve_gpu("NVIDIA A100-SXM-80GB")


def test_unknown_gpu_error_is_a_value_error_with_suggestions() -> None:
    with pytest.raises(ValueError, match="unknown GPU 'H1OO'") as info:
        resolve_gpu("H1OO")
    assert isinstance(info.value, UnknownGpuError)
    assert info.value.suggestions[0] == "NVIDIA H100 80GB HBM3"


def test_every_display_name_and_alias_resolves_to_its_own_gpu() -> None:
    for gpu in all_gpus():
        assert resolve_gpu(gpu.display_name) == gpu
        for alias in gpu.aliases:
            assert resolve_gpu(alias) == gpu, alias


def test_aws_gpu_info_names_are_disambiguated_by_memory() -> None:
    assert gpu_from_aws("A100", memory_mib=81920) == resolve_gpu("A100-80GB")
    assert gpu_from_aws("A100", memory_mib=40960) == resolve_gpu("A100-40GB")
    assert gpu_from_aws("Radeon Pro V520", memory_mib=8192) is None


def test_gcp_accelerator_types_map_to_gpus() -> None:
    assert gpu_from_gcp("nvidia-l4") == resolve_gpu("NVIDIA L4")
    assert gpu_from_gcp("nvidia-tesla-k80") is None
