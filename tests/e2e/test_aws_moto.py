"""The controller against moto's EC2 server over HTTP (behind the proxy that adds
ClientToken idempotency): placement, tags, scaling up to the ceiling and no further,
scaling to zero, and a controller killed with SIGKILL in the middle of a launch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import select

from autoscaler.config import parse_config
from autoscaler.controller import Controller, build_controller
from autoscaler.decide.signals import Signals
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Decision
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.workloads import ensure_workload
from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot, snapshot_path, write_snapshot
from providers.base import CLUSTER_TAG, LAUNCH_ID_TAG, WORKLOAD_TAG, ManualClock, utc
from tests.fakes.ec2_proxy import Ec2Proxy, _Cached
from tests.helpers import autoscaler_cli, wait_until
from tests.reconcile.world import FakeSignals

pytestmark = pytest.mark.slow

REGION = "us-east-1"
MOTO_AMI = "ami-785db401"


def _offer(instance_type: str, gpu: str, price: float, vram_per_gpu: int = 24) -> Offer:
    del vram_per_gpu
    return Offer(
        provider=ProviderName.AWS,
        region=REGION,
        zone=f"{REGION}a",
        instance_type=instance_type,
        gpu=gpu,
        gpu_count=1,
        vcpus=4,
        memory_gib=16,
        on_demand_usd_per_hour=price,
    )


T4 = _offer("g4dn.xlarge", "Tesla T4", 0.526)  # cheapest, but an 8B model does not fit
L4 = _offer("g6.xlarge", "NVIDIA L4", 0.8048)  # cheaper per hour, half the bandwidth
A10G = _offer("g5.xlarge", "NVIDIA A10G", 1.006)  # cheapest per unit of serving capacity
L40S = _offer("g6e.xlarge", "NVIDIA L40S", 1.861)  # not in the pool
CATALOG = Snapshot(offers=(T4, L4, A10G, L40S), taken_at=datetime.now(UTC), source="test catalog")


class HoldingProxy(Ec2Proxy):
    """Lets RunInstances reach moto, then holds the answer while ``hold`` is set, so the
    controller can be killed after the machine exists and before it hears of it."""

    def __init__(self, *, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host=upstream_host, upstream_port=upstream_port)
        self.hold = False
        self.held = threading.Event()
        self.release = threading.Event()

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Cached:
        result = super()._handle(method, path, headers, body)
        if self.hold and b"Action=RunInstances" in body:
            self.held.set()
            self.release.wait(timeout=30)
        return result


@pytest.fixture
def proxy(moto_server: ThreadedMotoServer) -> Iterator[HoldingProxy]:
    host, port = moto_server.get_host_and_port()
    proxy = HoldingProxy(upstream_host=host, upstream_port=port)
    proxy.start()
    yield proxy
    proxy.release.set()
    proxy.stop()


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def _config(proxy: Ec2Proxy, cluster: str, **extra: Any) -> dict[str, Any]:
    return {
        "cluster_id": cluster,
        "callback_url": "http://127.0.0.1:9",  # no instance here runs its startup script
        "providers": {
            "aws": {
                "regions": [REGION],
                "endpoint_url": proxy.url,
                "ami_overrides": {"default": MOTO_AMI},
                "gateway_cidr": "203.0.113.10/32",
                "retry_wait_seconds": 0.01,
                # Engines are never reached at moto's made-up addresses.
                "engine_address": "127.0.0.1:9",
            }
        },
        **extra,
    }


async def _cloud(proxy: Ec2Proxy, cluster: str) -> list[dict[str, Any]]:
    """The cluster's instances as EC2 describes them (terminated ones included)."""
    async with aioboto3.Session().client("ec2", region_name=REGION, endpoint_url=proxy.url) as c:
        pages = await c.describe_instances(
            Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
        )
    return [i for r in pages["Reservations"] for i in r["Instances"]]  # type: ignore[misc]


def _running(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in instances if i["State"]["Name"] in ("pending", "running")]


class AlwaysHealthy:
    async def healthy(self, *, url: str, health_path: str, engine_key: str | None) -> bool:
        return True


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    async with open_store(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as engine:
        yield session_factory(engine)


def _autoscaling_spec() -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {
            "name": "chat",
            "slug": "chat",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "command": "--max-model-len 8192",
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": 0,
                "max_workers": 6,
                "max_hourly_cost_usd": 3.1,
                "scale_up_time_window_sec": 20,
                "scale_down_time_window_sec": 60,
                "scale_to_zero_timeout_sec": 120,
                "scaling_down_timeout_sec": 30,
                "workers": {
                    "source": "cloud",
                    "cloud_pool": {
                        "gpu_pool": ["Tesla T4", "NVIDIA L4", "NVIDIA A10G"],
                        "allowed_cuda_versions": ["12.4"],
                    },
                },
            },
        }
    )


async def test_autoscaling_on_ec2_buys_cheapest_scales_to_ceiling_then_to_zero(
    proxy: HoldingProxy, store: Any, tmp_path: Path
) -> None:
    cluster = f"e2e-{uuid.uuid4().hex[:8]}"
    clock = ManualClock(start=time.time())
    signals = FakeSignals()
    controller: Controller = build_controller(
        parse_config(_config(proxy, cluster), source="test"),
        sessions=store,
        data_dir=tmp_path,
        signals=signals,
        clock=clock,
        health=AlwaysHealthy(),
        catalog=CATALOG,
    )
    async with store() as s, s.begin():
        await ensure_workload(
            s,
            project="acme",
            spec=_autoscaling_spec(),
            on_drift=OnDrift.RECONCILE,
            now=utc(clock.now()),
        )

    async def step(seconds: float, ttft: float | None = None, waiting: int = 0) -> None:
        clock.advance(seconds)
        now = clock.now()
        samples = [] if ttft is None else [(t, ttft) for t in range(int(now) - 120, int(now), 2)]
        signals.by_ref[("acme", "chat")] = Signals.from_epoch(
            ttft_samples=samples,
            request_rate=0.0 if ttft is None else 5.0,
            in_flight=0,
            queue_depth=waiting,
            last_request_at=now if (ttft is not None or waiting) else now - 10_000,
        )
        await controller.step()

    try:
        # A request waits with no replica: wake from zero onto the cheapest feasible offer.
        await step(0, waiting=1)
        [first] = _running(await _cloud(proxy, cluster))
        assert first["InstanceType"] == A10G.instance_type
        tags = {t["Key"]: t["Value"] for t in first["Tags"]}
        assert tags[CLUSTER_TAG] == cluster and tags[WORKLOAD_TAG] == "chat"
        async with store() as s:
            [row] = list(await s.scalars(select(LedgerRow)))
        assert tags[LAUNCH_ID_TAG] == row.launch_id and row.instance_id == first["InstanceId"]
        assert proxy.run_instances_calls == 1

        # TTFT far over target: more replicas, up to $3.10/h (3 x $1.006) and no further.
        most = 0
        for _ in range(20):
            await step(5, ttft=4.0)
            most = max(most, len(_running(await _cloud(proxy, cluster))))
        running = _running(await _cloud(proxy, cluster))
        assert len(running) == most == 3
        assert all(i["InstanceType"] == A10G.instance_type for i in running)
        async with store() as s:
            refused = list(await s.scalars(select(Decision).where(Decision.kind == "refused")))
        assert refused and not refused[0].acted
        assert "workload ceiling" in refused[0].reason
        refusals = controller.deps.metrics.refused.labels("acme", "chat", "workload_ceiling")
        assert refusals._value.get() >= 1

        # Idle past scale_to_zero_timeout_sec: drained, terminated, confirmed.
        for _ in range(12):
            await step(20)
        assert _running(await _cloud(proxy, cluster)) == []
        async with store() as s:
            rows = list(await s.scalars(select(LedgerRow)))
        assert rows and all(r.terminated_confirmed_at is not None for r in rows)
        assert len(await _cloud(proxy, cluster)) == len(rows)  # nothing bought untracked
    finally:
        await controller.close()


def _controller_argv(db: str, config: Path, data_dir: Path) -> list[str]:
    return autoscaler_cli(
        "controller",
        "--db",
        db,
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        "0",
    )


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        env={**os.environ, **AWS_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.stdout is not None
    output = proc.stdout.read()
    proc.stdout.close()
    return output


async def _ledger(db: str) -> list[LedgerRow]:
    async with open_store(db) as engine, session_factory(engine)() as s:
        return list(await s.scalars(select(LedgerRow).order_by(LedgerRow.intent_at)))


def test_controller_killed_mid_launch_resumes_without_duplicates(
    proxy: HoldingProxy, tmp_path: Path
) -> None:
    import yaml

    cluster = f"kill-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "data"
    write_snapshot(CATALOG, snapshot_path(data_dir))
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump(_config(proxy, cluster, tick_sec=0.5, orphan_grace_sec=3600)))
    db = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"

    async def create() -> None:
        async with open_store(db) as engine, session_factory(engine)() as s, s.begin():
            spec = WorkloadSpec.model_validate(
                {
                    "name": "fixed",
                    "slug": "fixed",
                    "model": "meta-llama/Llama-3.1-8B-Instruct",
                    "execution_policy_config": {"replicas": 2},
                }
            )
            await ensure_workload(
                s, project="acme", spec=spec, on_drift=OnDrift.RECONCILE, now=datetime.now(UTC)
            )

    asyncio.run(create())
    argv = _controller_argv(db, config, data_dir)
    proxy.hold = True
    first = _start(argv)
    try:
        assert proxy.held.wait(timeout=60), "the controller never launched"
    finally:
        _stop(first, signal.SIGKILL)
    proxy.hold = False
    proxy.release.set()
    rows = asyncio.run(_ledger(db))
    assert len(rows) == 1 and rows[0].instance_id is None  # the intent, unresolved
    assert len(_running(asyncio.run(_cloud(proxy, cluster)))) == 1  # the machine exists

    second = _start(argv)
    try:

        def settled() -> bool:
            rows = asyncio.run(_ledger(db))
            return len(rows) == 2 and all(r.instance_id for r in rows)

        wait_until(settled, timeout=60, what="both replicas launched and recorded")
        time.sleep(2)  # a few more passes: nothing more is bought
        rows = asyncio.run(_ledger(db))
        running = _running(asyncio.run(_cloud(proxy, cluster)))
    finally:
        output = _stop(second)
    assert len(rows) == 2, output
    assert sorted(i["InstanceId"] for i in running) == sorted(r.instance_id or "" for r in rows)
    by_launch = {next(t["Value"] for t in i["Tags"] if t["Key"] == LAUNCH_ID_TAG) for i in running}
    assert by_launch == {r.launch_id for r in rows}  # one machine per launch id
    assert "controller for cluster" in output
