"""The management API over HTTP (a live uvicorn server) through the SDK and raw httpx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from autoscaler.sdk import ApiError, ManagementClient
from autoscaler.spec import DEFAULT_MAX_REPLICAS, WorkloadSpec
from tests.conftest import ADMIN_TOKEN
from tests.helpers import ApiServer

SPEC: dict[str, Any] = {
    "name": "Support bot",
    "slug": "support-bot",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "execution_policy": "autoscaling",
    "execution_policy_config": {
        "max_workers": 2,
        "max_hourly_cost_usd": 10,
        "workers": {"cloud_pool": {"gpu_pool": ["NVIDIA L4"]}},
    },
}


def client(
    server: ApiServer, *, token: str = ADMIN_TOKEN, project: str = "acme"
) -> ManagementClient:
    return ManagementClient(url=server.url, token=token, project=project, retries=1)


def test_ensure_create_unchanged_update(api_server: ApiServer) -> None:
    with client(api_server) as c:
        created = c.ensure(SPEC)
        unchanged = c.ensure(WorkloadSpec.model_validate(SPEC))
        changed = {**SPEC, "model": "Qwen/Qwen2.5-7B-Instruct"}
        updated = c.ensure(changed)
        assert (created.action, created.generation) == ("created", 1)
        assert (unchanged.action, unchanged.generation) == ("unchanged", 1)
        assert (updated.action, updated.generation) == ("updated", 2)
        assert updated.diff == [
            {
                "path": "model",
                "old": "meta-llama/Llama-3.1-8B-Instruct",
                "new": "Qwen/Qwen2.5-7B-Instruct",
            }
        ]
        assert c.get("support-bot")["spec"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
        assert [w["slug"] for w in c.list()] == ["support-bot"]


def test_status_codes_201_then_200(api_server: ApiServer) -> None:
    url = f"{api_server.url}/v1/projects/acme/workloads/support-bot"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.put(url, json=SPEC, headers=headers).status_code == 201
    assert httpx.put(url, json=SPEC, headers=headers).status_code == 200


def test_drift_fail_is_409_with_the_diff_and_keeps_the_spec(api_server: ApiServer) -> None:
    with client(api_server) as c:
        c.ensure(SPEC)
        with pytest.raises(ApiError) as info:
            c.ensure({**SPEC, "name": "Renamed"}, on_drift="fail")
        assert (info.value.status, info.value.code) == (409, "drift_refused")
        assert info.value.details == [{"path": "name", "old": "Support bot", "new": "Renamed"}]
        ignored = c.ensure({**SPEC, "name": "Renamed"}, on_drift="ignore")
        assert (ignored.action, ignored.generation) == ("ignored", 1)
        assert c.get("support-bot")["name"] == "Support bot"


def test_invalid_spec_is_422_naming_the_field_and_changes_nothing(api_server: ApiServer) -> None:
    with client(api_server) as c:
        c.ensure(SPEC)
        bad = {
            **SPEC,
            "execution_policy_config": {**SPEC["execution_policy_config"], "min_replicas": 1},
        }
        with pytest.raises(ApiError) as info:
            c.ensure(bad)
        assert (info.value.status, info.value.code) == (422, "invalid_spec")
        assert info.value.details[0]["path"] == "execution_policy_config"
        assert "did you mean 'min_workers'" in info.value.details[0]["message"]
        after = c.get("support-bot")
        assert after["generation"] == 1
        assert "min_replicas" not in after["spec"]["execution_policy_config"]


FIXED: dict[str, Any] = {
    "name": "Batch",
    "slug": "batch",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "execution_policy": "fixed",
}


@pytest.mark.parametrize("replicas", [1_000_000, 2_147_483_648, DEFAULT_MAX_REPLICAS + 1])
def test_replicas_above_the_service_maximum_are_refused_at_apply(
    api_server: ApiServer, replicas: int
) -> None:
    with client(api_server) as c:
        with pytest.raises(ApiError) as info:
            c.ensure({**FIXED, "execution_policy_config": {"replicas": replicas}})
        assert (info.value.status, info.value.code) == (422, "invalid_spec")
        [detail] = info.value.details
        assert detail["path"] == "execution_policy_config.replicas"
        assert detail["value"] == replicas
        assert f"maximum of {DEFAULT_MAX_REPLICAS} replicas per workload" in detail["message"]
        assert c.list() == []
        at_max = c.ensure({**FIXED, "execution_policy_config": {"replicas": DEFAULT_MAX_REPLICAS}})
        assert at_max.action == "created"


def test_max_workers_above_the_service_maximum_is_refused_at_apply(api_server: ApiServer) -> None:
    config = {**SPEC["execution_policy_config"], "max_workers": 5_000}
    with client(api_server) as c:
        with pytest.raises(ApiError) as info:
            c.ensure({**SPEC, "execution_policy_config": config})
        assert info.value.details[0]["path"] == "execution_policy_config.max_workers"


def test_deeply_nested_json_is_a_400_and_changes_nothing(api_server: ApiServer) -> None:
    body = '{"name": "x", "command": ' + "[" * 5000 + "]" * 5000 + "}"
    response = httpx.put(
        f"{api_server.url}/v1/projects/acme/workloads/deep",
        content=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the body's JSON is nested too deeply"
    with client(api_server) as c:
        assert c.list() == []


def test_body_slug_must_match_the_path(api_server: ApiServer) -> None:
    response = httpx.put(
        f"{api_server.url}/v1/projects/acme/workloads/other",
        json=SPEC,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 409  # the body names another workload than the path
    assert response.json()["error"]["code"] == "slug_mismatch"


def test_legacy_pool_answers_with_a_warning(api_server: ApiServer) -> None:
    legacy = {
        **SPEC,
        "execution_policy_config": {
            "max_workers": 2,
            "max_hourly_cost_usd": 10,
            "gpu_pool": ["NVIDIA L4"],
        },
    }
    with client(api_server) as c:
        ref = c.ensure(legacy)
    assert ref.action == "created"
    assert ref.warnings and "deprecated" in ref.warnings[0]


def test_no_token_is_401(api_server: ApiServer) -> None:
    response = httpx.get(f"{api_server.url}/v1/projects/acme/workloads")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    bogus = httpx.get(
        f"{api_server.url}/v1/projects/acme/workloads",
        headers={"Authorization": "Bearer ik_sdk_nope"},
    )
    assert bogus.status_code == 401


def test_project_token_is_scoped_to_its_project(api_server: ApiServer) -> None:
    with client(api_server, project="acme") as admin:
        acme_token = admin.create_project_token(name="ci").secret
    assert acme_token.startswith("ik_sdk_")
    with client(api_server, token=acme_token, project="acme") as acme:
        assert acme.ensure(SPEC).action == "created"
    with client(api_server, token=acme_token, project="globex") as other:
        with pytest.raises(ApiError) as info:
            other.list()
        assert (info.value.status, info.value.code) == (403, "forbidden")
        with pytest.raises(ApiError):
            other.ensure(SPEC)
    with client(api_server, token=acme_token, project="acme") as acme:
        with pytest.raises(ApiError) as info:
            acme.create_project_token()
        assert info.value.status == 403


def test_data_key_is_refused_on_the_management_api(api_server: ApiServer) -> None:
    with client(api_server) as c:
        c.ensure(SPEC)
        key = c.create_key("support-bot", name="app")
    assert key.secret.startswith("ik_live_")
    with client(api_server, token=key.secret) as keyed, pytest.raises(ApiError) as info:
        keyed.list()
    assert info.value.status == 401
    assert "data key" in info.value.message


def test_keys_are_listed_without_secrets_and_revoked(api_server: ApiServer) -> None:
    with client(api_server) as c:
        c.ensure(SPEC)
        key = c.create_key("support-bot", name="app")
        listed = c.list_keys("support-bot")
        assert [(k["id"], k["name"], k["revoked_at"]) for k in listed] == [(key.id, "app", None)]
        assert all("secret" not in k and key.secret not in str(k) for k in listed)
        c.revoke_key("support-bot", key.id)
        assert c.list_keys("support-bot")[0]["revoked_at"] is not None
        with pytest.raises(ApiError) as info:
            c.revoke_key("support-bot", "tok_missing")
        assert info.value.status == 404


def test_delete_removes_the_workload_and_revokes_its_keys(api_server: ApiServer) -> None:
    with client(api_server) as c:
        c.ensure(SPEC)
        c.create_key("support-bot")
        assert c.delete("support-bot")["deleted"] is True
        with pytest.raises(ApiError) as info:
            c.get("support-bot")
        assert (info.value.status, info.value.code) == (404, "workload_not_found")
        assert c.list() == []
        with pytest.raises(ApiError):
            c.delete("support-bot")
        recreated = c.ensure(SPEC)
        assert (recreated.action, recreated.generation) == ("created", 1)
        keys = c.list_keys("support-bot")
        assert len(keys) == 1 and keys[0]["revoked_at"] is not None


def test_replicas_and_decisions_of_a_new_workload_are_empty(api_server: ApiServer) -> None:
    with client(api_server) as c:
        c.ensure(SPEC)
        assert c.replicas("support-bot") == []
        assert c.decisions("support-bot") == []


def test_openapi_document_lists_the_routes(api_server: ApiServer) -> None:
    paths = httpx.get(f"{api_server.url}/openapi.json").json()["paths"]
    assert "/v1/projects/{project}/workloads/{slug}" in paths
    assert "/v1/projects/{project}/workloads/{slug}/keys" in paths
    # Deleting a secret a workload still names is a 409 (secret_in_use): documented.
    deleting = paths["/v1/projects/{project}/secrets/{name}"]["delete"]["responses"]
    assert {"409", "413"} <= set(deleting)
    assert "409" not in paths["/v1/projects/{project}/secrets/{name}"]["put"]["responses"]


def test_sdk_from_env(api_server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOSCALER_URL", api_server.url)
    monkeypatch.setenv("AUTOSCALER_SDK_TOKEN", ADMIN_TOKEN)
    with ManagementClient.from_env(project="acme") as c:
        ref = c.ensure(WorkloadSpec.model_validate(SPEC))
    assert (ref.project_slug, ref.workload_slug, ref.generation, ref.action) == (
        "acme",
        "support-bot",
        1,
        "created",
    )


def test_sdk_retries_5xx_then_gives_up_with_the_error() -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(
                503, json={"error": {"code": "unavailable", "message": "busy", "details": []}}
            )
        return httpx.Response(200, json={"items": []})

    c = ManagementClient(
        url="http://api.invalid",
        token="ik_sdk_x",
        project="acme",
        transport=httpx.MockTransport(flaky),
    )
    assert c.list() == []
    assert len(calls) == 3
    calls.clear()
    c404 = ManagementClient(
        url="http://api.invalid",
        token="ik_sdk_x",
        project="acme",
        transport=httpx.MockTransport(
            lambda r: httpx.Response(
                404, json={"error": {"code": "workload_not_found", "message": "no", "details": []}}
            )
        ),
    )
    with pytest.raises(ApiError) as info:
        c404.get("x")
    assert info.value.code == "workload_not_found"


def test_a_sync_endpoint_without_a_replica_floor_is_422_with_the_reason(
    api_server: ApiServer,
) -> None:
    url = f"{api_server.url}/v1/projects/acme/workloads/support-bot"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    answer = httpx.put(url, json={**SPEC, "endpoint_type": "sync"}, headers=headers)
    assert answer.status_code == 422
    [detail] = answer.json()["error"]["details"]
    assert (detail["path"], detail["value"]) == ("endpoint_type", "sync")
    assert "min_workers is 0, allowed: 1 or more" in detail["message"]
    assert httpx.get(url, headers=headers).status_code == 404  # nothing stored
    floor = {**SPEC["execution_policy_config"], "min_workers": 1}
    body = {**SPEC, "endpoint_type": "sync", "execution_policy_config": floor}
    assert httpx.put(url, json=body, headers=headers).status_code == 201


@pytest.mark.parametrize(
    ("change", "path", "allowed"),
    [
        ({"scale_up_time_window_sec": float("inf")}, "scale_up_time_window_sec", "finite"),
        ({"scale_to_zero_timeout_sec": 1e18}, "scale_to_zero_timeout_sec", "2592000"),
        ({"upper_allowed_latency_sec": float("nan")}, "upper_allowed_latency_sec", "finite"),
        ({"scaling_up_timeout_sec": 1e-300}, "scaling_up_timeout_sec", "10"),
        ({"max_hourly_cost_usd": float("-inf")}, "max_hourly_cost_usd", "finite"),
    ],
)
def test_a_number_the_controller_cannot_run_is_422_and_never_stored(
    api_server: ApiServer, change: dict[str, float], path: str, allowed: str
) -> None:
    """Infinity, NaN or a window past 30 days used to be stored (or its refusal failed to
    render): the step then overflowed on every pass. Refused at apply, naming the field and
    the bound, as JSON a client can parse."""
    import json

    body = {**SPEC, "execution_policy_config": {**SPEC["execution_policy_config"], **change}}
    url = f"{api_server.url}/v1/projects/acme/workloads/support-bot"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}
    answer = httpx.put(url, content=json.dumps(body, allow_nan=True), headers=headers)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_spec"
    (detail,) = error["details"]
    assert detail["path"] == f"execution_policy_config.{path}"
    assert allowed in detail["message"]
    assert httpx.get(url, headers=headers).status_code == 404


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"cron": "0 0 31 2 *", "replicas": 1}, "never fires"),
        ({"cron": "0 9 * * *", "duration": 10**12, "replicas": 1}, "366 days"),
    ],
)
def test_a_schedule_that_cannot_run_is_refused_at_apply(
    api_server: ApiServer, config: dict[str, Any], message: str
) -> None:
    spec = {**SPEC, "execution_policy": "scheduled", "execution_policy_config": config}
    with client(api_server) as c:
        with pytest.raises(ApiError) as info:
            c.ensure(spec)
        assert (info.value.status, info.value.code) == (422, "invalid_spec")
        assert message in info.value.details[0]["message"]
        assert c.list() == []


def test_a_body_over_a_mebibyte_is_413_and_changes_nothing(api_server: ApiServer) -> None:
    url = f"{api_server.url}/v1/projects/acme/workloads/support-bot"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    big = {**SPEC, "labels": {f"k{i}": "v" * 60 for i in range(20_000)}}
    answer = httpx.put(url, json=big, headers=headers)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "too_large"

    def chunks() -> Any:  # no Content-Length: refused once the chunks read pass the limit
        yield b'{"name": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}'

    streamed = httpx.put(url, content=chunks(), headers=headers)
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "too_large")
    assert httpx.get(url, headers=headers).status_code == 404
    assert httpx.put(url, json=SPEC, headers=headers).status_code == 201


def test_names_models_and_commands_have_a_stated_length_limit(api_server: ApiServer) -> None:
    with client(api_server) as c:
        for field, value, limit in (
            ("name", "n" * 257, "256"),
            ("model", "m" * 1025, "1024"),
            ("command", "--x " * 5000, "16384"),
        ):
            with pytest.raises(ApiError) as info:
                c.ensure({**SPEC, field: value})
            detail = info.value.details[0]
            assert (detail["path"], limit in detail["message"]) == (field, True)
        assert c.list() == []
