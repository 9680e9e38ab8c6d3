"""GPU models and offers: the value types every layer above shares.

A GPU is known by its NVIDIA display name, as ``nvidia-smi`` reports it
("NVIDIA A100-SXM4-80GB"). An offer is one way to rent GPUs: a provider's instance type
in a zone, with its on-demand and (if any) spot price per hour. GCP prices a VM and its
GPUs apart; an offer always carries the total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property


class ProviderName(StrEnum):
    """Where an offer is bought."""

    AWS = "aws"
    GCP = "gcp"
    LOCAL = "local"
    PRIVATE = "private"
    SIMULATED = "simulated"


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One GPU model under its NVIDIA display name.

    ``compute_capability`` is the SM version as a (major, minor) pair: (8, 0) for A100,
    (9, 0) for H100. ``aliases`` are the other names people and providers use for it.
    """

    display_name: str
    vram_gib: float
    architecture: str
    compute_capability: tuple[int, int]
    interconnect: str = "PCIe"
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Offer:
    """A rentable instance type in one zone, priced per hour in USD (the total, GPUs included).

    ``spot_usd_per_hour`` is ``None`` where the provider sells no spot capacity for it.
    """

    provider: ProviderName
    region: str
    zone: str
    instance_type: str
    gpu: str
    gpu_count: int
    vcpus: float
    memory_gib: float
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float | None = None
    labels: tuple[tuple[str, str], ...] = field(default=())

    @cached_property
    def key(self) -> str:
        """A stable identity: provider/zone/instance type.

        GCP N1 machines take GPUs as attachments, so one machine type carries several
        offers; for those (label ``accelerator_type``) the key adds ``+COUNTxTYPE``.
        Formatted once per offer and kept (placement ranks every feasible offer by it on
        every pass; the offer is frozen, so the key cannot go stale): O(labels) the first
        time, O(1) after. Kept outside the dataclass fields, so equality, hashing and
        ``asdict`` are unchanged.
        """
        base = f"{self.provider.value}/{self.zone}/{self.instance_type}"
        attached = self.label("accelerator_type")
        return base if attached is None else f"{base}+{self.gpu_count}x{attached}"

    def label(self, name: str) -> str | None:
        """The value of label ``name``, or ``None``."""
        return next((value for key, value in self.labels if key == name), None)

    def price(self, *, spot: bool) -> float:
        """The hourly price on the given market; spot falls back to nothing, never silently."""
        if spot:
            if self.spot_usd_per_hour is None:
                raise ValueError(f"{self.key} has no spot price")
            return self.spot_usd_per_hour
        return self.on_demand_usd_per_hour
