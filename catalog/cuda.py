"""Which CUDA versions a GPU can run, and which drivers and machine images run them.

The table is ``catalog/data/cuda.json`` (sourced from NVIDIA's CUDA release notes and
driver release notes). An offer may serve a workload pinned to CUDA versions only when
its GPU's compute capability is built for one of them *and* the provider has a machine
image whose driver runs that version on that GPU (``offer_cuda_problem``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from catalog.model import GpuModel, ProviderName

DriverVersion = tuple[int, ...]


class UnknownCudaVersionError(ValueError):
    """A CUDA version the table does not know; lists the known ones."""

    def __init__(self, version: str, known: tuple[str, ...]) -> None:
        self.version = version
        super().__init__(f"unknown CUDA version {version!r}: known versions are {', '.join(known)}")


@dataclass(frozen=True, slots=True)
class CudaVersion:
    """One CUDA toolkit release: the GPUs it builds for and the driver it needs."""

    version: str
    min_driver: DriverVersion
    compute_capabilities: frozenset[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class MachineImage:
    """A provider's GPU machine image and the NVIDIA driver it ships."""

    provider: ProviderName
    name: str
    driver: DriverVersion

    @property
    def driver_text(self) -> str:
        return ".".join(str(part) for part in self.driver)


@dataclass(frozen=True, slots=True)
class _Table:
    versions: dict[str, CudaVersion]
    arch_min_driver: tuple[tuple[tuple[int, int], DriverVersion], ...]
    legacy_below: tuple[int, int]
    legacy_last_branch: int
    images: tuple[MachineImage, ...]


def parse_driver(text: str) -> DriverVersion:
    """ "570.172.08" -> (570, 172, 8); raises ValueError naming the bad text."""
    try:
        return tuple(int(part) for part in text.strip().split("."))
    except ValueError:
        raise ValueError(f"not an NVIDIA driver version: {text!r}") from None


def _capability(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


@cache
def _table() -> _Table:
    raw: dict[str, Any] = json.loads(
        resources.files("catalog.data").joinpath("cuda.json").read_text()
    )
    versions = {
        row["version"]: CudaVersion(
            version=row["version"],
            min_driver=parse_driver(row["min_driver"]),
            compute_capabilities=frozenset(_capability(cc) for cc in row["compute_capabilities"]),
        )
        for row in raw["versions"]
    }
    arch = tuple(
        sorted(
            (_capability(row["architecture_from"]), parse_driver(row["min_driver"]))
            for row in raw["driver_gpu_support"]
        )
    )
    legacy = raw["legacy_architectures_last_driver_branch"]
    images = tuple(
        MachineImage(
            provider=ProviderName(row["provider"]),
            name=row["name"],
            driver=parse_driver(row["driver"]),
        )
        for row in raw["machine_images"]
    )
    return _Table(
        versions=versions,
        arch_min_driver=arch,
        legacy_below=_capability(legacy["below_compute_capability"]),
        legacy_last_branch=int(legacy["last_branch"]),
        images=images,
    )


def known_cuda_versions() -> tuple[str, ...]:
    """Every CUDA version in the table, oldest first."""
    return tuple(_table().versions)


def cuda_version(version: str) -> CudaVersion:
    """The table row for ``version`` ("12.8", or "12.8.1": the patch level does not matter)."""
    parts = version.strip().split(".")
    key = ".".join(parts[:2])
    found = _table().versions.get(key)
    if found is None or len(parts) < 2:
        raise UnknownCudaVersionError(version, known_cuda_versions())
    return found


def cuda_supports(gpu: GpuModel, version: str) -> bool:
    """Whether CUDA ``version`` builds code for ``gpu``'s compute capability."""
    return gpu.compute_capability in cuda_version(version).compute_capabilities


def driver_supports_gpu(driver: DriverVersion, gpu: GpuModel) -> bool:
    """Whether an NVIDIA driver release knows ``gpu`` at all (too new or too old for it)."""
    table = _table()
    if gpu.compute_capability < table.legacy_below and driver[0] > table.legacy_last_branch:
        return False
    needed: DriverVersion = (0,)
    for since, min_driver in table.arch_min_driver:
        if gpu.compute_capability >= since:
            needed = max(needed, min_driver)
    return driver >= needed


def driver_runs(driver: DriverVersion, *, version: str, gpu: GpuModel) -> bool:
    """Whether a machine with this driver runs CUDA ``version`` code on ``gpu``."""
    return (
        cuda_supports(gpu, version)
        and driver >= cuda_version(version).min_driver
        and driver_supports_gpu(driver, gpu)
    )


def machine_images(provider: ProviderName) -> tuple[MachineImage, ...]:
    """The provider's GPU images, in table order; empty for providers we boot no image on."""
    return tuple(image for image in _table().images if image.provider == provider)


def images_for(*, provider: ProviderName, gpu: GpuModel, version: str) -> tuple[MachineImage, ...]:
    """The provider's images that run CUDA ``version`` on ``gpu``, newest driver first."""
    fitting = [
        image
        for image in machine_images(provider)
        if driver_runs(image.driver, version=version, gpu=gpu)
    ]
    return tuple(sorted(fitting, key=lambda image: image.driver, reverse=True))


def offer_cuda_problem(
    *, provider: ProviderName, gpu: GpuModel, pins: tuple[str, ...]
) -> str | None:
    """Why an offer cannot run any of the pinned CUDA versions, or ``None`` when one fits.

    Providers with no image table (local, private workers) bring their own driver, so only
    the GPU's compute capability is checked for them.
    """
    if not pins:
        return None
    built_for = [version for version in pins if cuda_supports(gpu, version)]
    if not built_for:
        cc = ".".join(str(part) for part in gpu.compute_capability)
        versions = ", ".join(pins)
        return f"{gpu.display_name} (compute capability {cc}) is not supported by CUDA {versions}"
    if not machine_images(provider):
        return None
    for version in built_for:
        if images_for(provider=provider, gpu=gpu, version=version):
            return None
    return (
        f"no {provider.value} machine image has a driver that runs CUDA "
        f"{', '.join(built_for)} on {gpu.display_name}"
    )
