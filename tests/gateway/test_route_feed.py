"""The gateway applies route changes from the store's change log: a refresh reads only
the workloads that changed, and still sees every change, including ones whose ids commit
out of order (``gateway.route_feed``)."""

from __future__ import annotations

import random

import httpx
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import update

from autoscaler.store.models import Token
from gateway.route_feed import Changes, RouteFeed
from tests.gateway.conftest import (
    MODEL,
    PROJECT,
    Seed,
    StartEngine,
    StartGateway,
    base_url,
    eventually,
    now,
)

HOUR = 3600.0


async def _chat(url: str, key: str) -> int:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        return response.status_code


async def test_a_refresh_reloads_only_what_changed_and_misses_nothing(
    seed: Seed, start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    key_a = await seed.workload("bot-a")
    await seed.workload("bot-b")
    first_a = await seed.replica("bot-a", engine.url)
    await seed.replica("bot-b", engine.url)
    gateway = await start_gateway(refresh_interval_sec=0.05, route_resync_sec=HOUR)
    table = gateway.route_table
    untouched = table.workloads[(PROJECT, "bot-b")]
    assert gateway.full_reloads == 1

    second_a = await seed.replica("bot-a", engine.url)  # a new replica becomes routable
    await eventually(lambda: len(gateway.route_table.workloads[(PROJECT, "bot-a")].ready) == 2)
    await seed.mark(first_a, terminate_requested_at=now())  # one stops being routable
    await eventually(
        lambda: (
            [r.key for r in gateway.route_table.workloads[(PROJECT, "bot-a")].ready] == [second_a]
        )
    )
    assert await _chat(base_url(gateway, "bot-a"), key_a) == 200

    # A revoked key stops working once the log names the keys.
    async with seed.sessions() as s, s.begin():
        await s.execute(update(Token).values(revoked_at=now()))

    async def refused() -> bool:
        return await _chat(base_url(gateway, "bot-a"), key_a) == 401

    await eventually(refused)
    # Nothing of bot-b was read again, and none of it was a whole reload.
    assert gateway.route_table.workloads[(PROJECT, "bot-b")] is untouched
    assert gateway.full_reloads == 1


@given(
    commits=st.lists(st.booleans(), min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_committed_change_is_reported_whatever_order_ids_commit_in(
    commits: list[bool], seed: int
) -> None:
    """Ids 1..n are taken in order and commit in a random order (``False``: rolled back);
    a refresh between any two commits sees what has committed. Every committed change is
    reported by the refresh that follows its commit, rolled-back ids never are."""
    rng = random.Random(seed)
    order = list(range(1, len(commits) + 1))
    rng.shuffle(order)
    feed = RouteFeed(hole_wait_sec=1e9)
    feed.seen, feed.full_at = 0, 0.0
    visible: set[int] = set()
    reported: set[int] = set()
    for step, change_id in enumerate(order):
        if commits[change_id - 1]:
            visible.add(change_id)
        assert feed.seen is not None
        rows = [(i, i) for i in sorted(visible) if i > feed.seen or i in feed.holes]
        changes = feed._absorb(rows, now=float(step))
        assert isinstance(changes, Changes)
        reported |= changes.workload_ids
        assert visible <= reported
    committed = {i for i, ok in enumerate(commits, start=1) if ok}
    assert reported == committed
