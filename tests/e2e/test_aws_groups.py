"""A replica group on moto's EC2 through the controller (behind the proxy that answers
placement-group calls): a model no machine of the pool holds is bought as a leader and
a worker in one cluster placement group, each with its group and role tags and the
startup script of its role, becomes ready once its worker checked in through the boot
callback and its leader answers, and is terminated whole on delete."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import httpx
import pytest
from sqlalchemy import select

from autoscaler.api.app import create_app
from autoscaler.api.deps import ApiState
from autoscaler.config import parse_config
from autoscaler.controller import build_controller
from autoscaler.reconcile.provisioner import boot_token
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.phase import Phase, phase_of
from autoscaler.store.workloads import delete_workload, ensure_workload
from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot
from providers.base import GROUP_TAG, LAUNCH_ID_TAG, ROLE_TAG, ManualClock, utc
from tests.e2e.test_aws_moto import AWS_ENV, REGION, AlwaysHealthy, _cloud, _config, _running
from tests.fakes.ec2_proxy import Ec2Proxy

pytestmark = pytest.mark.slow

P5 = Offer(
    provider=ProviderName.AWS,
    region=REGION,
    zone=f"{REGION}a",
    instance_type="p5.48xlarge",
    gpu="NVIDIA H100 80GB HBM3",
    gpu_count=8,
    vcpus=192,
    memory_gib=2048,
    on_demand_usd_per_hour=55.04,
)
MODEL = "meta-llama/Llama-3.1-405B-Instruct"  # about 800 GiB in BF16: two 640 GiB machines


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        yield session_factory(engine)


async def _user_data(proxy: Ec2Proxy, instance_id: str) -> str:
    async with aioboto3.Session().client("ec2", region_name=REGION, endpoint_url=proxy.url) as c:
        answer = await c.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(answer["UserData"]["Value"]).decode()


async def test_a_two_node_group_is_bought_in_one_placement_group_and_ends_whole(
    proxy: Ec2Proxy, store: Any, tmp_path: Path
) -> None:
    cluster = f"grp-{uuid.uuid4().hex[:8]}"
    clock = ManualClock(start=time.time())
    config = parse_config(_config(proxy, cluster, fleet_max_hourly_cost_usd=200), source="test")
    assert "aws" in config.group_providers  # the default: no key needed
    controller = build_controller(
        config,
        sessions=store,
        data_dir=tmp_path,
        clock=clock,
        health=AlwaysHealthy(),
        catalog=Snapshot(offers=(P5,), taken_at=datetime.now(UTC), source="test catalog"),
    )
    spec = WorkloadSpec.model_validate(
        {"name": "big", "slug": "big", "model": MODEL, "execution_policy_config": {"replicas": 1}}
    )
    async with store() as s, s.begin():
        await ensure_workload(
            s, project="acme", spec=spec, on_drift=OnDrift.RECONCILE, now=utc(clock.now())
        )

    async def rows() -> list[LedgerRow]:
        async with store() as s:
            return list(await s.scalars(select(LedgerRow).order_by(LedgerRow.group_role)))

    try:
        await controller.step()
        running = _running(await _cloud(proxy, cluster))
        assert len(running) == 2 and proxy.run_instances_calls == 2
        placement = f"autoscaler-{cluster}-{P5.zone}-p5-48xlarge"
        assert proxy.placement_groups == {placement: "cluster"}
        by_role: dict[str, dict[str, Any]] = {}
        for instance in running:
            assert instance["InstanceType"] == P5.instance_type
            assert proxy.instance_placement_group[instance["InstanceId"]] == placement
            tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
            by_role[tags[ROLE_TAG]] = {**instance, "tags": tags}
        leader, worker = by_role["leader"], by_role["worker"]
        group = leader["tags"][LAUNCH_ID_TAG]
        assert leader["tags"][GROUP_TAG] == worker["tags"][GROUP_TAG] == group

        leader_script = await _user_data(proxy, leader["InstanceId"])
        worker_script = await _user_data(proxy, worker["InstanceId"])
        assert "GROUP_ROLE=leader" in leader_script and "GROUP_ROLE=worker" in worker_script
        assert "GROUP_SIZE=2" in leader_script and "GROUP_SIZE=2" in worker_script
        assert f"LAUNCH_ID={worker['tags'][LAUNCH_ID_TAG]}" in worker_script
        assert "--pipeline-parallel-size 2" in leader_script.replace("'", "")
        assert f"/v1/boot/{worker['tags'][LAUNCH_ID_TAG]}" in worker_script

        for _ in range(3):  # the leader's engine answers; its worker has not checked in
            clock.advance(5)
            await controller.step()
        assert all(phase_of(r) is Phase.BOOTING for r in await rows())

        # The worker's startup script reports its role started: the boot callback.
        worker_row = next(r for r in await rows() if r.group_role == "worker")
        app = create_app(ApiState(sessions=store, now=lambda: utc(clock.now())))
        token = boot_token(launch_id=worker_row.launch_id, engine_key=worker_row.engine_key or "")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api"
        ) as api:
            group = await api.get(
                f"/v1/boot/{worker_row.launch_id}/group",
                headers={"Authorization": f"Bearer {token}"},
            )
            reported = await api.post(
                f"/v1/boot/{worker_row.launch_id}/status",
                headers={"Authorization": f"Bearer {token}"},
                json={"launch_id": worker_row.launch_id, "state": "ready", "reason": ""},
            )
        assert reported.status_code == 202, reported.text
        # The leader's own private address, not engine_address (127.0.0.1:9 here).
        assert group.json() == {
            "role": "worker",
            "size": 2,
            "leader_address": leader["PrivateIpAddress"],
        }
        for _ in range(5):  # the leader is checked for health on the next passes
            clock.advance(5)
            await controller.step()
            if all(phase_of(r) is Phase.READY for r in await rows()):
                break
        ledger = await rows()
        assert [r.group_role for r in ledger] == ["leader", "worker"]
        assert all(phase_of(r) is Phase.READY for r in ledger)
        assert {r.instance_id for r in ledger} == {leader["InstanceId"], worker["InstanceId"]}

        async with store() as s, s.begin():
            await delete_workload(s, project="acme", slug="big", now=utc(clock.now()))
        for _ in range(20):
            clock.advance(5)
            await controller.step()
            if all(r.terminated_confirmed_at is not None for r in await rows()):
                break
        assert all(r.terminated_confirmed_at is not None for r in await rows())
        assert _running(await _cloud(proxy, cluster)) == []
        assert len(await _cloud(proxy, cluster)) == 2  # nothing bought besides the group
    finally:
        await controller.close()
