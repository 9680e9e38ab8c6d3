"""``autoscaler describe``'s Serving line: endpoint type, per_worker, throughput floor."""

from __future__ import annotations

from autoscaler.cli.workloads import serving_summary
from autoscaler.spec import WorkloadSpec

BASE = {"name": "demo", "slug": "demo", "model": "meta-llama/Llama-3.1-8B-Instruct"}
AUTOSCALING = {"max_workers": 3, "max_hourly_cost_usd": 5.0}


def test_describe_says_how_the_workload_is_served() -> None:
    stored = WorkloadSpec(
        **BASE,
        endpoint_type="async",
        per_worker=2,
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_throughput_rate": 1500},
    ).canonical()
    assert serving_summary(stored) == (
        "async endpoint (jobs only), 2 request(s) at once per replica (per_worker), "
        "at least 1500 tokens/s (min_throughput_rate)"
    )
    assert serving_summary(WorkloadSpec(**BASE).canonical()) is None
