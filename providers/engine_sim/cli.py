"""The ``engine-sim`` command, shared by ``autoscaler engine-sim`` and ``python -m``."""

from __future__ import annotations

import click

from catalog.perf import ModelDoesNotFit
from providers.engine_sim.config import DEFAULT_GPU, DEFAULT_MODEL, EngineSimConfig


@click.command(name="engine-sim", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port; 0 picks one.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Served model name.")
@click.option("--gpu", default=DEFAULT_GPU, show_default=True, help="GPU display name.")
@click.option("--gpu-count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--params-b", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
    help="Model size in billions of parameters.",
)  # fmt: skip
@click.option(
    "--bytes-per-param", type=click.FloatRange(min=0, max=4, min_open=True), default=2.0,
    show_default=True, help="2 for bf16, 1 for fp8, 0.5 for 4-bit.",
)  # fmt: skip
@click.option(
    "--max-batch", "--max-num-seqs", "max_batch", type=click.IntRange(min=1), default=None,
    help="Cap on concurrent sequences (default: what the KV cache holds, at most 256).",
)  # fmt: skip
@click.option(
    "--max-num-batched-tokens", "max_batched_tokens", type=click.IntRange(min=1),
    default=None, help="Tokens one engine step holds, as vLLM's flag (default: vLLM's for "
    "the GPU, 8192 at 70 GiB or more, else 2048); longer prompts prefill over several steps.",
)  # fmt: skip
@click.option(
    "--api-key", envvar="ENGINE_SIM_API_KEY", default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 routes.",
)  # fmt: skip
@click.option(
    "--time-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
    help="Run every modelled latency this many times faster (metrics stay unscaled).",
)  # fmt: skip
@click.option(
    "--startup-delay", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="Wall-clock seconds /health answers 503, as while loading weights.",
)  # fmt: skip
@click.option(
    "--fail-after", type=click.IntRange(min=1), default=None,
    help="Exit abruptly after serving this many inference requests.",
)  # fmt: skip
@click.option(
    "--enable-lora", is_flag=True, default=False,
    help="Serve LoRA adapters (vLLM's flag); --lora-modules names them.",
)  # fmt: skip
@click.option(
    "--lora-modules", "lora_modules", multiple=True, metavar="NAME=SOURCE ...",
    help="LoRA adapters as vLLM takes them: --lora-modules a=org/a b=/path/b.",
)  # fmt: skip
@click.option(
    "--max-loras", type=click.IntRange(min=1), default=None,
    help="Accepted as vLLM takes it (adapters in one batch); it changes no latency here.",
)  # fmt: skip
@click.option(
    "--max-model-len", type=click.IntRange(min=1), default=None,
    help="Context length served, prompt and output together (default: no window).",
)  # fmt: skip
@click.option(
    "--enable-sleep-mode", is_flag=True, default=False,
    help="Serve vLLM's sleep routes (/sleep, /wake_up, /is_sleeping), as vLLM with "
    "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 does.",
)  # fmt: skip
@click.argument("more_lora_modules", nargs=-1, metavar="")
def command(
    *,
    host: str,
    port: int,
    model: str,
    gpu: str,
    gpu_count: int,
    params_b: float,
    bytes_per_param: float,
    max_batch: int | None,
    max_batched_tokens: int | None,
    api_key: str | None,
    time_scale: float,
    startup_delay: float,
    fail_after: int | None,
    enable_lora: bool,
    lora_modules: tuple[str, ...],
    max_loras: int | None,
    max_model_len: int | None,
    enable_sleep_mode: bool,
    more_lora_modules: tuple[str, ...],
) -> None:
    """Serve a simulated OpenAI-compatible engine whose latency follows the GPU's performance."""
    del max_loras  # taken for vLLM's command line; a batch's adapters cost nothing here
    if more_lora_modules and not lora_modules:
        raise click.UsageError(f"unexpected argument {more_lora_modules[0]!r}")
    # vLLM's --lora-modules takes every word up to the next flag: click hands the words
    # after the first one over as arguments.
    modules = tuple(_module(word) for word in (*lora_modules, *more_lora_modules))
    try:
        config = EngineSimConfig(
            host=host,
            port=port,
            model=model,
            gpu=gpu,
            gpu_count=gpu_count,
            params_b=params_b,
            bytes_per_param=bytes_per_param,
            max_batch=max_batch,
            max_batched_tokens=max_batched_tokens,
            api_key=api_key,
            time_scale=time_scale,
            startup_delay_s=startup_delay,
            fail_after=fail_after,
            enable_lora=enable_lora,
            lora_modules=modules,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
        )
        config.profile()
    except ModelDoesNotFit as exc:
        raise click.UsageError(str(exc)) from exc
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    # Imported here so that registering the command does not load the server stack.
    from providers.engine_sim.server import run

    run(config)


def _module(word: str) -> tuple[str, str]:
    name, eq, source = word.partition("=")
    if not eq or not name or not source:
        raise click.BadParameter(f"{word!r} is not NAME=SOURCE", param_hint="'--lora-modules'")
    return name, source
