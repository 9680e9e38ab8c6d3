"""How long an engine takes to fall asleep and to wake (vLLM sleep mode), from link speeds.

One model of sleep-mode timing, shared by engine-sim (which answers ``/sleep`` and
``/wake_up`` as slowly as a GPU would) and, later, the trace simulator and placement,
which weigh a sleeping engine against a stopped or a fresh machine. Pure: no clock, no I/O.

What vLLM does (``--enable-sleep-mode``, its CuMem allocator):

* **Level 1** copies every weight to pinned host memory and frees the KV cache; waking
  copies the weights back. Both are one pass over the weights across the GPU's host link.
* **Level 2** frees weights and KV cache without a copy; waking re-maps memory whose
  contents are gone, so the weights must be read again from local disk
  (``collective_rpc reload_weights``) and copied to the GPU.
* **Level 0** only pauses the scheduler: nothing moves.

The model, for ``weights_bytes`` split evenly over ``gpu_count`` GPUs that copy in
parallel, each over its own host link at :data:`HOST_LINK_EFFICIENCY` of the link's peak,
two GPUs sharing one host uplink on multi-GPU boards (:data:`GPUS_PER_HOST_UPLINK`):

* ``sleep_seconds``: level 1 ``OP_OVERHEAD_S + per_gpu_bytes / link``; levels 0 and 2
  ``OP_OVERHEAD_S``.
* ``wake_up_seconds`` (one ``POST /wake_up``): ``OP_OVERHEAD_S`` plus, when the weights
  were offloaded (level 1) and this call wakes them, ``per_gpu_bytes / link``.
* ``reload_weights_seconds`` (level 2 only): ``RELOAD_OVERHEAD_S + weights_bytes /
  DISK_READ_BYTES_PER_S + per_gpu_bytes / link`` (one disk per machine).
* ``wake_seconds``: what the controller's whole wake takes: level 1 one ``wake_up``;
  level 2 ``wake_up(weights) + reload_weights + wake_up(kv_cache)``; level 0 one
  ``wake_up``.

Sources and checks:

* Host links (per direction, x16): PCIe Gen3 15.75 GB/s, Gen4 31.5 GB/s, Gen5 63 GB/s
  (PCI-SIG base specifications: 8, 16 and 32 GT/s per lane, 128b/130b); NVLink-C2C 450
  GB/s per direction on Grace-Blackwell (NVIDIA GB200 datasheet, 900 GB/s
  bidirectional). The generation per GPU is NVIDIA's datasheet figure (V100, T4, P100:
  Gen3; A10/A10G, A100, L4, L40, L40S, RTX A6000, RTX 6000 Ada, RTX 4090: Gen4; H100, H200,
  B200, RTX PRO 6000 Blackwell: Gen5).
* Efficiency 0.8: pinned-memory copies reach about 25 GB/s on Gen4 and about 50 GB/s on
  Gen5 hosts (CUDA samples ``bandwidthTest``, NVIDIA ``nvbandwidth``).
* Two GPUs per host uplink: NVIDIA DGX/HGX A100 and H100 boards put two GPUs behind each
  PCIe switch to the CPU, so on a multi-GPU machine all GPUs copying at once get half a link.
* Disk 3.5 GB/s: one NVMe SSD's sequential read (PCIe Gen3 x4 class; the instance-store
  NVMe of GPU instances), one per machine.
* vLLM's blog "Zero-Reload Model Switching with vLLM Sleep Mode" (2025-10-26) measured
  level-1 wakes of 0.1-6 s (Qwen3-0.6B on an A4000 up to Qwen3-235B-FP8 over 4 x A100),
  level-2 wakes of 0.8-2.6 s (0.6B and 4.2B models on an A4000) and 30-100+ s for a full
  reload. This model gives level-1 wakes of 0.15 s (0.6B, Gen4) and 4.8 s (235B FP8 over
  4 x A100), level-2 wakes of 0.9 s (0.6B) and 3.2 s (4.2B, about 25 % slower than
  measured: the blog's reload read a warm page cache, this model a cold disk).
  ``docs/engine-sim.md`` has the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from catalog.perf import gpu_spec

SleepLevel = Literal[0, 1, 2]
SLEEP_LEVELS: tuple[SleepLevel, ...] = (0, 1, 2)

WAKE_TAGS = ("weights", "kv_cache")
"""What vLLM's ``POST /wake_up?tags=`` names (``scheduling`` is level 0's only tag)."""

PCIE_GEN3_BYTES_PER_S = 15.75e9
PCIE_GEN4_BYTES_PER_S = 31.5e9
PCIE_GEN5_BYTES_PER_S = 63.0e9
NVLINK_C2C_BYTES_PER_S = 450e9

HOST_LINK_EFFICIENCY = 0.8
"""Share of the link's peak a pinned host-device copy reaches."""

GPUS_PER_HOST_UPLINK = 2
"""GPUs behind one host uplink on a multi-GPU board (a single-GPU machine has its own)."""

DISK_READ_BYTES_PER_S = 3.5e9
"""Sequential read of the machine's local NVMe SSD, where the weights lie."""

OP_OVERHEAD_S = 0.1
"""Fixed cost of one sleep or wake call: pausing or resuming the scheduler, unmapping or
re-mapping the allocator's memory on every GPU."""

RELOAD_OVERHEAD_S = 0.3
"""Fixed cost of ``reload_weights``: opening the checkpoint and walking its tensors."""

_LINK_BY_GPU: Mapping[str, float] = {
    "tesla m60": PCIE_GEN3_BYTES_PER_S,
    "tesla p4": PCIE_GEN3_BYTES_PER_S,
    "tesla p100-pcie-16gb": PCIE_GEN3_BYTES_PER_S,
    "tesla v100-sxm2-16gb": PCIE_GEN3_BYTES_PER_S,
    "tesla v100-sxm2-32gb": PCIE_GEN3_BYTES_PER_S,
    "tesla t4": PCIE_GEN3_BYTES_PER_S,
    "nvidia t4g": PCIE_GEN3_BYTES_PER_S,
    "nvidia a10g": PCIE_GEN4_BYTES_PER_S,
    "nvidia a10": PCIE_GEN4_BYTES_PER_S,
    "nvidia rtx a6000": PCIE_GEN4_BYTES_PER_S,
    "nvidia a100-sxm4-40gb": PCIE_GEN4_BYTES_PER_S,
    "nvidia a100-pcie-40gb": PCIE_GEN4_BYTES_PER_S,
    "nvidia a100-sxm4-80gb": PCIE_GEN4_BYTES_PER_S,
    "nvidia a100 80gb pcie": PCIE_GEN4_BYTES_PER_S,
    "nvidia l4": PCIE_GEN4_BYTES_PER_S,
    "nvidia l40": PCIE_GEN4_BYTES_PER_S,
    "nvidia l40s": PCIE_GEN4_BYTES_PER_S,
    "nvidia geforce rtx 4090": PCIE_GEN4_BYTES_PER_S,
    "nvidia rtx 6000 ada generation": PCIE_GEN4_BYTES_PER_S,
    "nvidia h100 pcie": PCIE_GEN5_BYTES_PER_S,
    "nvidia h100 nvl": PCIE_GEN5_BYTES_PER_S,
    "nvidia h100 80gb hbm3": PCIE_GEN5_BYTES_PER_S,
    "nvidia h200": PCIE_GEN5_BYTES_PER_S,
    "nvidia b200": PCIE_GEN5_BYTES_PER_S,
    "nvidia gb200": NVLINK_C2C_BYTES_PER_S,
    "nvidia rtx pro 6000 blackwell server edition": PCIE_GEN5_BYTES_PER_S,
}


def host_link_bytes_per_s(gpu: str) -> float:
    """Peak host-to-device bandwidth of one ``gpu`` (a display name or alias), per direction.

    Raises ``ValueError`` naming the GPU when it or its host link is not known.
    """
    found = _LINK_BY_GPU.get(gpu_spec(gpu).display_name.casefold())
    if found is None:
        raise ValueError(f"no host-link figure for GPU {gpu!r}; known: {', '.join(_known())}")
    return found


def weights_bytes(params_b: float, bytes_per_param: float = 2.0) -> float:
    """Bytes of a model of ``params_b`` billion parameters at ``bytes_per_param``."""
    return params_b * 1e9 * bytes_per_param


def copy_seconds(*, weights_bytes: float, gpu: str, gpu_count: int = 1) -> float:
    """One pass of the weights across the host links, every GPU copying its share at once."""
    _check(weights_bytes=weights_bytes, gpu_count=gpu_count)
    per_gpu = weights_bytes / gpu_count
    sharing = min(gpu_count, GPUS_PER_HOST_UPLINK)
    return per_gpu * sharing / (host_link_bytes_per_s(gpu) * HOST_LINK_EFFICIENCY)


def sleep_seconds(
    *, weights_bytes: float, gpu: str, level: SleepLevel, gpu_count: int = 1
) -> float:
    """How long ``POST /sleep?level=LEVEL`` takes: level 1 copies the weights out."""
    _check_level(level)
    if level == 1:
        return OP_OVERHEAD_S + copy_seconds(
            weights_bytes=weights_bytes, gpu=gpu, gpu_count=gpu_count
        )
    _check(weights_bytes=weights_bytes, gpu_count=gpu_count)
    return OP_OVERHEAD_S


def wake_up_seconds(
    *,
    weights_bytes: float,
    gpu: str,
    level: SleepLevel,
    tags: Iterable[str],
    gpu_count: int = 1,
) -> float:
    """How long one ``POST /wake_up`` waking ``tags`` takes after a sleep at ``level``:
    weights offloaded at level 1 are copied back; at level 2 they are only re-mapped."""
    _check_level(level)
    if level == 1 and "weights" in set(tags):
        return OP_OVERHEAD_S + copy_seconds(
            weights_bytes=weights_bytes, gpu=gpu, gpu_count=gpu_count
        )
    _check(weights_bytes=weights_bytes, gpu_count=gpu_count)
    return OP_OVERHEAD_S


def reload_weights_seconds(*, weights_bytes: float, gpu: str, gpu_count: int = 1) -> float:
    """How long reading the weights from local disk onto the GPUs takes (after level 2)."""
    return (
        RELOAD_OVERHEAD_S
        + weights_bytes / DISK_READ_BYTES_PER_S
        + copy_seconds(weights_bytes=weights_bytes, gpu=gpu, gpu_count=gpu_count)
    )


def wake_seconds(*, weights_bytes: float, gpu: str, level: SleepLevel, gpu_count: int = 1) -> float:
    """A whole wake from ``level`` to serving, as the controller performs it.

    Level 1: one ``wake_up``. Level 2: ``wake_up(weights)``, ``reload_weights``, then
    ``wake_up(kv_cache)`` (the scheduler resumes only once the weights are real again).
    """
    size, count = weights_bytes, gpu_count
    if level != 2:
        return wake_up_seconds(
            weights_bytes=size, gpu=gpu, level=level, tags=WAKE_TAGS, gpu_count=count
        )
    return (
        wake_up_seconds(weights_bytes=size, gpu=gpu, level=2, tags=("weights",), gpu_count=count)
        + reload_weights_seconds(weights_bytes=size, gpu=gpu, gpu_count=count)
        + wake_up_seconds(weights_bytes=size, gpu=gpu, level=2, tags=("kv_cache",), gpu_count=count)
    )


def _check(*, weights_bytes: float, gpu_count: int) -> None:
    if not weights_bytes > 0:
        raise ValueError(f"weights_bytes must be > 0, got {weights_bytes}")
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be >= 1, got {gpu_count}")


def _check_level(level: int) -> None:
    if level not in SLEEP_LEVELS:
        raise ValueError(f"sleep level must be 0, 1 or 2, got {level}")


def _known() -> list[str]:
    return sorted(_LINK_BY_GPU)
