"""How much GPU memory serving a model needs, estimated from its id and launch command.

Used for placement when a workload names no GPU pool. The estimate is weights (parameter
count x bytes per parameter for the dtype or quantisation) + the KV cache of one sequence
of ``--max-model-len`` tokens (8192 when the command does not say) + runtime overhead
(CUDA context, activations, CUDA graphs). The parameter count comes from a table of
known models, else from the name ("Llama-3.1-8B", "Mixtral-8x7B", "SmolLM-135M"); the
confidence says which. A hint (the workload's ``model_memory_gib``) overrides it all.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

GIB = 1024**3
DEFAULT_CONTEXT_TOKENS = 8192
CONTEXT_FLAGS = ("--max-model-len", "--context-length", "--max-seq-len")
"""The engines' context-length flags (vLLM, SGLang, older vLLM), in the order they are read."""
UNKNOWN_MODEL_GIB = 16.0
BATCHED_TOKENS_FLAGS = ("--max-num-batched-tokens", "--chunked-prefill-size")
"""The engines' per-step token budget flags (vLLM, SGLang), in the order they are read."""
MAX_SEQS_FLAGS = ("--max-num-seqs", "--max-running-requests")
"""The engines' running-sequence cap flags (vLLM, SGLang), in the order they are read."""
ADAPTER_LIST_FLAGS = ("--lora-modules", "--lora-paths")
"""The engines' flags that list LoRA adapters as ``name=source`` words (vLLM, SGLang)."""


class Confidence(StrEnum):
    GIVEN = "given"  # the workload's own hint
    HIGH = "high"  # a known model: parameters and KV layout from its config
    MEDIUM = "medium"  # parameter count read from the name; KV layout approximated
    LOW = "low"  # nothing recognisable: a placeholder the operator should replace


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """GPU memory to serve a model, how sure we are, and how it was worked out."""

    gib: float
    confidence: Confidence
    explanation: str
    weights_gib: float = 0.0
    kv_cache_gib: float = 0.0
    overhead_gib: float = 0.0


@dataclass(frozen=True, slots=True)
class _Known:
    """Parameters (billions) and KV layout; ``layers == 0`` means no KV cache to speak of."""

    params_b: float
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    max_context: int | None = None


# Keyed by the lower-cased model name without its organisation; the longest matching
# key wins, so "llama-3.1-70b" beats "llama-3.1-7". Figures from each model's config.json.
KNOWN_MODELS: dict[str, _Known] = {
    "llama-3.2-1b": _Known(1.24, 16, 8, 64),
    "llama-3.2-3b": _Known(3.21, 28, 8, 128),
    "llama-3.1-8b": _Known(8.03, 32, 8, 128),
    "meta-llama-3-8b": _Known(8.03, 32, 8, 128),
    "llama-3.1-70b": _Known(70.6, 80, 8, 128),
    "llama-3.3-70b": _Known(70.6, 80, 8, 128),
    "meta-llama-3-70b": _Known(70.6, 80, 8, 128),
    "llama-3.1-405b": _Known(405.9, 126, 8, 128),
    "qwen2.5-0.5b": _Known(0.49, 24, 2, 64),
    "qwen2.5-1.5b": _Known(1.54, 28, 2, 128),
    "qwen2.5-3b": _Known(3.09, 36, 2, 128),
    "qwen2.5-7b": _Known(7.62, 28, 4, 128),
    "qwen2.5-14b": _Known(14.7, 48, 8, 128),
    "qwen2.5-32b": _Known(32.8, 64, 8, 128),
    "qwen2.5-72b": _Known(72.7, 80, 8, 128),
    "mistral-7b": _Known(7.24, 32, 8, 128),
    "mixtral-8x7b": _Known(46.7, 32, 8, 128),
    "mixtral-8x22b": _Known(141.0, 56, 8, 128),
    "gemma-2-9b": _Known(9.24, 42, 8, 256),
    "gemma-2-27b": _Known(27.2, 46, 16, 128),
    "phi-3-mini": _Known(3.82, 32, 32, 96),
    "whisper-tiny": _Known(0.039, max_context=448),
    "whisper-base": _Known(0.074, max_context=448),
    "whisper-small": _Known(0.244, max_context=448),
    "whisper-medium": _Known(0.769, max_context=448),
    "whisper-large-v3-turbo": _Known(0.809, max_context=448),
    "whisper-large": _Known(1.55, max_context=448),
    "bge-small-en": _Known(0.033, max_context=512),
    "bge-base-en": _Known(0.109, max_context=512),
    "bge-large-en": _Known(0.335, max_context=512),
    "bge-m3": _Known(0.568, max_context=8192),
    "bge-reranker-v2-m3": _Known(0.568, max_context=8192),
    "stable-diffusion-xl-base-1.0": _Known(3.5),
    "flux.1-dev": _Known(16.9),
    "flux.1-schnell": _Known(16.9),
}

# (pattern over the lower-cased id or quantisation flag, bytes per parameter, label)
QUANT_PATTERNS: tuple[tuple[re.Pattern[str], float, str], ...] = tuple(
    (re.compile(pattern), bytes_per_param, label)
    for pattern, bytes_per_param, label in (
        (r"awq|gptq|int4|4bit|4-bit|w4a16|nf4|bnb-4|q4|mxfp4|bitsandbytes", 0.56, "4-bit"),
        (r"fp8|int8|8bit|8-bit|w8a8|w8a16|q8", 1.03, "8-bit"),
        (r"fp32|float32", 4.0, "fp32"),
        (r"fp16|float16|bf16|bfloat16|half", 2.0, "16-bit"),
    )
)
_PARAMS_MOE = re.compile(r"(?<![\w.])(\d+)x(\d+(?:\.\d+)?)b(?![a-z])")
_PARAMS_B = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)b(?![a-z])")
_PARAMS_M = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)m(?![a-z])")


def estimate_model_memory(
    model_id: str, command: str | None = None, *, hint_gib: float | None = None
) -> MemoryEstimate:
    """GPU memory (GiB, all replicas' GPUs together) to serve ``model_id`` with ``command``.

    A pure function of its arguments: the last :data:`ESTIMATES_KEPT` answers are kept,
    so the steps of a pass that size the same model and command (placement, admission)
    parse the command once; an invalid hint raises each time."""
    return _estimate_model_memory(model_id, command, hint_gib)


ESTIMATES_KEPT = 1024
"""Estimates :func:`estimate_model_memory` keeps (least recently used dropped first)."""


@functools.lru_cache(maxsize=ESTIMATES_KEPT)
def _estimate_model_memory(
    model_id: str, command: str | None, hint_gib: float | None
) -> MemoryEstimate:
    if hint_gib is not None:
        if not hint_gib > 0:
            raise ValueError(f"model_memory_gib must be > 0, got {hint_gib}")
        return MemoryEstimate(
            gib=hint_gib,
            confidence=Confidence.GIVEN,
            explanation=f"model_memory_gib={hint_gib:g} given by the workload",
        )
    flags = command_line_flags(command)
    name = model_id.rsplit("/", 1)[-1].casefold()
    known = _lookup(name)
    params_b, confidence, source = _parameters(name, known)
    if params_b is None:
        return MemoryEstimate(
            gib=UNKNOWN_MODEL_GIB,
            confidence=Confidence.LOW,
            explanation=(
                f"no parameter count found in {model_id!r}; assumed {UNKNOWN_MODEL_GIB:g} GiB. "
                "Set model_memory_gib on the workload for a real figure."
            ),
        )
    bytes_per_param, dtype = _dtype(name, flags)
    weights = params_b * 1e9 * bytes_per_param / GIB
    context, context_source = _context(flags, known)
    kv, kv_note = _kv_cache(params_b=params_b, known=known, flags=flags, tokens=context)
    overhead = 1.0 + 0.08 * weights
    total = math.ceil((weights + kv + overhead) * 10) / 10
    explanation = (
        f"{params_b:g}B parameters ({source}) x {bytes_per_param:g} bytes ({dtype}) = "
        f"{weights:.1f} GiB weights; KV cache {kv:.1f} GiB for {context} tokens "
        f"({context_source}{kv_note}); overhead {overhead:.1f} GiB"
    )
    return MemoryEstimate(
        gib=total,
        confidence=confidence,
        explanation=explanation,
        weights_gib=round(weights, 2),
        kv_cache_gib=round(kv, 2),
        overhead_gib=round(overhead, 2),
    )


def command_line_flags(command: str | None) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs of a command line (a workload's engine
    command, a launch command), read as :func:`command_flags` reads an argv: the one
    reading the controller, the simulator, admission and engine-sim share."""
    if not command:
        return {}
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return command_flags(words)


def command_adapters(argv: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """The LoRA adapters an engine's argv loads, as ``(name, source)`` pairs in order:
    the ``name=source`` words after vLLM's ``--lora-modules`` or SGLang's
    ``--lora-paths`` (up to the next flag)."""
    found: list[tuple[str, str]] = []
    taking = False
    for arg in argv or ():
        if arg.startswith("--"):
            flag, eq, inline = arg.partition("=")
            taking = flag in ADAPTER_LIST_FLAGS
            if taking and eq:
                found.append(_adapter_word(inline))
            continue
        if taking:
            found.append(_adapter_word(arg))
    return tuple(found)


def _adapter_word(word: str) -> tuple[str, str]:
    name, eq, source = word.partition("=")
    return name, source if eq else name


def _lookup(name: str) -> _Known | None:
    matches = [key for key in KNOWN_MODELS if key in name]
    return KNOWN_MODELS[max(matches, key=len)] if matches else None


def _parameters(name: str, known: _Known | None) -> tuple[float | None, Confidence, str]:
    if known is not None:
        return known.params_b, Confidence.HIGH, "known model"
    moe = _PARAMS_MOE.search(name)
    if moe:
        # Experts share attention weights, so NxM over-counts a little: the safe side.
        return int(moe.group(1)) * float(moe.group(2)), Confidence.MEDIUM, "from the name"
    billions = _PARAMS_B.findall(name)
    if billions:
        return float(billions[-1]), Confidence.MEDIUM, "from the name"
    millions = _PARAMS_M.findall(name)
    if millions:
        return float(millions[-1]) / 1000, Confidence.MEDIUM, "from the name"
    return None, Confidence.LOW, ""


def _dtype(name: str, flags: dict[str, str]) -> tuple[float, str]:
    for text in (flags.get("quantization", ""), flags.get("dtype", ""), name):
        for pattern, bytes_per_param, label in QUANT_PATTERNS:
            if text and pattern.search(text.casefold()):
                return bytes_per_param, label
    return 2.0, "16-bit, the default"


def command_context(flags: dict[str, str]) -> tuple[int, str] | None:
    """The context length a command's flags set (``8k`` reads as 8000), and the flag that
    set it; None when no context flag is given. ``flags`` are keyed without dashes.

    Raises ValueError naming the flag when its value is not a whole number."""
    for flag in CONTEXT_FLAGS:
        value = flags.get(flag.removeprefix("--"))
        if value:
            try:
                return int(value.replace("k", "000").replace("K", "000")), flag
            except ValueError:
                raise ValueError(f"{flag} must be a whole number, got {value!r}") from None
    return None


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The step token budget and running-sequence cap a command sets; None: not set."""

    max_batched_tokens: int | None = None
    max_num_seqs: int | None = None


def command_batch_limits(flags: dict[str, str]) -> BatchLimits:
    """The batch limits a command's flags set: vLLM's ``--max-num-batched-tokens`` and
    ``--max-num-seqs``, or SGLang's ``--chunked-prefill-size`` and
    ``--max-running-requests``. ``flags`` are keyed without dashes. SGLang's
    ``--chunked-prefill-size -1`` (chunking off) reads as not set.

    Raises ValueError naming the flag when a value is not a whole number of at least 1,
    and, in vLLM's own words, for what vLLM's ``SchedulerConfig`` refuses to start with:
    a budget below the sequence cap, or (with chunked prefill turned off) below the
    context length."""
    budget = _whole_flag(flags, BATCHED_TOKENS_FLAGS)
    seqs = _whole_flag(flags, MAX_SEQS_FLAGS)
    if budget is not None and seqs is not None and budget < seqs:
        raise ValueError(
            f"max_num_batched_tokens ({budget}) must be greater than or equal to "
            f"max_num_seqs ({seqs})."
        )
    context = command_context(flags)
    if budget is not None and context is not None and budget < context[0] and _unchunked(flags):
        raise ValueError(
            f"max_num_batched_tokens ({budget}) is smaller than max_model_len ({context[0]}). "
            "This effectively limits the maximum sequence length to max_num_batched_tokens "
            "and makes vLLM reject longer sequences. Please increase max_num_batched_tokens "
            "or decrease max_model_len."
        )
    return BatchLimits(max_batched_tokens=budget, max_num_seqs=seqs)


def _unchunked(flags: dict[str, str]) -> bool:
    """Whether the command turns vLLM's chunked prefill (on by default in V1) off."""
    return "no-enable-chunked-prefill" in flags or (
        flags.get("enable-chunked-prefill", "").casefold() in ("false", "0")
    )


def _whole_flag(flags: dict[str, str], names: Sequence[str]) -> int | None:
    for flag in names:
        value = flags.get(flag.removeprefix("--"))
        if not value:
            continue
        if flag == "--chunked-prefill-size" and value == "-1":
            return None
        if not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"{flag} must be a whole number of at least 1, got {value!r}")
        return int(value)
    return None


def command_flags(argv: Sequence[str]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs of an engine's argv, keyed without
    dashes (as :func:`command_context` reads them)."""
    flags: dict[str, str] = {}
    for index, word in enumerate(argv):
        if not word.startswith("--"):
            continue
        key, sep, value = word[2:].partition("=")
        if not sep and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            value = argv[index + 1]
        flags[key.replace("_", "-")] = value
    return flags


def _context(flags: dict[str, str], known: _Known | None) -> tuple[int, str]:
    given = command_context(flags)
    if given is not None:
        return given
    if known is not None and known.max_context is not None:
        return known.max_context, "the model's context"
    return DEFAULT_CONTEXT_TOKENS, "default, the command sets no --max-model-len"


def _kv_cache(
    *, params_b: float, known: _Known | None, flags: dict[str, str], tokens: int
) -> tuple[float, str]:
    kv_bytes = 1.0 if "fp8" in flags.get("kv-cache-dtype", "") else 2.0
    if known is not None:
        if not known.layers:
            return 0.0, "; no decoder KV cache to speak of"
        per_token = 2 * known.layers * known.kv_heads * known.head_dim * kv_bytes
        return per_token * tokens / GIB, "; layout from the model config"
    # Grouped-query models keep ~128 KiB/token at 8B and ~320 KiB at 70B (16-bit): about
    # 48 KiB x sqrt(billions of parameters).
    per_token = 48 * 1024 * math.sqrt(params_b) * kv_bytes / 2
    return per_token * tokens / GIB, "; layout approximated from the size"
