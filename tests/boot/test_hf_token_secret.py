"""A workload's Hugging Face token as a stored secret: created, listed by name, named by
a spec (refused when it is not stored), delivered through the boot callback and to local
replicas' environment, refused deletion while in use; and its value in no API answer, no
log record and no ``describe`` output over the whole flow, and sealed at rest."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from autoscaler.cli import main
from autoscaler.reconcile.deps import ledger_secrets
from autoscaler.sdk import ApiError, ManagementClient
from autoscaler.store import sealed
from autoscaler.store.db import open_store
from autoscaler.store.models import Instance
from catalog.model import Offer, ProviderName
from providers.base import BootSpec, LaunchRequest, instance_tags
from tests.boot.conftest import HF_TOKEN, BootApiServer, add_launch
from tests.conftest import ADMIN_TOKEN

VALUE = "hf_" + "SeCrEt" * 6
"""The stored token: distinct from the controller's ``$HF_TOKEN`` (``HF_TOKEN``)."""


@pytest.fixture(autouse=True)
def sealing_key() -> Any:
    sealed.use_key(b"k" * 32)
    yield
    sealed.use_key(None)


def _client(api: BootApiServer) -> ManagementClient:
    return ManagementClient(url=api.url, token=ADMIN_TOKEN, project="acme", retries=1)


async def test_the_token_reaches_the_replica_and_nothing_else(
    boot_api: BootApiServer,
    store: Any,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []
    with _client(boot_api) as client:
        answers.append(str(client.create_secret("hf-acme", VALUE)))
        with pytest.raises(ApiError) as taken:
            client.create_secret("hf-acme", "hf_other")
        assert (taken.value.status, taken.value.code) == (409, "secret_exists")
        listed = client.list_secrets()
        assert [item["name"] for item in listed] == ["hf-acme"]
        answers.append(str(listed))

        spec = {"name": "chat", "slug": "chat-vllm", "model": "Qwen/Qwen2.5-0.5B-Instruct"}
        with pytest.raises(ApiError) as missing:
            client.ensure({**spec, "hf_token_secret": "hf-other"})
        assert missing.value.status == 422
        assert missing.value.details[0]["path"] == "hf_token_secret"
        assert "secret 'hf-other' is not stored in this project; stored: hf-acme" in (
            missing.value.message
        )

    launch = await add_launch(store, spec_extra={"hf_token_secret": "hf-acme"})
    async with httpx.AsyncClient() as http:
        env_file = await http.get(
            f"{boot_api.url}/v1/boot/{launch.launch_id}/secrets", headers=launch.auth()
        )
    assert env_file.text.splitlines() == [
        f"ENGINE_API_KEY={launch.engine_key}",
        f"HF_TOKEN={VALUE}",  # the workload's secret, not the controller's $HF_TOKEN
    ]

    # A local replica's environment gets it too (the local provider's secret source).
    async with store() as s:
        row = await s.get(Instance, launch.launch_id)
    assert row is not None
    local = await ledger_secrets(store, environ={"HF_TOKEN": HF_TOKEN})(_request(row))
    assert local["HF_TOKEN"] == VALUE

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    base = f"{boot_api.url}/v1/projects/acme"
    async with httpx.AsyncClient(headers=headers) as http:
        for path in (
            "/workloads",
            "/workloads/chat-vllm",
            "/workloads/chat-vllm/replicas",
            "/workloads/chat-vllm/decisions",
            "/secrets",
        ):
            answer = await http.get(base + path)
            assert answer.status_code == 200, answer.text
            answers.append(answer.text)
        openapi = await http.get(f"{boot_api.url}/openapi.json")
        answers.append(openapi.text)
    assert '"hf_token_secret":"hf-acme"' in answers[3].replace(" ", "")

    env = {"AUTOSCALER_URL": boot_api.url, "AUTOSCALER_SDK_TOKEN": ADMIN_TOKEN}
    described = CliRunner().invoke(main, ["describe", "chat-vllm", "-p", "acme"], env=env)
    assert described.exit_code == 0, described.output
    assert "hf_token_secret: hf-acme" in described.output
    yaml_out = CliRunner().invoke(main, ["get", "chat-vllm", "-p", "acme", "-o", "yaml"], env=env)
    listed_out = CliRunner().invoke(main, ["secrets", "list", "-p", "acme"], env=env)
    assert "hf-acme" in listed_out.output

    with _client(boot_api) as client:
        with pytest.raises(ApiError) as in_use:
            client.delete_secret("hf-acme")
        assert (in_use.value.status, in_use.value.code) == (409, "secret_in_use")
        assert "chat-vllm" in in_use.value.message
        answers.append(str(in_use.value.details))
        client.delete("chat-vllm")
        assert client.delete_secret("hf-acme") == {"name": "hf-acme", "deleted": True}
        assert client.list_secrets() == []

    for shown in (*answers, described.output, yaml_out.output, listed_out.output):
        assert VALUE not in shown
    for record in caplog.records:
        assert VALUE not in record.getMessage()
        assert VALUE not in repr(record.args)


async def test_the_value_is_sealed_at_rest(boot_api: BootApiServer, database_url: str) -> None:
    with _client(boot_api) as client:
        client.create_secret("hf-acme", VALUE)
    async with open_store(database_url) as engine, engine.connect() as conn:
        raw = (await conn.execute(text("SELECT value FROM secrets"))).scalar_one()
    assert raw.startswith(sealed.PREFIX)
    assert VALUE not in raw


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "bad name", "value": VALUE}, "name"),
        ({"name": "ok", "value": ""}, "value"),
        ({"name": "ok", "value": VALUE + "\nsecond line"}, "value"),
        ({"name": "ok", "value": VALUE, "extra": 1}, "extra"),
    ],
)
async def test_a_bad_secret_is_refused_without_echoing_the_value(
    boot_api: BootApiServer, body: dict[str, Any], field: str
) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{boot_api.url}/v1/projects/acme/secrets",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert answer.status_code == 422
    assert [d["path"].rsplit(".", 1)[-1] for d in answer.json()["error"]["details"]] == [field]
    assert VALUE not in answer.text


def test_the_cli_reads_the_value_from_a_file_or_stdin(
    boot_api: BootApiServer, tmp_path: Any
) -> None:
    env = {"AUTOSCALER_URL": boot_api.url, "AUTOSCALER_SDK_TOKEN": ADMIN_TOKEN}
    token_file = tmp_path / "token"
    token_file.write_text(VALUE + "\n")
    runner = CliRunner()
    made = runner.invoke(main, ["secrets", "create", "a", "--from-file", str(token_file),
                                "-p", "acme"], env=env)  # fmt: skip
    piped = runner.invoke(
        main, ["secrets", "create", "b", "--from-stdin", "-p", "acme"], env=env, input=VALUE
    )
    neither = runner.invoke(main, ["secrets", "create", "c", "-p", "acme"], env=env)
    assert made.exit_code == 0 and piped.exit_code == 0, made.output + piped.output
    assert "secret/a created" in made.output
    assert neither.exit_code == 2 and "exactly one of --from-file" in neither.output
    with _client(boot_api) as client:
        assert [s["name"] for s in client.list_secrets()] == ["a", "b"]
    for out in (made.output, piped.output):
        assert VALUE not in out


ROTATED = "hf_" + "RoTaTeD" * 5
"""The value a leaked ``VALUE`` is rotated to."""


async def test_a_secret_in_use_is_replaced_in_place(
    boot_api: BootApiServer,
    store: Any,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rotating a leaked token: its value is replaced while a workload uses it, with no
    edit of the workload; a replica booting from then on gets the new value; neither value
    shows in any answer, output or log record, and the new one is sealed at rest."""
    caplog.set_level(logging.DEBUG)
    env = {"AUTOSCALER_URL": boot_api.url, "AUTOSCALER_SDK_TOKEN": ADMIN_TOKEN}
    shown: list[str] = []
    with _client(boot_api) as client:
        client.create_secret("hf-acme", VALUE)
        launch = await add_launch(store, spec_extra={"hf_token_secret": "hf-acme"})
        with pytest.raises(ApiError) as taken:
            client.create_secret("hf-acme", ROTATED)
        assert (taken.value.status, taken.value.code) == (409, "secret_exists")
        assert "--replace" in taken.value.message
        replaced = client.replace_secret("hf-acme", ROTATED)
        listed = client.list_secrets()
        assert [replaced] == listed  # the same metadata as the list: name, created_at
        assert set(replaced) == {"name", "created_at"}
        with pytest.raises(ApiError) as unknown:
            client.replace_secret("hf-nobody", ROTATED)
        assert (unknown.value.status, unknown.value.code) == (404, "secret_not_found")
        shown += [str(replaced), str(listed), unknown.value.message, taken.value.message]

    async with httpx.AsyncClient() as http:
        env_file = await http.get(
            f"{boot_api.url}/v1/boot/{launch.launch_id}/secrets", headers=launch.auth()
        )
        bad = await http.put(
            f"{boot_api.url}/v1/projects/acme/secrets/hf-acme",
            json={"value": VALUE + "\nsecond line"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert f"HF_TOKEN={ROTATED}" in env_file.text.splitlines()
    assert bad.status_code == 422
    assert [d["path"].rsplit(".", 1)[-1] for d in bad.json()["error"]["details"]] == ["value"]
    shown.append(bad.text)
    async with store() as s:
        row = await s.get(Instance, launch.launch_id)
    assert row is not None
    local = await ledger_secrets(store, environ={"HF_TOKEN": HF_TOKEN})(_request(row))
    assert local["HF_TOKEN"] == ROTATED

    runner = CliRunner()
    again = runner.invoke(
        main, ["secrets", "create", "hf-acme", "--replace", "--from-stdin", "-p", "acme"],
        env=env, input=VALUE + "\n",
    )  # fmt: skip
    missing = runner.invoke(
        main, ["secrets", "create", "hf-none", "--replace", "--from-stdin", "-p", "acme"],
        env=env, input=VALUE,
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "secret/hf-acme replaced" in again.output
    assert missing.exit_code != 0 and "secret_not_found" in missing.output
    shown += [again.output, missing.output]
    async with httpx.AsyncClient() as http:
        env_file = await http.get(
            f"{boot_api.url}/v1/boot/{launch.launch_id}/secrets", headers=launch.auth()
        )
    assert f"HF_TOKEN={VALUE}" in env_file.text.splitlines()
    async with open_store(database_url) as engine, engine.connect() as conn:
        raw = (await conn.execute(text("SELECT value FROM secrets"))).scalar_one()
    assert raw.startswith(sealed.PREFIX) and VALUE not in raw

    for out in shown:
        assert VALUE not in out and ROTATED not in out
    for record in caplog.records:
        for value in (VALUE, ROTATED):
            assert value not in record.getMessage()
            assert value not in repr(record.args)


def _request(row: Instance) -> LaunchRequest:
    offer = Offer(
        provider=ProviderName.AWS,
        region=row.region,
        zone=row.zone,
        instance_type=row.instance_type,
        gpu=row.gpu,
        gpu_count=row.gpu_count,
        vcpus=4,
        memory_gib=16,
        on_demand_usd_per_hour=row.hourly_usd,
    )
    boot = BootSpec(
        image="vllm/vllm-openai:latest",
        command=("vllm", "serve", "m"),
        port=8000,
        health_path="/health",
        model_id="m",
        secret_env_names=("ENGINE_API_KEY", "HF_TOKEN"),
    )
    tags = instance_tags(
        cluster_id="c", project=row.project, workload=row.workload_slug, launch_id=row.launch_id
    )
    return LaunchRequest(offer=offer, spot=False, boot=boot, launch_id=row.launch_id, tags=tags)
