"""A replica's phase, derived from the facts the ledger stores (never stored itself)."""

from __future__ import annotations

from enum import StrEnum

from autoscaler.store.models import Instance


class Phase(StrEnum):
    PENDING = "pending"  # intent written; the provider has not confirmed a launch
    BOOTING = "booting"  # launched, engine not healthy yet
    READY = "ready"  # serving: the gateway routes to it
    DRAINING = "draining"  # no new requests; in-flight ones finish
    TERMINATING = "terminating"  # terminate asked; the provider has not confirmed
    TERMINATED = "terminated"  # the provider confirmed it gone


def phase_of(instance: Instance) -> Phase:
    if instance.terminated_confirmed_at is not None:
        return Phase.TERMINATED
    if instance.terminate_requested_at is not None:
        return Phase.TERMINATING
    if instance.drain_requested_at is not None:
        return Phase.DRAINING
    if instance.ready_at is not None:
        return Phase.READY
    if instance.launched_at is not None:
        return Phase.BOOTING
    return Phase.PENDING
