"""PATCH with a JSON merge patch (RFC 7396): part of a spec changes, the rest is kept,
and the result goes through the same validation as a PUT (on SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from autoscaler.sdk import ApiError, ManagementClient
from tests.conftest import ADMIN_TOKEN
from tests.helpers import ApiServer

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PATCH = {**AUTH, "Content-Type": "application/merge-patch+json"}
SPEC: dict[str, Any] = {
    "name": "Support bot",
    "slug": "support-bot",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "command": "vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
    "execution_policy": "autoscaling",
    "execution_policy_config": {
        "max_workers": 2,
        "max_hourly_cost_usd": 10,
        "workers": {"cloud_pool": {"gpu_pool": ["NVIDIA L4"], "max_instances": 2}},
    },
}


def _url(server: ApiServer) -> str:
    return f"{server.url}/v1/projects/acme/workloads/support-bot"


@pytest.fixture
def stored(api_server: ApiServer) -> ApiServer:
    assert httpx.put(_url(api_server), json=SPEC, headers=AUTH).status_code == 201
    return api_server


def _spec(server: ApiServer) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(_url(server), headers=AUTH).json()
    return found


def test_a_nested_change_merges_and_keeps_the_rest(stored: ApiServer) -> None:
    patch = {
        "execution_policy_config": {
            "max_workers": 4,
            "workers": {"cloud_pool": {"max_instances": 4}},
        }
    }
    response = httpx.patch(_url(stored), json=patch, headers=PATCH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["action"], body["generation"]) == ("updated", 2)
    assert [d["path"] for d in body["diff"]] == [
        "execution_policy_config.max_workers",
        "execution_policy_config.workers.cloud_pool.max_instances",
    ]
    config = _spec(stored)["spec"]["execution_policy_config"]
    assert config["max_workers"] == 4 and config["max_hourly_cost_usd"] == 10
    assert config["workers"]["cloud_pool"]["gpu_pool"] == ["NVIDIA L4"]
    assert config["workers"]["cloud_pool"]["max_instances"] == 4


def test_null_removes_a_key_and_lists_are_replaced(stored: ApiServer) -> None:
    patch = {
        "command": None,
        "execution_policy_config": {"workers": {"cloud_pool": {"gpu_pool": ["a100-80gb"]}}},
    }
    response = httpx.patch(_url(stored), json=patch, headers=PATCH)
    assert response.status_code == 200, response.text
    spec = _spec(stored)["spec"]
    assert spec["command"] is None
    assert spec["execution_policy_config"]["workers"]["cloud_pool"]["gpu_pool"] == [
        "NVIDIA A100-SXM4-80GB"
    ]


def test_the_same_values_are_unchanged(stored: ApiServer) -> None:
    response = httpx.patch(_url(stored), json={"name": "Support bot"}, headers=PATCH)
    assert (response.json()["action"], response.json()["generation"]) == ("unchanged", 1)


@pytest.mark.parametrize(
    ("patch", "path", "says"),
    [
        (
            {"execution_policy_config": {"max_replicas": 3}},
            "execution_policy_config",
            "min_workers",
        ),
        ({"command": "vllm serve --port 1"}, "command", "--port"),
        (
            {"execution_policy_config": {"max_hourly_cost_usd": None}},
            "execution_policy_config",
            "max_hourly_cost_usd",
        ),
        # A null on a key the spec does not have is refused, not merged into "unchanged".
        ({"max_replicas": None}, "(root)", "did you mean 'max_workers'"),
        ({"": None}, "(root)", "unknown field ''"),
        (
            {
                "worker_id": "wrk_nobody",
                "execution_policy": "fixed",
                "execution_policy_config": None,
            },
            "worker_id",
            "not registered",
        ),
    ],
)
def test_a_patch_that_does_not_validate_is_422_and_changes_nothing(
    stored: ApiServer, patch: dict[str, Any], path: str, says: str
) -> None:
    response = httpx.patch(_url(stored), json=patch, headers=PATCH)
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["path"] == path and says in detail["message"]
    after = _spec(stored)
    assert after["generation"] == 1 and after["spec"]["command"] == SPEC["command"]


def test_what_a_patch_cannot_be(stored: ApiServer) -> None:
    as_text = {**AUTH, "Content-Type": "text/plain"}
    assert httpx.patch(_url(stored), content=b"{}", headers=as_text).status_code == 415
    slug = httpx.patch(_url(stored), json={"slug": "other"}, headers=PATCH)
    assert (slug.status_code, slug.json()["error"]["code"]) == (409, "slug_mismatch")
    missing = httpx.patch(
        f"{stored.url}/v1/projects/acme/workloads/nobody", json={"name": "x"}, headers=PATCH
    )
    assert missing.status_code == 404
    drift = httpx.patch(
        _url(stored), json={"name": "Renamed"}, headers=PATCH, params={"on_drift": "fail"}
    )
    assert drift.status_code == 409 and _spec(stored)["name"] == "Support bot"


def test_the_sdk_updates_through_the_same_patch(stored: ApiServer) -> None:
    with ManagementClient(url=stored.url, token=ADMIN_TOKEN, project="acme", retries=1) as c:
        ref = c.update("support-bot", {"execution_policy_config": {"min_workers": 1}})
        assert (ref.action, ref.generation) == ("updated", 2)
        assert ref.diff == [{"path": "execution_policy_config.min_workers", "old": 0, "new": 1}]
        with pytest.raises(ApiError) as info:
            c.update("support-bot", {"backend": "tgi"})
        assert (info.value.status, info.value.details[0]["path"]) == (422, "backend")
        assert c.get("support-bot")["generation"] == 2
