"""How long one controller pass takes over a converged fleet, by fleet size and store.

Each row builds a fleet of ``N`` fixed workloads of three replicas each on a fake cloud
(instances run at once, every engine answers, no gateway signals), runs passes until
every replica is ready and one more (a pass steps in full the workloads whose rows the
last one changed: ``autoscaler.reconcile.changes``), then times:

* ``steady_pass_s``: the median of ``--passes`` passes over the unchanged fleet, and
  ``steady_cpu_s`` the CPU time this process spent in them (the controller and, for
  SQLite, the store; steadier than the wall clock on a shared machine);
  ``steady_full_collections``: the cyclic garbage collector's full collections in
  those passes (a steady pass makes no long-lived objects of its own, so none is
  expected);
* ``changed_pass_s``: one pass after ``--changed`` workloads (default ``N // 100``, at
  least 1) were re-applied with a fourth replica (each such workload launches one), and
  ``changed_cpu_s`` the CPU time this process spent in it; ``changed_full_collections``:
  the cyclic garbage collector's full collections in it (one costs 0.13-0.19 s of CPU
  over a 1,000-workload fleet, and whether one falls in this pass is chance: a figure
  with one is not the pass's own cost); with ``--changed-passes K`` (default 1), K - 1
  more such passes follow, each over workloads not changed before (two passes apart, so
  the last launches are settled): ``later_changed_cpu_s``, ``later_changed_pass_s`` and
  ``later_changed_full_collections`` list each (the first changed pass also prepares
  the batch's statements, which later passes find cached);
* the gateway's route refresh over the same store: ``gateway_full_s``, a reload of the
  whole table (what every refresh cost before the change log); ``gateway_steady_s``, the
  median refresh with nothing changed; ``gateway_changed_s``, the refresh that follows
  the changed pass (``gateway.route_feed``).

The table is printed for SQLite (a file in a temporary directory) and, when a server
answers at ``--pg`` (trust auth), PostgreSQL in a database of its own, dropped at the
end. ``--db URL`` measures one store instead, ``--json`` prints one object per row.

    .venv/bin/python -m bench.fleet                      # 10, 100, 1,000 workloads
    .venv/bin/python -m bench.fleet --large              # and 3,000
    .venv/bin/python -m bench.fleet --workloads 1000 --db sqlite+aiosqlite:///x.db --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from autoscaler.reconcile.deps import Deps, NoSignals, ProviderEntry, ProviderRegistry, Settings
from autoscaler.reconcile.loop import reconcile_once
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.workloads import ensure_workload
from gateway.app import Gateway, GatewaySettings
from providers.base import ManualClock, utc
from providers.fake import FakeCloud, FakeProvider
from tests.helpers import pg_available, pg_create_database, pg_drop_database
from tests.reconcile.world import offer

PROJECT = "bench"
REPLICAS = 3
PG = "postgresql://postgres@127.0.0.1:5432"

OFFERS = tuple(
    offer(instance_type, gpu, price, zone=f"us-east-1{zone}")
    for zone in "abc"
    for instance_type, gpu, price in (
        ("g6.xlarge", "NVIDIA L4", 0.80),
        ("g5.xlarge", "NVIDIA A10G", 1.00),
        ("g6e.xlarge", "NVIDIA L40S", 1.86),
    )
)


@dataclass(frozen=True, slots=True)
class Row:
    store: str
    workloads: int
    replicas: int
    steady_pass_s: float
    steady_cpu_s: float
    steady_full_collections: int
    """Full collections of the cyclic garbage collector (its oldest generation) in them."""
    changed: int
    changed_pass_s: float
    changed_cpu_s: float
    changed_full_collections: int
    gateway_full_s: float
    gateway_steady_s: float
    gateway_changed_s: float
    later_changed_pass_s: tuple[float, ...] = ()
    later_changed_cpu_s: tuple[float, ...] = ()
    later_changed_full_collections: tuple[int, ...] = ()


class _AlwaysHealthy:
    async def healthy(self, *, url: str, health_path: str, engine_key: str | None) -> bool:
        return True


def _spec(index: int, replicas: int) -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {
            "name": f"w{index}",
            "slug": f"w{index:05d}",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "execution_policy": "fixed",
            "execution_policy_config": {"replicas": replicas},
        }
    )


async def measure(
    url: str,
    *,
    store: str,
    workloads: int,
    passes: int,
    changed: int,
    fleet_ceiling: float | None,
    changed_passes: int = 1,
) -> Row:
    clock = ManualClock(start=1_750_000_000.0)
    cloud = FakeCloud(clock=clock)
    async with open_store(url) as engine:
        sessions = session_factory(engine)
        deps = Deps(
            sessions=sessions,
            providers=ProviderRegistry({"aws": ProviderEntry(FakeProvider(cloud, name="aws"))}),
            clock=clock,
            signals=NoSignals(),
            health=_AlwaysHealthy(),
            offers=lambda: OFFERS,
            settings=Settings(
                cluster_id="bench-fleet",
                fleet_max_hourly_cost_usd=fleet_ceiling,
                workload_share_sec=3600.0,
                pass_budget_sec=3600.0,
            ),
            notify_change=lambda: None,
        )

        async def apply(indexes: range | list[int], replicas: int) -> None:
            async with sessions() as s, s.begin():
                for i in indexes:
                    await ensure_workload(
                        s,
                        project=PROJECT,
                        spec=_spec(i, replicas),
                        on_drift=OnDrift.RECONCILE,
                        now=utc(clock.now()),
                    )

        async def timed_pass() -> tuple[float, float]:
            clock.advance(deps.settings.tick_sec)
            started, cpu = time.perf_counter(), time.process_time()
            await reconcile_once(deps)
            return time.perf_counter() - started, time.process_time() - cpu

        await apply(range(workloads), REPLICAS)
        for _ in range(3):  # launch, then see every engine answer
            await timed_pass()
        running = [i for i in cloud.all() if not i.state.is_gone]
        if len(running) != workloads * REPLICAS:
            raise RuntimeError(
                f"the fleet did not converge: {len(running)} instances for "
                f"{workloads} x {REPLICAS} replicas"
            )
        await timed_pass()  # the rows the last pass made ready are looked at once more
        full_before = gc.get_stats()[2]["collections"]
        timed = [await timed_pass() for _ in range(passes)]
        full_collections = gc.get_stats()[2]["collections"] - full_before
        gateway = Gateway(sessions=sessions, settings=GatewaySettings(route_resync_sec=1e9))
        full_s = await _timed(gateway.refresh)
        gateway_steady = statistics.median([await _timed(gateway.refresh) for _ in range(passes)])
        await apply(list(range(changed)), REPLICAS + 1)
        full_before = gc.get_stats()[2]["collections"]
        changed_s, changed_cpu = await timed_pass()
        changed_full = gc.get_stats()[2]["collections"] - full_before
        gateway_changed = await _timed(gateway.refresh)
        later: list[tuple[float, float, int]] = []
        for j in range(1, changed_passes):
            for _ in range(2):  # the last changed pass's launches are seen ready
                await timed_pass()
            await apply(list(range(j * changed, (j + 1) * changed)), REPLICAS + 1)
            full_before = gc.get_stats()[2]["collections"]
            wall, cpu = await timed_pass()
            later.append((wall, cpu, gc.get_stats()[2]["collections"] - full_before))
        if gateway.full_reloads != 1:
            raise RuntimeError(f"the gateway reloaded whole {gateway.full_reloads} times, not once")
    steady = statistics.median(t[0] for t in timed)
    steady_cpu = statistics.median(t[1] for t in timed)
    return Row(
        store,
        workloads,
        workloads * REPLICAS,
        steady,
        steady_cpu,
        full_collections,
        changed,
        changed_s,
        changed_cpu,
        changed_full,
        full_s,
        gateway_steady,
        gateway_changed,
        tuple(t[0] for t in later),
        tuple(t[1] for t in later),
        tuple(t[2] for t in later),
    )


async def _timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def _row(
    store: str, url: str | None, pg: str, tmp: Path, args: argparse.Namespace, n: int
) -> Row:
    changed = args.changed if args.changed is not None else max(1, n // 100)
    options = {
        "workloads": n,
        "passes": args.passes,
        "changed": min(changed, n),
        "changed_passes": max(1, min(args.changed_passes, n // max(1, min(changed, n)))),
        "fleet_ceiling": args.fleet_ceiling,
    }
    if url is not None:
        return await measure(url, store=store, **options)
    if store == "sqlite":
        path = tmp / f"fleet-{n}.db"
        return await measure(f"sqlite+aiosqlite:///{path}", store=store, **options)
    name = "autoscaler_bench_fleet_" + secrets.token_hex(4)
    await pg_create_database(pg, name)
    try:
        url = f"{pg.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
        return await measure(url, store=store, **options)
    finally:
        await pg_drop_database(pg, name)


async def main(args: argparse.Namespace) -> None:
    sizes = args.workloads or [10, 100, 1000, *([3000] if args.large else [])]
    if args.db is not None:
        stores: list[tuple[str, str | None]] = [(args.db.split(":", 1)[0].split("+")[0], args.db)]
    else:
        stores = [("sqlite", None)]
        if await pg_available(args.pg):
            stores.append(("postgresql", None))
        elif not args.json:
            print(f"no PostgreSQL answers at {args.pg}: SQLite only")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for store, url in stores:
                row = await _row(store, url, args.pg, Path(tmp), args, n)
                rows.append(row)
                if args.json:
                    print(json.dumps(dataclasses.asdict(row)))
    if args.json:
        return
    print(
        "| workloads | replicas | store | steady pass | its CPU | per workload | changed "
        "| changed pass | routes: whole | routes: steady | routes: changed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.workloads:,} | {r.replicas:,} | {r.store} | {r.steady_pass_s:.3f} s | "
            f"{r.steady_cpu_s:.3f} s | "
            f"{r.steady_pass_s / r.workloads * 1000:.2f} ms | {r.changed} | "
            f"{r.changed_pass_s:.3f} s | {r.gateway_full_s * 1000:.1f} ms | "
            f"{r.gateway_steady_s * 1000:.1f} ms | {r.gateway_changed_s * 1000:.1f} ms |"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--workloads", type=int, action="append", help="a fleet size (repeatable)")
    parser.add_argument("--large", action="store_true", help="add 3,000 workloads")
    parser.add_argument("--db", help="one store's URL instead of SQLite and PostgreSQL")
    parser.add_argument("--pg", default=PG, help=f"PostgreSQL server (default {PG})")
    parser.add_argument("--passes", type=int, default=3, help="steady passes timed (median)")
    parser.add_argument("--changed", type=int, help="workloads changed (default N // 100)")
    parser.add_argument(
        "--changed-passes",
        type=int,
        default=1,
        help="changed passes, each over workloads not changed before (default 1)",
    )
    parser.add_argument(
        "--fleet-ceiling", type=float, help="a fleet-wide ceiling in $/h (default none)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(_parser().parse_args()))
