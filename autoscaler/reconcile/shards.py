"""Several controllers share the fleet: workloads in shards, shards under leases.

With ``sharding.enabled`` in the controller's configuration (PostgreSQL only), every
controller process reconciles the workloads of the shards it holds a lease on, so the
fleet a pass covers, and the capacity to reconcile, grows with the processes.

* **Shards.** :data:`NUM_SHARDS` (64), fixed: a workload's shard is a stable hash of
  its (project, slug) (:func:`shard_of`), the same in every process and every release,
  so a slug deleted and applied again lands where its predecessor's replicas are.
* **Members.** Each controller heartbeats a row in ``controller_members`` (its id, and
  an expiry ``lease_ttl_sec`` ahead on the database's clock); a row past its expiry is
  a dead controller and is deleted by the next round of any other.
* **Who should hold what.** :func:`assign`: rendezvous hashing with bounded loads over
  the live members. Each shard goes to the member that ranks highest for it among those
  still below ``ceil(64 / members)`` shards, so every controller holds 16 of 64 with
  four, 21 or 22 with three. Adding or removing a controller moves its own share plus,
  for the balance, a few more (on average about 2 of 64 in random trials, at most 6).
  Every member computes the same answer from the same table.
* **Leases.** ``shard_leases`` has one row per shard: its holder, a fencing token
  (incremented at every change of holder) and an expiry on the database's clock. A
  round (:meth:`ShardMember.renew_once`, every ``renew_sec``) heartbeats, releases the
  shards now assigned elsewhere, renews the ones it keeps and takes those assigned to
  it that are free or expired, in one transaction. A controller that stops (SIGTERM)
  releases its leases, which the others take in their next round (within a round's
  bound: a database that hangs leaves them to expire); one that dies leaves them to
  expire.
* **How fast a dead controller's shards move.** Its last renewal happened before it
  died (at the latest just before), so its leases expire at most ``lease_ttl_sec``
  after its death, and the next round of each shard's new owner comes at most
  ``renew_sec`` later: :func:`move_bound_sec`, 10 + 3 = 13 s with the
  defaults, which leaves 2 s of the 15 s bar for the round itself and the new owner's
  first pass (woken at once when it takes a shard). In practice sooner: a round reads
  when the next member or wanted lease of another expires and comes just after it when
  that is before ``renew_sec`` (a live member's expiry is always further off), so the
  shards are taken about ``lease_ttl_sec`` after the death (measured with the defaults:
  9.3-10.2 s, the workloads reconciled by their new owners 11.6-12.4 s after, four
  controllers and forty workloads on a loaded two-core machine).

**Fencing: a controller stops acting on a shard before another can take it.**

1. *Locally*, every lease has a deadline on this process's monotonic clock: the start
   of the round that last renewed it plus ``lease_ttl_sec``. The database set its
   expiry later than that round's start, so the local deadline passes first: a
   controller whose renewals fail (a lost connection, a stalled process) stops starting
   workload steps on the shard (:meth:`ShardMember.owns`) while its lease is still
   valid in the database, where nobody else may take it.
2. *In the database*, a launch's intent row commits only in a transaction that first
   holds the shard's lease row (``SELECT … FOR KEY SHARE``) with this member as holder,
   its token unchanged and its expiry ahead (:meth:`ShardMember.fence`). No round
   can take the row while it is held (a taker's ``FOR UPDATE SKIP LOCKED`` skips it and
   tries again at its next round), so the new holder takes it only after the intent
   committed, and its first read sees the intent; a launch after the lease moved raises
   :class:`LeaseLost` and buys nothing. The provider is called only after that
   commit, with the launch id as its idempotency token, so a launch call still in
   flight at the old holder and the new holder's resolution of the same intent buy
   one machine. The token checked is the one the step began under
   (:meth:`ShardMember.step_scope`), not merely the current one: a step that outlived
   its lease while another controller held the shard (and perhaps launched), then ran
   on after this controller took the shard back under a new token, launches nothing
   from the rows it read before.

Other writes a step makes (a drain, a terminate request, a confirmed termination) are
idempotent and confirmed by the provider: the local deadline stops them, and one that
races a takeover repeats what the new holder does anyway.

**Renewals never wait for launches.** A launch holds its lease row from its fence to
its commit, which includes its wait for the fleet reservation (below), behind every
other controller's launch. The lock is ``FOR KEY SHARE``, which the round's updates of
the row (expiry, holder, token: no key changes) do not wait for, so a round renews
(or releases) the row while a launch holds it; and the rounds run on a connection of
their own outside the store's pool, bounded by half the lease
(:attr:`LeaseSettings.round_timeout_sec`, on the client and as the server's
``statement_timeout``). Locks are always taken in one order, the lease row then the
reservation; a round takes no reservation and no taker waits for a held row, so the
two cannot deadlock. The wait for the reservation may outlast the lease (a controller
whose rounds fail): :func:`~autoscaler.reconcile.provisioner.admit` fences again once
it holds the reservation (the row is still its own: that waits for nothing), so a
launch whose lease lapsed meanwhile raises :class:`LeaseLost` and writes nothing.

**Fleet-wide duties** (the orphan sweep, the scheduled catalog sync) go with shard 0:
its holder does them, as the leader did before. The fleet ceiling is kept exact across
controllers by a reservation in the database (``ledger.reserve_fleet``): every launch
takes one transaction-scoped lock, sums the open rows and inserts its intent in the
same transaction.

SQLite, and PostgreSQL without ``sharding.enabled``: one controller reconciles every
workload (on PostgreSQL the leader of an advisory lock), as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, event, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

from autoscaler.metrics import ControllerMetrics
from autoscaler.reconcile.deps import LeaseLost, log

NUM_SHARDS = 64
"""Shards the workloads are spread over. Fixed: every controller sharing a store must
agree on it, and a workload's shard must not move between releases."""

FLEET_DUTIES_SHARD = 0
"""The holder of this shard runs the fleet-wide duties (orphan sweep, catalog sync)."""

_AFTER_EXPIRY_SEC = 0.05
"""A round due at an expiry comes this long after it."""

DEFAULT_LEASE_TTL_SEC = 10.0
DEFAULT_RENEW_SEC = 3.0


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """How long a lease lasts without renewal, and how often a controller renews."""

    ttl_sec: float = DEFAULT_LEASE_TTL_SEC
    renew_sec: float = DEFAULT_RENEW_SEC

    @property
    def round_timeout_sec(self) -> float:
        """The longest a round may take (half the lease): a round cut there, on the
        client and by the server's ``statement_timeout``, is a failed round."""
        return self.ttl_sec / 2


def move_bound_sec(settings: LeaseSettings) -> float:
    """The longest a dead controller's shards stay unheld: its leases expire at most
    ``ttl_sec`` after its last renewal (at the latest, its death), and each new owner's
    next round comes at most ``renew_sec`` after that. The round's own statements and
    the new owner's first pass come on top."""
    return settings.ttl_sec + settings.renew_sec


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def shard_of(project: str, slug: str) -> int:
    """The shard of a workload: stable across processes and releases."""
    return _hash64(f"{project}\x00{slug}") % NUM_SHARDS


def assign(members: Sequence[str]) -> dict[int, str]:
    """Which member should hold each shard: rendezvous hashing with bounded loads.

    Shards are taken in order; each goes to the member ranking highest for it among
    those holding fewer than ``ceil(NUM_SHARDS / len(members))``. O(shards x members
    log members). Empty without members."""
    if not members:
        return {}
    cap = math.ceil(NUM_SHARDS / len(members))
    load = dict.fromkeys(members, 0)
    owners: dict[int, str] = {}
    for shard in range(NUM_SHARDS):
        ranked = sorted(members, key=lambda m: (_hash64(f"{m}\x00{shard}"), m), reverse=True)
        owner = next(m for m in ranked if load[m] < cap)
        owners[shard] = owner
        load[owner] += 1
    return owners


def new_member_id() -> str:
    """This process's member id: host, pid and a random tail (a restart is a new member)."""
    return f"{socket.gethostname()[:80]}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(slots=True)
class _Lease:
    token: int
    valid_until: float
    """On this process's monotonic clock: before the database's expiry."""


_HEARTBEAT = text(
    "INSERT INTO controller_members (member_id, started_at, heartbeat_at, expires_at) "
    "VALUES (:me, clock_timestamp(), clock_timestamp(), "
    "clock_timestamp() + make_interval(secs => :ttl)) "
    "ON CONFLICT (member_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, "
    "expires_at = EXCLUDED.expires_at"
)
# Rows another round has locked are skipped, not waited for: a member renewing its own
# row is alive, and two rounds never wait on each other (no deadlock).
_FORGET_DEAD = text(
    "DELETE FROM controller_members WHERE member_id IN (SELECT member_id "
    "FROM controller_members WHERE expires_at <= clock_timestamp() FOR UPDATE SKIP LOCKED)"
)
_LIVE = text("SELECT member_id FROM controller_members ORDER BY member_id")
_SEED = text(
    "INSERT INTO shard_leases (shard, token) SELECT g, 0 FROM generate_series(0, :last) g "
    "ON CONFLICT (shard) DO NOTHING"
)
_RELEASE = text(
    "UPDATE shard_leases SET holder = NULL, expires_at = clock_timestamp() "
    "WHERE holder = :me AND NOT (shard = ANY(:keep))"
)
_RENEW = text(
    "UPDATE shard_leases SET expires_at = clock_timestamp() + make_interval(secs => :ttl) "
    "WHERE holder = :me AND shard = ANY(:keep) AND expires_at > clock_timestamp() "
    "RETURNING shard, token"
)
_TAKE = text(
    "UPDATE shard_leases SET holder = :me, token = token + 1, acquired_at = clock_timestamp(), "
    "expires_at = clock_timestamp() + make_interval(secs => :ttl) "
    "WHERE shard IN (SELECT shard FROM shard_leases WHERE shard = ANY(:take) "
    "AND (holder IS NULL OR expires_at <= clock_timestamp()) ORDER BY shard "
    "FOR UPDATE SKIP LOCKED) RETURNING shard, token"
)
_NEXT_EXPIRY = text(
    "SELECT extract(epoch FROM min(expires_at) - clock_timestamp()) FROM ("
    "SELECT expires_at FROM controller_members WHERE member_id <> :me UNION ALL "
    "SELECT expires_at FROM shard_leases WHERE shard = ANY(:want) AND holder <> :me) AS e"
)
"""Seconds until the next member or wanted lease of another expires, if any."""
_LEAVE = text("DELETE FROM controller_members WHERE member_id = :me")
_STEP_LEASE: contextvars.ContextVar[tuple[str, int, int] | None] = contextvars.ContextVar(
    "step_lease", default=None
)
"""(member, shard, token) of the lease the running workload step began under."""

_FENCE = text(
    "SELECT 1 FROM shard_leases WHERE shard = :shard AND holder = :me AND token = :token "
    "AND expires_at > clock_timestamp() FOR KEY SHARE"
)
"""``FOR KEY SHARE``: a round's updates of the row (expiry, holder, token; no key
changes) never wait for it, while a taker's ``FOR UPDATE SKIP LOCKED`` skips the row."""


async def _leases(
    conn: AsyncConnection, statement: TextClause, params: dict[str, object]
) -> dict[int, int]:
    """Shard -> token of the rows ``statement`` returned."""
    return {
        int(shard): int(token) for shard, token in (await conn.execute(statement, params)).all()
    }


class ShardMember:
    """One controller's membership and shard leases (see the module docstring).

    The rounds run on a connection of their own, opened outside the store's pool, so a
    pass holding the pool's connections (launches waiting for the fleet reservation
    among them) never delays a renewal, and a round waits for no launch's locks."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        settings: LeaseSettings,
        metrics: ControllerMetrics,
        member_id: str | None = None,
        on_gain: Callable[[], None] = lambda: None,
    ) -> None:
        self.member_id = member_id or new_member_id()
        self.settings = settings
        # Rounds connect without the pool: a reconnect never waits for its connections.
        self._engine = create_async_engine(engine.url, poolclass=NullPool)
        # The server cuts a round that takes too long, on every connection the engine
        # opens: the first, and one it opens again by itself after a cancelled round.
        timeout_ms = max(int(settings.round_timeout_sec * 1000), 1)

        def limit_statements(dbapi_connection: Any, _record: object) -> None:
            # Outside a transaction, so that no rollback undoes it (SQLAlchemy's recipe).
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SET SESSION statement_timeout = {timeout_ms}")
            finally:
                cursor.close()
                dbapi_connection.autocommit = autocommit

        event.listen(self._engine.sync_engine, "connect", limit_statements)
        self._metrics = metrics
        self._on_gain = on_gain
        self._conn: AsyncConnection | None = None
        self._seeded = False
        self._held: dict[int, _Lease] = {}
        self.next_round_sec = settings.renew_sec
        """When the next round is due: ``renew_sec``, or just after the expiry of a
        member or of a lease this member wants, when that comes first."""

    # --- what the pass asks -------------------------------------------------------

    def _valid(self, shard: int) -> _Lease | None:
        lease = self._held.get(shard)
        if lease is None or time.monotonic() >= lease.valid_until:
            return None
        return lease

    def owns(self, project: str, slug: str) -> bool:
        """Whether this controller may act on the workload now. O(1)."""
        return self._valid(shard_of(project, slug)) is not None

    @property
    def fleet_duties(self) -> bool:
        """Whether this controller holds shard 0 (the orphan sweep, the catalog sync)."""
        return self._valid(FLEET_DUTIES_SHARD) is not None

    def shards(self) -> list[int]:
        """The shards this controller may act on now."""
        return sorted(s for s in self._held if self._valid(s) is not None)

    @contextlib.contextmanager
    def step_scope(self, project: str, slug: str) -> Iterator[None]:
        """A workload's step runs under the lease held when it began: a launch it makes
        (:meth:`fence`) is refused when the shard's token changed since, even if this
        controller holds the shard again, because the rows the step read predate what
        another holder may have written meanwhile."""
        shard = shard_of(project, slug)
        lease = self._valid(shard)
        pinned = _STEP_LEASE.set((self.member_id, shard, -1 if lease is None else lease.token))
        try:
            yield
        finally:
            _STEP_LEASE.reset(pinned)

    async def fence(self, session: AsyncSession, *, project: str, slug: str) -> None:
        """Hold the workload's lease row in ``session``'s transaction until it commits;
        :class:`LeaseLost` when this controller no longer holds it, or no longer under
        the lease the running step began under (:meth:`step_scope`)."""
        shard = shard_of(project, slug)
        lease = self._valid(shard)
        pinned = _STEP_LEASE.get()
        if (
            lease is not None
            and pinned is not None
            and pinned[:2] == (self.member_id, shard)
            and pinned[2] != lease.token
        ):
            raise LeaseLost(
                f"shard {shard} of {project}/{slug} changed holder since this step began"
            )
        if lease is not None:
            held = await session.scalar(
                _FENCE, {"shard": shard, "me": self.member_id, "token": lease.token}
            )
            if held is not None:
                return
            self._held.pop(shard, None)
        raise LeaseLost(f"shard {shard} of {project}/{slug} is no longer held by {self.member_id}")

    # --- rounds -------------------------------------------------------------------

    async def renew_once(self) -> None:
        """One round: heartbeat, release, renew, take (one transaction)."""
        started = time.monotonic()
        ttl = self.settings.ttl_sec
        conn = await self._connection()
        me = self.member_id
        async with conn.begin():
            if not self._seeded:
                await conn.execute(_SEED, {"last": NUM_SHARDS - 1})
            await conn.execute(_HEARTBEAT, {"me": me, "ttl": ttl})
            await conn.execute(_FORGET_DEAD)
            members = list((await conn.execute(_LIVE)).scalars())
            wanted = sorted(s for s, owner in assign(members).items() if owner == me)
            for shard in set(self._held) - set(wanted):  # stop acting before releasing
                del self._held[shard]
            await conn.execute(_RELEASE, {"me": me, "keep": wanted})
            renewed = await _leases(conn, _RENEW, {"me": me, "keep": wanted, "ttl": ttl})
            free = [s for s in wanted if s not in renewed]
            taken = await _leases(conn, _TAKE, {"me": me, "take": free, "ttl": ttl}) if free else {}
            expiry = await conn.scalar(_NEXT_EXPIRY, {"me": me, "want": wanted})
        self._seeded = True
        valid_until = started + ttl
        self._held = {s: _Lease(token, valid_until) for s, token in {**renewed, **taken}.items()}
        # A member that stopped renewing expires within the interval: the next round
        # comes just after, instead of up to renew_sec later.
        self.next_round_sec = self.settings.renew_sec
        if expiry is not None:
            self.next_round_sec = min(
                self.next_round_sec, max(float(expiry), 0.0) + _AFTER_EXPIRY_SEC
            )
        self._metrics.shards_owned.set(len(self._held))
        if taken:
            log.info("took the leases of shards %s", ", ".join(map(str, sorted(taken))))
            self._on_gain()

    async def run(self, stopping: asyncio.Event) -> None:
        """Rounds every ``renew_sec`` until ``stopping`` is set. A failed round is
        logged and its connection dropped; leases lapse locally at their deadline."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(self.renew_once(), timeout=self.settings.round_timeout_sec)
            except Exception as exc:
                log.warning("shard lease round failed: %s: %s", type(exc).__name__, exc)
                await self._drop_connection()
            self._metrics.shards_owned.set(len(self.shards()))
            wait, self.next_round_sec = self.next_round_sec, self.settings.renew_sec
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=wait)

    async def leave(self) -> None:
        """Release every lease and the membership (an orderly stop): the others take the
        shards in their next round instead of after the TTL. Bounded as a round is
        (:attr:`LeaseSettings.round_timeout_sec`); the connection is closed however it
        ends (failed, cut, cancelled)."""
        self._held.clear()
        self._metrics.shards_owned.set(0)
        try:
            await asyncio.wait_for(self._release_all(), timeout=self.settings.round_timeout_sec)
        except Exception as exc:
            log.warning(
                "releasing the shard leases failed (they expire instead): %s: %s",
                type(exc).__name__,
                exc,
            )
        finally:
            await self.close()

    async def _release_all(self) -> None:
        conn = await self._connection()
        async with conn.begin():
            await conn.execute(_RELEASE, {"me": self.member_id, "keep": []})
            await conn.execute(_LEAVE, {"me": self.member_id})

    async def close(self) -> None:
        """Drop the connection without releasing anything (leases expire)."""
        self._held.clear()
        try:
            await self._drop_connection()
        finally:
            await self._engine.dispose()

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self._engine.connect()
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.invalidate()
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
