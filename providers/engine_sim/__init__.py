"""A simulated OpenAI-compatible engine that answers as slowly as a real one would.

``autoscaler engine-sim`` (or ``python -m providers.engine_sim``) serves chat and text
completions, embeddings, images, speech and transcription with latencies from
:mod:`catalog.perf`: prompts are prefilled at the GPU's prefill speed, tokens decoded at
its per-sequence speed, at most ``max_batch`` sequences run at once and the rest queue,
so time to first token rises under load as on a real engine. ``/metrics`` reports vLLM's
metric names. With ``--enable-sleep-mode`` it sleeps and wakes as vLLM's sleep mode does
(:mod:`providers.engine_sim.sleep`), as slowly as :mod:`catalog.wake` says. Demos, the
local provider and the tests use it in place of vLLM.

* :class:`~providers.engine_sim.config.EngineSimConfig`: what to simulate and how to serve it
* :func:`~providers.engine_sim.app.create_app`: the aiohttp application
* :class:`~providers.engine_sim.server.EngineSimServer`: run it in-process (async context)
* :func:`~providers.engine_sim.server.run`: run it until SIGINT/SIGTERM (the CLI)
"""

from providers.engine_sim.config import EngineSimConfig

__all__ = ["EngineSimConfig"]
