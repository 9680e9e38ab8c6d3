"""The worker agent against a real management API: register, heartbeat, run assignments.

The engine is engine-sim in a real process; the test reaches it over HTTP at the address
the agent reported. Assignments are written into the ledger as the controller would.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.store import workloads
from autoscaler.store.models import Instance
from catalog.model import Offer
from providers.agent import (
    Agent,
    AgentConfig,
    GpuInfo,
    probe_gpus,
    register_worker,
    worker_id_from_secret,
    worker_is_lost,
)
from providers.base import BootSpec
from providers.local import EngineSimLauncher, LaunchCommand
from tests.agent.conftest import SteppedNow, WorkersApiServer
from tests.conftest import ADMIN_TOKEN
from tests.helpers import kill_recorded, pid_running, recorded_pids

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ENGINE_KEY = "ek-agent-" + "a" * 24
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
A10G = [GpuInfo(name="NVIDIA A10G", memory_mib=23028, driver_version="560.35.03")]


@pytest.fixture
def agent_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "agent"
    yield directory
    kill_recorded(directory)


@dataclass
class Worker:
    worker_id: str
    secret: str


@pytest.fixture
async def worker(api: WorkersApiServer) -> Worker:
    creds = await register_worker(
        controller_url=api.url, control_token=ADMIN_TOKEN, project="acme", name="gpu-box-1"
    )
    return Worker(creds.worker_id, creds.secret)


@pytest.fixture
async def make_agent(api: WorkersApiServer, worker: Worker, agent_dir: Path) -> AsyncIterator[Any]:
    agents: list[Agent] = []

    def make(launcher: Any = None) -> Agent:
        agent = Agent(
            AgentConfig(
                controller_url=api.url,
                worker_id=worker.worker_id,
                secret=worker.secret,
                state_dir=agent_dir,
                heartbeat_seconds=0.1,
                stop_grace_seconds=5.0,
            ),
            launcher=launcher or EngineSimLauncher(time_scale=50.0),
            gpu_probe=lambda: A10G,
        )
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.aclose()


async def create_workload(api: WorkersApiServer, slug: str = "support-bot") -> None:
    async with httpx.AsyncClient(base_url=api.url, headers=ADMIN) as client:
        response = await client.put(
            f"/v1/projects/acme/workloads/{slug}",
            json={"name": "Support bot", "model": MODEL, "backend": "vllm"},
        )
    assert response.status_code == 201, response.text


async def assign(
    sessions: async_sessionmaker[AsyncSession],
    *,
    worker_id: str,
    launch_id: str,
    engine_command: list[str] | None = None,
) -> None:
    """Write an assignment as the controller does: a ledger row with worker_id set."""
    async with sessions() as s, s.begin():
        row = await workloads.get_workload(s, project="acme", slug="support-bot")
        assert row is not None
        s.add(
            Instance(
                launch_id=launch_id,
                workload_id=row.id,
                project="acme",
                workload_slug="support-bot",
                spec_generation=row.generation,
                provider="private",
                offer_key=f"private/{worker_id}",
                region="private",
                zone=worker_id,
                instance_type="worker",
                gpu="NVIDIA A10G",
                gpu_count=1,
                spot=False,
                hourly_usd=0.0,
                worker_id=worker_id,
                engine_key=ENGINE_KEY,
                intent_at=datetime.now(UTC),
                engine_command=engine_command,
            )
        )


async def ledger_row(sessions: async_sessionmaker[AsyncSession], launch_id: str) -> Instance:
    async with sessions() as s:
        row = await s.get(Instance, launch_id)
        assert row is not None
        return row


async def tick_until(agent: Agent, state: str, launch_id: str) -> list[dict[str, Any]]:
    for _ in range(200):
        reports = await agent.tick()
        if any(r["launch_id"] == launch_id and r["state"] == state for r in reports):
            return reports
        await asyncio.sleep(0.05)
    raise AssertionError(f"{launch_id} never reached {state}")


async def test_register_shows_the_secret_once_and_lists_the_worker_as_never_heard_from(
    api: WorkersApiServer, worker: Worker
) -> None:
    assert worker.worker_id.startswith("wrk_")
    assert worker_id_from_secret(worker.secret) == worker.worker_id
    async with httpx.AsyncClient(base_url=api.url, headers=ADMIN) as client:
        listed = (await client.get("/v1/projects/acme/workers")).json()["items"]

    assert [w["id"] for w in listed] == [worker.worker_id]
    assert listed[0]["name"] == "gpu-box-1"
    assert listed[0]["status"] == "lost"
    assert listed[0]["last_heartbeat_at"] is None
    assert worker.secret not in json.dumps(listed)


async def test_the_agent_runs_an_assigned_replica_reports_it_ready_and_stops_it(
    api: WorkersApiServer,
    worker: Worker,
    store: async_sessionmaker[AsyncSession],
    make_agent: Any,
    agent_dir: Path,
) -> None:
    await create_workload(api)
    await assign(store, worker_id=worker.worker_id, launch_id="lch_agent_1")
    agent: Agent = make_agent()

    await tick_until(agent, "ready", "lch_agent_1")

    row = await ledger_row(store, "lch_agent_1")
    assert row.launched_at is not None
    assert row.ready_at is not None
    assert row.url is not None
    assert row.url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient(base_url=row.url, timeout=10.0) as engine:
        served = await engine.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
            headers={"Authorization": f"Bearer {ENGINE_KEY}"},
        )
        denied = await engine.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert served.status_code == 200
    assert denied.status_code == 401

    async with httpx.AsyncClient(base_url=api.url, headers=ADMIN) as client:
        [listed] = (await client.get("/v1/projects/acme/workers")).json()["items"]
    assert listed["status"] == "alive"
    assert listed["gpus"][0]["name"] == "NVIDIA A10G"
    assert listed["replicas"] == 1

    [pid] = recorded_pids(agent_dir)
    async with store() as s, s.begin():
        requested = await s.get(Instance, "lch_agent_1")
        assert requested is not None
        requested.terminate_requested_at = datetime.now(UTC)
    await agent.tick()

    assert not pid_running(pid)
    row = await ledger_row(store, "lch_agent_1")
    assert row.terminated_confirmed_at is not None
    assert row.last_error is None


async def test_a_restarted_agent_adopts_its_running_replica_instead_of_starting_another(
    api: WorkersApiServer,
    worker: Worker,
    store: async_sessionmaker[AsyncSession],
    make_agent: Any,
    agent_dir: Path,
) -> None:
    await create_workload(api)
    await assign(store, worker_id=worker.worker_id, launch_id="lch_agent_2")
    await tick_until(make_agent(), "ready", "lch_agent_2")

    reports = await tick_until(make_agent(), "ready", "lch_agent_2")

    assert len(recorded_pids(agent_dir)) == 1
    assert [r["launch_id"] for r in reports] == ["lch_agent_2"]


@dataclass(frozen=True)
class Crashing:
    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        return LaunchCommand(("bash", "-c", "exit 7"))


async def test_a_replica_that_exits_is_reported_with_its_status_and_confirmed_gone(
    api: WorkersApiServer,
    worker: Worker,
    store: async_sessionmaker[AsyncSession],
    make_agent: Any,
) -> None:
    await create_workload(api)
    await assign(store, worker_id=worker.worker_id, launch_id="lch_agent_3")

    await tick_until(make_agent(Crashing()), "exited", "lch_agent_3")

    row = await ledger_row(store, "lch_agent_3")
    assert row.terminated_confirmed_at is not None
    assert row.last_error == (
        "boot failed: exited on the worker: the engine process exited with status 7"
    )


async def test_heartbeats_need_the_workers_own_secret(
    api: WorkersApiServer, worker: Worker
) -> None:
    other = await register_worker(controller_url=api.url, control_token=ADMIN_TOKEN, project="acme")
    url = f"{api.url}/v1/workers/{worker.worker_id}/heartbeat"
    async with httpx.AsyncClient() as client:
        missing = await client.post(url, json={})
        foreign = await client.post(
            url, json={}, headers={"Authorization": f"Bearer {other.secret}"}
        )
        control = await client.post(url, json={}, headers=ADMIN)
        own = await client.post(url, json={}, headers={"Authorization": f"Bearer {worker.secret}"})
    assert [missing.status_code, foreign.status_code, control.status_code] == [401, 401, 401]
    assert foreign.json()["error"]["code"] == "unauthorized"
    assert own.status_code == 200


async def test_a_worker_that_stops_heartbeating_is_listed_as_lost(
    api: WorkersApiServer, worker: Worker, clock: SteppedNow
) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        beat = await client.post(
            f"/v1/workers/{worker.worker_id}/heartbeat",
            json={"gpus": [{"name": "NVIDIA L4", "memory_mib": 23034}]},
            headers={"Authorization": f"Bearer {worker.secret}"},
        )
        assert beat.json()["worker"]["status"] == "alive"

        clock.offset = timedelta(seconds=31)
        [listed] = (await client.get("/v1/projects/acme/workers", headers=ADMIN)).json()["items"]

    assert listed["status"] == "lost"
    assert listed["gpus"] == [{"name": "NVIDIA L4", "memory_mib": 23034, "driver_version": None}]


def test_lost_is_decided_by_the_last_heartbeat_now_and_the_timeout() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    timeout = timedelta(seconds=30)
    assert worker_is_lost(last_heartbeat_at=None, now=now, timeout=timeout)
    assert not worker_is_lost(last_heartbeat_at=now - timeout, now=now, timeout=timeout)
    assert worker_is_lost(
        last_heartbeat_at=now - timeout - timedelta(seconds=1), now=now, timeout=timeout
    )


def test_gpus_come_from_nvidia_smi_or_are_none(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        textwrap.dedent(
            """\
            #!/usr/bin/env bash
            echo "NVIDIA A100-SXM4-80GB, 81920, 550.54.15"
            echo "NVIDIA A100-SXM4-80GB, 81920, 550.54.15"
            """
        )
    )
    fake.chmod(0o755)

    gpus = probe_gpus(str(fake))

    assert gpus == [GpuInfo("NVIDIA A100-SXM4-80GB", 81920, "550.54.15")] * 2
    assert probe_gpus(str(tmp_path / "absent")) == []


async def test_an_assignment_carries_the_workloads_stored_hf_token(
    api: WorkersApiServer, worker: Worker, store: async_sessionmaker[AsyncSession]
) -> None:
    token = "hf_" + "WoRkEr" * 6
    async with httpx.AsyncClient(base_url=api.url, headers=ADMIN) as client:
        made = await client.post(
            "/v1/projects/acme/secrets", json={"name": "hf-acme", "value": token}
        )
        assert made.status_code == 201, made.text
        applied = await client.put(
            "/v1/projects/acme/workloads/support-bot",
            json={"name": "Support bot", "model": MODEL, "hf_token_secret": "hf-acme"},
        )
        assert applied.status_code == 201, applied.text
    await assign(store, worker_id=worker.worker_id, launch_id="lch_agent_hf")
    async with httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {worker.secret}"}
    ) as client:
        answer = await client.get(f"/v1/workers/{worker.worker_id}/assignments")
    [item] = answer.json()["items"]
    assert item["secrets"]["HF_TOKEN"] == token
    assert token not in json.dumps(item["boot"])


async def test_an_assignment_booted_to_sleep_carries_the_sleep_flags(
    api: WorkersApiServer, worker: Worker, store: async_sessionmaker[AsyncSession]
) -> None:
    """A warm pool that may sleep records the sleep flag in the intent's command; the
    agent's boot must carry it too, or the engine could never be put to sleep."""
    async with httpx.AsyncClient(base_url=api.url, headers=ADMIN) as client:
        applied = await client.put(
            "/v1/projects/acme/workloads/support-bot",
            json={"name": "Support bot", "model": MODEL},
        )
        assert applied.status_code == 201, applied.text
    recorded = ["vllm", "serve", MODEL, "--enable-sleep-mode"]
    await assign(store, worker_id=worker.worker_id, launch_id="lch_sleepy", engine_command=recorded)
    await assign(store, worker_id=worker.worker_id, launch_id="lch_awake")
    async with httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {worker.secret}"}
    ) as client:
        answer = await client.get(f"/v1/workers/{worker.worker_id}/assignments")
    boots = {item["launch_id"]: item["boot"] for item in answer.json()["items"]}
    assert "--enable-sleep-mode" in boots["lch_sleepy"]["command"]
    assert boots["lch_sleepy"]["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-sleep-mode" not in boots["lch_awake"]["command"]
