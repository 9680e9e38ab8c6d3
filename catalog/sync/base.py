"""What every provider fetcher shares: progress reporting, retries on throttling, errors.

Errors::

    SyncError                 a sync that cannot produce a trustworthy snapshot
    ├── FetchError            a provider call failed (after retries); names the call
    └── ValidationError       the new snapshot lost too much against the old one
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

T = TypeVar("T")


class SyncError(Exception):
    """A sync that must not replace the active catalog."""


class FetchError(SyncError):
    """A provider call that failed for good: ``"aws us-east-1 GetProducts: ..."``."""


class ValidationError(SyncError):
    """The new snapshot would silently drop most of the old one's offers."""


class SyncProgress(Protocol):
    """Progress of one sync, one task per provider and region."""

    def start(self, task: str, *, total: int) -> None:
        """A task with ``total`` steps begins."""

    def advance(self, task: str, steps: int = 1) -> None:
        """``steps`` more steps of ``task`` are done."""


class NullProgress:
    """Reports nowhere."""

    def start(self, task: str, *, total: int) -> None:
        del task, total

    def advance(self, task: str, steps: int = 1) -> None:
        del task, steps


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How throttled calls are retried: exponential backoff, then give up."""

    attempts: int = 6
    initial_seconds: float = 0.5
    max_seconds: float = 20.0


async def call_with_retry(
    action: str,
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    is_throttling: Callable[[BaseException], bool],
) -> T:
    """Run ``call``, retrying throttling errors; any final failure becomes a ``FetchError``."""
    retrying = AsyncRetrying(
        retry=retry_if_exception(is_throttling),
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await call()
    except SyncError:
        raise
    except Exception as exc:
        raise FetchError(f"{action}: {exc}") from exc
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
