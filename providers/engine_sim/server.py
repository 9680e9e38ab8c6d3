"""Running engine-sim: in-process for tests and embedders, or as a process until signalled."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from providers.engine_sim.app import create_app
from providers.engine_sim.config import EngineSimConfig
from providers.engine_sim.state import STATE, exit_abruptly


class EngineSimServer:
    """An engine-sim listening on ``config.host:config.port`` (port 0: any free port).

    ``async with EngineSimServer(config) as server:`` serves at ``server.url`` until the
    block ends.
    """

    def __init__(
        self, config: EngineSimConfig, *, on_fail: Callable[[], None] = exit_abruptly
    ) -> None:
        self.config = config
        # Cancel a handler whose client hung up, so its sequence leaves the batch as in vLLM.
        self._runner = web.AppRunner(
            create_app(config, on_fail=on_fail), access_log=None, handler_cancellation=True
        )
        self.host = config.host
        self.port = config.port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:43121`` (append ``/v1`` for OpenAI clients)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def engine_seconds(self) -> float:
        """The simulated engine's clock: model seconds since it started (wall seconds times
        the time scale). Tests measure modelled durations on it."""
        return self._runner.app[STATE].engine.now_s()

    async def start(self) -> None:
        """Bind and serve; learns the port when ``config.port`` is 0."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.host, self.port = self._runner.addresses[0][:2]

    async def stop(self) -> None:
        """Stop serving and cancel the requests still inside."""
        await self._runner.cleanup()

    async def __aenter__(self) -> EngineSimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(config: EngineSimConfig) -> None:
    """Serve until SIGINT or SIGTERM; announces the address on stdout once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with EngineSimServer(config) as server:
        profile = server.config.profile()
        print(
            f"engine-sim serving {config.model} on {server.url} "
            f"({profile.gpu_count} x {profile.gpu}, {config.params_b:g}B params, "
            f"max batch {profile.max_batch}, time scale {config.time_scale:g})",
            flush=True,
        )
        await stop.wait()


def run(config: EngineSimConfig) -> None:
    """Run :func:`serve` on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        asyncio.run(serve(config))
        return
    if sys.platform != "win32":
        uvloop.run(serve(config))
    else:  # pragma: no cover
        asyncio.run(serve(config))
