"""Replays without the cyclic garbage collector.

A day's replay holds about half a million requests (each a trace entry and a record)
and allocates millions of short-lived objects (events, samples, the controller's
signals): every allocation-triggered collection of the older generations walks all of
them, about a fifth of a replay's time. Nothing a replay allocates relies on the
collector (no reference cycles on the per-event paths; what is freed by reference
counting is freed as before), so :func:`paused_gc` switches it off for a replay and
back on after. Results do not depend on it: the collector frees memory, nothing more.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic collector off for the block, then as it was (nested blocks: the
    outermost turns it back on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
