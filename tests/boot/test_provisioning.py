"""The provisioner hands cloud launches their startup script; a boot reported failed is
terminated and its offer skipped; a cloud configuration without callback_url is refused."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autoscaler.config import ConfigError, parse_config
from autoscaler.reconcile.deps import ProviderEntry, ProviderRegistry
from autoscaler.reconcile.provisioner import boot_token
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance
from autoscaler.store.phase import Phase
from providers.base import LaunchRequest
from providers.fake import FakeProvider
from providers.local import offer_for_this_machine
from tests.helpers import Process, autoscaler_cli, free_port, http_ok, wait_until
from tests.reconcile.world import OFFERS, World, autoscaling, fixed

CALLBACK = "https://autoscaler.internal:8001"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        world = World(session_factory(engine))
        world.deps.settings = dataclasses.replace(world.deps.settings, callback_url=CALLBACK)
        yield world


def _launches(provider: FakeProvider) -> list[LaunchRequest]:
    found = [call.argument for call in provider.calls_to("launch")]
    assert all(isinstance(r, LaunchRequest) for r in found)
    return found  # type: ignore[return-value]


async def test_a_cloud_launch_carries_a_startup_script_that_calls_back_for_this_launch(
    world: World,
) -> None:
    await world.apply(fixed("chat"))
    await world.step()

    [row] = await world.rows("chat")
    [request] = _launches(world.provider)
    script = request.boot.startup_script
    assert script is not None and script.startswith("#!/usr/bin/env bash")
    assert f"CALLBACK_URL={CALLBACK}/v1/boot/{row.launch_id}\n" in script
    assert row.engine_key is not None
    token = boot_token(launch_id=row.launch_id, engine_key=row.engine_key)
    assert f"CALLBACK_TOKEN={token}\n" in script
    assert row.engine_key not in script  # fetched at boot, never in user data


async def test_this_machine_starts_its_engines_itself_and_gets_no_script(world: World) -> None:
    local = FakeProvider(world.cloud, name="local")
    machine = offer_for_this_machine(gpu="NVIDIA H100 80GB HBM3", gpu_count=1)
    world.deps.providers = ProviderRegistry({"local": ProviderEntry(local)})
    world.deps.offers = lambda: (machine,)
    await world.apply(fixed("chat"))
    await world.step()

    [request] = _launches(local)
    assert request.boot.startup_script is None


async def test_a_boot_reported_failed_is_terminated_and_its_offer_skipped(world: World) -> None:
    await world.apply(autoscaling("chat", min_workers=1))
    await world.step()
    [first] = await world.rows("chat")
    async with world.sessions() as s, s.begin():
        row = await s.get(Instance, first.launch_id)
        assert row is not None
        row.last_error = "boot failed: NVIDIA driver 535.104.05 is older than 550.54.14"
    world.health.all_healthy = False  # the engine never came up

    await world.step(1)
    await world.step(1)

    rows = {r.launch_id: r for r in await world.rows("chat")}
    failed = rows.pop(first.launch_id)
    assert failed.terminated_confirmed_at is not None and failed.ready_at is None
    assert failed.last_error == "boot failed: NVIDIA driver 535.104.05 is older than 550.54.14"
    [replacement] = rows.values()
    assert replacement.offer_key != first.offer_key  # the failed offer is skipped a while
    assert replacement.offer_key in {o.key for o in OFFERS}
    [terminate] = await world.decisions("terminate")
    assert terminate.reason.startswith("boot failed: NVIDIA driver 535.104.05")
    assert [i.instance_id for i in world.live_instances()] == [replacement.instance_id]
    assert await world.phases("chat") == [Phase.TERMINATED, Phase.BOOTING]


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_a_cloud_provider_without_callback_url_is_a_config_error_naming_the_key(
    cloud: str,
) -> None:
    providers = {"aws": {"regions": ["us-east-1"]}, "gcp": {"project": "p", "zones": ["z"]}}
    with pytest.raises(ConfigError) as caught:
        parse_config({"providers": {cloud: providers[cloud]}}, source="ctl.yaml")
    assert str(caught.value).startswith(
        f"controller config ctl.yaml: callback_url: required with providers.{cloud}"
    )
    config = parse_config(
        {"callback_url": CALLBACK, "providers": {cloud: providers[cloud]}}, source="ctl.yaml"
    )
    assert config.callback_url == CALLBACK
    with pytest.raises(ConfigError, match="callback_url"):
        parse_config({"callback_url": "autoscaler:8001"}, source="ctl.yaml")


def test_autoscaler_run_refuses_such_a_config_before_serving(tmp_path: Path) -> None:
    config = tmp_path / "ctl.yaml"
    config.write_text("providers:\n  aws:\n    regions: [us-east-1]\n")
    done = subprocess.run(
        autoscaler_cli("run", "--config", str(config), "--data-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"controller config {config}: callback_url: required with providers.aws" in done.stderr


def test_autoscaler_run_dry_run_logs_the_plan_and_starts_nothing(tmp_path: Path) -> None:
    api_port, gateway_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    admin = "ik_sdk_dry-run-admin-" + "d" * 20
    argv = autoscaler_cli(
        "run", "--dry-run", "--api-port", str(api_port), "--gateway-port", str(gateway_port)
    )
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": admin}
    headers = {"Authorization": f"Bearer {admin}"}
    workload = f"{api}/v1/projects/demo/workloads/chat"
    with Process(argv, env=env) as service:
        wait_until(lambda: http_ok(api + "/healthz"), timeout=60, what="autoscaler run")
        spec = fixed("chat").model_dump(mode="json", exclude_none=True)
        assert httpx.put(workload, json=spec, headers=headers).status_code == 201

        def planned() -> list[dict[str, Any]]:
            items = httpx.get(f"{workload}/decisions", headers=headers).json()["items"]
            return [d for d in items if d["reason"].startswith("dry-run: ")]

        wait_until(lambda: bool(planned()), timeout=30, what="a dry-run decision")
        replicas = httpx.get(f"{workload}/replicas", headers=headers).json()["items"]
        decisions = planned()
        output = service.stop()
    assert "; dry run)" in output
    assert replicas == []
    assert not any(d["acted"] for d in decisions)
