"""The dispatcher's wait queue: arrival order among waiters the same replicas may serve,
and a request for an adapter no ready replica has yet (a rollout adding it) stalls no
one else of its workload."""

from __future__ import annotations

import asyncio
import random

import pytest

from autoscaler.spec import TaskType
from gateway.dispatch import Dispatcher, DispatchLimits, Lease
from gateway.errors import GatewayError
from gateway.routes import Adapter, Replica, WorkloadRef, WorkloadRoute
from gateway.signals import Metrics, Signals

REF: WorkloadRef = ("p", "w")
SQL = Adapter("sql", "o/sql")


def _dispatcher() -> Dispatcher:
    return Dispatcher(
        limits=DispatchLimits(
            replica_concurrency_cap=64,
            max_queued_per_workload=8,
            queue_timeout_sec=30.0,
            cold_start_timeout_sec=lambda _: 30.0,
            cold_start_retry_after_sec=1.0,
            refused_cooldown_sec=1.0,
        ),
        signals=Signals(window_sec=60.0, metrics=Metrics()),
        on_cold_start=lambda _: None,
        rng=random.Random(0),
    )


def _route(*replicas: Replica, per_worker: int | None = None) -> dict[WorkloadRef, WorkloadRoute]:
    return {
        REF: WorkloadRoute(
            ref=REF,
            workload_id=1,
            model="base",
            task_type=TaskType.TEXT2TEXT,
            replicas=replicas,
            last_request_at=None,
            per_worker=per_worker,
            adapters=(SQL,),
        )
    }


def _replica(key: str, *adapters: str) -> Replica:
    return Replica(
        key=key, url=f"http://{key}", engine_key=None, draining=False, adapters=frozenset(adapters)
    )


async def _queued(dispatcher: Dispatcher, count: int) -> None:
    """Let the tasks just made run up to their wait (a waiter joins the line before its
    first suspension), then check the line's length."""
    await asyncio.sleep(0)
    assert dispatcher.queued(REF) == count


async def test_a_request_for_an_adapter_no_replica_has_stalls_no_one_else() -> None:
    """During a rollout adding ``sql``: its request waits for the first replica booted
    with it, while base-model requests (and async jobs, batch lines) go on at once to
    the idle replica booted without it."""
    dispatcher = _dispatcher()
    dispatcher.update(_route(_replica("old")))
    waiting = asyncio.create_task(dispatcher.acquire(REF, adapter="sql"))
    await _queued(dispatcher, 1)
    base = await asyncio.wait_for(dispatcher.acquire(REF), 5)
    assert base.replica.key == "old"
    assert dispatcher.has_room(REF) and dispatcher.has_room(REF, batch=True)
    assert not waiting.done()
    dispatcher.update(_route(_replica("old"), _replica("new", "sql")))
    lease = await asyncio.wait_for(waiting, 5)
    assert lease.replica.key == "new"
    for done in (base, lease):
        dispatcher.release(done)


async def test_a_waiter_behind_an_unservable_one_is_served_when_room_frees() -> None:
    """The one replica is at its cap: a waiter for the missing adapter, then a base-model
    waiter. When the lease comes back, the base-model waiter gets it."""
    dispatcher = _dispatcher()
    dispatcher.update(_route(_replica("old"), per_worker=1))
    held = await dispatcher.acquire(REF)
    adapter = asyncio.create_task(dispatcher.acquire(REF, adapter="sql"))
    await _queued(dispatcher, 1)
    base = asyncio.create_task(dispatcher.acquire(REF))
    await _queued(dispatcher, 2)
    assert not dispatcher.has_room(REF)
    dispatcher.release(held)
    lease = await asyncio.wait_for(base, 5)
    assert lease.replica.key == "old"
    assert dispatcher.queued(REF) == 1 and not adapter.done()
    adapter.cancel()
    dispatcher.release(lease)


async def test_waiters_the_same_replicas_serve_keep_their_order() -> None:
    """A newcomer never overtakes a waiter that may use the replica it would get: the
    replica freed goes to the first waiter, and the newcomer waits behind."""
    dispatcher = _dispatcher()
    dispatcher.update(_route(_replica("old"), _replica("new", "sql"), per_worker=1))
    leases = [await dispatcher.acquire(REF) for _ in range(2)]
    assert {lease.replica.key for lease in leases} == {"old", "new"}
    # A waiter for sql holds "new"; a base-model waiter behind it holds both.
    first = asyncio.create_task(dispatcher.acquire(REF, adapter="sql"))
    await _queued(dispatcher, 1)
    second = asyncio.create_task(dispatcher.acquire(REF))
    await _queued(dispatcher, 2)
    on_new = next(lease for lease in leases if lease.replica.key == "new")
    dispatcher.release(on_new)
    got: Lease = await asyncio.wait_for(first, 5)
    assert got.replica.key == "new" and not second.done()
    # "old" frees: the base-model waiter has it before any newcomer.
    dispatcher.release(next(lease for lease in leases if lease.replica.key == "old"))
    served = await asyncio.wait_for(second, 5)
    assert served.replica.key == "old"
    newcomer = asyncio.create_task(dispatcher.acquire(REF))
    await _queued(dispatcher, 1)
    dispatcher.release(got)
    assert (await asyncio.wait_for(newcomer, 5)).replica.key == "new"
    assert dispatcher.queued(REF) == 0


async def test_a_newcomer_waits_behind_a_waiter_for_its_replica() -> None:
    """A base-model waiter holds every replica: a newcomer for the adapter whose only
    replica it could use waits behind it, and a retry (``excluded``) is refused."""
    dispatcher = _dispatcher()
    dispatcher.update(_route(_replica("new", "sql"), per_worker=1))
    held = await dispatcher.acquire(REF)
    base = asyncio.create_task(dispatcher.acquire(REF))
    await _queued(dispatcher, 1)
    with pytest.raises(GatewayError) as retry:
        await dispatcher.acquire(REF, adapter="sql", excluded={"elsewhere"})
    assert retry.value.status == 502
    adapter = asyncio.create_task(dispatcher.acquire(REF, adapter="sql"))
    await _queued(dispatcher, 2)
    dispatcher.release(held)
    first = await asyncio.wait_for(base, 5)
    assert not adapter.done()
    dispatcher.release(first)
    dispatcher.release(await asyncio.wait_for(adapter, 5))
