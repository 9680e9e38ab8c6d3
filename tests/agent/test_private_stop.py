"""A private worker is the user's machine: stopping it is refused, never retried."""

from __future__ import annotations

from providers.agent import refuse_stop
from providers.base import ProviderError, Terminal, Transient


def test_stopping_a_replica_on_a_private_worker_is_terminal_and_says_why() -> None:
    error = refuse_stop("wrk_0123456789abcdef", launch_id="ln-1")

    assert isinstance(error, Terminal) and isinstance(error, ProviderError)
    assert not isinstance(error, Transient)  # the controller never retries it
    assert error.action == "stopping replica ln-1 on worker wrk_0123456789abcdef"
    assert "user's own machine" in error.detail
