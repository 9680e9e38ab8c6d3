"""``autoscaler run`` with the simulated cloud as its provider (the example config): a
70B workload is placed on a multi-GPU catalog offer at its catalog price, boots with
the matching tensor-parallel flag in its command line, becomes ready, answers through
the gateway, and its engine process ends with the workload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from autoscaler import ManagementClient
from catalog.snapshot import load_bundled
from tests.helpers import RunningService, free_port, run_argv, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
ADMIN = "ik_sdk_e2e-simcloud-admin-" + "s" * 20

pytestmark = pytest.mark.slow


def _engine_running(port: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"providers.engine_sim" in argv and str(port).encode() in argv:
            return True
    return False


def _service(tmp_path: Path, **overrides: Any) -> tuple[RunningService, str, int]:
    """``autoscaler run`` with the example config, boots of a few seconds."""
    config = yaml.safe_load((EXAMPLES / "config-simulated-cloud.yaml").read_text())
    config["tick_sec"] = 1
    config.update(overrides)
    config["providers"]["simulated"]["boot_time_scale"] = 0.02
    config_file = tmp_path / "controller.yaml"
    config_file.write_text(yaml.safe_dump(config))
    api_port, gateway_port = free_port(), free_port()
    argv = run_argv(api_port=api_port, gateway_port=gateway_port, config=config_file)
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    api = f"http://127.0.0.1:{api_port}"
    service = RunningService(argv, env=env, api_url=api, token=ADMIN, project="demo")
    return service, api, gateway_port


def _chat(gateway: str, *, key: str, model: str) -> httpx.Response:
    with httpx.Client(timeout=30) as client:

        def chat() -> httpx.Response:
            return client.post(
                f"{gateway}/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4},
            )  # fmt: skip

        wait_until(lambda: chat().status_code != 401, timeout=10, what="the new data key")
        return chat()


def test_a_405b_model_no_machine_of_the_pool_holds_is_served_by_a_group(
    tmp_path: Path,
) -> None:
    """405B in BF16 on a pool of H100s: two 8-GPU machines in one zone, a leader and a
    worker, bought whole; the leader alone is routed to and answers."""
    # Two 8 x H100 machines cost $184-197/h in the catalog; three 4 x H100 ones $147/h.
    service, api, gateway_port = _service(tmp_path, fleet_max_hourly_cost_usd=250)
    model = "meta-llama/Llama-3.1-405B-Instruct"
    spec = {
        "name": "big", "slug": "big", "model": model, "execution_policy": "autoscaling",
        "execution_policy_config": {
            "min_workers": 1, "max_workers": 1, "max_hourly_cost_usd": 200,
            "workers": {"source": "cloud",
                        "cloud_pool": {"gpu_pool": ["NVIDIA H100 80GB HBM3"]}},
        },
    }  # fmt: skip
    with service, ManagementClient(url=api, token=ADMIN, project="demo") as mgmt:
        mgmt.ensure(spec)
        wait_until(
            lambda: mgmt.status("big").actual_phase == "running",
            timeout=120,
            what="the 405B group to be ready",
        )
        members = mgmt.replicas("big")
        assert sorted(m["role"] for m in members) == ["leader", "worker"]
        assert len({m["group"] for m in members}) == 1 and len({m["zone"] for m in members}) == 1
        assert len({m["offer"] for m in members}) == 1
        leader = next(m for m in members if m["role"] == "leader")
        assert "--pipeline-parallel-size 2" in leader["command"]
        assert "--tensor-parallel-size 8" in leader["command"]
        status = mgmt.get("big")["status"]
        assert (status["ready"], status["desired"]) == (1, 1)
        key = mgmt.create_key("big").secret
        gateway = f"http://127.0.0.1:{gateway_port}/endpoint/demo/big/v1"
        answer = _chat(gateway, key=key, model=model)
        assert answer.status_code == 200, answer.text
        ports = [int(str(m["url"]).rsplit(":", 1)[1]) for m in members]
        assert all(_engine_running(port) for port in ports)
        mgmt.delete("big")
        wait_until(
            lambda: not any(_engine_running(p) for p in ports), timeout=60, what="engines to stop"
        )


def test_a_70b_workload_is_placed_started_and_served_on_the_simulated_cloud(
    tmp_path: Path,
) -> None:
    service_, api, gateway_port = _service(tmp_path)
    spec_file = EXAMPLES / "llama-70b-simulated.yaml"
    model = yaml.safe_load(spec_file.read_text())["model"]
    with service_ as service, ManagementClient(url=api, token=ADMIN, project="demo") as mgmt:
        assert "created" in service.ok("apply", "-f", str(spec_file))
        wait_until(
            lambda: mgmt.status("llama-70b").actual_phase == "running",
            timeout=120,
            what="the 70B replica to be ready",
        )
        [replica] = mgmt.replicas("llama-70b")
        gpus = replica["gpu_count"]
        assert replica["provider"] == "simulated" and replica["offer"].startswith("simulated/")
        assert gpus > 1, replica
        prices = {o.key.split("/", 1)[1]: o.on_demand_usd_per_hour for o in load_bundled().offers}
        assert replica["hourly_usd"] == prices[replica["offer"].split("/", 1)[1]]
        assert f"--tensor-parallel-size {gpus}" in replica["command"]
        assert "--api-key ****" in replica["command"]
        described = service.ok("describe", "llama-70b")
        assert f"command: vllm serve {model}" in described
        assert "Phase:       running (desired running)" in described
        assert "served by the simulated cloud" in described

        key = mgmt.create_key("llama-70b").secret
        gateway = f"http://127.0.0.1:{gateway_port}/endpoint/demo/llama-70b/v1"
        answer = _chat(gateway, key=key, model=model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]

        port = int(str(replica["url"]).rsplit(":", 1)[1])
        assert _engine_running(port)
        assert "deleted" in service.ok("delete", "llama-70b")
        wait_until(lambda: not _engine_running(port), timeout=60, what="the engine to stop")
        log = service.stop()
    assert "providers: simulated" in log
