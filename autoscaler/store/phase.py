"""A replica's phase, derived from the facts the ledger stores (never stored itself).

Each replica has an actual phase (:func:`phase_of`, what has happened to it) and a
desired phase (:func:`desired_phase_of`, what the controller last asked of it), the two
words a user reads side by side in ``describe`` and the API.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Protocol

from autoscaler.store.models import Instance


class Stamps(Protocol):
    """What a phase is derived from: a ledger row, or a value carrying its timestamps
    (``autoscaler.reconcile.fleet.RowFacts``)."""

    @property
    def launched_at(self) -> datetime | None: ...
    @property
    def ready_at(self) -> datetime | None: ...
    @property
    def drain_requested_at(self) -> datetime | None: ...
    @property
    def terminate_requested_at(self) -> datetime | None: ...
    @property
    def terminated_confirmed_at(self) -> datetime | None: ...
    @property
    def park_requested_at(self) -> datetime | None: ...
    @property
    def parked_at(self) -> datetime | None: ...


class Noted(Protocol):
    """What a spot warning is read from: a ledger row, or its facts."""

    @property
    def last_error(self) -> str | None: ...


SPOT_NOTICE = "spot notice: "
"""How ``last_error`` starts when the provider announced it will reclaim the instance."""


def spot_warned(instance: Noted) -> bool:
    """Whether its provider warned it will reclaim the machine: a spot notice is recorded
    (its time, where known, in ``reclaim_at``). The notice stays until the row closes."""
    return (instance.last_error or "").startswith(SPOT_NOTICE)


class Phase(StrEnum):
    PENDING = "pending"  # intent written; the provider has not confirmed a launch
    BOOTING = "booting"  # launched, engine not healthy yet
    READY = "ready"  # serving: the gateway routes to it
    DRAINING = "draining"  # no new requests; in-flight ones finish
    TERMINATING = "terminating"  # terminate asked; the provider has not confirmed
    TERMINATED = "terminated"  # the provider confirmed it gone
    PARKING = "parking"  # asked to sleep or stop; the engine or provider has not confirmed
    PARKED = "parked"  # asleep or stopped (``park_mode``), kept for a fast scale-up


def phase_of(instance: Stamps) -> Phase:
    """A resumed replica has its park facts cleared (``resumed_at`` set, ``ready_at``
    cleared): it is booting until its engine answers again."""
    if instance.terminated_confirmed_at is not None:
        return Phase.TERMINATED
    if instance.terminate_requested_at is not None:
        return Phase.TERMINATING
    if instance.parked_at is not None:
        return Phase.PARKED
    if instance.park_requested_at is not None:
        return Phase.PARKING
    if instance.drain_requested_at is not None:
        return Phase.DRAINING
    if instance.ready_at is not None:
        return Phase.READY
    if instance.launched_at is not None:
        return Phase.BOOTING
    return Phase.PENDING


class DesiredPhase(StrEnum):
    RUNNING = "running"  # the controller wants it serving
    PARKED = "parked"  # asked to sleep or stop, kept for a fast scale-up
    TERMINATED = "terminated"  # drain or terminate asked, or its workload deleted


def desired_phase_of(instance: Instance, *, workload_deleted: bool = False) -> DesiredPhase:
    """What the controller wants of a replica: terminated from the moment it asked for a
    drain or a termination (or the workload was deleted), parked once it asked for a park
    (a drained replica is parked instead of terminated), running before."""
    if (
        workload_deleted
        or instance.terminate_requested_at is not None
        or instance.terminated_confirmed_at is not None
    ):
        return DesiredPhase.TERMINATED
    if instance.park_requested_at is not None:
        return DesiredPhase.PARKED
    if instance.drain_requested_at is not None:
        return DesiredPhase.TERMINATED
    return DesiredPhase.RUNNING
