"""Four ``autoscaler controller`` processes share one PostgreSQL store with sharding on,
and eight fixed one-replica workloads on the local provider (engine-sim processes on
this machine, recorded in one state dir all four read). Once each holds its 16 shards
and every replica is ready, one controller is SIGKILLed: the others take its shards
after its leases expire, step its workloads, and adopt its replicas (nothing launched
again, nothing leaked, one ready replica per workload).

The time from the kill to the first survivor pass that steps each of the killed
controller's workloads is printed; with the default leases (10 s, renewed every 3 s) the
bar is 15 s. The test waits on the store and the controllers' ``/metrics``, each wait
bounded; it asserts no wall-clock time.

Required under ``CI=true``; elsewhere skipped with a message when PostgreSQL does not
answer."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from autoscaler.config import ShardingSettings
from autoscaler.reconcile.shards import NUM_SHARDS, move_bound_sec, shard_of
from autoscaler.spec import OnDrift
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Decision, ShardLease, Workload
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.workloads import ensure_workload
from providers.local import LocalProvider
from tests.helpers import Process, autoscaler_cli, free_port, kill_surviving_engines
from tests.reconcile.world import fixed

CLUSTER = "shardkill"
PROJECT = "acme"
SLUGS = [f"bot-{i}" for i in range(8)]
SHARDING = ShardingSettings(enabled=True)
"""The defaults (10 s leases renewed every 3 s): the handover measured is the product's."""
WAIT_SEC = 60.0
"""Bound on each wait (four controllers starting, eight engines becoming ready, a pass)
on a loaded machine; a wait ends as soon as its condition holds. The five waits (the
handover's a lease longer) stay within the test's timeout, so a late one says what was late."""

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(6 * WAIT_SEC)]


@dataclass
class Controller:
    process: Process
    metrics_url: str

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def holds(self, lease: ShardLease) -> bool:
        """Whether ``lease`` is this process's (a member id is host-pid-random)."""
        return lease.holder is not None and f"-{self.pid}-" in lease.holder

    async def metric(self, http: httpx.AsyncClient, name: str) -> float | None:
        try:
            text = (await http.get(self.metrics_url, timeout=5)).text
        except httpx.TransportError:
            return None  # not serving yet
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return None if found is None else float(found.group(1))


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[AsyncEngine]:
    async with open_store(pg_url) as engine:  # migrates before the controllers start
        yield engine


async def _until(
    check: Callable[[], Awaitable[bool]], *, what: str, within: float = WAIT_SEC
) -> None:
    try:
        async with asyncio.timeout(within):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {within:g}s: {what}") from None


async def _leases(engine: AsyncEngine) -> dict[int, ShardLease]:
    async with session_factory(engine)() as s:
        return {lease.shard: lease for lease in await s.scalars(select(ShardLease))}


async def _open_rows(engine: AsyncEngine) -> list[LedgerRow]:
    async with session_factory(engine)() as s:
        query = select(LedgerRow).where(LedgerRow.terminated_confirmed_at.is_(None))
        return list(await s.scalars(query))


async def _first_steps(
    engine: AsyncEngine, *, after: datetime | None = None
) -> dict[str, datetime]:
    """Per workload, when its first decision (after ``after``) was made. A controller
    records one at the first step it runs of a workload (it has no last desired count
    yet)."""
    query = select(Workload.slug, Decision.at).join(Workload, Workload.id == Decision.workload_id)
    if after is not None:
        query = query.where(Decision.at > after)
    async with session_factory(engine)() as s:
        rows = await s.execute(query.order_by(Decision.at))
        first: dict[str, datetime] = {}
        for slug, when in rows.all():
            first.setdefault(slug, when)
        return first


def _start(tmp_path: Path, n: int, *, pg_url: str, config: Path) -> Controller:
    data_dir, port = tmp_path / f"ctl-{n}", free_port()
    argv = autoscaler_cli(
        "controller", "--db", pg_url, "--config", str(config), "--data-dir", str(data_dir),
        "--metrics-port", str(port), "--log-level", "warning",
    )  # fmt: skip
    # Its own data dir: stopping one proves no engine recorded there outlived it, and the
    # engines all four share are in the config's state dir, ended by the test.
    process = Process(argv, env={"AUTOSCALER_DATA_DIR": str(data_dir)})
    return Controller(process, f"http://127.0.0.1:{port}/metrics")


async def test_a_sigkilled_controllers_workloads_move_to_the_others_with_nothing_bought_twice(
    store: AsyncEngine, pg_url: str, tmp_path: Path
) -> None:
    engines_dir = tmp_path / "engines"
    config = tmp_path / "controller.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cluster_id": CLUSTER,
                "tick_sec": 1,
                "providers": {
                    "local": {"engine": "sim", "time_scale": 100, "state_dir": str(engines_dir)}
                },
                "sharding": SHARDING.model_dump(),
            }
        )
    )
    fleet = [_start(tmp_path, n, pg_url=pg_url, config=config) for n in range(4)]
    with ExitStack() as stack:
        stack.callback(kill_surviving_engines, tmp_path, under=("engines",))
        for controller in fleet:
            stack.enter_context(controller.process)
        async with httpx.AsyncClient() as http:
            await _scenario(store, fleet, http, engines_dir=engines_dir)


async def _scenario(
    store: AsyncEngine, fleet: list[Controller], http: httpx.AsyncClient, *, engines_dir: Path
) -> None:
    async def balanced() -> bool:
        leases = (await _leases(store)).values()
        owned = [await c.metric(http, "autoscaler_controller_shards_owned") for c in fleet]
        held = [sum(c.holds(lease) for lease in leases) for c in fleet]
        return owned == held == [NUM_SHARDS // 4] * 4

    await _until(balanced, what="the four controllers hold 16 shards each")
    before = await _leases(store)
    async with session_factory(store)() as s, s.begin():
        for slug in SLUGS:
            spec = fixed(slug)
            await ensure_workload(
                s, project=PROJECT, spec=spec, on_drift=OnDrift.RECONCILE, now=datetime.now(UTC)
            )

    async def converged() -> bool:
        rows = await _open_rows(store)
        ready = sorted(r.workload_slug for r in rows if r.ready_at and r.instance_id)
        stepped = await _first_steps(store)
        return ready == sorted(SLUGS) == sorted(stepped) and len(rows) == len(SLUGS)

    await _until(converged, what="one ready replica per workload")
    leases = await _leases(store)
    # A controller whose shards never changed holder since the workloads were made is
    # the only one to have stepped their workloads: after its death, the first step of
    # each by a survivor records a decision, which is how the handover is seen.
    moved = {s for s, lease in leases.items() if lease.token != before[s].token}

    def workloads_of(controller: Controller) -> list[str]:
        return [slug for slug in SLUGS if controller.holds(leases[shard_of(PROJECT, slug)])]

    candidates = [
        c for c in fleet if not any(c.holds(leases[s]) for s in moved) and workloads_of(c)
    ]
    assert candidates, f"every controller holding workloads had shards move: {moved}"
    victim = max(candidates, key=lambda c: len(workloads_of(c)))
    survivors = [c for c in fleet if c is not victim]
    its_workloads = workloads_of(victim)
    its_shards = {s: lease for s, lease in leases.items() if victim.holds(lease)}
    rows_before = {r.workload_slug: r for r in await _open_rows(store)}

    assert victim.process.proc is not None
    os.kill(victim.pid, signal.SIGKILL)  # no lease released, no engine stopped
    victim.process.proc.wait()
    killed_at = datetime.now(UTC)

    async def stepped_elsewhere() -> bool:
        return set(its_workloads) <= set(await _first_steps(store, after=killed_at))

    lease_settings = SHARDING.leases()
    assert lease_settings is not None
    bound = move_bound_sec(lease_settings) + WAIT_SEC
    await _until(stepped_elsewhere, what="the killed controller's workloads stepped", within=bound)
    first = await _first_steps(store, after=killed_at)
    handover = max((first[slug] - killed_at).total_seconds() for slug in its_workloads)
    print(
        f"killed a controller holding {len(its_shards)} shards and {len(its_workloads)} "
        f"workloads; the last of them was first stepped by a survivor {handover:.2f}s after it "
        f"(leases of {SHARDING.lease_ttl_sec:g}s renewed every {SHARDING.renew_sec:g}s)"
    )

    async def all_taken() -> bool:  # its shards without workloads too, at their owners' rounds
        after = await _leases(store)
        return all(any(c.holds(after[s]) for c in survivors) for s in its_shards)

    await _until(all_taken, what="every shard of the killed controller taken by a survivor")
    after = await _leases(store)
    for shard, lease in its_shards.items():
        taken = after[shard]
        assert taken.acquired_at is not None and lease.expires_at is not None
        assert taken.acquired_at >= lease.expires_at  # not before the dead one's lease ended

    # Once every survivor ended a pass after the handover's steps began (the orphan sweep
    # of shard 0's holder included), the fleet is as it was before the kill.
    handed_over = max(first[slug] for slug in its_workloads).timestamp()

    async def passed_again() -> bool:
        done = [await c.metric(http, "autoscaler_controller_last_reconcile_timestamp_seconds")
                for c in survivors]  # fmt: skip
        return all(t is not None and t > handed_over for t in done)

    await _until(passed_again, what="a pass of every survivor after the handover")
    rows = await _open_rows(store)
    assert sorted(r.workload_slug for r in rows) == sorted(SLUGS)  # one replica each
    assert all(r.ready_at is not None for r in rows)
    assert {r.workload_slug: r.launch_id for r in rows} == {
        slug: row.launch_id for slug, row in rows_before.items()
    }  # adopted, not launched again
    async with session_factory(store)() as s:
        ever = list(await s.scalars(select(LedgerRow.launch_id)))
    assert len(ever) == len(SLUGS)  # no launch beyond one per replica slot, ever
    machines = await LocalProvider(state_dir=engines_dir).list(CLUSTER)
    running = {m.launch_id for m in machines if not m.state.is_gone}
    assert running == {r.launch_id for r in rows}  # every engine on record, none leaked
