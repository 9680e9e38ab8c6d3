"""What ``describe``, the API and the SDK say about a workload: desired and ready counts,
phase, endpoint and last error; a workload that cannot be placed answers callers at once
with the reason; the local provider standing in for the cloud says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autoscaler import ManagementClient
from tests.helpers import RunningService, autoscaler_cli, free_port, wait_until

pytestmark = pytest.mark.slow

ADMIN = "ik_sdk_status-admin-" + "t" * 20


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, str]]:
    root = tmp_path_factory.mktemp("status")
    api_port, gateway_port = free_port(), free_port()
    config = root / "controller.yaml"
    config.write_text(
        "cluster_id: status\ntick_sec: 1\nproviders:\n  local: {gpu: NVIDIA H100 80GB HBM3}\n"
    )
    env = {"AUTOSCALER_DATA_DIR": str(root / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    argv = autoscaler_cli(
        "run", "--api-port", str(api_port), "--gateway-port", str(gateway_port),
        "--config", str(config),
    )  # fmt: skip
    api = f"http://127.0.0.1:{api_port}"
    with RunningService(argv, env=env, api_url=api, token=ADMIN, project="acme") as running:
        yield running, f"http://127.0.0.1:{gateway_port}"


def _client(running: RunningService) -> ManagementClient:
    return ManagementClient(url=running.url, token=ADMIN, project="acme")


def _spec(slug: str, **extra: Any) -> dict[str, Any]:
    return {"name": slug, "slug": slug, "model": "meta-llama/Llama-3.1-8B-Instruct", **extra}


def test_a_ready_workload_reports_counts_endpoint_and_the_local_stand_in(
    service: tuple[RunningService, str], tmp_path: Path
) -> None:
    running, gateway = service
    with _client(running) as mgmt:
        mgmt.ensure(_spec("bot", execution_policy_config={"replicas": 1}))
        wait_until(lambda: mgmt.get("bot")["status"]["phase"] == "ready", timeout=60, what="ready")
        status = mgmt.get("bot")["status"]
        seen = mgmt.status("bot")
    assert (status["desired"], status["ready"], status["last_error"]) == (1, 1, None)
    assert (seen.desired_phase, seen.actual_phase) == ("running", "running")
    [replica] = seen.replicas
    assert (replica.desired_phase, replica.actual_phase) == ("running", "ready")
    assert replica.command is not None and "--api-key ****" in replica.command
    assert status["endpoint"] == f"{gateway}/endpoint/acme/bot/v1"
    assert "local provider standing in for the cloud" in status["note"]
    described = running.ok("describe", "bot")
    assert "Status:      ready: 1 ready of 1 desired" in described
    assert "Phase:       running (desired running)" in described
    assert f"{replica.launch_id}: command: vllm serve meta-llama/Llama-3.1-8B-Instruct" in described
    assert "--api-key ****" in described and "${ENGINE_API_KEY}" not in described
    assert f"Endpoint:    {gateway}/endpoint/acme/bot/v1" in described
    assert "standing in for the cloud" in described


def test_a_workload_no_offer_fits_is_blocked_and_callers_get_503_at_once(
    service: tuple[RunningService, str],
) -> None:
    running, gateway = service
    pool = {"gpu_pool": ["NVIDIA L4"]}  # this machine stands in as an H100 only
    config = {
        "min_workers": 1,
        "max_workers": 2,
        "max_hourly_cost_usd": 5.0,
        "workers": {"source": "cloud", "cloud_pool": pool},
    }
    with _client(running) as mgmt:
        mgmt.ensure(_spec("l4-bot", execution_policy="autoscaling", execution_policy_config=config))
        key = mgmt.create_key("l4-bot").secret
        wait_until(
            lambda: mgmt.get("l4-bot")["status"]["phase"] == "blocked", timeout=60, what="blocked"
        )
        status = mgmt.get("l4-bot")["status"]
    assert status["ready"] == 0 and status["desired"] == 1
    assert "no offer fits" in status["last_error"]

    response = httpx.post(
        f"{gateway}/endpoint/acme/l4-bot/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [], "max_tokens": 1},
        timeout=30,
    )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "cannot_place" and "no offer fits" in error["message"]

    described = running.ok("describe", "l4-bot")
    assert "Status:      blocked: 0 ready of 1 desired" in described
    assert "Last error:  launch not possible: no offer fits" in described
    listed = running.ok("get")
    assert any(line.split()[0] == "l4-bot" and "blocked" in line for line in listed.splitlines())
