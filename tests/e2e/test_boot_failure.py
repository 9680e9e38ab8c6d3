"""Replicas that pass admission but cannot start, against ``autoscaler run``: each failed
boot is said once, with why, in ``describe``, the API and the SDK, and the service backs
off instead of relaunching (and logging) on every pass.

The failures are the ones a user meets on a machine without the engine installed, made
by the product's own launchers: the local provider running the workload's command on the
host (``launcher: host``) starts ``python3 -m sglang.launch_server …``, which exits at
once with status 1 where SGLang is not installed; a private worker running host processes
(``autoscaler agent --runtime process``) sees the same engine exit, and refuses a vLLM
launch outright where ``vllm`` is not on its ``PATH``. Both processes get a ``PATH`` of
this interpreter's directory and the system's, where neither engine is.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from autoscaler import ManagementClient
from tests.helpers import Process, RunningService, autoscaler_cli, free_port, wait_until

pytestmark = pytest.mark.slow

ADMIN = "ik_sdk_boot-failure-admin-" + "b" * 20
PROJECT = "acme"
NO_ENGINES_PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
SGLANG = {
    "model": "Qwen/Qwen2.5-0.5B-Instruct",
    "backend": "sglang",
    "command": "python3 -m sglang.launch_server --mem-fraction-static 0.8",
}


@dataclass
class Service:
    running: RunningService
    agent: Process
    worker_id: str

    def client(self) -> ManagementClient:
        return ManagementClient(url=self.running.url, token=ADMIN, project=PROJECT)

    def failed_boots(self, slug: str) -> list[dict[str, Any]]:
        with self.client() as mgmt:
            return [d for d in mgmt.decisions(slug, limit=200) if d["kind"] == "boot_failed"]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    api_port, gateway_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    config = tmp_path / "controller.yaml"
    config.write_text(
        "cluster_id: boot-failure\ntick_sec: 1\nproviders:\n"
        "  local: {launcher: host, gpu: NVIDIA A100-SXM4-80GB}\n"
    )
    env = {
        "AUTOSCALER_DATA_DIR": str(tmp_path / "data"),
        "AUTOSCALER_ADMIN_TOKEN": ADMIN,
        "PATH": NO_ENGINES_PATH,
    }
    argv = autoscaler_cli(
        "run", "--api-port", str(api_port), "--gateway-port", str(gateway_port),
        "--config", str(config),
    )  # fmt: skip
    state = tmp_path / "agent"
    agent_argv = autoscaler_cli(
        "agent", "--controller", api, "--token", ADMIN, "--project", PROJECT,
        "--name", "box-without-engines", "--state-dir", str(state), "--runtime", "process",
        "--bind-host", "127.0.0.1", "--heartbeat-seconds", "0.3",
    )  # fmt: skip
    with (
        RunningService(argv, env=env, api_url=api, token=ADMIN, project=PROJECT) as running,
        Process(agent_argv, env=env) as agent,
    ):
        worker = state / "worker.json"
        wait_until(
            lambda: worker.exists() and bool(worker.read_text()),
            timeout=30,
            what="the agent to register",
        )
        yield Service(running, agent, json.loads(worker.read_text())["worker_id"])


def _status_everywhere(service: Service, slug: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workload's status through the SDK and over plain HTTP."""
    with service.client() as mgmt:
        sdk = mgmt.get(slug)["status"]
    raw = httpx.get(
        f"{service.running.url}/v1/projects/{PROJECT}/workloads/{slug}",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    )
    raw.raise_for_status()
    return sdk, raw.json()["status"]


def _wait_for_failed_boots(service: Service, slug: str, count: int) -> list[dict[str, Any]]:
    wait_until(
        lambda: len(service.failed_boots(slug)) >= count,
        timeout=90,
        what=f"{count} failed boots of {slug}",
    )
    return sorted(service.failed_boots(slug), key=lambda d: d["result"]["failures"])


def test_replicas_that_cannot_start_say_why_once_in_describe_the_api_and_the_sdk(
    service: Service,
) -> None:
    with service.client() as mgmt:
        local = mgmt.ensure({"name": "local-sgl", "slug": "local-sgl", **SGLANG})
        on_worker = mgmt.ensure(
            {"name": "box-sgl", "slug": "box-sgl", "worker_id": service.worker_id, **SGLANG}
        )
        refused = mgmt.ensure(
            {
                "name": "box-vllm",
                "slug": "box-vllm",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "command": "vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192",
                "worker_id": service.worker_id,
            }
        )
    assert (local.action, on_worker.action, refused.action) == ("created",) * 3

    # The local engine exits at once: three failed boots, each reported once, the wait
    # before the next launch doubling each time (tick_sec 1), never a launch per pass.
    failed = _wait_for_failed_boots(service, "local-sgl", 3)
    assert [d["result"]["next_launch_in_sec"] for d in failed[:3]] == [1, 2, 4]
    assert len({d["inputs"]["launch_id"] for d in failed}) == len(failed)
    first = failed[0]["result"]["error"]
    assert first.startswith("the engine process exited with status 1; its output is in ")
    output = Path(first.rsplit(" ", 1)[1])
    assert "No module named 'sglang'" in output.read_text()

    sdk, api = _status_everywhere(service, "local-sgl")
    for status in (sdk, api):
        assert (status["desired"], status["ready"]) == (1, 0)
        assert status["phase"] in ("blocked", "scaling")
        assert "failed to start: the engine process exited with status 1" in status["last_error"]
    described = service.running.ok("describe", "local-sgl")
    [line] = [x for x in described.splitlines() if x.startswith("Last error:")]
    assert "failed to start: the engine process exited with status 1" in line
    assert "boot_failed" in described

    # The private worker sees the same engine exit, and refuses a launch it cannot start.
    [exited] = _wait_for_failed_boots(service, "box-sgl", 1)[:1]
    assert exited["result"]["error"] == (
        "exited on the worker: the engine process exited with status 1"
    )
    [cannot] = _wait_for_failed_boots(service, "box-vllm", 1)[:1]
    assert cannot["result"]["error"].startswith("failed on the worker: ")
    assert "'vllm' is not on PATH" in cannot["result"]["error"]
    for slug, why in (("box-sgl", "exited with status 1"), ("box-vllm", "is not on PATH")):
        # Each read may see a newer failed boot than the one before: compare what they say.
        for status in _status_everywhere(service, slug):
            assert f"on worker {service.worker_id} failed to start" in status["last_error"]
            assert why in status["last_error"]
        described = service.running.ok("describe", slug)
        [line] = [x for x in described.splitlines() if x.startswith("Last error:")]
        assert f"on worker {service.worker_id} failed to start" in line and why in line

    # The log: one warning per failed boot, and not a single traceback.
    reported = [
        d["inputs"]["launch_id"]
        for slug in ("local-sgl", "box-sgl", "box-vllm")
        for d in service.failed_boots(slug)
    ]
    log = service.running.stop()
    assert "Traceback" not in log
    for launch_id in reported:
        assert log.count(f"replica {launch_id} on ") == 1, launch_id
