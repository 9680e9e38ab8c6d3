"""``autoscaler run`` and a real ``autoscaler agent`` registered as a private worker: an
autoscaling workload sourcing that worker gets its replica started by the agent
(engine-sim), ready in ``describe`` and answering through the gateway with a data key;
deleting the workload stops the engine. No process outlives the test."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import (
    Process,
    RunningService,
    autoscaler_cli,
    free_port,
    pid_running,
    wait_until,
)

pytestmark = pytest.mark.slow

ADMIN = "ik_sdk_e2e-private-admin-" + "p" * 20
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def _replica_pids(state_dir: Path) -> list[int]:
    """The engine processes the agent recorded (one JSON file per replica)."""
    return [json.loads(p.read_text())["pid"] for p in (state_dir / "replicas").glob("*.json")]


@pytest.fixture
def agent_state(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "agent-state"
    yield directory
    for pid in _replica_pids(directory):  # a failed test must not leave an engine running
        if pid_running(pid):
            os.killpg(pid, signal.SIGKILL)
        wait_until(partial(_gone, pid), timeout=10, what=f"engine process {pid} to end")


def _gone(pid: int) -> bool:
    return not pid_running(pid)


def test_a_private_worker_serves_the_workload_through_the_gateway_until_deleted(
    tmp_path: Path, agent_state: Path
) -> None:
    api_port, gateway_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    config = tmp_path / "controller.yaml"
    config.write_text("cluster_id: private-e2e\ntick_sec: 1\nproviders: {}\n")  # no cloud
    service_argv = autoscaler_cli(
        "run",
        "--api-port",
        str(api_port),
        "--gateway-port",
        str(gateway_port),
        "--config",
        str(config),
    )
    agent_argv = autoscaler_cli(
        "agent",
        "--controller",
        api,
        "--token",
        ADMIN,
        "--project",
        "acme",
        "--name",
        "gpu-box",
        "--state-dir",
        str(agent_state),
        "--runtime",
        "engine-sim",
        "--bind-host",
        "127.0.0.1",
        "--heartbeat-seconds",
        "0.3",
        "--time-scale",
        "50",
    )
    with RunningService(service_argv, env=env, api_url=api, token=ADMIN, project="acme") as service:
        cli = service.ok

        with Process(agent_argv, env=env) as agent:
            saved = agent_state / "worker.json"
            wait_until(
                lambda: saved.exists() and bool(saved.read_text()),
                timeout=30,
                what="the agent to register",
            )
            worker_id = json.loads(saved.read_text())["worker_id"]
            spec = {
                "name": "Private chat",
                "slug": "private-chat",
                "model": MODEL,
                "execution_policy": "autoscaling",
                "execution_policy_config": {
                    "min_workers": 1,
                    "max_workers": 1,
                    "workers": {"source": "private", "private_worker_ids": [worker_id]},
                },
            }
            spec_file = tmp_path / "private-chat.yaml"
            spec_file.write_text(yaml.safe_dump(spec))
            assert "created" in cli("apply", "-f", str(spec_file))

            headers = {"Authorization": f"Bearer {ADMIN}"}
            replicas_url = f"{api}/v1/projects/acme/workloads/private-chat/replicas"

            def ready() -> list[dict[str, object]]:
                items = httpx.get(replicas_url, headers=headers, timeout=5).json()["items"]
                return [r for r in items if r["phase"] == "ready"]

            wait_until(lambda: len(ready()) == 1, timeout=60, what="a ready replica")
            [replica] = ready()
            described = cli("describe", "private-chat")
            assert str(replica["url"]) in described and " ready " in described
            [engine_pid] = _replica_pids(agent_state)
            assert pid_running(engine_pid)

            key = cli("keys", "create", "private-chat").split("secret:")[1].split()[0]
            gateway = f"http://127.0.0.1:{gateway_port}/endpoint/acme/private-chat/v1"
            chat = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }
            with httpx.Client(timeout=30) as client:

                def ask() -> httpx.Response:
                    return client.post(
                        f"{gateway}/chat/completions",
                        headers={"Authorization": f"Bearer {key}"},
                        json=chat,
                    )

                wait_until(lambda: ask().status_code != 401, timeout=10, what="the data key")
                answer = ask()
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"]
                keyless = client.post(f"{gateway}/chat/completions", json=chat)
                assert keyless.status_code == 401

            assert "deleted" in cli("delete", "private-chat")
            wait_until(
                lambda: not pid_running(engine_pid),
                timeout=60,
                what="the agent to stop the engine after the delete",
            )
            agent_log = agent.stop()
        service.stop()
    assert f"worker {worker_id}" in agent_log
    assert ADMIN not in agent_log
