"""The hard ceiling: refusals carry the numbers."""

from __future__ import annotations

import pytest

from autoscaler.decide.budget import BudgetLimits, Spend, check_launch, limits_for
from autoscaler.spec import AutoscalingPolicy


def test_launch_that_crosses_the_workload_ceiling_is_refused_with_the_numbers() -> None:
    verdict = check_launch(
        live_usd_per_hour=[4.10, 4.10, 4.10],
        new_usd_per_hour=4.10,
        limits=BudgetLimits(workload_usd_per_hour=15.0),
    )
    assert not verdict.allowed
    assert verdict.reason == (
        "launch refused: 3 x $4.10/h + $4.10/h = $16.40/h would exceed the workload "
        "ceiling $15.00/h"
    )


def test_launch_that_fits_exactly_is_allowed() -> None:
    verdict = check_launch(
        live_usd_per_hour=[0.1, 0.2],
        new_usd_per_hour=0.3,
        limits=BudgetLimits(workload_usd_per_hour=0.6),
    )
    assert verdict.allowed
    assert verdict.workload_usd_per_hour == pytest.approx(0.6)


def test_pool_ceiling_and_instance_count_apply_too() -> None:
    pool = check_launch(
        live_usd_per_hour=[1.0],
        new_usd_per_hour=1.5,
        limits=BudgetLimits(workload_usd_per_hour=10.0, pool_usd_per_hour=2.0),
    )
    assert not pool.allowed
    assert "cloud pool ceiling $2.00/h" in pool.reason
    count = check_launch(
        live_usd_per_hour=[1.0, 1.0], new_usd_per_hour=1.0, limits=BudgetLimits(max_instances=2)
    )
    assert not count.allowed
    assert "max_instances 2" in count.reason


def test_max_instances_counts_every_machine_of_a_group() -> None:
    held = Spend.of([110.0], machines=2)  # one group of two machines
    single = check_launch(
        live_usd_per_hour=held, new_usd_per_hour=55.0, limits=BudgetLimits(max_instances=3)
    )
    assert single.allowed
    group = check_launch(
        live_usd_per_hour=held,
        new_usd_per_hour=110.0,
        limits=BudgetLimits(max_instances=3),
        new_instances=2,
    )
    assert not group.allowed
    assert group.reason == (
        "launch refused: 2 instance(s) + a group of 2 = 4 would exceed max_instances 3"
    )
    first = check_launch(
        live_usd_per_hour=[],
        new_usd_per_hour=110.0,
        limits=BudgetLimits(max_instances=1),
        new_instances=2,
    )
    assert not first.allowed and "0 instance(s) + a group of 2 = 2" in first.reason


def test_fleet_ceiling_counts_every_workload() -> None:
    verdict = check_launch(
        live_usd_per_hour=[],
        new_usd_per_hour=0.8523,
        limits=BudgetLimits(workload_usd_per_hour=5.0, fleet_usd_per_hour=20.0),
        fleet_live_usd_per_hour=19.5,
    )
    assert not verdict.allowed
    assert verdict.reason == (
        "launch refused: fleet $19.50/h + $0.8523/h = $20.3523/h would exceed the fleet "
        "ceiling $20.00/h"
    )
    with pytest.raises(ValueError, match="fleet_live_usd_per_hour"):
        check_launch(
            live_usd_per_hour=[], new_usd_per_hour=1.0, limits=BudgetLimits(fleet_usd_per_hour=5.0)
        )


def test_limits_come_from_the_policy() -> None:
    policy = AutoscalingPolicy.model_validate(
        {
            "max_workers": 4,
            "max_hourly_cost_usd": 12.0,
            "workers": {
                "cloud_pool": {"gpu_pool": ["L4"], "max_hourly_cost_usd": 8.0, "max_instances": 3}
            },
        }
    )
    limits = limits_for(policy, fleet_usd_per_hour=100.0)
    assert limits == BudgetLimits(
        workload_usd_per_hour=12.0, pool_usd_per_hour=8.0, max_instances=3, fleet_usd_per_hour=100.0
    )
