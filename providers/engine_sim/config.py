"""What engine-sim simulates (GPU, model size) and how it serves (address, key, speed-up)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from catalog.perf import ServingProfile, serving_profile

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_GPU = "NVIDIA A100-SXM4-80GB"


@dataclass(frozen=True, slots=True)
class EngineSimConfig:
    """Settings of one simulated engine. Invalid values raise ``ValueError`` naming the field.

    ``time_scale`` divides every latency the model computes (prefill, decode, queueing) so
    tests and benchmarks run fast; the metrics still report the model's unscaled times.
    ``startup_delay_s`` is wall-clock seconds (not scaled) during which ``/health`` answers
    503, like an engine loading weights. After ``fail_after`` completed inference requests
    the process exits abruptly.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = DEFAULT_MODEL
    gpu: str = DEFAULT_GPU
    gpu_count: int = 1
    params_b: float = 8.0
    bytes_per_param: float = 2.0
    max_batch: int | None = None
    """Cap on running sequences (vLLM's ``--max-num-seqs``); unset, what the KV cache
    holds, at most 256."""
    max_batched_tokens: int | None = None
    """Tokens one engine step may hold, decodes and prompt chunks together (vLLM's
    ``--max-num-batched-tokens``): a longer prompt is prefilled over several steps;
    unset, vLLM's default for the GPU."""
    api_key: str | None = None
    time_scale: float = 1.0
    startup_delay_s: float = 0.0
    fail_after: int | None = None
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()
    """LoRA adapters served beside the model, as ``(name, source)`` (vLLM's
    ``--lora-modules name=source``; needs ``enable_lora``). A request naming one is
    answered as the base model would be, under the adapter's name."""
    max_model_len: int | None = None
    """The context length served (vLLM's ``--max-model-len``): a prompt longer is refused
    with vLLM's 400, and the output is cut to what is left of it; unset, no window (the
    model's own, which engine-sim does not know, is long)."""
    enable_sleep_mode: bool = False
    """Serve vLLM's sleep-mode routes (``POST /sleep``, ``POST /wake_up``, ``GET
    /is_sleeping``, ``POST /collective_rpc`` for ``reload_weights``): what vLLM offers
    when started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``. Without it
    those paths answer 404, as vLLM's do outside development mode."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.model.strip():
            raise ValueError("model must be a non-empty name")
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a finite number > 0, got {self.time_scale}")
        if not (self.startup_delay_s >= 0 and math.isfinite(self.startup_delay_s)):
            raise ValueError(f"startup_delay_s must be >= 0, got {self.startup_delay_s}")
        if self.fail_after is not None and self.fail_after < 1:
            raise ValueError(f"fail_after must be >= 1, got {self.fail_after}")
        if self.max_batched_tokens is not None and self.max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {self.max_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora (vLLM: --enable-lora)")
        names = [name for name, _ in self.lora_modules]
        for name, source in self.lora_modules:
            if not name or not source:
                raise ValueError(f"lora module {name}={source} must be name=source")
            if name == self.model or names.count(name) > 1:
                raise ValueError(
                    f"lora module name {name!r} is the model's or given twice; each adapter "
                    "needs a name of its own"
                )

    def served(self, model: str) -> bool:
        """Whether a request's ``model`` is served here: the model or an adapter."""
        return model == self.model or any(name == model for name, _ in self.lora_modules)

    def profile(self) -> ServingProfile:
        """The serving profile the latencies follow (raises ``ValueError`` if it cannot serve)."""
        return serving_profile(
            self.gpu,
            self.gpu_count,
            self.params_b,
            self.bytes_per_param,
            max_batch=self.max_batch,
            max_batched_tokens=self.max_batched_tokens,
        )
