"""Tables. Facts are stored (timestamps of what happened); phases are derived from them.

Every timestamp is UTC. SQLite drops time zones, so :class:`UtcDateTime` stores naive UTC
and hands back aware datetimes on both backends.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from autoscaler.store.sealed import SealedString, SealedText


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    slug: Mapped[str] = mapped_column(String(63), primary_key=True)
    created_at: Mapped[datetime]


class Token(Base):
    """An API credential, stored as a SHA-256 hash; the secret is shown once.

    ``kind`` is ``admin`` (every project), ``sdk`` (management API of one project) or
    ``live`` (the gateway, one workload of one project).
    """

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(24))
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    workload_slug: Mapped[str | None] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class Workload(Base):
    """One generation line of a workload. Soft-deleted rows stay until drained."""

    __tablename__ = "workloads"
    __table_args__ = (
        Index(
            "uq_workloads_live_slug",
            "project",
            "slug",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(ForeignKey("projects.slug"))
    slug: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    deleted_at: Mapped[datetime | None]
    last_request_at: Mapped[datetime | None]
    revision: Mapped[int] = mapped_column(BigInteger, index=True, server_default=text("0"))
    """Set by a trigger on every write (migration 0015): the controller reads only the
    rows written since its last pass (``reconcile.fleet``)."""


class Instance(Base):
    """The ledger: one row per launch, written before the provider is called.

    Phase is derived from the timestamps (see :mod:`autoscaler.store.phase`).
    """

    __tablename__ = "instances"
    __table_args__ = (
        # A workload's spot machines closed within the measured interruption rate's
        # window (``reconcile.liveness.closed_spot_lives``).
        Index(
            "ix_instances_spot_record",
            "workload_id",
            "terminated_confirmed_at",
            sqlite_where=text("spot"),
            postgresql_where=text("spot"),
        ),
    )

    launch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id"), index=True)
    project: Mapped[str] = mapped_column(String(63))
    workload_slug: Mapped[str] = mapped_column(String(63))
    spec_generation: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(16))
    offer_key: Mapped[str] = mapped_column(String(200))
    region: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64))
    instance_type: Mapped[str] = mapped_column(String(64))
    gpu: Mapped[str] = mapped_column(String(64))
    gpu_count: Mapped[int] = mapped_column(Integer)
    spot: Mapped[bool] = mapped_column(Boolean, default=False)
    hourly_usd: Mapped[float] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(String(40))
    instance_id: Mapped[str | None] = mapped_column(String(128), index=True)
    url: Mapped[str | None] = mapped_column(String(300))
    engine_key: Mapped[str | None] = mapped_column(SealedString())  # encrypted at rest
    intent_at: Mapped[datetime]
    launched_at: Mapped[datetime | None]
    ready_at: Mapped[datetime | None]
    drain_requested_at: Mapped[datetime | None]
    terminate_requested_at: Mapped[datetime | None]
    terminated_confirmed_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    engine: Mapped[str | None] = mapped_column(String(32))
    """What serves on the instance where the provider says (``vllm``, ``engine-sim``)."""
    engine_reason: Mapped[str | None] = mapped_column(Text)
    engine_command: Mapped[list[str] | None] = mapped_column(JSON)
    """The engine's argv as the replica was asked to boot, with secrets as ``${NAME}``
    references (never their values); ``describe`` shows it masked."""
    group_id: Mapped[str | None] = mapped_column(String(64), index=True)
    """A replica group's members share it (the leader's launch id); ``None``: one machine."""
    group_role: Mapped[str | None] = mapped_column(String(8))
    """``leader`` (the member the gateway routes to) or ``worker``."""
    group_size: Mapped[int | None] = mapped_column(Integer)
    """Members of the row's group, the leader included."""
    private_address: Mapped[str | None] = mapped_column(String(64))
    """The machine's private address as its provider reported it: what a replica group's
    workers are told is their leader's (``url`` may name a tunnel: ``engine_address``)."""
    joined_at: Mapped[datetime | None]
    """When a group worker's startup script reported its role started against the
    leader (the boot callback's ``ready``); the leader is ready only after every worker
    that boots from a script has."""
    park_mode: Mapped[str | None] = mapped_column(String(16))
    """How the replica waits while parked (``stopped``: its machine; ``sleeping``: its
    engine), set with ``park_requested_at``; after a resume, the path it came back by."""
    park_requested_at: Mapped[datetime | None]
    """When the controller asked the engine to sleep or the provider to stop it."""
    parked_at: Mapped[datetime | None]
    """When the engine (asleep) or the provider (``stopped``) confirmed the park."""
    resumed_at: Mapped[datetime | None]
    """When it was last woken or started again; it is booting until ready once more."""
    running_usd_per_hour: Mapped[float | None] = mapped_column(Float)
    """Its price running, while ``hourly_usd`` is a stopped machine's (its disks);
    ``None``: ``hourly_usd`` is the running price."""
    stopped_usd_per_hour: Mapped[float | None] = mapped_column(Float)
    """What its machine costs stopped (its disks); ``None``: it is never stopped (a spot
    machine, a private worker, this machine, a replica group's member)."""
    prefill: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    """Launched to refill a warm pool: drained and parked once ready."""
    reclaim_at: Mapped[datetime | None]
    """When its provider will reclaim the machine, as its spot notice said (recorded with
    the notice in ``last_error``; ``None``: no notice, or one without a time). Migration
    0016."""
    revision: Mapped[int] = mapped_column(BigInteger, index=True, server_default=text("0"))
    """Set by a trigger on every write, as the workload's is (migration 0015)."""


class WorkloadSignals(Base):
    """The latest measurement of a workload, as the controller last read it: the
    gateway's and the engines' (``autoscaler.reconcile.engine_metrics``). One row per
    workload, replaced in place; ``describe`` shows it."""

    __tablename__ = "workload_signals"

    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id"), primary_key=True)
    at: Mapped[datetime]
    data: Mapped[dict[str, Any]]


class Decision(Base):
    """A decision the controller acted on or refused, with its inputs and reason."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id"), index=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    inputs: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any]]
    reason: Mapped[str] = mapped_column(Text)
    cost_delta_usd_per_hour: Mapped[float] = mapped_column(Float, default=0.0)
    acted: Mapped[bool] = mapped_column(Boolean, default=True)


class Worker(Base):
    """A private GPU box running ``autoscaler agent``."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(63), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(300))
    gpus: Mapped[dict[str, Any]]
    registered_at: Mapped[datetime]
    last_heartbeat_at: Mapped[datetime | None]


class Job(Base):
    """An async request held by the gateway until a replica has answered it."""

    __tablename__ = "jobs"
    #: A batch's lines by status: whether any is open, and the counts (migration 0010).
    __table_args__ = (Index("ix_jobs_batch_id_status", "batch_id", "status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    workload_slug: Mapped[str] = mapped_column(String(63), index=True)
    route: Mapped[str] = mapped_column(String(100))
    request: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), index=True)
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    batch_id: Mapped[str | None] = mapped_column(String(40), default=None)
    """The batch this job is a line of (``None``: a job submitted on its own)."""
    custom_id: Mapped[str | None] = mapped_column(Text, default=None)
    batch_line: Mapped[int | None] = mapped_column(Integer, default=None)
    """The line's number in the batch's input file, from 1."""
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """How many times a gateway has claimed the job."""


class StoredFile(Base):
    """A file of the OpenAI Files API: a batch's input, output or errors (JSONL).

    It belongs to one workload, like the data key that uploaded it."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    workload_slug: Mapped[str] = mapped_column(String(63), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column("bytes", Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    """Loaded only when asked for (``undefer``): listing files never reads it."""
    created_at: Mapped[datetime]


class Batch(Base):
    """A batch of the OpenAI Batches API: its lines are jobs (``jobs.batch_id``).

    Facts only; the status is derived from the timestamps (``gateway.batch_format``)."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project: Mapped[str] = mapped_column(String(63))
    workload_slug: Mapped[str] = mapped_column(String(63), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    user_metadata: Mapped[dict[str, Any] | None]
    total: Mapped[int] = mapped_column(Integer)
    completed: Mapped[int | None] = mapped_column(Integer)
    """Lines answered with a status below 400, counted when the batch was finalized."""
    failed: Mapped[int | None] = mapped_column(Integer)
    """The other lines (failed, cancelled or expired): ``completed + failed == total``."""
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]
    cancelling_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]


class RouteChange(Base):
    """One change to what the gateway routes on, written by database triggers (migration
    0007): an instance's routing columns, a workload's spec, name or deletion, a decision
    (a workload's placement block), or a key (``workload_id`` NULL). Append-only, so a
    writer never waits on another for it; gateways read the rows past the last id they
    saw and reload only those workloads (:mod:`gateway.routes`), and prune rows every
    gateway has long seen. Written by the triggers alone, so no code path can forget it."""

    __tablename__ = "route_changes"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workload_id: Mapped[int | None] = mapped_column(Integer)


class Secret(Base):
    """A value workloads of a project refer to by name (``hf_token_secret``), sealed at
    rest; only the boot callback and a replica's environment ever see it."""

    __tablename__ = "secrets"

    project: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(SealedText())
    created_at: Mapped[datetime]


class ControllerMember(Base):
    """A controller sharing the workloads (``autoscaler.reconcile.shards``): alive while
    ``expires_at``, on the database's clock, is ahead; each round moves it on."""

    __tablename__ = "controller_members"

    member_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class ShardLease(Base):
    """Who holds a shard of the workloads until when. ``token`` grows at every change of
    holder (a fencing token: a launch commits only with the token its holder took)."""

    __tablename__ = "shard_leases"

    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(128))
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    acquired_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]


class SpotNotice(Base):
    """A spot interruption warning read from a provider's event queue, kept for the
    controller whose shard holds the instance (``autoscaler.reconcile.notices``): with
    sharding, a queue's message goes to whichever controller reads it first. The owner
    deletes it when its step records it on the replica's row; one no row matches is
    dropped after a while or beyond a count."""

    __tablename__ = "spot_notices"

    instance_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    launch_id: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64))
    instance_type: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    noticed_at: Mapped[datetime]
    """When the provider's reader saw it (the provider's own clock)."""
    received_at: Mapped[datetime]
    """When a controller stored it (its pass's time): what the bounds go by."""
