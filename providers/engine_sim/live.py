"""The performance model's engine, driven by the (scaled) wall clock inside an event loop.

:class:`catalog.engine.BatchEngine` does the modelling; this module only maps wall-clock
time onto engine time (``engine seconds = wall seconds x time_scale``), sleeps until the
engine's next event, and turns events into futures a request handler can await.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from catalog.engine import BatchEngine, EngineEvent, EventKind, RequestTiming
from catalog.perf import ServingProfile


@dataclass(slots=True)
class Ticket:
    """One submitted request: its engine id, arrival, and futures for its two moments."""

    request_id: int
    arrival_s: float
    output_tokens: int
    first_token: asyncio.Future[float] = field(repr=False)
    finished: asyncio.Future[RequestTiming] = field(repr=False)
    aborted: bool = False
    """Ended by the engine before its last token (a sleep in ``abort`` mode): its
    ``output_tokens`` are then the tokens it had produced, and both futures are settled."""


class LiveEngine:
    """A :class:`BatchEngine` advanced in real time, ``time_scale`` times faster than life."""

    def __init__(
        self,
        profile: ServingProfile,
        *,
        time_scale: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = BatchEngine(profile)
        self._scale = time_scale
        self._monotonic = monotonic
        self._origin = monotonic()
        self._tickets: dict[int, Ticket] = {}
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None

    @property
    def profile(self) -> ServingProfile:
        return self._engine.profile

    @property
    def running(self) -> int:
        """Sequences in the batch, as of now."""
        self.sync()
        return self._engine.running

    @property
    def waiting(self) -> int:
        """Requests queued for a batch slot, as of now."""
        self.sync()
        return self._engine.waiting

    def now_s(self) -> float:
        """Engine time: scaled seconds since this engine was made."""
        return (self._monotonic() - self._origin) * self._scale

    def start(self) -> None:
        """Start the task that wakes up for the engine's events."""
        if self._driver is None:
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def stop(self) -> None:
        """Stop the driver; requests still inside are cancelled."""
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        for ticket in self._tickets.values():
            ticket.first_token.cancel()
            ticket.finished.cancel()
        self._tickets.clear()

    def submit(self, *, input_tokens: int, output_tokens: int) -> Ticket:
        """Hand a request arriving now to the engine."""
        self.sync()
        loop = asyncio.get_running_loop()
        request_id = self._engine.submit(input_tokens=input_tokens, output_tokens=output_tokens)
        ticket = Ticket(
            request_id=request_id,
            arrival_s=self._engine.now_s,
            output_tokens=output_tokens,
            first_token=loop.create_future(),
            finished=loop.create_future(),
        )
        self._tickets[request_id] = ticket
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a request whose client went away, freeing its batch slot.

        Harmless for a request that has finished: call it unconditionally on the way out.
        """
        self.sync()
        if self._tickets.pop(ticket.request_id, None) is not None:
            self._engine.cancel(ticket.request_id)
            self._wake.set()
        ticket.first_token.cancel()
        ticket.finished.cancel()

    def abort_all(self) -> None:
        """End every request inside now, as vLLM's pause in ``abort`` mode does: each keeps
        the tokens it produced, and its futures settle at once."""
        self.sync()
        now = self._engine.now_s
        for ticket in list(self._tickets.values()):
            produced = self.generated_tokens(ticket)
            self._engine.cancel(ticket.request_id)
            self._tickets.pop(ticket.request_id, None)
            ticket.aborted = True
            ticket.output_tokens = produced
            if not ticket.first_token.done():
                ticket.first_token.set_result(now)
            if not ticket.finished.done():
                first = ticket.first_token.result()
                ticket.finished.set_result(
                    RequestTiming(
                        request_id=ticket.request_id,
                        arrival_s=ticket.arrival_s,
                        admitted_s=min(first, now),
                        first_token_s=first,
                        finished_s=now,
                        input_tokens=0,
                        output_tokens=produced,
                    )
                )
        self._wake.set()

    async def drained(self) -> None:
        """Return once every request inside now has finished (or gone)."""
        pending = [ticket.finished for ticket in self._tickets.values()]
        if pending:
            await asyncio.wait(pending)

    def generated_tokens(self, ticket: Ticket) -> int:
        """Output tokens the request has produced by now."""
        self.sync()
        if ticket.finished.done():
            return ticket.output_tokens
        if not ticket.first_token.done():
            return 0
        return max(self._engine.generated_tokens(ticket.request_id), 1)

    def sync(self) -> None:
        """Advance the engine to now and settle the futures of what happened meanwhile."""
        for event in self._engine.advance(max(self.now_s(), self._engine.now_s)):
            self._settle(event)

    def seconds_until(self, engine_s: float) -> float:
        """Wall-clock seconds until engine time ``engine_s``."""
        return max(engine_s - self.now_s(), 0.0) / self._scale

    def _settle(self, event: EngineEvent) -> None:
        ticket = self._tickets.get(event.request_id)
        if ticket is None:
            return
        if event.kind is EventKind.FIRST_TOKEN:
            if not ticket.first_token.done():
                ticket.first_token.set_result(event.at_s)
        elif event.timing is not None:
            del self._tickets[event.request_id]
            if not ticket.finished.done():
                ticket.finished.set_result(event.timing)

    async def _drive(self) -> None:
        while True:
            self.sync()
            due = self._engine.next_event_s()
            self._wake.clear()
            delay = None if due is None else self.seconds_until(due)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
