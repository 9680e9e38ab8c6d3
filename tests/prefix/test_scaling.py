"""Scaling that knows the cache: the measured hit rate raises a replica's capacity."""

from __future__ import annotations

import pytest

from autoscaler.decide.inputs import ModelSize, TokenMix, measured_of, replica_capacity
from gateway.window import TokenStats, WorkloadWindow

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
    assert window.token_stats() == TokenStats(1, 2000.0, 0.0, 100.0, 0.0, 0.0)


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
