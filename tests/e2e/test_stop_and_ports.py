"""``autoscaler run`` as a real process: SIGTERM and Ctrl-C stop it within its stated
bound while it is launching, and a taken port is one line and exit status 3 before any
admin token is made."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from autoscaler.cli.serve import EXIT_PORT_IN_USE
from autoscaler.service import STOP_BOUND_SEC
from tests.helpers import RunningService, autoscaler_cli, free_port, http_ok, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
ADMIN = "ik_sdk_e2e-stop-admin-" + "s" * 20

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_run_within_its_bound_while_it_launches(
    tmp_path: Path, signum: signal.Signals
) -> None:
    api_port, gateway_port = free_port(), free_port()
    doc = yaml.safe_load((EXAMPLES / "chat-fixed.yaml").read_text())
    doc["execution_policy_config"]["replicas"] = 3
    spec_file = tmp_path / "chat.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    config = tmp_path / "controller.yaml"
    config.write_text("cluster_id: laptop\ntick_sec: 1\nproviders:\n  local: {}\n")
    env = {"AUTOSCALER_DATA_DIR": str(tmp_path / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    argv = autoscaler_cli(
        "run", "--api-port", str(api_port), "--gateway-port", str(gateway_port),
        "--config", str(config),
    )  # fmt: skip
    api = f"http://127.0.0.1:{api_port}"
    with RunningService(argv, env=env, api_url=api, token=ADMIN, project="demo") as service:
        assert "created" in service.ok("apply", "-f", str(spec_file))
        replicas = f"{api}/v1/projects/demo/workloads/support-bot/replicas"
        headers = {"Authorization": f"Bearer {ADMIN}"}
        wait_until(
            lambda: bool(httpx.get(replicas, headers=headers, timeout=5).json()["items"]),
            timeout=60,
            what="the controller to start launching",
        )
        process = service.process.proc
        assert process is not None
        os.kill(process.pid, signum)  # the service alone, as a terminal or systemd would
        try:
            code = process.wait(timeout=STOP_BOUND_SEC + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"autoscaler run did not stop within {STOP_BOUND_SEC}s of {signum!r}")
        output = service.stop()
    assert code == 0, output
    assert f"stopping (within {STOP_BOUND_SEC:g}s)" in output
    assert "stopped" in output


def test_a_taken_port_is_one_line_and_exit_3_before_any_token_is_made(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {**os.environ, "AUTOSCALER_DATA_DIR": str(tmp_path / "data")}
        env.pop("AUTOSCALER_ADMIN_TOKEN", None)
        result = subprocess.run(
            autoscaler_cli("run", "--api-port", str(taken), "--gateway-port", str(free_port())),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == EXIT_PORT_IN_USE
    assert result.stderr.strip().splitlines() == [
        f"autoscaler: 127.0.0.1:{taken} is already in use (--api-port); stop what holds it "
        "or choose another port"
    ]
    assert "Admin token" not in result.stdout
    assert not (tmp_path / "data" / "state.db").exists()


def test_sigterm_stops_run_whose_output_nobody_reads_any_more(tmp_path: Path) -> None:
    """A service started by a parent that has gone (its stderr a pipe with no reader) still
    stops on SIGTERM: the handler's notice failing to be written does not stop shutdown."""
    api_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTOSCALER_DATA_DIR": str(tmp_path / "data"),
        "AUTOSCALER_ADMIN_TOKEN": ADMIN,
    }
    argv = autoscaler_cli("run", "--api-port", str(api_port), "--gateway-port", str(gateway_port))
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        healthz = f"http://127.0.0.1:{api_port}/healthz"
        wait_until(
            lambda: process.poll() is not None or http_ok(healthz),
            timeout=60,
            what="autoscaler run",
        )
        assert process.poll() is None, "autoscaler run ended before serving"
        assert process.stdout is not None
        process.stdout.close()  # the reader is gone
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_BOUND_SEC + 10)
        except subprocess.TimeoutExpired:
            pytest.fail("autoscaler run with no reader of its output ignored SIGTERM")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
