"""Scaling that knows the cache: the measured hit rate raises a replica's capacity."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.decide.inputs import ModelSize, TokenMix, measured_of, replica_capacity
from autoscaler.decide.plan import Drain
from gateway.window import TokenStats, WorkloadWindow, prompt_bucket
from tests.decide.test_plan import plan, replica

SHAPE = ("NVIDIA H100 80GB HBM3", 1)


def test_the_window_reports_the_share_of_prompt_tokens_found_cached() -> None:
    window = WorkloadWindow()
    window.add_tokens(now=100.0, input_tokens=8000, output_tokens=100, cached_tokens=6000)
    window.add_tokens(now=101.0, input_tokens=2000, output_tokens=100, cached_tokens=0)
    snapshot = window.snapshot(
        project="p", workload="w", now=102.0, window_sec=60.0, concurrency_cap=None
    )
    assert snapshot.tokens is not None
    assert snapshot.tokens.cached_share == pytest.approx(0.6)
    # The contract survives its JSON form, and an older gateway's JSON means no hits.
    assert TokenStats.from_json(snapshot.tokens.to_json()) == snapshot.tokens
    old = snapshot.tokens.to_json()
    del old["cached_mean"]
    assert TokenStats.from_json(old).cached_share == 0.0
    mix = measured_of(snapshot).token_mix
    assert mix is not None and mix.cached_share == pytest.approx(0.6)
    # Samples leave the window with their cached tokens.
    window.trim(now=160.5, window_sec=60.0)
    assert window.token_stats() == TokenStats(
        1, 2000.0, 0.0, 100.0, 0.0, 0.0, input_histogram={prompt_bucket(2000): 1}
    )


def test_a_fleet_that_finds_its_prefixes_cached_needs_fewer_replicas() -> None:
    model = ModelSize(params_b=8.0)
    cold = replica_capacity(SHAPE, model=model, mix=TokenMix(15_000, 150), concurrency_cap=32)
    warm = replica_capacity(
        SHAPE, model=model, mix=TokenMix(15_000, 150, cached_share=0.5), concurrency_cap=32
    )
    assert cold is not None and warm is not None
    # Prefill dominates a 15k-token prompt: half of it cached nearly doubles the rate.
    assert warm.requests_per_s > 1.8 * cold.requests_per_s
    assert warm.prefill_s is not None and cold.prefill_s is not None
    assert warm.prefill_s == pytest.approx(cold.prefill_s / 2, rel=0.01)


def test_a_scale_down_drains_the_coldest_cache_not_the_warmest() -> None:
    old_warm = replace(replica("warm", age=4000, ready_age=3000), cache_blocks=800)
    new_cold = replace(replica("cold", age=200, ready_age=60), cache_blocks=5)
    newest_warm = replace(replica("warm2", age=100, ready_age=30), cache_blocks=700)
    p = plan(2, [old_warm, new_cold, newest_warm])
    drains = [a for a in p.actions if isinstance(a, Drain)]
    assert [d.launch_id for d in drains] == ["cold"]
    assert "5 cached prefix blocks" in drains[0].reason
    # Without cache figures, the newest goes first, as before.
    p = plan(2, [replace(r, cache_blocks=0) for r in (old_warm, new_cold, newest_warm)])
    assert [a.launch_id for a in p.actions if isinstance(a, Drain)] == ["warm2"]
