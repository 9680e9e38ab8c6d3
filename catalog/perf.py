"""What a GPU can serve: prefill and decode speed and batch size, from datasheet figures.

One latency and capacity model, shared by placement (how many replicas of which GPU a
load needs), ``autoscaler engine-sim`` (a fake engine that answers as slowly as a real
one would) and the trace simulator (``autoscaler simulate``), both of which run it in
``catalog.engine``. Pure: no clock, no I/O.

The model, for a decoder-only transformer of ``P`` billion parameters at ``b`` bytes per
parameter, tensor-parallel over ``n`` GPUs:

* **Prefill is compute-bound.** A prompt token costs ``2·P`` GFLOP, so prefill runs at
  ``n · TFLOPS · PREFILL_MFU · tp_efficiency / (2·P)`` tokens/s, but never faster than one
  forward pass, which must read every weight once (``prefill_seconds`` takes the larger).
* **Decode is bandwidth-bound.** Each step reads the weights once and each running
  sequence's KV cache, and emits one token per sequence:
  ``step = max(bytes_read / (n · bandwidth · DECODE_BANDWIDTH_EFFICIENCY · tp),
  2·P·batch / (n · TFLOPS · PREFILL_MFU · tp)) + STEP_OVERHEAD_S``.
  Per-sequence speed is ``1 / step``: highest at batch 1, falling slowly as the batch
  grows and the KV reads add up.
* **A step with a prompt chunk in it is one pass.** With chunked prefill (vLLM V1's
  only scheduler) one forward pass decodes every running sequence and prefills up to
  ``max_batched_tokens`` less those decodes of prompt tokens: ``step_seconds`` is the
  decode step's formula over all the pass's tokens, the larger of the reads (weights,
  the decoding sequences' KV caches) and the compute (decodes and chunk), plus the
  overhead; the decodes ride almost free on a compute-bound chunk.
* **The batch is bounded by KV-cache memory.** ``GPU_MEMORY_UTILIZATION`` of the memory,
  less the weights and a runtime reserve per GPU, holds the KV cache; each sequence
  reserves ``KV_TOKENS_PER_SEQUENCE`` tokens of it. vLLM's ``max_num_seqs`` default (256)
  caps it.

Calibration, for Llama-3.1-8B in bf16 on one GPU (``serving_profile(gpu, 1, 8.0)``):

============================  ============  ============================
GPU                           prefill tok/s  decode tok/s/seq at batch 1
============================  ============  ============================
NVIDIA H100 80GB HBM3         ~30 900        ~157
NVIDIA A100-SXM4-80GB         ~9 750         ~98
NVIDIA L4                     ~3 780         ~15
============================  ============  ============================

These sit inside published vLLM and SGLang figures for that model (prefill roughly
25-33k tokens/s on H100, 9-11k on A100, 3-4k on L4; batch-1 decode close to memory
bandwidth over weight bytes, e.g. 3.35 TB/s / 16 GB on H100).

Sources:

* Dense BF16/FP16 tensor TFLOPS and memory bandwidth: NVIDIA datasheets: H100
  (SXM 989 TFLOPS, 3.35 TB/s; PCIe 756, 2.0 TB/s; NVL 835, 3.9 TB/s), H200 (989, 4.8
  TB/s), B200 (2 250, 8 TB/s), GB200 (2 500, 8 TB/s), A100 (312; 1.555 TB/s at 40 GB,
  2.039 TB/s SXM 80 GB, 1.935 TB/s PCIe 80 GB), L40S (362, 864 GB/s), L40 (181, 864
  GB/s), L4 (121, 300 GB/s), A10 (125, 600 GB/s), T4 (65, 320 GB/s), V100 (125, 900
  GB/s), P100 (18.7, 732 GB/s), RTX 6000 Ada (364, 960 GB/s), RTX PRO 6000 Blackwell
  Server (504, 1.6 TB/s), RTX A6000 (155, 768 GB/s), GeForce RTX 4090 (165, 1 008 GB/s).
  The sparsity-doubled figures NVIDIA also prints are not used. AWS publishes no tensor
  figure for the A10G; 70 TFLOPS and 600 GB/s are the commonly cited ones.
* Efficiencies (MFU about 0.5 in prefill, about 80 % of peak bandwidth in decode): the
  vLLM and SGLang published serving benchmarks (vLLM performance dashboard and v0.6
  release blog, SGLang v0.2/v0.4 benchmark posts) for Llama-3.1-8B/70B on A100 and H100.
* Memory: vLLM's defaults (``gpu_memory_utilization`` 0.9, ``max_num_seqs`` 256); the
  Llama-3.1-8B KV cache is 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes =
  128 KiB per token. Other sizes scale it as ``(P / 8) ** 0.43`` (Llama-3.1-70B: 320 KiB).
* The per-step token budget (``max_batched_tokens``): vLLM's OpenAI server default,
  ``EngineArgs.get_batch_defaults`` in ``vllm/engine/arg_utils.py``: 8,192 tokens on a
  GPU of at least 70 GiB other than an A100 (H100, H200, B200, MI300X), 2,048 on the
  rest (the A100 is kept low because larger budgets cost it throughput, vLLM PR #17885).
* Tensor parallelism keeps ``TP_EFFICIENCY_NVLINK`` (NVLink) or ``TP_EFFICIENCY_PCIE`` of
  linear scaling per doubling of GPUs.

The continuous-batching engine that runs on a profile is ``catalog.engine``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from catalog.gpus import UnknownGpuError, resolve_gpu

PREFILL_MFU = 0.5
"""Fraction of peak dense tensor FLOPS a prefill (and a decode step's compute) achieves."""

DECODE_BANDWIDTH_EFFICIENCY = 0.8
"""Fraction of peak memory bandwidth a decode step achieves."""

STEP_OVERHEAD_S = 0.0004
"""Scheduling, sampling and kernel-launch time added to every decode step."""

GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of GPU memory the engine may use."""

RUNTIME_RESERVE_BYTES_PER_GPU = 1.5e9
"""Activations, CUDA graphs and the CUDA context: memory neither weights nor KV cache."""

MAX_NUM_SEQS = 256
"""vLLM's default cap on concurrently running sequences."""

MAX_BATCHED_TOKENS_LARGE_GPU = 8192
"""vLLM's OpenAI-server ``max_num_batched_tokens`` on a GPU of 70 GiB or more (not an A100)."""

MAX_BATCHED_TOKENS = 2048
"""vLLM's OpenAI-server ``max_num_batched_tokens`` on every other GPU."""

LARGE_GPU_GIB = 70.0
"""The memory from which vLLM counts a GPU as large (its ``70 * GiB_bytes``)."""

KV_TOKENS_PER_SEQUENCE = 2048
"""KV-cache tokens reserved per running sequence when sizing the batch."""

DECODE_CONTEXT_TOKENS = 1024
"""Mean context a decoding sequence attends over: the KV bytes each step reads per sequence."""

REFERENCE_PARAMS_B = 8.0
REFERENCE_KV_BYTES_PER_TOKEN = 131_072.0  # Llama-3.1-8B in bf16
KV_SCALING_EXPONENT = 0.43  # 8B -> 128 KiB, 70B -> 320 KiB per token

TP_EFFICIENCY_NVLINK = 0.9
TP_EFFICIENCY_PCIE = 0.75

_GIB = 1024**3

SERVING_PROFILES_KEPT = 1024
"""The most serving profiles :func:`serving_profile` keeps (a few hundred bytes each)."""


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A GPU's datasheet figures: dense BF16/FP16 tensor TFLOPS, memory bandwidth, memory."""

    display_name: str
    tflops: float
    bandwidth_tb_s: float
    vram_gib: float
    nvlink: bool


def _spec(name: str, tflops: float, tb_s: float, gib: float, *, nvlink: bool) -> GpuSpec:
    return GpuSpec(
        display_name=name, tflops=tflops, bandwidth_tb_s=tb_s, vram_gib=gib, nvlink=nvlink
    )


# Memory is what nvidia-smi shows (the same figures as catalog/data/gpus.json).
_SPECS: tuple[GpuSpec, ...] = (
    _spec("Tesla M60", 4.8, 0.16, 8.0, nvlink=False),
    _spec("Tesla P4", 5.5, 0.192, 7.5, nvlink=False),
    _spec("Tesla P100-PCIE-16GB", 18.7, 0.732, 16.0, nvlink=False),
    _spec("Tesla V100-SXM2-16GB", 125.0, 0.9, 16.0, nvlink=True),
    _spec("Tesla V100-SXM2-32GB", 125.0, 0.9, 32.0, nvlink=True),
    _spec("Tesla T4", 65.0, 0.32, 15.0, nvlink=False),
    _spec("NVIDIA T4G", 65.0, 0.32, 15.0, nvlink=False),
    _spec("NVIDIA A10G", 70.0, 0.6, 22.5, nvlink=False),
    _spec("NVIDIA A10", 125.0, 0.6, 22.5, nvlink=False),
    _spec("NVIDIA RTX A6000", 154.8, 0.768, 48.0, nvlink=False),
    _spec("NVIDIA A100-SXM4-40GB", 312.0, 1.555, 40.0, nvlink=True),
    _spec("NVIDIA A100-PCIE-40GB", 312.0, 1.555, 40.0, nvlink=False),
    _spec("NVIDIA A100-SXM4-80GB", 312.0, 2.039, 80.0, nvlink=True),
    _spec("NVIDIA A100 80GB PCIe", 312.0, 1.935, 80.0, nvlink=False),
    _spec("NVIDIA L4", 121.0, 0.3, 22.5, nvlink=False),
    _spec("NVIDIA L40", 181.0, 0.864, 45.0, nvlink=False),
    _spec("NVIDIA L40S", 362.0, 0.864, 45.0, nvlink=False),
    _spec("NVIDIA GeForce RTX 4090", 165.2, 1.008, 24.0, nvlink=False),
    _spec("NVIDIA RTX 6000 Ada Generation", 364.2, 0.96, 48.0, nvlink=False),
    _spec("NVIDIA H100 PCIe", 756.0, 2.0, 79.6, nvlink=False),
    _spec("NVIDIA H100 NVL", 835.0, 3.9, 93.6, nvlink=True),
    _spec("NVIDIA H100 80GB HBM3", 989.0, 3.35, 79.6, nvlink=True),
    _spec("NVIDIA H200", 989.0, 4.8, 140.4, nvlink=True),
    _spec("NVIDIA B200", 2250.0, 8.0, 179.1, nvlink=True),
    _spec("NVIDIA GB200", 2500.0, 8.0, 184.0, nvlink=True),
    _spec("NVIDIA RTX PRO 6000 Blackwell Server Edition", 503.8, 1.597, 95.6, nvlink=False),
)
_BY_NAME: dict[str, GpuSpec] = {spec.display_name.casefold(): spec for spec in _SPECS}


class ModelDoesNotFit(ValueError):
    """The weights, the runtime reserve and one sequence's KV cache exceed the GPUs' memory."""


def known_gpus() -> tuple[str, ...]:
    """Display names of every GPU the performance model knows."""
    return tuple(spec.display_name for spec in _SPECS)


def gpu_spec(gpu: str) -> GpuSpec:
    """The datasheet figures for ``gpu``: a display name or any alias the GPU table knows.

    Raises ``ValueError`` naming the GPU (and the closest known names) when it is unknown.
    """
    found = _BY_NAME.get(" ".join(gpu.split()).casefold())
    if found is not None:
        return found
    try:
        display = resolve_gpu(gpu).display_name
    except UnknownGpuError as exc:
        raise ValueError(f"no performance figures for GPU {gpu!r}: {exc}") from exc
    found = _BY_NAME.get(display.casefold())
    if found is None:
        raise ValueError(f"no performance figures for GPU {display!r} (named {gpu!r})")
    return found


def kv_bytes_per_token(params_b: float) -> float:
    """KV-cache bytes one token of context holds, for a model of ``params_b`` billion params."""
    scale: float = (params_b / REFERENCE_PARAMS_B) ** KV_SCALING_EXPONENT
    return REFERENCE_KV_BYTES_PER_TOKEN * scale


@dataclass(frozen=True, slots=True)
class ServingProfile:
    """How fast one replica (``gpu_count`` x ``gpu``, tensor-parallel) serves one model.

    Speeds are in tokens per second of the whole replica; times in seconds. Build it with
    :func:`serving_profile`.
    """

    gpu: str
    gpu_count: int
    params_b: float
    bytes_per_param: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    """Per sequence, at batch 1."""
    max_batch: int
    weight_bytes: float
    kv_bytes_per_token: float
    kv_capacity_tokens: int
    effective_bandwidth_bytes_s: float
    effective_flops: float
    max_batched_tokens: int
    """Tokens one engine step may process, decodes and prompt chunks together (vLLM's
    ``max_num_batched_tokens``); never below ``max_batch``, as vLLM requires."""

    def decode_step_seconds(self, batch: int) -> float:
        """One decode step with ``batch`` running sequences (each gains one token)."""
        return self._pass_seconds(decodes=max(batch, 1), tokens=max(batch, 1))

    def _pass_seconds(self, *, decodes: int, tokens: int) -> float:
        """One forward pass over ``tokens`` tokens, ``decodes`` of them decoding sequences
        whose KV caches it reads: the slower of the reads and the compute, plus overhead."""
        read = self.weight_bytes + decodes * DECODE_CONTEXT_TOKENS * self.kv_bytes_per_token
        memory = read / self.effective_bandwidth_bytes_s
        compute = 2e9 * self.params_b * tokens / self.effective_flops
        return max(memory, compute) + STEP_OVERHEAD_S

    def decode_tokens_per_s_at(self, batch: int) -> float:
        """Tokens per second each sequence gets when ``batch`` sequences decode together."""
        return 1.0 / self.decode_step_seconds(batch)

    def prefill_seconds(self, input_tokens: int) -> float:
        """Time to prefill a prompt of ``input_tokens`` on an otherwise idle replica."""
        if input_tokens < 0:
            raise ValueError(f"input_tokens must be >= 0, got {input_tokens}")
        return max(input_tokens / self.prefill_tokens_per_s, self.decode_step_seconds(1))

    def step_seconds(self, *, decodes: int, prefill_tokens: int) -> float:
        """One chunked-prefill engine step: ``decodes`` running sequences gain a token each
        and ``prefill_tokens`` prompt tokens are prefilled, in one forward pass.

        The pass reads the weights once and the decoding sequences' KV caches, and
        computes every token it holds: the slower of the two, plus overhead, like a decode
        step. So the decodes ride almost free on a chunk big enough to be compute-bound,
        and a small chunk costs little more than the decode step. With nothing decoding it
        is a plain prefill (:meth:`prefill_seconds`), with no chunk a decode step.
        """
        if prefill_tokens <= 0:
            return self.decode_step_seconds(decodes)
        if decodes <= 0:
            return self.prefill_seconds(prefill_tokens)
        return self._pass_seconds(decodes=decodes, tokens=decodes + prefill_tokens)

    def ttft_seconds(self, input_tokens: int, *, queued_prefill_tokens: int = 0) -> float:
        """Time to first token behind ``queued_prefill_tokens`` of prompts not yet prefilled."""
        if queued_prefill_tokens < 0:
            raise ValueError(f"queued_prefill_tokens must be >= 0, got {queued_prefill_tokens}")
        return self.prefill_seconds(input_tokens + queued_prefill_tokens)

    def request_seconds(self, *, input_tokens: int, output_tokens: int, batch: int = 1) -> float:
        """End-to-end time of one request decoding alongside ``batch - 1`` others."""
        decode = max(output_tokens - 1, 0) * self.decode_step_seconds(batch)
        return self.prefill_seconds(input_tokens) + decode

    def capacity_rps(self, *, input_tokens: float, output_tokens: float) -> float:
        """Requests per second a saturated replica completes for this mean token mix.

        The replica's time per request: its share of prefill compute plus its share of
        decode steps run at full batch.
        """
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got input {input_tokens}, output {output_tokens}"
            )
        prefill = input_tokens / self.prefill_tokens_per_s
        decode = output_tokens * self.decode_step_seconds(self.max_batch) / self.max_batch
        busy = prefill + decode
        if busy == 0:
            return math.inf
        return 1.0 / busy


def _tp_efficiency(spec: GpuSpec, gpu_count: int) -> float:
    per_doubling = TP_EFFICIENCY_NVLINK if spec.nvlink else TP_EFFICIENCY_PCIE
    return float(per_doubling ** math.log2(gpu_count))


def _kv_capacity_tokens(
    spec: GpuSpec, *, gpu_count: int, weight_bytes: float, kv_per_token: float
) -> int:
    usable = spec.vram_gib * _GIB * GPU_MEMORY_UTILIZATION * gpu_count
    free = usable - weight_bytes - RUNTIME_RESERVE_BYTES_PER_GPU * gpu_count
    return max(int(free // kv_per_token), 0)


@functools.lru_cache(maxsize=SERVING_PROFILES_KEPT, typed=True)
def serving_profile(
    gpu: str,
    gpu_count: int,
    params_b: float,
    bytes_per_param: float = 2.0,
    *,
    max_batch: int | None = None,
    max_batched_tokens: int | None = None,
) -> ServingProfile:
    """The serving profile of ``gpu_count`` x ``gpu`` for a ``params_b``-billion model.

    ``bytes_per_param`` is 2 for bf16/fp16, 1 for fp8/int8, 0.5 for 4-bit. ``max_batch``
    lowers (never raises) the batch the KV cache allows, like vLLM's ``--max-num-seqs``;
    ``max_batched_tokens`` sets the step's token budget, like ``--max-num-batched-tokens``
    (default: vLLM's for the GPU, :data:`MAX_BATCHED_TOKENS_LARGE_GPU` or
    :data:`MAX_BATCHED_TOKENS`), and must be at least ``max_batch`` when both are given;
    given alone, a budget below the batch the KV cache allows lowers the batch to it.
    Raises ``ValueError`` for an unknown GPU or bad numbers, and :class:`ModelDoesNotFit`
    when the model leaves no room for even one sequence's KV cache.

    A pure function of its arguments returning a frozen value, so the last
    :data:`SERVING_PROFILES_KEPT` profiles asked for are kept and handed out again:
    placement and the scaling rules ask for the same few shapes on every pass (an
    error is not kept; it is raised again each time). They are kept by the arguments'
    values and types: ``True`` or ``1.0`` equals ``1`` as a key, and a ``gpu_count`` of
    either is refused whatever was asked before.
    """
    spec = gpu_spec(gpu)
    _check_sizes(gpu_count=gpu_count, params_b=params_b, bytes_per_param=bytes_per_param)
    tp = _tp_efficiency(spec, gpu_count)
    weight_bytes = params_b * 1e9 * bytes_per_param
    kv_per_token = kv_bytes_per_token(params_b)
    capacity = _kv_capacity_tokens(
        spec, gpu_count=gpu_count, weight_bytes=weight_bytes, kv_per_token=kv_per_token
    )
    fitting = min(capacity // KV_TOKENS_PER_SEQUENCE, MAX_NUM_SEQS)
    if fitting < 1:
        raise ModelDoesNotFit(
            f"a {params_b:g}B model at {bytes_per_param:g} bytes/param "
            f"({weight_bytes / 1e9:.1f} GB of weights) does not fit on {gpu_count} x "
            f"{spec.display_name} ({spec.vram_gib:g} GiB each) with room for its KV cache"
        )
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    budget = _default_batched_tokens(spec) if max_batched_tokens is None else max_batched_tokens
    # As vLLM's EngineArgs: a default sequence cap is lowered to a smaller budget.
    batch = min(fitting, budget) if max_batch is None else min(fitting, max_batch)
    if budget < batch:
        raise ValueError(
            f"max_batched_tokens ({budget}) must be at least the batch ({batch}), "
            "as vLLM requires of max_num_batched_tokens and max_num_seqs"
        )
    flops = spec.tflops * 1e12 * PREFILL_MFU * gpu_count * tp
    bandwidth = spec.bandwidth_tb_s * 1e12 * DECODE_BANDWIDTH_EFFICIENCY * gpu_count * tp
    profile = ServingProfile(
        gpu=spec.display_name,
        gpu_count=gpu_count,
        params_b=params_b,
        bytes_per_param=bytes_per_param,
        prefill_tokens_per_s=flops / (2e9 * params_b),
        decode_tokens_per_s=0.0,
        max_batch=batch,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_per_token,
        kv_capacity_tokens=capacity,
        effective_bandwidth_bytes_s=bandwidth,
        effective_flops=flops,
        max_batched_tokens=budget,
    )
    return _with_decode_speed(profile)


def _default_batched_tokens(spec: GpuSpec) -> int:
    large = spec.vram_gib >= LARGE_GPU_GIB and "a100" not in spec.display_name.casefold()
    return MAX_BATCHED_TOKENS_LARGE_GPU if large else MAX_BATCHED_TOKENS


def _with_decode_speed(profile: ServingProfile) -> ServingProfile:
    return replace(profile, decode_tokens_per_s=profile.decode_tokens_per_s_at(1))


def _check_sizes(*, gpu_count: int, params_b: float, bytes_per_param: float) -> None:
    if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 1:
        raise ValueError(f"gpu_count must be a whole number >= 1, got {gpu_count!r}")
    if not params_b > 0 or math.isinf(params_b):
        raise ValueError(f"params_b (billions of parameters) must be > 0, got {params_b!r}")
    if not 0 < bytes_per_param <= 4:
        raise ValueError(f"bytes_per_param must be in (0, 4], got {bytes_per_param!r}")


def fits(gpu: str, gpu_count: int, params_b: float, bytes_per_param: float = 2.0) -> bool:
    """Whether the model fits on ``gpu_count`` x ``gpu`` with room for at least one sequence."""
    try:
        serving_profile(gpu, gpu_count, params_b, bytes_per_param)
    except ModelDoesNotFit:
        return False
    return True


def fastest_single_gpu(
    gpus: Iterable[str], params_b: float, bytes_per_param: float = 2.0
) -> ServingProfile | None:
    """One GPU of the fastest-prefilling kind among ``gpus`` on which the model fits
    alone (the SLO's reference: no fleet answers a long prompt faster than this GPU
    prefills it); ``None`` when it fits on none of them alone or none has figures."""
    best: ServingProfile | None = None
    for gpu in sorted(set(gpus)):
        try:
            profile = serving_profile(gpu, 1, params_b, bytes_per_param)
        except ValueError:  # ModelDoesNotFit, or no figures for the GPU
            continue
        if best is None or profile.prefill_tokens_per_s > best.prefill_tokens_per_s:
            best = profile
    return best
