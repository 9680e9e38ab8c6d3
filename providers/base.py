"""The provider contract: what the controller may ask of any cloud, and what it gets back.

A provider buys, finds and releases machines. It does not decide which offer to buy (that
is ``autoscaler.decide``) nor wait for an engine to become healthy (that is
``autoscaler.reconcile``). Its promises, in short:

* every instance it launches carries the request's tags (cluster id, project, workload,
  launch id), so the ledger can find it after a crash;
* a launch id is an idempotency token: launching the same request twice yields one
  instance (EC2 ClientToken, GCE requestId);
* ``terminate``, ``stop`` and ``start`` are idempotent, and ``describe`` raises
  :class:`NotFound` for an unknown id;
* a stopped machine is still ours: it is listed, found by its launch id, not gone, and it
  bills its disks (:func:`catalog.storage.stopped_usd_per_hour`);
* vendor errors arrive as :mod:`providers.errors` types, never as botocore or Google types.

Time comes from an injected :class:`Clock` wherever a provider needs it.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from catalog.model import Offer, ProviderName
from providers.errors import (
    InsufficientCapacity,
    NotFound,
    ProviderError,
    QuotaExceeded,
    Terminal,
    Transient,
)

__all__ = [
    "CLUSTER_TAG",
    "GROUP_TAG",
    "LAUNCH_ID_TAG",
    "PROJECT_TAG",
    "REQUIRED_TAGS",
    "ROLE_TAG",
    "WORKLOAD_TAG",
    "BootSpec",
    "Clock",
    "Instance",
    "InstanceState",
    "InsufficientCapacity",
    "LaunchRequest",
    "ManualClock",
    "NotFound",
    "Provider",
    "ProviderError",
    "QuotaExceeded",
    "SpotInterruption",
    "SpotInterruptionSource",
    "SpotNoticeSource",
    "SystemClock",
    "Terminal",
    "Transient",
    "instance_tags",
    "pick_for_launch",
    "utc",
]

CLUSTER_TAG = "autoscaler:cluster"
PROJECT_TAG = "autoscaler:project"
WORKLOAD_TAG = "autoscaler:workload"
LAUNCH_ID_TAG = "autoscaler:launch-id"
REQUIRED_TAGS = (CLUSTER_TAG, PROJECT_TAG, WORKLOAD_TAG, LAUNCH_ID_TAG)
GROUP_TAG = "autoscaler:group"
"""On each member of a replica group: the group's id (its leader's launch id)."""
ROLE_TAG = "autoscaler:role"
"""On each member of a replica group: ``leader`` or ``worker``."""


class Clock(Protocol):
    """Where time comes from. Tests inject a :class:`ManualClock` and step it."""

    def now(self) -> float:
        """Seconds since the Unix epoch (UTC)."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds})")
        self._now += seconds


def utc(epoch_seconds: float) -> datetime:
    """An epoch timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(epoch_seconds, tz=UTC)


def instance_tags(
    *, cluster_id: str, project: str, workload: str, launch_id: str
) -> dict[str, str]:
    """The tags every launched instance must carry (keys are the ``*_TAG`` constants)."""
    values = {
        CLUSTER_TAG: cluster_id,
        PROJECT_TAG: project,
        WORKLOAD_TAG: workload,
        LAUNCH_ID_TAG: launch_id,
    }
    empty = [key for key, value in values.items() if not value]
    if empty:
        raise ValueError(f"instance tags need a non-empty value for {', '.join(empty)}")
    return values


class InstanceState(StrEnum):
    """An instance's lifecycle state as the provider reports it.

    ::

        PENDING ──> RUNNING ──> STOPPING ──> STOPPED ──(start)──> PENDING
           │           │                        │
           └───────────┴──> SHUTTING_DOWN ──> TERMINATED       (terminate, from any)
                       └──> INTERRUPTED                        (reclaimed spot)

    ``STOPPING`` is on its way to ``STOPPED``; ``SHUTTING_DOWN`` on its way to
    ``TERMINATED``. Only ``TERMINATED`` and ``INTERRUPTED`` are gone: a stopped machine
    is still ours (listed, billed for its disks, started again or terminated by us).
    """

    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SHUTTING_DOWN = "shutting-down"
    TERMINATED = "terminated"
    # Reclaimed by the provider (spot interruption or GCE preemption), not by us.
    INTERRUPTED = "interrupted"

    @property
    def is_gone(self) -> bool:
        """True once the machine no longer exists: terminated or reclaimed. A machine
        shutting down is not gone yet (nothing is marked gone before the provider says
        so), nor is a stopped one."""
        return self in (InstanceState.TERMINATED, InstanceState.INTERRUPTED)

    @property
    def is_stopped(self) -> bool:
        """True for a machine stopping or stopped: it serves nothing, keeps its disk,
        and bills only that disk once stopped."""
        return self in (InstanceState.STOPPING, InstanceState.STOPPED)


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class BootSpec:
    """How an instance boots its engine.

    ``command`` is the engine's argv inside ``image``; the engine listens on ``port`` and
    answers ``health_path`` when ready. ``env`` holds non-secret variables only; secrets
    are named in ``secret_env_names`` and resolved on the instance. ``cuda_version``
    ("12.4") pins the driver/image family; ``startup_script`` is the script the instance
    runs at first boot (EC2 user data, GCE ``startup-script`` metadata).
    """

    image: str
    command: tuple[str, ...]
    port: int
    health_path: str
    model_id: str
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env_names: tuple[str, ...] = ()
    cuda_version: str | None = None
    startup_script: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"BootSpec.port must be 1-65535, got {self.port}")
        if not self.health_path.startswith("/"):
            raise ValueError(f"BootSpec.health_path must start with '/', got {self.health_path!r}")
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", _frozen(self.env))


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """One instance to buy: an offer, a market, how it boots, and who it belongs to.

    ``tags`` must hold every key of :data:`REQUIRED_TAGS` (build them with
    :func:`instance_tags`), and the launch-id tag must equal ``launch_id``.
    """

    offer: Offer
    spot: bool
    boot: BootSpec
    launch_id: str
    tags: Mapping[str, str]

    def __post_init__(self) -> None:
        missing = [key for key in REQUIRED_TAGS if not self.tags.get(key)]
        if missing:
            raise ValueError(f"LaunchRequest {self.launch_id}: tags lack {', '.join(missing)}")
        if self.tags[LAUNCH_ID_TAG] != self.launch_id:
            raise ValueError(
                f"LaunchRequest {self.launch_id}: tag {LAUNCH_ID_TAG} is "
                f"{self.tags[LAUNCH_ID_TAG]!r}, not the launch id"
            )
        if self.spot and self.offer.spot_usd_per_hour is None:
            raise ValueError(f"LaunchRequest {self.launch_id}: {self.offer.key} sells no spot")
        object.__setattr__(self, "tags", _frozen(self.tags))

    @property
    def client_token(self) -> str:
        """The provider idempotency token: the launch id itself."""
        return self.launch_id

    @property
    def cluster_id(self) -> str:
        return self.tags[CLUSTER_TAG]

    @property
    def workload(self) -> str:
        return self.tags[WORKLOAD_TAG]

    @property
    def action(self) -> str:
        """How error messages name this launch: 'launching g5.xlarge in us-east-1a for w'."""
        market = " (spot)" if self.spot else ""
        return (
            f"launching {self.offer.instance_type}{market} in {self.offer.zone} for {self.workload}"
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """A machine as the provider last reported it."""

    provider: ProviderName
    instance_id: str
    launch_id: str
    zone: str
    instance_type: str
    state: InstanceState
    spot: bool
    launched_at: datetime
    tags: Mapping[str, str]
    private_address: str | None = None
    public_address: str | None = None
    engine: str | None = None
    """What serves on it, where the provider knows (the local provider: ``vllm`` or
    ``engine-sim``); ``engine_reason`` says why that engine."""
    engine_reason: str | None = None
    ended_reason: str | None = None
    """How a gone instance ended, where the provider knows without being asked to end it
    (the local provider: ``the engine process exited with status 1``, and where its
    output is)."""

    def __post_init__(self) -> None:
        if self.launched_at.tzinfo is None:
            raise ValueError(f"Instance {self.instance_id}: launched_at must be timezone-aware")
        object.__setattr__(self, "tags", _frozen(self.tags))

    @property
    def cluster_id(self) -> str | None:
        return self.tags.get(CLUSTER_TAG)


@dataclass(frozen=True, slots=True)
class SpotInterruption:
    """The provider reclaimed (or announced it will reclaim) a spot instance."""

    instance_id: str
    launch_id: str
    zone: str
    instance_type: str
    noticed_at: datetime
    reason: str = "spot capacity reclaimed"
    reclaim_at: datetime | None = None
    """When the provider reclaims the machine, where the notice says (``None``: not
    known; :func:`reclaim_time` estimates it from the provider's lead)."""


SPOT_NOTICE_LEAD_S: dict[ProviderName, float] = {ProviderName.AWS: 120.0, ProviderName.GCP: 30.0}
"""Seconds from a spot interruption warning to the reclaim, by the provider of the offer.
EC2 warns two minutes before it stops or terminates a Spot Instance (EC2 user guide,
"Spot Instance interruption notices":
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html);
GCE sends a Spot or preemptible VM its preemption notice (ACPI G2 Soft Off) 30 s before it
stops it (Compute Engine, "Preemption process":
https://cloud.google.com/compute/docs/instances/spot#preemption-process). An offer of
another provider is reclaimed without a warning."""

_ACTION_TIME = re.compile(r'"time"\s*:\s*"([^"]+)"')


def reclaim_time(notice: str, *, provider: str, noticed_at: datetime) -> datetime | None:
    """When a spot notice's machine is reclaimed: the action time EC2's instance metadata
    ``spot/instance-action`` carries (``{"action": "terminate", "time": "…"}``) where the
    notice quotes it, else ``noticed_at`` plus the provider's lead
    (:data:`SPOT_NOTICE_LEAD_S`); ``None`` for a provider of unknown lead."""
    match = _ACTION_TIME.search(notice)
    if match is not None:
        try:
            at = datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        except ValueError:
            at = None
        if at is not None and at.tzinfo is not None:
            return at
    lead = SPOT_NOTICE_LEAD_S.get(ProviderName(provider)) if provider in _PROVIDERS else None
    return None if lead is None else noticed_at + timedelta(seconds=lead)


_PROVIDERS = frozenset(p.value for p in ProviderName)


@runtime_checkable
class Provider(Protocol):
    """A cloud (or this machine, or a simulation) that sells instances.

    Every method is safe to call again after a crash or a timeout: launches are keyed by
    launch id, terminations are idempotent, and lookups read the provider's own truth.
    Errors are :mod:`providers.errors` types whose message names the action that failed.
    """

    name: str

    async def launch(self, request: LaunchRequest) -> Instance:
        """Buy one instance for ``request`` and return it (usually still ``PENDING``).

        Tags the instance (and its volumes where the provider tags volumes) with
        ``request.tags`` and passes ``request.client_token`` as the provider's idempotency
        token, so a second call with the same launch id returns the same instance instead
        of buying another. Raises :class:`InsufficientCapacity` when the zone has none,
        :class:`QuotaExceeded` on an account limit, :class:`Transient` on throttling or
        server faults, :class:`Terminal` when the request itself is invalid.
        """
        ...

    async def terminate(self, instance_id: str) -> None:
        """Release the instance. Idempotent: an instance already gone is a success.

        Returns once the provider accepted the termination; the instance may still be
        ``SHUTTING_DOWN`` (or, on GCE, ``STOPPING``) — confirm with :meth:`describe` or
        :meth:`list` before marking it gone. A stopped instance is terminated like any.
        """
        ...

    async def stop(self, instance_id: str) -> None:
        """Stop the machine and keep it: its disk (image, container, weights) stays, and
        only the disk is billed while it is stopped.

        Idempotent: an instance already ``STOPPING`` or ``STOPPED`` is a success. Returns
        once the provider accepted the stop; the instance is ``STOPPING`` until
        :meth:`describe` or :meth:`list` shows ``STOPPED``. Raises :class:`NotFound` for
        an unknown instance or one gone or shutting down (there is nothing to keep),
        :class:`Transient` while the provider cannot stop it yet (EC2 refuses to stop a
        ``pending`` instance), and :class:`Terminal` where the machine can never be
        stopped (an EC2 spot instance of a one-time request; a private worker).
        """
        ...

    async def start(self, instance_id: str) -> Instance:
        """Start a stopped machine again and return it (usually ``PENDING``): the same
        instance id, tags and launch id; its addresses may be new (a public address is
        released at stop), so read them from the returned instance.

        Idempotent: an instance already ``PENDING`` or ``RUNNING`` is returned as it is.
        Raises :class:`NotFound` for an unknown or gone instance, :class:`Transient` while
        it is still ``STOPPING``, and :class:`InsufficientCapacity` when the zone has no
        capacity for its type now (a stopped machine is tied to its zone: the caller
        launches elsewhere instead, and may terminate the stopped one).
        """
        ...

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        """Every instance tagged with ``cluster_id`` that the provider still shows.

        Instances that are terminated or interrupted but still visible are included with
        that state, so callers can confirm termination.
        """
        ...

    async def describe(self, instance_id: str) -> Instance:
        """The instance's current state. Raises :class:`NotFound` for an unknown id."""
        ...

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        """The instance launched for ``launch_id`` in ``cluster_id``, or ``None``.

        This resolves an intent after a crash: a fresh provider object with no memory of
        the launch must find the instance by its tags. Where several instances carry the
        launch id (never by our own doing), the one not gone, else the newest, is returned.
        """
        ...


@runtime_checkable
class SpotInterruptionSource(Protocol):
    """Optional capability: the provider reports spot interruptions it knows about.

    Interruptions are reported here (and as the ``INTERRUPTED`` state of the instance),
    so the controller reacts to them instead of discovering a dead replica by accident.
    """

    async def interruptions(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        """Interruptions of the cluster's spot instances that are still visible."""
        ...


@runtime_checkable
class SpotNoticeSource(Protocol):
    """Optional capability: warnings that spot instances are about to be reclaimed, read
    from the provider's event stream (EC2 interruption warnings through SQS), besides
    the notice each instance reports through its boot callback."""

    async def spot_notices(self, cluster_id: str) -> builtins.list[SpotInterruption]:
        """The cluster's instances warned of since the last call (each warning once)."""
        ...


def pick_for_launch(instances: builtins.list[Instance]) -> Instance | None:
    """Of the instances carrying one launch id: the one not gone, else the newest."""
    if not instances:
        return None
    alive = [instance for instance in instances if not instance.state.is_gone]
    return max(alive or instances, key=lambda instance: instance.launched_at)
