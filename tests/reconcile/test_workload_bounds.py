"""Each workload's own bounds are exported, so alert rules compare against them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tests.reconcile.world import World, autoscaling, fixed


def _value(registry: CollectorRegistry, name: str, workload: str) -> float | None:
    return registry.get_sample_value(name, {"project": "acme", "workload": workload})


async def test_targets_and_bounds_are_exported_per_workload(world: World) -> None:
    await world.apply(autoscaling("chat", upper_allowed_latency_sec=0.8, max_workers=3))
    await world.apply(autoscaling("docs", upper_allowed_latency_sec=4.0, max_workers=6))
    await world.apply(fixed("batch", replicas=2))

    await world.step()

    registry = world.deps.metrics.registry
    target = "autoscaler_controller_workload_ttft_target_seconds"
    assert _value(registry, target, "chat") == 0.8
    assert _value(registry, target, "docs") == 4.0
    assert _value(registry, target, "batch") is None  # a fixed workload has no TTFT target
    assert _value(registry, "autoscaler_controller_workload_ttft_lower_seconds", "chat") == 0.2
    maximum = "autoscaler_controller_workload_max_replicas"
    assert [_value(registry, maximum, w) for w in ("chat", "docs", "batch")] == [3, 6, 2]


async def test_a_changed_target_is_exported_and_a_deleted_workload_leaves(world: World) -> None:
    await world.apply(autoscaling("chat", upper_allowed_latency_sec=0.8))
    await world.step()
    await world.apply(autoscaling("chat", upper_allowed_latency_sec=1.5))
    await world.step(5)
    registry = world.deps.metrics.registry
    target = "autoscaler_controller_workload_ttft_target_seconds"
    assert _value(registry, target, "chat") == 1.5

    await world.delete("chat")
    for _ in range(6):
        await world.step(30)

    assert _value(registry, target, "chat") is None


def _labels_series(registry: CollectorRegistry) -> dict[str, dict[str, str]]:
    [family] = [f for f in registry.collect() if f.name == "autoscaler_controller_workload_labels"]
    return {s.labels["workload"]: dict(s.labels) for s in family.samples}


async def test_labels_are_exported_and_a_label_edit_keeps_the_replica(world: World) -> None:
    await world.apply(fixed("chat", labels={"team": "search", "app.example.com/tier": "prod"}))
    await world.apply(fixed("batch"))
    await world.step()
    [before] = await world.rows("chat")

    series = _labels_series(world.deps.metrics.registry)
    assert series["chat"] == {
        "project": "acme",
        "workload": "chat",
        "label_team": "search",
        "label_app_example_com_tier": "prod",
    }
    assert series["batch"] == {"project": "acme", "workload": "batch"}

    await world.apply(fixed("chat", labels={"team": "ads"}))
    await world.step(5)
    assert [r.launch_id for r in await world.rows("chat")] == [before.launch_id]
    assert _labels_series(world.deps.metrics.registry)["chat"]["label_team"] == "ads"

    await world.delete("chat")
    for _ in range(6):
        await world.step(30)
    assert "chat" not in _labels_series(world.deps.metrics.registry)


async def test_a_workload_made_again_after_its_delete_exports_its_gauges_again(
    world: World,
) -> None:
    """The gauges' children are kept per workload: a series dropped (a delete, a policy
    changed away from autoscaling) must come back when the workload sets it again."""
    registry = world.deps.metrics.registry
    target = "autoscaler_controller_workload_ttft_target_seconds"
    desired = "autoscaler_controller_desired_replicas"
    await world.apply(autoscaling("chat", upper_allowed_latency_sec=0.8))
    await world.step()
    await world.delete("chat")
    for _ in range(6):
        await world.step(30)
    assert _value(registry, desired, "chat") is None

    await world.apply(fixed("chat", replicas=2))
    await world.step(5)
    await world.step(5)
    assert _value(registry, desired, "chat") == 2
    assert _value(registry, "autoscaler_controller_workload_max_replicas", "chat") == 2
    assert _value(registry, target, "chat") is None
    replicas = {
        phase: registry.get_sample_value(
            "autoscaler_controller_replicas",
            {"project": "acme", "workload": "chat", "phase": phase},
        )
        for phase in ("pending", "booting", "ready")
    }
    assert sum(v or 0 for v in replicas.values()) == 2

    await world.apply(autoscaling("chat", upper_allowed_latency_sec=1.5))
    await world.step(5)
    assert _value(registry, target, "chat") == 1.5
    await world.apply(fixed("chat", replicas=1))
    await world.step(5)
    assert _value(registry, target, "chat") is None
    await world.apply(autoscaling("chat", upper_allowed_latency_sec=2.5))
    await world.step(5)
    assert _value(registry, target, "chat") == 2.5
