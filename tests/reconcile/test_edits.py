"""Edits of a running workload: what only scales keeps every replica; what changes what
a replica boots rolls, one replica over the desired count at most, within the budget,
old replicas drained only after their replacements are ready."""

from __future__ import annotations

from typing import Any

from autoscaler.store.models import Instance
from autoscaler.store.phase import Phase, phase_of
from tests.reconcile.world import World, autoscaling, fixed

L4_POOL = {"workers": {"source": "cloud", "cloud_pool": {"gpu_pool": ["NVIDIA L4"]}}}


def _open(rows: list[Instance]) -> list[Instance]:
    return [r for r in rows if r.terminated_confirmed_at is None]


def _ready(rows: list[Instance]) -> list[Instance]:
    return [r for r in rows if phase_of(r) is Phase.READY]


async def _settle(world: World, slug: str, *, ready: int, passes: int = 30) -> None:
    for _ in range(passes):
        await world.step(5)
        rows = _open(await world.rows(slug))
        if len(_ready(rows)) == ready and len(rows) == ready:
            return
    raise AssertionError(f"{slug} did not settle at {ready} ready replicas")


async def test_replicas_one_to_two_keeps_the_first_replica(world: World) -> None:
    await world.apply(fixed("bot", 1))
    await _settle(world, "bot", ready=1)
    [first] = await world.rows("bot")

    await world.apply(fixed("bot", 2))
    await _settle(world, "bot", ready=2)

    rows = await world.rows("bot")
    assert first.launch_id in {r.launch_id for r in _ready(rows)}
    assert len(rows) == 2  # nothing replaced, nothing terminated
    assert {r.spec_generation for r in rows} == {2}
    assert not await world.decisions("drain") and not await world.decisions("terminate")


async def test_scale_only_edits_of_an_autoscaling_workload_keep_every_replica(
    world: World,
) -> None:
    await world.apply(autoscaling("bot", min_workers=2, max_workers=4))
    await _settle(world, "bot", ready=2)
    before = {r.launch_id for r in await world.rows("bot")}

    edits: list[dict[str, Any]] = [
        {"max_workers": 6},
        {"upper_allowed_latency_sec": 2.0, "lower_allowed_latency_sec": 0.5},
        {"scale_up_time_window_sec": 45, "scaling_down_timeout_sec": 90},
        {"max_hourly_cost_usd": 12.0},
    ]
    for edit in edits:
        await world.apply(autoscaling("bot", **{"min_workers": 2, "max_workers": 4, **edit}))
        for _ in range(3):
            await world.step(5)
    rows = await world.rows("bot")
    assert {r.launch_id for r in _ready(rows)} == before
    assert not await world.decisions("drain") and not await world.decisions("terminate")


async def _roll_model(world: World, *, ceiling: float) -> list[tuple[int, int, float]]:
    """Three L4 replicas at $0.80/h roll to another model under ``ceiling``; after every
    pass, (live replicas, ready replicas, $/h of live replicas)."""
    policy: dict[str, Any] = {"min_workers": 3, "max_workers": 3, "max_hourly_cost_usd": ceiling}
    await world.apply(autoscaling("bot", **policy, **L4_POOL))
    await _settle(world, "bot", ready=3)
    old = {r.launch_id for r in await world.rows("bot")}

    changed = autoscaling("bot", **policy, **L4_POOL).model_copy(
        update={"model": "Qwen/Qwen2.5-7B-Instruct"}
    )
    await world.apply(changed)
    seen: list[tuple[int, int, float]] = []
    for _ in range(40):
        await world.step(5)
        live = _open(await world.rows("bot"))
        seen.append((len(live), len(_ready(live)), sum(r.hourly_usd for r in live)))
        if {r.spec_generation for r in live} == {2} and len(_ready(live)) == 3 == len(live):
            break
    rows = await world.rows("bot")
    live = _open(rows)
    assert {r.spec_generation for r in live} == {2} and len(_ready(live)) == 3
    assert not old & {r.launch_id for r in live}  # every old replica was replaced
    return seen


async def test_a_model_change_rolls_with_a_surge_of_one_within_the_ceiling(world: World) -> None:
    seen = await _roll_model(world, ceiling=3.3)  # room for four L4s, not five
    assert max(live for live, _, _ in seen) == 4
    assert max(usd for _, _, usd in seen) <= 3.3
    # Old replicas are drained only once their replacements serve: three stay ready.
    assert min(ready for _, ready, _ in seen) >= 3, seen


async def test_a_model_change_with_no_room_for_a_surge_replaces_one_at_a_time(
    world: World,
) -> None:
    seen = await _roll_model(world, ceiling=2.5)  # three L4s fit, a fourth does not
    assert max(live for live, _, _ in seen) == 3
    assert max(usd for _, _, usd in seen) <= 2.5
    assert min(ready for _, ready, _ in seen) >= 2  # one replaced at a time
