"""A launch on moto's EC2 boots from the script the provisioner rendered: the script is
read back from the instance's user data and run by bash in a sandbox whose nvidia-smi
and docker are fakes (docker's ``run`` starts a real engine-sim with the key it was
given) and whose curl is the real one, pointed at the live management API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aioboto3
import httpx
import pytest
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.config import parse_config
from autoscaler.controller import Controller, build_controller
from autoscaler.decide.inputs import Measured, SignalsRead
from autoscaler.decide.signals import Signals
from autoscaler.reconcile.deps import SignalsSource
from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance
from autoscaler.store.phase import SPOT_NOTICE, Phase, phase_of
from autoscaler.store.workloads import ensure_workload
from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot
from gateway.routes import load_route_table
from providers.bootstrap import min_driver_for
from tests.boot.conftest import HF_TOKEN, BootApiServer
from tests.conftest import ADMIN_TOKEN
from tests.fakes.ec2_proxy import Ec2Proxy
from tests.helpers import free_port, pid_running, recorded_pids, wait_until

pytestmark = pytest.mark.slow

REGION = "us-east-1"
MOTO_AMI = "ami-785db401"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
A10G = Offer(
    provider=ProviderName.AWS,
    region=REGION,
    zone=f"{REGION}a",
    instance_type="g5.xlarge",
    gpu="NVIDIA A10G",
    gpu_count=1,
    vcpus=4,
    memory_gib=16,
    on_demand_usd_per_hour=1.006,
)

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
[[ -n "${FAKE_DRIVER:-}" ]] || exit 9
echo "$FAKE_DRIVER"
"""

# ``docker run`` starts engine-sim on the published host port with the --api-key the
# script put on the command line, in its own session (recorded for the teardown).
FAKE_DOCKER = """#!/usr/bin/env bash
echo "docker $1" >>"$SANDBOX/docker-calls"
case "$1" in
  run)
    shift; port="" key="" seen_image=""
    while (($#)); do
      case "$1" in
        -p) port=${2%%:*}; shift ;;
        --api-key) key=$2; shift ;;
        --name|-v|-e|--env-file|--label|--entrypoint|--restart) shift ;;
      esac
      shift
    done
    setsid "$PYTHON" -m providers.engine_sim --port "$port" --api-key "$key" \\
      --model "$MODEL" --params-b 0.5 --time-scale 50 \\
      </dev/null >"$SANDBOX/engine.log" 2>&1 &
    echo "{\\"pid\\": $!}" >"$SANDBOX/engines/engine.json"
    ;;
  inspect) echo running ;;
esac
"""


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BootApiServer]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AUTOSCALER_ADMIN_TOKEN": ADMIN_TOKEN,
        "HF_TOKEN": HF_TOKEN,
    }.items():
        monkeypatch.setenv(key, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    server = BootApiServer(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    with server:
        yield server


@pytest.fixture
async def store(api: BootApiServer) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with open_store(api.database_url) as engine:
        yield session_factory(engine)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "instance"
    (root / "bin").mkdir(parents=True)
    (root / "engines").mkdir()
    for name, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("docker", FAKE_DOCKER)):
        (root / "bin" / name).write_text(text)
        (root / "bin" / name).chmod(0o755)
    yield root
    for pid in recorded_pids(root / "engines"):  # not our child: killed, then watched go
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait_until(partial(_gone, pid), timeout=10, what=f"engine process {pid} to end")


def _gone(pid: int) -> bool:
    return not pid_running(pid)


@dataclasses.dataclass
class Booted:
    controller: Controller
    row: Instance
    user_data: str
    engine_port: int


async def _launch(
    *,
    api: BootApiServer,
    proxy: Ec2Proxy,
    store: async_sessionmaker[AsyncSession],
    tmp: Path,
    spot: bool = False,
    signals: SignalsSource | None = None,
) -> Booted:
    """Apply a workload pinned to CUDA 12.4, let the controller buy its instance on moto,
    and read the instance's user data back from EC2."""
    engine_port = free_port()
    config = parse_config(
        {
            "cluster_id": f"boot-{uuid.uuid4().hex[:8]}",
            "callback_url": api.url,
            "providers": {
                "aws": {
                    "regions": [REGION],
                    "endpoint_url": proxy.url,
                    "ami_overrides": {"default": MOTO_AMI},
                    "retry_wait_seconds": 0.01,
                    # moto's addresses lead nowhere: the engine is the sandbox's.
                    "engine_address": f"127.0.0.1:{engine_port}",
                }
            },
        },
        source="test",
    )
    offer = dataclasses.replace(A10G, spot_usd_per_hour=0.45) if spot else A10G
    catalog = Snapshot(offers=(offer,), taken_at=datetime.now(UTC), source="test")
    controller = build_controller(
        config, sessions=store, data_dir=tmp, catalog=catalog, signals=signals
    )
    spec = WorkloadSpec.model_validate(
        {
            "name": "chat",
            "slug": "chat",
            "model": MODEL,
            "execution_policy": "autoscaling",
            "execution_policy_config": {
                "min_workers": 1,
                "max_workers": 1,
                "max_hourly_cost_usd": 2.0,
                "allow_spot_instances": spot,
                "workers": {
                    "source": "cloud",
                    "cloud_pool": {"gpu_pool": ["NVIDIA A10G"], "allowed_cuda_versions": ["12.4"]},
                },
            },
        }
    )
    async with store() as s, s.begin():
        await ensure_workload(
            s, project="acme", spec=spec, on_drift=OnDrift.RECONCILE, now=datetime.now(UTC)
        )
    await controller.step()
    [row] = await _rows(store)
    assert row.instance_id is not None and phase_of(row) is Phase.BOOTING
    async with aioboto3.Session().client("ec2", region_name=REGION, endpoint_url=proxy.url) as c:
        attribute: Any = await c.describe_instance_attribute(
            InstanceId=row.instance_id, Attribute="userData"
        )
    user_data = base64.b64decode(attribute["UserData"]["Value"]).decode()
    return Booted(controller, row, user_data, engine_port)


async def _rows(store: async_sessionmaker[AsyncSession]) -> list[Instance]:
    async with store() as s:
        return list(await s.scalars(select(Instance).order_by(Instance.intent_at)))


async def _row(store: async_sessionmaker[AsyncSession], launch_id: str) -> Instance:
    async with store() as s:
        row = await s.get(Instance, launch_id)
    assert row is not None
    return row


async def _run_on_instance(
    booted: Booted, sandbox: Path, *, driver: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The user data, run as the instance would, with this machine's paths and port."""
    script = (
        booted.user_data.replace("STATE_DIR=/var/lib/autoscaler", f"STATE_DIR={sandbox / 'state'}")
        .replace("CACHE_DIR=/var/lib/autoscaler/", f"CACHE_DIR={sandbox}/")
        .replace("ENGINE_PORT=8000", f"ENGINE_PORT={booted.engine_port}")
        .replace("POLL_SECONDS=5", "POLL_SECONDS=1")
        .replace("HEALTH_TIMEOUT_SECONDS=1800", "HEALTH_TIMEOUT_SECONDS=60")
    )
    (sandbox / "boot.sh").write_text(script)
    env = {
        "PATH": f"{sandbox / 'bin'}:/usr/bin:/bin",
        "SANDBOX": str(sandbox),
        "PYTHON": sys.executable,
        "MODEL": MODEL,
        "FAKE_DRIVER": driver,
        **(env or {}),
    }
    return await asyncio.to_thread(
        subprocess.run,
        ["bash", str(sandbox / "boot.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_the_rendered_script_boots_an_engine_that_becomes_ready_with_its_key(
    api: BootApiServer, proxy: Ec2Proxy, store: async_sessionmaker[AsyncSession], sandbox: Path
) -> None:
    booted = await _launch(api=api, proxy=proxy, store=store, tmp=sandbox.parent)
    key = booted.row.engine_key
    assert key is not None
    assert f"CALLBACK_URL={api.url}/v1/boot/{booted.row.launch_id}\n" in booted.user_data
    assert key not in booted.user_data
    try:
        done = await _run_on_instance(booted, sandbox, driver="560.35.03")

        assert done.returncode == 0, done.stderr
        assert key not in done.stderr and HF_TOKEN not in done.stderr
        env_file = sandbox / "state" / f"engine-{booted.row.launch_id}.env"
        assert env_file.read_text() == f"ENGINE_API_KEY={key}\nHF_TOKEN={HF_TOKEN}\n"
        assert api.wakes == 1  # the ready report woke the controller
        assert (await _row(store, booted.row.launch_id)).ready_at is None

        await booted.controller.step()  # its own health check, with the engine key

        row = await _row(store, booted.row.launch_id)
        assert phase_of(row) is Phase.READY and row.last_error is None
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{booted.engine_port}") as c:
            keyed = await c.post(
                "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}
            )
            keyless = await c.post("/v1/chat/completions", json=chat)
        assert keyed.status_code == 200 and keyed.json()["choices"]
        assert keyless.status_code == 401
    finally:
        await booted.controller.close()


async def test_a_driver_too_old_ends_with_last_error_and_the_instance_terminated(
    api: BootApiServer, proxy: Ec2Proxy, store: async_sessionmaker[AsyncSession], sandbox: Path
) -> None:
    booted = await _launch(api=api, proxy=proxy, store=store, tmp=sandbox.parent)
    try:
        done = await _run_on_instance(booted, sandbox, driver="535.104.05")

        assert done.returncode == 1
        reason = (
            f"NVIDIA driver 535.104.05 is older than {min_driver_for('12.4')}, "
            "which CUDA 12.4 needs"
        )
        row = await _row(store, booted.row.launch_id)
        assert row.last_error == f"boot failed: {reason}"
        assert not (sandbox / "docker-calls").exists() and recorded_pids(sandbox / "engines") == []

        await booted.controller.step()  # liveness: terminate, skip the offer
        await booted.controller.step()  # the provider's word: gone

        row = await _row(store, booted.row.launch_id)
        assert row.ready_at is None and row.terminated_confirmed_at is not None
        assert row.last_error == f"boot failed: {reason}"
        assert A10G.key in booted.controller.deps.memory.unavailable
        async with aioboto3.Session().client(
            "ec2", region_name=REGION, endpoint_url=proxy.url
        ) as c:
            found: Any = await c.describe_instances(InstanceIds=[row.instance_id or ""])
        [instance] = [i for r in found["Reservations"] for i in r["Instances"]]
        assert instance["State"]["Name"] in ("shutting-down", "terminated")
        assert len(await _rows(store)) == 1  # the only offer is skipped: nothing else bought
    finally:
        await booted.controller.close()


class FakeMetadata:
    """EC2's instance metadata service as a spot instance sees it (IMDSv2): a token from
    ``PUT /latest/api/token``, then ``spot/instance-action`` answers 404 until the
    interruption is scheduled (:attr:`notice`)."""

    TOKEN = "imds-token-1"

    def __init__(self) -> None:
        self.notice: dict[str, str] | None = None
        self.asked = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self._action)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        if not request.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return web.Response(status=400)
        return web.Response(text=self.TOKEN)

    async def _action(self, request: web.Request) -> web.Response:
        self.asked += 1
        if request.headers.get("X-aws-ec2-metadata-token") != self.TOKEN:
            return web.Response(status=401)
        if self.notice is None:
            return web.Response(status=404, text="Not Found")
        return web.json_response(self.notice)


@pytest.fixture
async def metadata() -> AsyncIterator[FakeMetadata]:
    server = FakeMetadata()
    await server.start()
    yield server
    await server.stop()


class InFlight:
    """The gateway's word on the workload: how many requests are in flight."""

    def __init__(self) -> None:
        self.count = 0

    async def signals(self) -> SignalsRead:
        return SignalsRead({("acme", "chat"): Measured(signals=Signals(in_flight=self.count))})


async def _until(check: Any, what: str) -> None:
    """Wait (30 s at most) until the async ``check`` holds: the event, polled for."""

    async def poll() -> None:
        while True:
            if await check():
                return
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(poll(), timeout=30)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _stop_watcher(sandbox: Path) -> None:
    for pid_file in (sandbox / "state").glob("spot-notice-*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


async def test_a_spot_notice_drains_and_replaces_the_replica_before_the_machine_goes(
    api: BootApiServer,
    proxy: Ec2Proxy,
    store: async_sessionmaker[AsyncSession],
    sandbox: Path,
    metadata: FakeMetadata,
) -> None:
    in_flight = InFlight()
    booted = await _launch(
        api=api, proxy=proxy, store=store, tmp=sandbox.parent, spot=True, signals=in_flight
    )
    assert booted.row.spot
    assert "\nSPOT_NOTICE=ec2\n" in booted.user_data
    key = booted.row.engine_key or ""
    try:
        done = await _run_on_instance(
            booted, sandbox, driver="580.95.05", env={"AUTOSCALER_EC2_METADATA_URL": metadata.url}
        )
        assert done.returncode == 0, done.stderr
        await booted.controller.step()  # healthy: ready, and the gateway would route to it
        assert phase_of(await _row(store, booted.row.launch_id)) is Phase.READY
        await _until(_asked(metadata), "the watcher to poll the metadata service")

        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": 256,
            "stream": True,
        }
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{booted.engine_port}") as client,
            client.stream(
                "POST",
                "/v1/chat/completions",
                json=chat,
                headers={"Authorization": f"Bearer {key}"},
            ) as response,
        ):
            lines = response.aiter_lines()
            first = await anext(lines)
            in_flight.count = 1  # the gateway's count while this request streams

            metadata.notice = {"action": "terminate", "time": "2026-11-30T09:02:00Z"}
            await _until(_noticed(store, booted.row.launch_id), "the notice to reach the API")

            row = await _row(store, booted.row.launch_id)
            assert phase_of(row) is Phase.DRAINING  # at once, before the controller's pass
            async with store() as s:
                table = await load_route_table(s, now=datetime.now(UTC))
            route = table.workloads[("acme", "chat")]
            assert [r.key for r in route.replicas] == [row.launch_id]
            assert route.ready == ()  # the gateway sends it nothing new

            await booted.controller.step()  # replace now, away from this spot market

            old, replacement = await _rows(store)
            assert old.launch_id == row.launch_id and old.terminate_requested_at is None
            assert replacement.instance_id is not None and not replacement.spot
            assert await _ec2_state(proxy, row.instance_id) == "running"  # not gone yet
            rest = [line async for line in lines]
        assert response.status_code == 200
        assert first.startswith("data: ") and rest[-2:] == ["data: [DONE]", ""]

        in_flight.count = 0
        await booted.controller.step()  # drained: now it is terminated
        old = await _row(store, row.launch_id)
        assert old.terminate_requested_at is not None
        assert (old.last_error or "").startswith(f"{SPOT_NOTICE}ec2 spot interruption notice:")
    finally:
        _stop_watcher(sandbox)
        await booted.controller.close()


def _asked(metadata: FakeMetadata) -> Any:
    async def check() -> bool:
        return metadata.asked > 0

    return check


def _noticed(store: async_sessionmaker[AsyncSession], launch_id: str) -> Any:
    async def check() -> bool:
        row = await _row(store, launch_id)
        return (row.last_error or "").startswith(SPOT_NOTICE)

    return check


async def _ec2_state(proxy: Ec2Proxy, instance_id: str | None) -> str:
    async with aioboto3.Session().client("ec2", region_name=REGION, endpoint_url=proxy.url) as c:
        found: Any = await c.describe_instances(InstanceIds=[instance_id or ""])
    [instance] = [i for r in found["Reservations"] for i in r["Instances"]]
    return str(instance["State"]["Name"])
