"""Endpoint types, per-worker concurrency and the throughput floor, as users write them
(the Scale Launch and ScaleGenAI fields), and the reasons a spec is refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoscaler.spec import EndpointType, WorkloadSpec, describe_errors

BASE: dict[str, Any] = {"name": "demo", "slug": "demo", "model": "meta-llama/Llama-3.1-8B-Instruct"}
AUTOSCALING = {"max_workers": 3, "max_hourly_cost_usd": 5.0}


def spec(**fields: Any) -> WorkloadSpec:
    return WorkloadSpec.model_validate({**BASE, **fields})


def refusal(**fields: Any) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        spec(**fields)
    [error] = describe_errors(caught.value)
    return error


def test_the_launch_samples_fields_are_accepted() -> None:
    # create_model_endpoint(min_workers=0, endpoint_type="async") and the sync and
    # streaming samples (min_workers=1, per_worker=1).
    asynchronous = spec(
        endpoint_type="async",
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_workers": 0},
        labels={"team": "MY_TEAM", "product": "MY_PRODUCT"},
    )
    sync = spec(
        endpoint_type="sync",
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_workers": 1},
    )
    streaming = spec(
        endpoint_type="streaming",
        per_worker=1,
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_workers": 1},
    )
    assert asynchronous.endpoint_type is EndpointType.ASYNC
    assert sync.endpoint_type is EndpointType.SYNC
    assert (streaming.endpoint_type, streaming.per_worker) == (EndpointType.STREAMING, 1)
    assert spec().endpoint_type is None and spec().per_worker is None


def test_the_sdk_builds_an_endpoint_from_the_package() -> None:
    from autoscaler import EndpointType as Exported
    from autoscaler import WorkloadSpec as Spec

    built = Spec(**BASE, endpoint_type=Exported.STREAMING, per_worker=1)
    assert built.canonical()["endpoint_type"] == "streaming"
    assert built.canonical()["per_worker"] == 1


@pytest.mark.parametrize("kind", ["sync", "streaming"])
def test_a_live_endpoint_with_no_replica_floor_is_refused_with_the_reason(kind: str) -> None:
    error = refusal(
        endpoint_type=kind,
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_workers": 0},
    )
    assert error["path"] == "endpoint_type"
    assert error["value"] == kind
    assert f"endpoint_type {kind!r} needs at least one replica at all times" in error["message"]
    assert "min_workers is 0, allowed: 1 or more" in error["message"]
    assert "endpoint_type 'async'" in error["message"]


def test_a_live_endpoint_with_zero_fixed_replicas_or_a_schedule_is_refused() -> None:
    fixed = refusal(endpoint_type="sync", execution_policy_config={"replicas": 0})
    assert "replicas is 0, allowed: 1 or more" in fixed["message"]
    scheduled = refusal(
        endpoint_type="streaming",
        execution_policy="scheduled",
        execution_policy_config={"cron": "0 2 * * *"},
    )
    assert "'scheduled' runs none outside its schedule" in scheduled["message"]


def test_a_job_only_modality_cannot_be_a_live_endpoint() -> None:
    error = refusal(endpoint_type="sync", task_type="reranker")
    assert error["path"] == "endpoint_type"
    assert "task_type 'reranker' is served only as async jobs" in error["message"]
    assert spec(endpoint_type="async", task_type="reranker").endpoint_type is EndpointType.ASYNC


def test_an_async_endpoint_may_scale_to_zero() -> None:
    found = spec(
        endpoint_type="async",
        execution_policy="autoscaling",
        execution_policy_config=AUTOSCALING,
    )
    assert found.execution_policy_config.min_workers == 0  # type: ignore[union-attr]


def test_an_unknown_endpoint_type_lists_the_allowed_ones() -> None:
    error = refusal(endpoint_type="batch")
    assert error["path"] == "endpoint_type"
    assert all(kind in error["message"] for kind in ("'sync'", "'streaming'", "'async'"))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_per_worker_is_a_count_of_at_least_one(value: Any) -> None:
    error = refusal(per_worker=value)
    assert (error["path"], error["value"]) == ("per_worker", value)


def test_min_throughput_rate_is_a_positive_rate_of_the_autoscaling_policy() -> None:
    found = spec(
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_throughput_rate": 2500},
    )
    assert found.execution_policy_config.min_throughput_rate == 2500  # type: ignore[union-attr]
    error = refusal(
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_throughput_rate": 0},
    )
    assert error["path"] == "execution_policy_config.min_throughput_rate"
    # ScaleGenAI's create body writes it as null when unset.
    assert spec(
        execution_policy="autoscaling",
        execution_policy_config={**AUTOSCALING, "min_throughput_rate": None},
    )


def test_changing_per_worker_or_the_endpoint_type_keeps_the_replicas() -> None:
    before = spec(endpoint_type="sync")
    after = spec(endpoint_type="streaming", per_worker=4)
    assert before.replica_identity() == after.replica_identity()
