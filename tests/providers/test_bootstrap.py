"""The startup script, run by bash in a sandbox whose nvidia-smi, docker and curl are fakes.

The fakes log every call to files in the sandbox; the tests assert what the script ran
and what it reported to the controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from providers.bootstrap import (
    BootCallback,
    GroupRole,
    SpotNotice,
    min_driver_for,
    startup_script_for,
)
from providers.engines import ENGINES, boot_spec
from tests.helpers import wait_until

ENGINE_KEY = "sk-engine-" + "k" * 24
HF_TOKEN = "hf_" + "t" * 30

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
echo "nvidia-smi $*" >>"$SANDBOX/calls"
[[ -n "${FAKE_DRIVER:-}" ]] || exit 9
echo "$FAKE_DRIVER"
"""

FAKE_DOCKER = """#!/usr/bin/env bash
printf 'docker' >>"$SANDBOX/calls"
printf ' %q' "$@" >>"$SANDBOX/calls"
echo >>"$SANDBOX/calls"
case "$1" in
  inspect) echo "${FAKE_CONTAINER_STATUS:-running}" ;;
  pull) [[ -z "${FAKE_PULL_FAILS:-}" ]] ;;
esac
"""

FAKE_CURL = """#!/usr/bin/env bash
out="" data="" url=""
while (($#)); do
  case "$1" in
    -o) out=$2; shift ;;
    --data) data=$2; shift ;;
    -H|-X|--retry|--retry-delay|--max-time) shift ;;
    -*) ;;
    *) url=$1 ;;
  esac
  shift
done
echo "curl $url" >>"$SANDBOX/calls"
case "$url" in
  */secrets) printf 'ENGINE_API_KEY=%s\\nHF_TOKEN=%s\\n' "$FAKE_KEY" "$FAKE_HF" >"$out" ;;
  */status) echo "$data" >>"$SANDBOX/reports" ;;
  */group) [[ -n "${FAKE_LEADER:-}" ]] &&
    printf '{"role": "worker", "size": 2, "leader_address": "%s"}' "$FAKE_LEADER" ;;
  */computeMetadata/v1/instance/preempted) echo "${FAKE_PREEMPTED:-FALSE}" ;;
  http://127.0.0.1:*) [[ -n "${FAKE_HEALTHY:-}" ]] ;;
  *) exit 7 ;;
esac
"""


@dataclass
class Run:
    returncode: int
    calls: list[str]
    reports: list[dict[str, str]]
    stderr: str

    def docker_calls(self, verb: str) -> list[str]:
        return [c for c in self.calls if c.startswith(f"docker {verb}")]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("nvidia-smi", FAKE_NVIDIA_SMI),
        ("docker", FAKE_DOCKER),
        ("curl", FAKE_CURL),
    ):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return tmp_path


def run_script(
    sandbox: Path,
    *,
    backend: str = "vllm",
    model: str = "Qwen/Qwen2.5-0.5B-Instruct",
    cuda: str | None = "12.4",
    env: dict[str, str] | None = None,
    with_nvidia_smi: bool = True,
    spot_notice: SpotNotice | None = None,
    group_role: GroupRole | None = None,
) -> Run:
    nodes = 2 if group_role else 1
    boot = boot_spec(
        backend=backend,
        model=model,
        cuda_version=cuda,
        gpu_count=8,
        nodes=nodes,
        node_rank=1 if group_role == "worker" else 0,
    )
    if group_role is None:
        boot = boot_spec(backend=backend, model=model, cuda_version=cuda)
    script = startup_script_for(
        boot=boot,
        backend=backend,
        launch_id="lch_0123abcd",
        callback=BootCallback("http://controller.test/v1/boot/lch_0123abcd", "boot-token"),
        spot_notice=spot_notice,
        group_role=group_role,
        group_size=nodes,
    )
    script = script.replace("STATE_DIR=/var/lib/autoscaler", f"STATE_DIR={sandbox / 'state'}")
    script = script.replace("CACHE_DIR=/var/lib/autoscaler/", f"CACHE_DIR={sandbox}/")
    script = script.replace("POLL_SECONDS=5", "POLL_SECONDS=0")
    script = script.replace("HEALTH_TIMEOUT_SECONDS=1800", "HEALTH_TIMEOUT_SECONDS=3")
    path = sandbox / "boot.sh"
    path.write_text(script)
    if not with_nvidia_smi:
        (sandbox / "bin" / "nvidia-smi").unlink()
    run_env = {
        "PATH": f"{sandbox / 'bin'}:/usr/bin:/bin",
        "SANDBOX": str(sandbox),
        "FAKE_KEY": ENGINE_KEY,
        "FAKE_HF": HF_TOKEN,
        "FAKE_DRIVER": "560.35.03",
        "FAKE_HEALTHY": "1",
        **(env or {}),
    }
    done = subprocess.run(
        ["bash", str(path)], env=run_env, capture_output=True, text=True, timeout=30
    )
    calls_file, reports_file = sandbox / "calls", sandbox / "reports"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    reports = reports_file.read_text().splitlines() if reports_file.exists() else []
    return Run(done.returncode, calls, [json.loads(r) for r in reports], done.stderr)


def test_a_good_driver_pulls_starts_the_engine_with_gpus_and_reports_ready(
    sandbox: Path,
) -> None:
    run = run_script(sandbox)

    assert run.returncode == 0, run.stderr
    assert run.reports == [{"launch_id": "lch_0123abcd", "state": "ready", "reason": ""}]
    assert run.calls[0] == "nvidia-smi --query-gpu=driver_version --format=csv,noheader"
    assert run.docker_calls("pull") == ["docker pull vllm/vllm-openai:v0.11.0"]
    [started] = run.docker_calls("run")
    for expected in (
        "--gpus all",
        "--ipc=host",
        "--restart unless-stopped",
        "-p 8000:8000",
        f"-v {sandbox}/model-cache:/root/.cache/huggingface",
        "--entrypoint vllm vllm/vllm-openai:v0.11.0 serve Qwen/Qwen2.5-0.5B-Instruct",
        f"--api-key {ENGINE_KEY}",
    ):
        assert expected in started
    # Health was polled on the engine's own port and path before ready was reported.
    assert "curl http://127.0.0.1:8000/health" in run.calls
    assert run.calls.index("curl http://127.0.0.1:8000/health") < run.calls.index(
        "curl http://controller.test/v1/boot/lch_0123abcd/status"
    )


def test_secrets_reach_the_engine_but_never_the_log_or_the_report(sandbox: Path) -> None:
    run = run_script(sandbox)

    env_file = sandbox / "state" / "engine-lch_0123abcd.env"
    assert f"HF_TOKEN={HF_TOKEN}" in env_file.read_text()
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert f"--env-file {env_file}" in run.docker_calls("run")[0]
    assert ENGINE_KEY not in run.stderr
    assert HF_TOKEN not in run.stderr
    assert ENGINE_KEY not in json.dumps(run.reports)


def test_an_old_driver_is_reported_as_failed_with_the_reason_and_nothing_is_served(
    sandbox: Path,
) -> None:
    run = run_script(sandbox, env={"FAKE_DRIVER": "535.104.05"})

    assert run.returncode == 1
    [report] = run.reports
    assert report["state"] == "failed"
    assert report["reason"] == (
        f"NVIDIA driver 535.104.05 is older than {min_driver_for('12.4')}, which CUDA 12.4 needs"
    )
    assert run.docker_calls("") == []


def test_no_driver_at_all_is_reported_as_failed(sandbox: Path) -> None:
    run = run_script(sandbox, with_nvidia_smi=False)

    assert run.returncode == 1
    assert run.reports[0]["state"] == "failed"
    assert "nvidia-smi is not installed" in run.reports[0]["reason"]


def test_an_engine_that_never_answers_health_is_reported_as_failed(sandbox: Path) -> None:
    run = run_script(sandbox, env={"FAKE_HEALTHY": ""})

    assert run.returncode == 1
    assert run.reports[-1]["state"] == "failed"
    assert "did not answer /health within 3s" in run.reports[-1]["reason"]


def test_an_engine_container_that_exits_is_reported_as_failed(sandbox: Path) -> None:
    run = run_script(sandbox, env={"FAKE_HEALTHY": "", "FAKE_CONTAINER_STATUS": "exited"})

    assert run.reports[-1]["state"] == "failed"
    assert "container stopped (exited)" in run.reports[-1]["reason"]


def test_a_failed_pull_is_reported_after_retries(sandbox: Path) -> None:
    run = run_script(sandbox, env={"FAKE_PULL_FAILS": "1"})

    assert run.returncode == 1
    assert len(run.docker_calls("pull")) == 3
    assert run.reports[-1]["reason"] == "pulling image vllm/vllm-openai:v0.11.0 failed 3 times"
    assert run.docker_calls("run") == []


def test_ollama_pulls_its_model_before_it_is_reported_ready(sandbox: Path) -> None:
    run = run_script(sandbox, backend="ollama", model="llama3.2:1b", cuda=None)

    assert run.returncode == 0, run.stderr
    [started] = run.docker_calls("run")
    assert "-p 11434:11434" in started
    assert f"-v {sandbox}/model-cache:/root/.ollama" in started
    assert "--entrypoint ollama ollama/ollama:0.13.5 serve" in started
    pulled = "docker exec engine-lch_0123abcd ollama pull llama3.2:1b"
    assert pulled in run.calls
    assert run.calls.index(pulled) < run.calls.index(
        "curl http://controller.test/v1/boot/lch_0123abcd/status"
    )
    assert run.reports[-1]["state"] == "ready"


@pytest.mark.parametrize("backend", sorted(ENGINES))
def test_the_rendered_script_passes_shellcheck(backend: str, tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is required under CI=true (scripts/check --install)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    boot = boot_spec(backend=backend, model="org/model", cuda_version="12.4")
    script = tmp_path / "boot.sh"
    script.write_text(
        startup_script_for(
            boot=boot,
            backend=backend,
            launch_id="lch_1",
            callback=BootCallback("https://controller.test/boot/lch_1", "t"),
        )
    )
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _reports(sandbox: Path) -> list[dict[str, str]]:
    path = sandbox / "reports"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _stop_watcher(sandbox: Path) -> None:
    """Stop the watcher and whatever it is running (a poll in flight would otherwise
    record its call after the test has moved on), and wait until all of it is gone."""
    pid_file = sandbox / "state" / "spot-notice-lch_0123abcd.pid"
    try:
        watcher = int(pid_file.read_text())
        os.kill(watcher, signal.SIGSTOP)  # no new child while its tree is collected
    except (ProcessLookupError, FileNotFoundError):
        return
    tree = [watcher]
    for pid in tree:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                tree += [int(c) for c in (task / "children").read_text().split()]
    for pid in reversed(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(_alive(pid) for pid in tree), timeout=30, what="the watcher to end")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_gce_preemption_is_reported_as_interrupted_by_the_watcher(sandbox: Path) -> None:
    try:
        run = run_script(sandbox, spot_notice="gce", env={"FAKE_PREEMPTED": "TRUE"})
        assert run.returncode == 0, run.stderr
        wait_until(
            lambda: any(r["state"] == "interrupted" for r in _reports(sandbox)),
            timeout=10,
            what="the watcher's interrupted report",
        )
    finally:
        _stop_watcher(sandbox)
    assert sorted(r["state"] for r in _reports(sandbox)) == ["interrupted", "ready"]
    [notice] = [r for r in _reports(sandbox) if r["state"] == "interrupted"]
    assert notice == {
        "launch_id": "lch_0123abcd",
        "state": "interrupted",
        "reason": "gce spot interruption notice: instance/preempted is TRUE",
    }


def test_no_preemption_no_report_and_on_demand_machines_do_not_watch(sandbox: Path) -> None:
    try:
        run = run_script(sandbox, spot_notice="gce", env={"FAKE_PREEMPTED": "FALSE"})
        assert run.returncode == 0, run.stderr
        wait_until(
            lambda: _count(sandbox / "calls", "computeMetadata") >= 3,
            timeout=60,
            what="the watcher to poll three times",
        )
    finally:
        _stop_watcher(sandbox)
    assert [r["state"] for r in _reports(sandbox)] == ["ready"]
    for used in ("calls", "reports", "state/spot-notice-lch_0123abcd.pid"):
        (sandbox / used).unlink()
    plain = run_script(sandbox)
    assert plain.returncode == 0
    assert not (sandbox / "state" / "spot-notice-lch_0123abcd.pid").exists()
    assert _count(sandbox / "calls", "computeMetadata") == 0


def _count(path: Path, text: str) -> int:
    return sum(text in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("notice", ["ec2", "gce"])
def test_a_spot_script_watches_its_providers_notice_and_passes_shellcheck(
    notice: SpotNotice, tmp_path: Path
) -> None:
    boot = boot_spec(backend="vllm", model="org/model", cuda_version="12.4")
    callback = BootCallback("https://controller.test/boot/lch_1", "t")
    spot = startup_script_for(
        boot=boot, backend="vllm", launch_id="lch_1", callback=callback, spot_notice=notice
    )
    plain = startup_script_for(boot=boot, backend="vllm", launch_id="lch_1", callback=callback)
    assert f"\nSPOT_NOTICE={notice}\n" in spot
    assert "\nSPOT_NOTICE=''\n" in plain  # on-demand machines start no watcher
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is required under CI=true (scripts/check --install)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    script = tmp_path / "boot.sh"
    script.write_text(spot)
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_a_callback_must_be_an_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        BootCallback("controller.test/boot", "t")
    assert "secret-token" not in repr(BootCallback("https://c.test", "secret-token"))


def test_a_group_worker_joins_its_leaders_ray_cluster_from_the_callbacks_address(
    sandbox: Path,
) -> None:
    run = run_script(sandbox, group_role="worker", env={"FAKE_LEADER": "10.0.0.5"})

    assert run.returncode == 0, run.stderr
    assert "curl http://controller.test/v1/boot/lch_0123abcd/group" in run.calls
    [started] = run.docker_calls("run")
    assert "--network host" in started and "--gpus all" in started
    assert "--entrypoint ray vllm/vllm-openai:v0.11.0 start --block --address=10.0.0.5:6379" in (
        started
    )
    assert "serve" not in started  # a worker runs no engine of its own
    assert not any(c.startswith("curl http://127.0.0.1:") for c in run.calls)
    assert run.reports == [{"launch_id": "lch_0123abcd", "state": "ready", "reason": ""}]


def test_a_group_worker_without_a_leader_address_fails_with_the_reason(sandbox: Path) -> None:
    run = run_script(sandbox, group_role="worker")

    assert run.returncode != 0
    assert run.docker_calls("run") == []
    [report] = run.reports
    assert report["state"] == "failed" and "leader address did not come" in report["reason"]


def test_a_group_leader_starts_a_ray_head_then_the_engine_over_every_member(
    sandbox: Path,
) -> None:
    run = run_script(sandbox, group_role="leader")

    assert run.returncode == 0, run.stderr
    [started] = run.docker_calls("run")
    assert "--network host" in started and "-p 8000:8000" not in started
    assert "--entrypoint bash vllm/vllm-openai:v0.11.0 -c" in started
    assert "ray\\ start\\ --head" in started or "ray start --head" in started
    assert " 6379 2 vllm serve Qwen/Qwen2.5-0.5B-Instruct" in started
    assert "--pipeline-parallel-size 2" in started and "--tensor-parallel-size 8" in started
    assert "curl http://127.0.0.1:8000/health" in run.calls


SGLANG_MODEL = "meta-llama/Llama-3.1-405B-Instruct"


def test_an_sglang_group_leader_runs_the_engine_as_rank_0_at_its_own_address(
    sandbox: Path,
) -> None:
    run = run_script(
        sandbox,
        backend="sglang",
        model=SGLANG_MODEL,
        group_role="leader",
        env={"FAKE_LEADER": "10.0.0.5"},
    )

    assert run.returncode == 0, run.stderr
    assert "curl http://controller.test/v1/boot/lch_0123abcd/group" in run.calls
    [started] = run.docker_calls("run")
    assert "--network host" in started and "ray" not in started
    assert "--tp 16 --nnodes 2 --node-rank 0 --dist-init-addr 10.0.0.5:20000" in started, started
    assert "curl http://127.0.0.1:30000/health" in run.calls  # served once all joined
    assert run.reports == [{"launch_id": "lch_0123abcd", "state": "ready", "reason": ""}]


def test_an_sglang_group_worker_runs_the_engine_with_its_rank_and_the_leaders_address(
    sandbox: Path,
) -> None:
    run = run_script(
        sandbox,
        backend="sglang",
        model=SGLANG_MODEL,
        group_role="worker",
        env={"FAKE_LEADER": "10.0.0.5"},
    )

    assert run.returncode == 0, run.stderr
    [started] = run.docker_calls("run")
    assert "--network host" in started and "ray" not in started
    assert "--entrypoint python3" in started and "-m sglang.launch_server" in started
    assert "--tp 16 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.5:20000" in started, started
    assert not any(c.startswith("curl http://127.0.0.1:") for c in run.calls)  # serves nothing
    assert run.reports == [{"launch_id": "lch_0123abcd", "state": "ready", "reason": ""}]


def test_an_sglang_group_member_without_its_leaders_address_starts_nothing(
    sandbox: Path,
) -> None:
    run = run_script(sandbox, backend="sglang", model=SGLANG_MODEL, group_role="leader")

    assert run.returncode != 0
    assert run.docker_calls("run") == []
    [report] = run.reports
    assert report["state"] == "failed" and "leader address did not come" in report["reason"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("role", ["leader", "worker"])
@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_a_group_members_script_passes_shellcheck(
    role: GroupRole, backend: str, tmp_path: Path
) -> None:
    boot = boot_spec(backend=backend, model="m", gpu_count=8, nodes=2)
    script = startup_script_for(
        boot=boot,
        backend=backend,
        launch_id="lch_1",
        callback=BootCallback("http://controller.test/v1/boot/lch_1", "t"),
        group_role=role,
        group_size=2,
    )
    path = tmp_path / "boot.sh"
    path.write_text(script)
    done = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
