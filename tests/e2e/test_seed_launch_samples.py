"""Scale Launch's model-endpoint samples, run as users paste them, against ``autoscaler run``.

Each sample is here as written, the import being ``from autoscaler import LaunchClient``.
What a Launch user has before running them is done first: ``LAUNCH_API_KEY`` holds a
management token, ``AUTOSCALER_PROJECT`` names the project, and the bundles the samples
name (``test-bundle``, ``test-streaming-bundle``) are registered. The samples give no
``gpu_type``, so the endpoints run on the project's private worker (an ``autoscaler
agent`` serving engine-sim replicas, from ``test_seed_samples``).
"""

from __future__ import annotations

import pytest

from autoscaler import ManagementClient
from tests.e2e.test_seed_samples import ADMIN, PROJECT, Service, service
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

__all__ = ["service"]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
def launch_user(
    service: Service, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Service:
    monkeypatch.setenv("LAUNCH_API_KEY", ADMIN)
    monkeypatch.setenv("AUTOSCALER_PROJECT", PROJECT)
    monkeypatch.setenv(
        "AUTOSCALER_LAUNCH_BUNDLES", str(tmp_path_factory.mktemp("launch") / "bundles.json")
    )
    from autoscaler import LaunchClient

    with LaunchClient(api_key=ADMIN) as setup:
        setup.create_model_bundle("test-bundle", model=MODEL, command=f"vllm serve {MODEL}")
        setup.create_model_bundle(
            "test-streaming-bundle", model=MODEL, command=f"vllm serve {MODEL}"
        )
    return service


def test_launch_endpoint_samples(launch_user: Service) -> None:
    service = launch_user

    # Creating an Async Model Endpoint
    import os

    from autoscaler import LaunchClient

    client = LaunchClient(api_key=os.getenv("LAUNCH_API_KEY"))
    endpoint = client.create_model_endpoint(
        endpoint_name="demo-endpoint-async",
        model_bundle="test-bundle",
        cpus=1,
        min_workers=0,
        endpoint_type="async",
        update_if_exists=True,
        labels={
            "team": "MY_TEAM",
            "product": "MY_PRODUCT",
        },
    )
    assert (endpoint.name, endpoint.endpoint_type, endpoint.min_workers) == (
        "demo-endpoint-async",
        "async",
        0,
    )
    assert endpoint.model_bundle == "test-bundle"
    assert endpoint.labels == {"team": "MY_TEAM", "product": "MY_PRODUCT"}

    # Creating a Sync Model Endpoint
    client = LaunchClient(api_key=os.getenv("LAUNCH_API_KEY"))
    endpoint = client.create_model_endpoint(
        endpoint_name="demo-endpoint-sync",
        model_bundle="test-bundle",
        cpus=1,
        min_workers=1,
        endpoint_type="sync",
        update_if_exists=True,
        labels={
            "team": "MY_TEAM",
            "product": "MY_PRODUCT",
        },
    )
    [sync_replica] = service.wait_ready("demo-endpoint-sync")
    assert sync_replica["provider"] == "private"

    # Creating a Streaming Model Endpoint
    client = LaunchClient(api_key=os.getenv("LAUNCH_API_KEY"))
    endpoint = client.create_model_endpoint(
        endpoint_name="demo-endpoint-streaming",
        model_bundle="test-streaming-bundle",
        cpus=1,
        min_workers=1,
        per_worker=1,
        endpoint_type="streaming",
        update_if_exists=True,
        labels={
            "team": "MY_TEAM",
            "product": "MY_PRODUCT",
        },
    )
    assert (endpoint.per_worker, endpoint.model_bundle) == (1, "test-streaming-bundle")
    service.wait_ready("demo-endpoint-streaming")

    # Listing Model Endpoints
    client = LaunchClient(api_key=os.getenv("LAUNCH_API_KEY"))
    endpoints = client.list_model_endpoints()
    assert {"demo-endpoint-async", "demo-endpoint-sync", "demo-endpoint-streaming"} <= {
        e.name for e in endpoints
    }

    # Updating a Model Endpoint: only the bound changes, so the replica stays.
    client = LaunchClient(api_key=os.getenv("LAUNCH_API_KEY"))
    client.edit_model_endpoint(
        model_endpoint="demo-endpoint-sync",
        max_workers=2,
    )
    assert client.get_model_endpoint("demo-endpoint-sync").max_workers == 2
    wait_until(
        lambda: (
            [r["launch_id"] for r in service.ready_replicas("demo-endpoint-sync")]
            == [sync_replica["launch_id"]]
        ),
        timeout=60,
        what="the running replica adopted by the edited spec",
    )

    # Deleting a Model Endpoint
    import time

    client = LaunchClient(api_key=os.getenv("LAUNCH_API_KEY"))
    endpoint = client.create_model_endpoint(
        endpoint_name="demo-endpoint-tmp",
        model_bundle="test-bundle",
        cpus=1,
        min_workers=0,
        endpoint_type="async",
        update_if_exists=True,
        labels={
            "team": "MY_TEAM",
            "product": "MY_PRODUCT",
        },
    )
    time.sleep(15)  # Wait for Launch to build the endpoint
    client.delete_model_endpoint(model_endpoint_name="demo-endpoint-tmp")
    assert "demo-endpoint-tmp" not in {e.name for e in client.list_model_endpoints()}
    client.close()


def test_launch_refusals_name_what_is_wrong(launch_user: Service) -> None:
    from autoscaler import LaunchClient

    client = LaunchClient(api_key=ADMIN)
    with pytest.raises(LookupError, match=r"unknown model bundle 'no-such'.*create_model_bundle"):
        client.create_model_endpoint(
            endpoint_name="demo-unknown-bundle", model_bundle="no-such", min_workers=1
        )
    with pytest.raises(TypeError, match="post_inference_hooks"):
        client.create_model_endpoint(  # type: ignore[call-arg]
            endpoint_name="demo-hooks", model_bundle="test-bundle", post_inference_hooks=[]
        )
    with pytest.raises(ValueError, match=r"endpoint_type 'sync' needs at least one replica"):
        client.create_model_endpoint(
            endpoint_name="demo-sync-zero", model_bundle="test-bundle", min_workers=0
        )
    with pytest.raises(ValueError, match=r"gpus is 2; allowed: 0 or 1"):
        client.create_model_endpoint(
            endpoint_name="demo-two-gpus", model_bundle="test-bundle", gpus=2
        )
    client.create_model_endpoint(
        endpoint_name="demo-exists",
        model_bundle="test-bundle",
        min_workers=0,
        endpoint_type="async",
    )
    with pytest.raises(ValueError, match=r"'demo-exists' already exists.*update_if_exists=True"):
        client.create_model_endpoint(
            endpoint_name="demo-exists", model_bundle="test-bundle", endpoint_type="async"
        )
    client.delete_model_endpoint(model_endpoint_name="demo-exists")
    names = {e.name for e in client.list_model_endpoints()}
    assert not names & {"demo-unknown-bundle", "demo-hooks", "demo-sync-zero", "demo-two-gpus"}
    client.close()


def test_gpu_type_buys_a_cloud_pool_under_the_clients_ceiling(launch_user: Service) -> None:
    from autoscaler import LaunchClient
    from autoscaler.sdk import ConfigError

    with (
        LaunchClient(api_key=ADMIN) as no_ceiling,
        pytest.raises(ConfigError, match="AUTOSCALER_MAX_HOURLY_COST_USD"),
    ):
        no_ceiling.create_model_endpoint(
            endpoint_name="demo-cloud", model_bundle="test-bundle", gpu_type="nvidia-ampere-a100e"
        )
    client = LaunchClient(api_key=ADMIN, max_hourly_cost_usd=5.0)
    client.create_model_endpoint(
        endpoint_name="demo-cloud", model_bundle="test-bundle", gpus=1,
        gpu_type="nvidia-ampere-a100e", max_workers=2,
    )  # fmt: skip
    [replica] = launch_user.wait_ready("demo-cloud")
    assert replica["provider"] == "local"
    with ManagementClient.from_env(project=PROJECT) as mgmt:
        config = mgmt.get("demo-cloud")["spec"]["execution_policy_config"]
    assert config["max_hourly_cost_usd"] == 5.0
    pool = config["workers"]["cloud_pool"]
    assert (pool["gpu_pool"], pool["max_instances"]) == (["NVIDIA A100-SXM4-80GB"], 2)
    client.delete_model_endpoint(model_endpoint_name="demo-cloud")
    client.close()
