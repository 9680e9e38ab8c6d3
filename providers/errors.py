"""The errors every provider raises: vendor errors translated at the boundary.

The type says what the caller should do next::

    ProviderError                 something a provider call could not do
     ├── InsufficientCapacity     the offer has no capacity now: try the next offer and
     │                            mark this one unavailable for a while
     ├── QuotaExceeded            an account limit (vCPUs, GPUs, spot count): no retry will
     │                            help until the limit is raised or instances are freed
     ├── Transient                throttled or a server fault: retry the same call after
     │                            ``retry_after`` seconds (idempotency tokens make it safe)
     ├── Terminal                 the request itself is wrong (unknown instance type, bad
     │                            parameter, no image): never retry it
     └── NotFound                 no such instance

Each error's message starts with the action that failed ("launching g5.xlarge in
us-east-1a for support-bot: …"), and adapters raise it ``from`` the vendor's exception so
the original stays in the traceback. No botocore or Google type leaves ``providers/``.
"""

from __future__ import annotations


class ProviderError(Exception):
    """A provider call failed. ``action`` is what was being done; ``detail`` is why."""

    def __init__(self, action: str, detail: str) -> None:
        super().__init__(f"{action}: {detail}")
        self.action = action
        self.detail = detail


class InsufficientCapacity(ProviderError):
    """The zone has no capacity for this instance type (on this market) right now."""


class QuotaExceeded(ProviderError):
    """An account limit stops the launch; retrying will not help until it is raised."""


class Transient(ProviderError):
    """Throttling or a server-side fault; the same call may succeed after ``retry_after`` s."""

    def __init__(self, action: str, detail: str, *, retry_after: float = 1.0) -> None:
        super().__init__(action, detail)
        self.retry_after = retry_after


class Throttled(Transient):
    """The provider's rate limit: retry after ``retry_after`` s, not sooner, and not by
    sleeping in the caller (the controller records when to try again)."""


def retried_in_the_call(error: BaseException) -> bool:
    """Whether a provider retries ``error`` itself, at once with a short backoff: a server
    fault yes; a rate limit (:class:`Throttled`) no, it is raised so that no pass sleeps
    through it and the controller records when to try that launch again."""
    return isinstance(error, Transient) and not isinstance(error, Throttled)


class Terminal(ProviderError):
    """The request is invalid for this provider; retrying it unchanged will fail again."""


class NotFound(ProviderError):
    """The instance does not exist (or is no longer visible) at the provider."""
