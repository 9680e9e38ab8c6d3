"""``autoscaler workers register|list`` and ``autoscaler agent`` against a live API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from autoscaler.cli import main
from tests.agent.conftest import WorkersApiServer
from tests.agent.test_agent import assign, create_workload, ledger_row
from tests.conftest import ADMIN_TOKEN
from tests.helpers import Process, autoscaler_cli, pid_running


@pytest.fixture
def cli_env(api: WorkersApiServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"AUTOSCALER_URL": api.url, "AUTOSCALER_SDK_TOKEN": ADMIN_TOKEN}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_register_prints_the_agent_command_and_list_shows_the_worker(
    cli_env: dict[str, str],
) -> None:
    runner = CliRunner()

    registered = runner.invoke(main, ["workers", "register", "-p", "acme", "--name", "box-a"])
    listed = runner.invoke(main, ["workers", "list", "-p", "acme"])

    assert registered.exit_code == 0, registered.output
    assert "--token ik_wrk_" in registered.output
    assert listed.exit_code == 0, listed.output
    header, row = listed.output.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "LAST", "HEARTBEAT", "GPUS", "REPLICAS"]
    assert row.split()[1:] == ["box-a", "lost", "never", "none", "0"]


def test_list_without_a_token_says_how_to_get_one(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOSCALER_SDK_TOKEN")
    result = CliRunner().invoke(main, ["workers", "list", "-p", "acme"])
    assert result.exit_code == 2
    assert "AUTOSCALER_SDK_TOKEN" in result.output


@pytest.fixture
def agent_state(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "agent-state"
    yield directory
    for record in (directory / "replicas").glob("*.json"):
        pid = json.loads(record.read_text())["pid"]
        if pid_running(pid):
            os.killpg(pid, signal.SIGKILL)
        # Not our child (the agent started it): init reaps it, which takes a moment.
        for _ in range(100):
            if not pid_running(pid):
                break
            time.sleep(0.05)
        assert not pid_running(pid), f"replica process {pid} survived the test"


async def test_the_agent_command_registers_itself_and_serves_an_assignment(
    api: WorkersApiServer,
    store: async_sessionmaker[AsyncSession],
    agent_state: Path,
) -> None:
    await create_workload(api)
    argv = autoscaler_cli(
        "agent",
        "--controller",
        api.url,
        "--token",
        ADMIN_TOKEN,
        "--project",
        "acme",
        "--state-dir",
        str(agent_state),
        "--runtime",
        "engine-sim",
        "--bind-host",
        "127.0.0.1",
        "--heartbeat-seconds",
        "0.2",
        "--time-scale",
        "50",
    )
    with Process(argv) as agent:
        saved = agent_state / "worker.json"
        for _ in range(200):
            if saved.exists() and saved.read_text():
                break
            await asyncio.sleep(0.05)
        worker_id = json.loads(saved.read_text())["worker_id"]
        assert oct(saved.stat().st_mode & 0o777) == "0o600"

        await assign(store, worker_id=worker_id, launch_id="lch_cli_1")
        for _ in range(300):
            if (await ledger_row(store, "lch_cli_1")).ready_at is not None:
                break
            await asyncio.sleep(0.05)
        output = agent.stop()

    row = await ledger_row(store, "lch_cli_1")
    assert row.ready_at is not None, output
    assert f"worker {worker_id} reporting to {api.url}" in output
    assert ADMIN_TOKEN not in output


def test_the_agent_logs_json_lines_at_the_level_asked_like_the_other_roles(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    secret = "ik_wrk_0123456789abcdef_" + "s3cret" * 4
    argv = autoscaler_cli(
        "agent",
        "--controller",
        f"http://127.0.0.1:{unused_tcp_port}",  # nothing listens: every tick fails
        "--token",
        secret,
        "--state-dir",
        str(tmp_path / "agent"),
        "--runtime",
        "engine-sim",
        "--heartbeat-seconds",
        "0.2",
        "--log-format",
        "json",
        "--log-level",
        "warning",
    )
    with Process(argv) as agent:
        assert agent.proc is not None and agent.proc.stdout is not None
        entries: list[dict[str, str]] = []
        for line in agent.proc.stdout:  # until the first failed tick is logged
            if line.startswith("{"):
                entries.append(json.loads(line))
                break
        output = agent.stop()

    [entry] = entries
    assert entry["level"] == "warning"
    assert entry["logger"] == "providers.agent"
    assert entry["msg"].startswith("agent tick failed, retrying")
    assert entry["ts"].endswith("Z")
    assert secret not in output
