"""A warm pool on moto's EC2 server, run by the ``autoscaler controller`` command: a
replica is refilled, stopped, the controller killed with SIGKILL while EC2's answer to
the stop is still on its way, a new controller confirms the stop from EC2, then starts the
machine again when a request comes, and the replica serves (its engine is an engine-sim
process at the address every EC2 machine is reached by). The ledger is checked against
EC2 at each step: one row per machine, billed running until the stop is confirmed and
for its disks after."""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from moto.server import ThreadedMotoServer
from sqlalchemy import update

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance as LedgerRow
from autoscaler.store.models import Workload
from autoscaler.store.phase import Phase, phase_of
from autoscaler.store.workloads import ensure_workload
from catalog.snapshot import snapshot_path, write_snapshot
from catalog.storage import stopped_usd_per_hour
from tests.e2e.test_aws_moto import (
    A10G,
    CATALOG,
    _cloud,
    _config,
    _controller_argv,
    _ledger,
    _start,
    _stop,
    aws_environment,  # noqa: F401  (autouse: the test's own EC2 calls need credentials)
)
from tests.fakes.ec2_proxy import Ec2Proxy, _Cached
from tests.helpers import Process, autoscaler_cli, free_port, http_ok, wait_until

pytestmark = pytest.mark.slow


class StopHoldingProxy(Ec2Proxy):
    """Lets StopInstances reach moto, then holds its answer while ``hold`` is set: the
    controller can be killed after EC2 stopped the machine and before it heard so."""

    def __init__(self, *, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host=upstream_host, upstream_port=upstream_port)
        self.hold = True
        self.held = threading.Event()
        self.release = threading.Event()

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Cached:
        result = super()._handle(method, path, headers, body)
        if self.hold and b"Action=StopInstances" in body:
            self.held.set()
            self.release.wait(timeout=30)
        return result


def _spec(gpu: str = "NVIDIA A10G") -> WorkloadSpec:
    """A chat workload that scales to zero with one stopped machine in its pool."""
    return WorkloadSpec.model_validate(
        {
            "name": "chat",
            "slug": "chat",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": 0,
                "max_workers": 2,
                "max_hourly_cost_usd": 3.0,
                "scale_to_zero_timeout_sec": 600,
                "scaling_down_timeout_sec": 30,
                "warm_pool": {"stopped": 1},
                "workers": {"source": "cloud", "cloud_pool": {"gpu_pool": [gpu]}},
            },
        }
    )


def _by_id(instances: list[dict[str, Any]]) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in instances}


def test_a_stopped_replica_survives_a_sigkill_and_serves_again(
    moto_server: ThreadedMotoServer, tmp_path: Path
) -> None:
    host, port = moto_server.get_host_and_port()
    proxy = StopHoldingProxy(upstream_host=host, upstream_port=port)
    proxy.start()
    engine_port = free_port()
    model = _spec().model
    engine = Process(autoscaler_cli("engine-sim", "--port", str(engine_port), "--model", model))
    cluster = f"warm-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "data"
    write_snapshot(CATALOG, snapshot_path(data_dir))
    settings = _config(proxy, cluster, tick_sec=0.5, orphan_grace_sec=3600)
    settings["providers"]["aws"]["engine_address"] = f"127.0.0.1:{engine_port}"
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump(settings))
    db = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"

    async def create() -> None:
        async with open_store(db) as store, session_factory(store)() as s, s.begin():
            await ensure_workload(
                s, project="acme", spec=_spec(), on_drift=OnDrift.RECONCILE, now=datetime.now(UTC)
            )

    async def request_arrives() -> None:
        async with open_store(db) as store, session_factory(store)() as s, s.begin():
            stamp = update(Workload).values(last_request_at=datetime.now(UTC))
            await s.execute(stamp)

    def rows() -> list[LedgerRow]:
        return asyncio.run(_ledger(db))

    argv = _controller_argv(db, config, data_dir)
    with engine:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{engine_port}/health"), what="engine-sim")
        asyncio.run(create())
        first = _start(argv)
        try:  # the pool is refilled: a replica launched, made ready, drained, stopped
            assert proxy.held.wait(timeout=90), "the controller never stopped a machine"
        finally:
            _stop(first, signal.SIGKILL)
        [row] = rows()
        assert phase_of(row) is Phase.PARKING and row.parked_at is None and row.prefill
        assert row.hourly_usd == pytest.approx(A10G.on_demand_usd_per_hour)  # not confirmed
        [(instance_id, state)] = _by_id(asyncio.run(_cloud(proxy, cluster))).items()
        assert instance_id == row.instance_id and state in ("stopping", "stopped")
        proxy.hold = False
        proxy.release.set()

        second = _start(argv)
        try:
            wait_until(
                lambda: phase_of(rows()[0]) is Phase.PARKED, timeout=60, what="the stop confirmed"
            )
            [parked] = rows()
            assert parked.launch_id == row.launch_id
            assert parked.hourly_usd == pytest.approx(stopped_usd_per_hour(A10G))
            assert parked.running_usd_per_hour == pytest.approx(A10G.on_demand_usd_per_hour)

            asyncio.run(request_arrives())  # scale from zero: the stopped machine first

            def resumed_ready() -> bool:
                found = [r for r in rows() if r.launch_id == row.launch_id]
                return bool(found) and phase_of(found[0]) is Phase.READY

            wait_until(resumed_ready, timeout=60, what="the stopped replica started and ready")

            def refilled() -> bool:  # the pool it left: a fresh replica, stopped in turn
                return [phase_of(r) for r in rows()] == [Phase.READY, Phase.PARKED]

            wait_until(refilled, timeout=60, what="the pool refilled")
            ledger = rows()
            cloud = _by_id(asyncio.run(_cloud(proxy, cluster)))
            resumed = next(r for r in ledger if r.launch_id == row.launch_id)
            answer = httpx.post(  # it serves where the started machine is reached
                f"{resumed.url}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
        finally:
            output = _stop(second)
    proxy.stop()
    assert resumed.resumed_at is not None, output
    assert resumed.hourly_usd == pytest.approx(A10G.on_demand_usd_per_hour)
    assert cloud[resumed.instance_id or ""] == "running"
    # One machine per open row, none untracked: the resumed one and the new refill.
    refill = next(r for r in ledger if r.launch_id != row.launch_id)
    assert refill.prefill and refill.hourly_usd == pytest.approx(stopped_usd_per_hour(A10G))
    assert cloud == {resumed.instance_id: "running", refill.instance_id: "stopped"}
    assert all(r.terminated_confirmed_at is None for r in ledger)
    assert answer.status_code == 200, answer.text
