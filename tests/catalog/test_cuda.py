"""CUDA compatibility: which GPUs a CUDA version builds for, and which images run it."""

from __future__ import annotations

import pytest

from catalog.cuda import (
    UnknownCudaVersionError,
    cuda_supports,
    driver_runs,
    images_for,
    offer_cuda_problem,
    parse_driver,
)
from catalog.gpus import resolve_gpu
from catalog.model import ProviderName


@pytest.mark.parametrize(
    ("gpu", "version", "supported"),
    [
        ("Tesla V100-SXM2-16GB", "12.8", True),
        ("Tesla V100-SXM2-16GB", "13.0", False),  # 13.0 dropped Volta
        ("Tesla P100-PCIE-16GB", "13.0", False),  # and Pascal
        ("Tesla M60", "13.0", False),  # and Maxwell
        ("Tesla T4", "13.0", True),
        ("NVIDIA H100 80GB HBM3", "11.8", True),  # Hopper arrived in 11.8
        ("NVIDIA L4", "11.8", True),
        ("NVIDIA B200", "12.6", False),  # Blackwell needs 12.8
        ("NVIDIA B200", "12.8", True),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "12.8", True),
        ("NVIDIA A100-SXM4-80GB", "12.4.1", True),  # patch level ignored
    ],
)
def test_cuda_supports_follows_nvidia_release_notes(
    gpu: str, version: str, supported: bool
) -> None:
    assert cuda_supports(resolve_gpu(gpu), version) is supported


def test_unknown_cuda_version_names_the_known_ones() -> None:
    with pytest.raises(UnknownCudaVersionError, match=r"unknown CUDA version '14\.7'.*12\.8"):
        cuda_supports(resolve_gpu("L4"), "14.7")


def test_driver_must_be_new_enough_for_the_toolkit() -> None:
    h100 = resolve_gpu("H100")
    assert driver_runs(parse_driver("575.51.03"), version="12.9", gpu=h100)
    assert not driver_runs(parse_driver("570.172.08"), version="12.9", gpu=h100)


def test_drivers_after_r580_do_not_run_volta() -> None:
    v100 = resolve_gpu("V100")
    assert driver_runs(parse_driver("580.95.05"), version="12.8", gpu=v100)
    assert not driver_runs(parse_driver("595.91.07"), version="12.8", gpu=v100)


def test_images_for_lists_newest_driver_first() -> None:
    images = images_for(provider=ProviderName.AWS, gpu=resolve_gpu("H100"), version="12.8")
    assert [image.driver for image in images] == sorted(
        (image.driver for image in images), reverse=True
    )
    assert len(images) >= 2


def test_offer_cuda_problem_explains_gpu_and_image_failures() -> None:
    v100 = resolve_gpu("V100")
    b200 = resolve_gpu("B200")
    gcp = ProviderName.GCP
    gpu_problem = offer_cuda_problem(provider=gcp, gpu=v100, pins=("13.0",))
    assert gpu_problem is not None
    assert "compute capability 7.0" in gpu_problem
    # GCP has no image with a 590+ driver in the table, so 13.1 cannot run there.
    image_problem = offer_cuda_problem(provider=gcp, gpu=b200, pins=("13.1",))
    assert image_problem is not None
    assert "machine image" in image_problem
    assert offer_cuda_problem(provider=gcp, gpu=b200, pins=("13.1", "12.8")) is None
    # Private workers bring their own driver: only the GPU is checked.
    assert offer_cuda_problem(provider=ProviderName.PRIVATE, gpu=b200, pins=("13.1",)) is None


def test_parse_driver_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not an NVIDIA driver version: 'abc'"):
        parse_driver("abc")
