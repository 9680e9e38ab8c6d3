"""``autoscaler run`` on this machine, as the quickstart uses it: apply the fixed chat
example, see engine-sim replicas come up and answer through the gateway, delete the
workload and see every engine process gone."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import RunningService, free_port, run_argv, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
ADMIN = "ik_sdk_e2e-local-admin-" + "z" * 20

pytestmark = pytest.mark.slow


def _engine_pids(port: int) -> list[int]:
    """Processes running engine-sim on ``port`` (from /proc, as ps would show them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"providers.engine_sim" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("gateway_workers", [1, 2])
def test_run_serves_the_fixed_example_on_engine_sim_and_delete_stops_it(
    tmp_path: Path, gateway_workers: int
) -> None:
    """With ``--gateway-workers 2`` the gateway is two processes on one port: the same
    answers, the same key refresh, and its metrics on the management port summed."""
    api_port, gateway_port = free_port(), free_port()
    doc = yaml.safe_load((EXAMPLES / "chat-fixed.yaml").read_text())
    doc["execution_policy_config"]["replicas"] = 2
    spec_file = tmp_path / "chat.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    config = tmp_path / "controller.yaml"
    config.write_text("cluster_id: laptop\ntick_sec: 1\nproviders:\n  local: {}\n")
    argv = run_argv(
        api_port=api_port,
        gateway_port=gateway_port,
        config=config,
        extra=["--gateway-workers", str(gateway_workers)],
    )
    api = f"http://127.0.0.1:{api_port}"
    with RunningService(argv, env=env, api_url=api, token=ADMIN, project="demo") as service:
        cli = service.ok

        assert "created" in cli("apply", "-f", str(spec_file))
        headers = {"Authorization": f"Bearer {ADMIN}"}
        replicas_url = f"{api}/v1/projects/demo/workloads/support-bot/replicas"

        def ready() -> list[dict[str, object]]:
            items = httpx.get(replicas_url, headers=headers, timeout=5).json()["items"]
            return [r for r in items if r["phase"] == "ready"]

        wait_until(lambda: len(ready()) == 2, timeout=60, what="two ready replicas")
        urls = sorted(str(r["url"]) for r in ready())
        described = cli("describe", "support-bot")
        for url in urls:
            assert url in described
        assert described.count(" ready ") >= 2
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        assert all(_engine_pids(port) for port in ports)

        key = cli("keys", "create", "support-bot").split("secret:")[1].split()[0]
        gateway = f"http://127.0.0.1:{gateway_port}/endpoint/demo/support-bot/v1"
        with httpx.Client(timeout=30) as client:

            def chat() -> httpx.Response:
                return client.post(
                    f"{gateway}/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={
                        "model": doc["model"],
                        "messages": [{"role": "user", "content": "hello"}],
                        "max_tokens": 4,
                    },
                )

            # The gateway reloads keys within its refresh interval.
            wait_until(lambda: chat().status_code != 401, timeout=10, what="the new data key")
            for _ in range(4):
                answer = chat()
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"]
            metrics = client.get(f"{api}/metrics").text
        assert 'autoscaler_controller_replicas{phase="ready",project="demo",' in metrics
        answered = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("autoscaler_gateway_requests_total{")
            and 'status="200"' in line
            and 'workload="support-bot"' in line
        ]
        assert len(answered) == 1 and answered[0] >= 4
        assert "autoscaler_controller_launch_to_ready_seconds_count" in metrics

        assert "deleted" in cli("delete", "support-bot")
        wait_until(
            lambda: not any(_engine_pids(port) for port in ports),
            timeout=60,
            what="engine-sim processes to stop after the delete",
        )
        decisions = httpx.get(
            f"{api}/v1/projects/demo/workloads/support-bot/decisions", headers=headers
        )
        assert decisions.status_code == 404  # the workload is gone from the API
        log = service.stop()
    assert "providers: local" in log
    assert ("2 worker processes" in log) == (gateway_workers == 2)
    assert json.dumps(urls)  # the URLs were real http://127.0.0.1:PORT addresses
    assert all(url.startswith("http://127.0.0.1:") for url in urls)
