"""The worker pool's role in ``autoscaler run``: a stop ends it (the pool's ``run`` ends
only when a worker cannot stay up), and a pool that gives up stops the service."""

from __future__ import annotations

import asyncio

import pytest

from autoscaler.service import until_stopping
from gateway.workers import WorkerPoolFailed


async def test_a_stop_ends_the_pool_role_that_runs_until_a_failure() -> None:
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stopping = asyncio.Event()
    role = asyncio.ensure_future(until_stopping(asyncio.shield(failed), stopping))
    await asyncio.sleep(0)
    assert not role.done()
    stopping.set()
    async with asyncio.timeout(30):  # a hang guard: the role ends on the stop itself
        await role
    assert role.exception() is None


async def test_a_pool_that_gives_up_ends_its_role_with_the_failure() -> None:
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    role = asyncio.ensure_future(until_stopping(asyncio.shield(failed), asyncio.Event()))
    failed.set_exception(WorkerPoolFailed("gateway worker 0 died 6 times within 60s"))
    with pytest.raises(WorkerPoolFailed, match="died 6 times"):
        async with asyncio.timeout(30):
            await role
