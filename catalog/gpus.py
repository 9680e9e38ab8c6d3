"""The GPU table: every NVIDIA GPU AWS and GCP rent, and name lookup.

The table lives in ``catalog/data/gpus.json`` (with its sources). A GPU is canonically
known by its ``nvidia-smi`` display name; people and providers use other names
("A100-80GB", GCP's ``nvidia-a100-80gb``, AWS GpuInfo's ``A100`` with 81920 MiB), which
``resolve_gpu`` and the provider lookups map back to it.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from catalog.model import GpuModel

_DATA_FILE = "gpus.json"


class UnknownGpuError(ValueError):
    """A GPU name that is neither a display name nor an alias; lists the closest matches."""

    def __init__(self, name: str, suggestions: tuple[str, ...]) -> None:
        self.name = name
        self.suggestions = suggestions
        if suggestions:
            hint = f"did you mean {suggestions[0]!r}?"
            if len(suggestions) > 1:
                others = ", ".join(repr(s) for s in suggestions[1:])
                hint += f" (other close matches: {others})"
        else:
            hint = "run `autoscaler catalog show` for the known GPUs"
        super().__init__(f"unknown GPU {name!r}: {hint}")


@dataclass(frozen=True, slots=True)
class _Table:
    gpus: tuple[GpuModel, ...]
    by_name: dict[str, GpuModel]
    by_alias: dict[str, GpuModel]
    by_loose: dict[str, GpuModel]
    aws: dict[str, tuple[tuple[int, GpuModel], ...]]
    gcp: dict[str, GpuModel]


def _fold(name: str) -> str:
    return " ".join(name.split()).casefold()


def _loose(name: str) -> str:
    # "a100 80gb", "A100_80GB" and "A100-80GB" are the same name to a person.
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def _gpu_from_row(row: dict[str, Any]) -> GpuModel:
    major, minor = row["compute_capability"]
    return GpuModel(
        display_name=row["display_name"],
        vram_gib=float(row["vram_gib"]),
        architecture=row["architecture"],
        compute_capability=(int(major), int(minor)),
        interconnect=row.get("interconnect", "PCIe"),
        aliases=tuple(row.get("aliases", ())),
    )


@cache
def _table() -> _Table:
    raw = json.loads(resources.files("catalog.data").joinpath(_DATA_FILE).read_text())
    gpus: list[GpuModel] = []
    by_name: dict[str, GpuModel] = {}
    by_alias: dict[str, GpuModel] = {}
    loose_hits: dict[str, set[GpuModel]] = {}
    aws: dict[str, list[tuple[int, GpuModel]]] = {}
    gcp: dict[str, GpuModel] = {}
    for row in raw["gpus"]:
        gpu = _gpu_from_row(row)
        gpus.append(gpu)
        by_name[_fold(gpu.display_name)] = gpu
        for alias in gpu.aliases:
            by_alias.setdefault(_fold(alias), gpu)
        for name in (gpu.display_name, *gpu.aliases):
            loose_hits.setdefault(_loose(name), set()).add(gpu)
        for aws_name, memory_mib in row.get("aws_names", ()):
            aws.setdefault(_fold(aws_name), []).append((int(memory_mib), gpu))
        for gcp_name in row.get("gcp_names", ()):
            gcp[gcp_name] = gpu
    # A loose key shared by two GPUs would be a guess; keep only the unambiguous ones.
    by_loose = {key: next(iter(hits)) for key, hits in loose_hits.items() if len(hits) == 1}
    return _Table(
        gpus=tuple(gpus),
        by_name=by_name,
        by_alias=by_alias,
        by_loose=by_loose,
        aws={key: tuple(rows) for key, rows in aws.items()},
        gcp=gcp,
    )


def all_gpus() -> tuple[GpuModel, ...]:
    """Every known GPU, in table order (oldest architecture first)."""
    return _table().gpus


def resolve_gpu(name: str) -> GpuModel:
    """The GPU called ``name``: exact display name, then alias, both case-insensitive.

    Raises ``UnknownGpuError`` naming the closest known names when nothing matches.
    """
    table = _table()
    folded = _fold(name)
    found = table.by_name.get(folded) or table.by_alias.get(folded)
    if found is None:
        found = table.by_loose.get(_loose(name))
    if found is None:
        raise UnknownGpuError(name, closest_gpu_names(name))
    return found


def closest_gpu_names(name: str, *, limit: int = 3) -> tuple[str, ...]:
    """Display names of the GPUs whose names (or aliases) look most like ``name``."""
    table = _table()
    candidates: dict[str, GpuModel] = {}
    for gpu in table.gpus:
        for known in (gpu.display_name, *gpu.aliases):
            candidates.setdefault(_fold(known), gpu)
    matches = difflib.get_close_matches(_fold(name), list(candidates), n=limit * 3, cutoff=0.5)
    result: list[str] = []
    for match in matches:
        display = candidates[match].display_name
        if display not in result:
            result.append(display)
    return tuple(result[:limit])


def gpu_from_aws(name: str, *, memory_mib: int) -> GpuModel | None:
    """The GPU an EC2 GpuInfo entry describes (its name is ambiguous: "A100" is 40 or 80 GB).

    Picks the entry whose memory is nearest ``memory_mib``; ``None`` for GPUs not in the
    table (AMD, retired models).
    """
    rows = _table().aws.get(_fold(name))
    if not rows:
        return None
    return min(rows, key=lambda row: abs(row[0] - memory_mib) if row[0] else 0)[1]


def gpu_from_gcp(accelerator_type: str) -> GpuModel | None:
    """The GPU a Compute Engine accelerator type (``nvidia-l4``) names, or ``None``."""
    return _table().gcp.get(accelerator_type)
