"""Refused at apply: a spec the controller could not run gets 422 naming the field, the
value and what is allowed, through raw JSON and the SDK alike, and nothing is stored."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from autoscaler.sdk import ApiError, ManagementClient
from autoscaler.spec import WorkloadSpec
from tests.conftest import ADMIN_TOKEN
from tests.helpers import ApiServer

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BASE: dict[str, Any] = {
    "name": "Poster maker",
    "slug": "poster-maker",
    "model": "stabilityai/stable-diffusion-3.5-large",
    "backend": "vllm-omni",
    "task_type": "text2image",
}
CLOUD = {
    "min_workers": 0,
    "max_workers": 2,
    "max_hourly_cost_usd": 5.0,
}


def _url(server: ApiServer, slug: str = "poster-maker") -> str:
    return f"{server.url}/v1/projects/acme/workloads/{slug}"


def _pool(gpus: list[str], cuda: list[str]) -> dict[str, Any]:
    pool = {"gpu_pool": gpus, "allowed_cuda_versions": cuda}
    return {**CLOUD, "workers": {"source": "cloud", "cloud_pool": pool}}


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "engine-sim as a command",
        {"command": "autoscaler engine-sim --model x"},
        "command",
        "'vllm serve stabilityai/stable-diffusion-3.5-large [flags]'",
    ),
    ("a flag the service owns", {"command": "vllm serve --port 9000"}, "command", "--port"),
    (
        "an unparsable command",
        {"command": 'vllm serve "stabilityai'},
        "command",
        "cannot be parsed",
    ),
    (
        "a parallel flag that is not a number",
        {"command": "vllm serve --tensor-parallel-size two"},
        "command",
        "--tensor-parallel-size must be a whole number",
    ),
    (
        "an unknown backend",
        {"backend": "tgi"},
        "backend",
        "allowed: vllm, sglang, ollama, vllm-omni",
    ),
    (
        "an unknown CUDA version",
        {"execution_policy": "autoscaling", "execution_policy_config": _pool(["A100"], ["99.9"])},
        "execution_policy_config.workers.cloud_pool.allowed_cuda_versions",
        "known versions are",
    ),
    (
        "a CUDA pin no GPU of the pool runs",
        {"execution_policy": "autoscaling", "execution_policy_config": _pool(["V100"], ["13.0"])},
        "execution_policy_config.workers.cloud_pool",
        "Tesla V100-SXM2-16GB (compute capability 7.0) is not supported by CUDA 13.0",
    ),
    (
        "an unknown GPU name",
        {"execution_policy": "autoscaling", "execution_policy_config": _pool(["Z9000"], [])},
        "execution_policy_config.workers.cloud_pool.gpu_pool",
        "Z9000",
    ),
    (
        "autoscaling with no config on cloud workers",
        {"execution_policy": "autoscaling"},
        "execution_policy_config",
        "'max_workers' and 'max_hourly_cost_usd'",
    ),
    (
        "scheduled with no config",
        {"execution_policy": "scheduled"},
        "execution_policy_config",
        "exactly one of 'cron'",
    ),
    ("an unregistered worker", {"worker_id": "wrk_nothere"}, "worker_id", "not registered"),
    (
        "a context length the command also sets",
        {"command": "vllm serve --max-model-len 4096", "max_model_len": 8192},
        "max_model_len",
        "give it once",
    ),
    (
        "a step token budget below the sequence cap",
        {"command": "vllm serve --max-num-batched-tokens 128 --max-num-seqs=256"},
        "command",
        "max_num_batched_tokens (128) must be greater than or equal to max_num_seqs (256).",
    ),
    (
        "an unknown region",
        {
            "execution_policy": "autoscaling",
            "execution_policy_config": {**CLOUD, "regions": ["MOON"]},
        },
        "execution_policy_config.regions",
        "use a macro region (US, CANADA, EU, ASIA)",
    ),
]


@pytest.mark.parametrize(
    ("change", "path", "says"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused_over_raw_json_with_the_field_and_nothing_stored(
    api_server: ApiServer, change: dict[str, Any], path: str, says: str
) -> None:
    response = httpx.put(_url(api_server), json={**BASE, **change}, headers=HEADERS)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    detail = error["details"][0]
    assert detail["path"] == path
    assert says in detail["message"]
    assert httpx.get(_url(api_server), headers=HEADERS).status_code == 404


@pytest.mark.parametrize(
    ("change", "path", "says"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused_through_the_sdk_with_the_same_words(
    api_server: ApiServer, change: dict[str, Any], path: str, says: str
) -> None:
    raw = {**BASE, **change}
    local_error = ""
    try:
        spec: WorkloadSpec | dict[str, Any] = WorkloadSpec(**raw)
    except ValidationError as exc:
        # Built locally, the schema's own checks fail at construction, naming the field.
        local_error, spec = str(exc), raw
    assert not local_error or says in local_error
    with ManagementClient(url=api_server.url, token=ADMIN_TOKEN, project="acme") as client:
        with pytest.raises(ApiError) as info:
            client.ensure(spec)
        assert (info.value.status, info.value.code) == (422, "invalid_spec")
        assert info.value.details[0]["path"] == path
        assert says in info.value.details[0]["message"]
        assert client.list() == []


def test_the_seeds_vllm_omni_command_form_is_accepted(api_server: ApiServer) -> None:
    spec = {**BASE, "command": "vllm-omni serve stabilityai/stable-diffusion-3.5-large"}
    assert httpx.put(_url(api_server), json=spec, headers=HEADERS).status_code == 201


def test_a_registered_worker_is_accepted_and_autoscaling_on_it_gets_defaults(
    api_server: ApiServer,
) -> None:
    registered = httpx.post(
        f"{api_server.url}/v1/projects/acme/workers", json={"name": "box"}, headers=HEADERS
    )
    worker = registered.json()["id"]
    spec = {**BASE, "worker_id": worker, "execution_policy": "autoscaling"}
    response = httpx.put(_url(api_server), json=spec, headers=HEADERS)
    assert response.status_code == 201, response.text
    config = response.json()["workload"]["spec"]["execution_policy_config"]
    assert (config["min_workers"], config["max_workers"]) == (0, 1)
    assert config["workers"] == {"source": "private", "private_worker_ids": [worker]}


def test_a_worker_of_another_project_is_not_registered_here(api_server: ApiServer) -> None:
    other = httpx.post(
        f"{api_server.url}/v1/projects/other/workers", json={"name": "box"}, headers=HEADERS
    ).json()["id"]
    pool = {
        "min_workers": 1,
        "max_workers": 2,
        "workers": {"source": "private", "private_worker_ids": [other]},
    }
    spec = {**BASE, "execution_policy": "autoscaling", "execution_policy_config": pool}
    response = httpx.put(_url(api_server), json=spec, headers=HEADERS)
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["path"] == "execution_policy_config.workers.private_worker_ids.0"
    assert detail["value"] == other


def test_an_unknown_backend_names_each_allowed_value_once(api_server: ApiServer) -> None:
    response = httpx.put(_url(api_server), json={**BASE, "backend": "tgi"}, headers=HEADERS)
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    named, allowed = detail["message"].split("; allowed: ")
    assert named == "unknown backend 'tgi'"
    assert allowed.split(", ") == ["vllm", "sglang", "ollama", "vllm-omni"]
