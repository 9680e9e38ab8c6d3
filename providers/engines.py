"""Serving engines: which image, port, health path and command each backend boots with.

A workload names its backend by wire string (``vllm``, ``sglang``, ``ollama``,
``vllm-omni``); this module turns (backend, model, the user's ``command``, version pin,
task type, CUDA pin) into a :class:`~providers.base.BootSpec`.

The user's ``command`` is parsed with :func:`shlex.split`. It may repeat the engine's own
program (``vllm serve MODEL --max-model-len 8192``) or give only the extra arguments
(``--max-model-len 8192``). Flags the service owns (the port, the bind address, the API
key, the model) are refused with an error that names the flag, because the service sets
them itself and a second value would either break routing or open the engine.

Secrets never enter a BootSpec as values. Each replica's engine API key is named
:data:`ENGINE_KEY_SECRET`; the Hugging Face token :data:`HF_TOKEN_SECRET`. The command
refers to the key as ``${ENGINE_API_KEY}`` and whoever starts the engine (the startup
script, the local provider, the worker agent) substitutes the value it resolved with
:func:`expand_secrets`. Ollama has no API key: its port must be reachable from the
gateway only (``Engine.api_key`` is False so callers can tell).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from providers.base import BootSpec

__all__ = [
    "ENGINES",
    "ENGINE_KEY_SECRET",
    "HF_TOKEN_SECRET",
    "MODEL_CACHE_DIR",
    "CommandError",
    "Engine",
    "SleepSupport",
    "boot_spec",
    "engine_argv",
    "engine_for",
    "expand_secrets",
    "image_for",
    "masked_command",
    "parallel_size",
    "secret_ref",
]

ENGINE_KEY_SECRET = "ENGINE_API_KEY"
HF_TOKEN_SECRET = "HF_TOKEN"

GROUP_LEADER_ADDRESS = "GROUP_LEADER_ADDRESS"
"""A replica group's leader address in a member's engine command (``${GROUP_LEADER_ADDRESS}``),
filled in where the member boots from the boot callback's ``GET {url}/group``."""

SGLANG_DIST_INIT_PORT = 20000
"""The port of an SGLang group's distributed init on its leader (``--dist-init-addr``)."""
#: Where the engine keeps downloaded weights inside its container; the host mounts a
#: volume here so a restarted engine does not download the model again.
MODEL_CACHE_DIR = "/root/.cache/huggingface"
_OLLAMA_MODELS_DIR = "/root/.ollama"

_POOLING_TASKS = frozenset({"embedding", "reranker", "classification", "reward"})
# vLLM before 0.10.1 selects pooling with --task; later versions with --runner pooling.
_VLLM_TASK_FLAG = {
    "embedding": "embed",
    "reranker": "score",
    "classification": "classify",
    "reward": "reward",
}
_VLLM_RUNNER_SINCE = (0, 10, 1)
# ASCII digits only (Python's ``\d`` takes any script's), the whole string (``$`` would
# let a final newline through into the image tag): matched with ``fullmatch``.
_VERSION_RE = re.compile(r"v?([0-9]+)\.([0-9]+)(?:\.([0-9]+))?([-.+a-zA-Z0-9]*)")


class CommandError(ValueError):
    """The workload's engine command cannot be used as given; the message says why."""


@dataclass(frozen=True, slots=True)
class SleepSupport:
    """How a backend frees its GPU while its process stays up, and what it needs at boot.

    ``protocol`` names the HTTP calls (``vllm``: ``POST /sleep?level=``, ``POST
    /wake_up``, ``GET /is_sleeping``; ``sglang``: ``POST /release_memory_occupation``,
    ``POST /resume_memory_occupation``). ``boot_flags`` join the engine's command and
    ``boot_env`` its environment when a replica is booted to sleep later; ``levels`` are
    the depths it offers (1: weights kept in host memory, 2: weights dropped, reloaded
    from disk on wake). ``driven`` says whether the service's client
    (``providers.engine_sleep``) drives it; one that is not raises ``EngineCannotSleep``.
    """

    protocol: str
    boot_flags: tuple[str, ...]
    boot_env: tuple[tuple[str, str], ...]
    levels: tuple[int, ...]
    driven: bool


@dataclass(frozen=True, slots=True)
class Engine:
    """How one backend is served.

    ``program`` is the argv prefix that starts the OpenAI-compatible server;
    ``program_aliases`` are other prefixes a user may write in ``command`` for it.
    ``owned_flags`` are set by the service and refused in the user's command.
    ``warmup`` is run inside the container after the server answers and before the
    replica is reported ready (``{model}`` is replaced by the model). ``fixed_args``
    follow the model on every command line (vllm-omni's ``--omni``).
    """

    backend: str
    image_repository: str
    default_tag: str
    port: int
    health_path: str
    program: tuple[str, ...]
    program_aliases: tuple[tuple[str, ...], ...]
    owned_flags: frozenset[str]
    model_positional: bool
    api_key: bool
    cache_dir: str = MODEL_CACHE_DIR
    warmup: tuple[str, ...] = ()
    fixed_args: tuple[str, ...] = ()
    sleep: SleepSupport | None = None
    """Whether and how it can sleep (``None``: it cannot; see ``docs/engine-sim.md``)."""

    def image(self, version: str | None = None) -> str:
        """``repository:tag``: the pinned version when given, else the default tag."""
        tag = self.default_tag if version is None else _tag(version, backend=self.backend)
        return f"{self.image_repository}:{tag}"


_VLLM_OWNED = frozenset({"--port", "--host", "--api-key", "--model", "--uds"})

VLLM_SLEEP = SleepSupport(
    protocol="vllm",
    # The flag makes the CuMem allocator track weights and KV cache; the routes exist
    # only in the server's development mode. CUDA and ROCm only: the CPU build refuses
    # the flag at boot ("Sleep mode is not supported on current platform.").
    boot_flags=("--enable-sleep-mode",),
    boot_env=(("VLLM_SERVER_DEV_MODE", "1"),),
    levels=(1, 2),
    driven=True,
)
SGLANG_SLEEP = SleepSupport(
    protocol="sglang",
    # torch_memory_saver releases weights and KV cache; with the CPU backup the weights
    # come back from host memory (like vLLM's level 1) instead of being re-sent.
    boot_flags=("--enable-memory-saver", "--enable-weights-cpu-backup"),
    boot_env=(),
    levels=(1,),
    driven=False,
)

ENGINES: Mapping[str, Engine] = {
    "vllm": Engine(
        backend="vllm",
        image_repository="vllm/vllm-openai",
        default_tag="v0.11.0",
        port=8000,
        health_path="/health",
        program=("vllm", "serve"),
        program_aliases=(
            ("python", "-m", "vllm.entrypoints.openai.api_server"),
            ("python3", "-m", "vllm.entrypoints.openai.api_server"),
        ),
        owned_flags=_VLLM_OWNED,
        model_positional=True,
        api_key=True,
        sleep=VLLM_SLEEP,
    ),
    "vllm-omni": Engine(
        backend="vllm-omni",
        image_repository="vllm/vllm-omni",
        default_tag="v0.12.0rc1",
        port=8000,
        health_path="/health",
        program=("vllm", "serve"),
        program_aliases=(("vllm-omni", "serve"),),
        owned_flags=_VLLM_OWNED,
        model_positional=True,
        api_key=True,
        fixed_args=("--omni",),
        # vLLM-Omni's multi-stage pipelines sleep and wake stage by stage, on their own
        # terms (reported corrupting output after a wake: vllm-omni issue 4473): no sleep.
    ),
    "sglang": Engine(
        backend="sglang",
        image_repository="lmsysorg/sglang",
        default_tag="v0.5.5",
        port=30000,
        health_path="/health",
        program=("python3", "-m", "sglang.launch_server"),
        program_aliases=(("python", "-m", "sglang.launch_server"),),
        owned_flags=frozenset({"--port", "--host", "--api-key", "--model-path", "--model"}),
        model_positional=False,
        api_key=True,
        sleep=SGLANG_SLEEP,
    ),
    "ollama": Engine(
        backend="ollama",
        image_repository="ollama/ollama",
        default_tag="0.13.5",
        port=11434,
        health_path="/api/version",
        program=("ollama", "serve"),
        program_aliases=(),
        owned_flags=frozenset(),
        model_positional=False,
        api_key=False,
        cache_dir=_OLLAMA_MODELS_DIR,
        warmup=("ollama", "pull", "{model}"),
        # Ollama's nearest thing, keep_alive 0, unloads the model: the next request loads
        # it from disk again, as a cold start does. No sleep.
    ),
}


def engine_for(backend: str) -> Engine:
    """The engine for a backend wire string; the error lists the known ones."""
    try:
        return ENGINES[backend]
    except KeyError:
        known = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown backend {backend!r}: known backends are {known}") from None


def image_for(*, backend: str, vllm_version: str | None = None) -> str:
    """The container image for a backend; ``vllm_version`` pins vllm and vllm-omni."""
    engine = engine_for(backend)
    if vllm_version is not None and backend not in ("vllm", "vllm-omni"):
        raise ValueError(f"vllm_version applies to vllm and vllm-omni only, not {backend!r}")
    return engine.image(vllm_version)


def secret_ref(name: str) -> str:
    """How a command refers to a secret resolved where the engine starts: ``${NAME}``."""
    return "${" + name + "}"


def expand_secrets(
    argv: Sequence[str], *, secrets: Mapping[str, str], names: Sequence[str]
) -> list[str]:
    """``argv`` with each ``${NAME}`` of ``names`` replaced by its value in ``secrets``.

    A referenced secret without a value is an error naming it (never the other values).
    """
    expanded = []
    for arg in argv:
        for name in names:
            ref = secret_ref(name)
            if ref in arg:
                if name not in secrets:
                    raise KeyError(f"the engine command needs secret {name}, which has no value")
                arg = arg.replace(ref, secrets[name])
        expanded.append(arg)
    return expanded


SECRET_MASK = "****"
# Flags whose value is a credential, in any engine's command line.
_SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--token", "--admin-api-key", "--api-keys"})
# Hugging Face tokens (hf_...), and NAME=value settings of a secret-looking name.
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_SECRET_SETTING_RE = re.compile(r"^([A-Za-z_]*(?:TOKEN|KEY|SECRET|PASSWORD)[A-Za-z_]*)=.+$", re.I)


def masked_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell line for people to read, with every secret masked.

    Masked as :data:`SECRET_MASK`: the value of a credential flag (``--api-key``,
    ``--hf-token``, ``--token``, in ``--flag value`` and ``--flag=value`` forms), every
    ``${NAME}`` reference to a secret the service resolves, anything shaped like a
    Hugging Face token, and the value of a ``NAME=value`` setting whose name says
    token, key, secret or password. What a secret is called stays readable; its value
    never appears.
    """
    shown: list[str] = []
    after_flag = False
    for arg in argv:
        if after_flag:
            shown.append(SECRET_MASK)
            after_flag = False
            continue
        flag, eq, _value = arg.partition("=")
        if flag.replace("_", "-") in _SECRET_FLAGS:
            if eq:
                shown.append(f"{flag}={SECRET_MASK}")
            else:
                shown.append(arg)
                after_flag = True
            continue
        setting = _SECRET_SETTING_RE.match(arg)
        if setting:
            shown.append(f"{setting.group(1)}={SECRET_MASK}")
            continue
        for name in (ENGINE_KEY_SECRET, HF_TOKEN_SECRET):
            arg = arg.replace(secret_ref(name), SECRET_MASK)
        shown.append(_TOKEN_RE.sub(SECRET_MASK, arg))
    return " ".join(_quote_around_mask(arg) for arg in shown)


def _quote_around_mask(arg: str) -> str:
    """Shell-quote ``arg`` but leave the mask itself bare, so it reads as a mask."""
    if SECRET_MASK not in arg:
        return shlex.quote(arg)
    return SECRET_MASK.join(shlex.quote(p) if p else "" for p in arg.split(SECRET_MASK))


# The flags that split one replica over several GPUs of its machine, per backend, with
# their short forms: tensor parallel first, then pipeline parallel.
_PARALLEL_FLAGS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vllm": (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")),
    "vllm-omni": (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")),
    "sglang": (("--tp", "--tp-size", "--tensor-parallel-size"), ("--pp", "--pp-size")),
}


def parallel_size(*, backend: str, command: str | None) -> int | None:
    """The GPUs one replica spans by the user's own command: tensor parallel times
    pipeline parallel (``None``: the command sets neither; the service sets them from
    the machine placement chose, see :func:`engine_argv`).

    Raises :class:`CommandError` for a size that is not a whole number of at least 1.
    """
    flags = _PARALLEL_FLAGS.get(backend)
    if flags is None or not command:
        return None
    try:
        tokens = shlex.split(command)
    except ValueError as exc:
        raise CommandError(f"command {command!r} cannot be parsed: {exc}") from None
    sizes = [_flag_value(tokens, names) for names in flags]
    if all(size is None for size in sizes):
        return None
    total = 1
    for names, size in zip(flags, sizes, strict=True):
        if size is None:
            continue
        if not size.isdigit() or int(size) < 1:
            raise CommandError(f"{names[0]} must be a whole number of at least 1, got {size!r}")
        total *= int(size)
    return total


def _flag_value(tokens: Sequence[str], names: Sequence[str]) -> str | None:
    for i, token in enumerate(tokens):
        name, eq, value = token.partition("=")
        if name.replace("_", "-") in names:
            if eq:
                return value
            return tokens[i + 1] if i + 1 < len(tokens) else ""
    return None


def _parallel_args(
    engine: Engine, *, gpu_count: int, nodes: int, node_rank: int, user_args: Sequence[str]
) -> list[str]:
    """Tensor parallelism over every GPU of the machine, unless the user chose a split;
    across ``nodes`` machines, pipeline parallelism between them (vLLM) or one tensor
    parallel group over all their GPUs (SGLang, whose every member runs the engine with
    its ``--node-rank`` and the leader's ``--dist-init-addr``)."""
    flags = _PARALLEL_FLAGS.get(engine.backend)
    if flags is None or (gpu_count <= 1 and nodes <= 1):
        return []
    if any(_flag_value(user_args, names) is not None for names in flags):
        return []
    if nodes <= 1:
        return [flags[0][0], str(gpu_count)]
    if engine.backend == "sglang":
        leader = f"{secret_ref(GROUP_LEADER_ADDRESS)}:{SGLANG_DIST_INIT_PORT}"
        return [
            "--tp",
            str(gpu_count * nodes),
            "--nnodes",
            str(nodes),
            "--node-rank",
            str(node_rank),
            "--dist-init-addr",
            leader,
        ]
    return [
        flags[0][0],
        str(gpu_count),
        flags[1][0],
        str(nodes),
        "--distributed-executor-backend",
        "ray",
    ]


def engine_argv(
    *,
    backend: str,
    model: str,
    command: str | None = None,
    task_type: str = "text2text",
    vllm_version: str | None = None,
    gpu_count: int = 1,
    nodes: int = 1,
    node_rank: int = 0,
    sleep_mode: bool = False,
) -> tuple[str, ...]:
    """The engine's full argv: its program, the model, service-owned flags, user args.

    ``sleep_mode`` adds the flags that let the replica sleep later (vLLM
    ``--enable-sleep-mode``; its environment comes from :func:`boot_spec`); a backend
    that cannot sleep raises :class:`CommandError`.

    ``gpu_count`` is the number of GPUs of the machine the replica runs on: above one,
    the engine is told to split the model over all of them (vLLM
    ``--tensor-parallel-size N``, SGLang ``--tp N``) unless the user's command already
    sets a parallel split, which placement then matched to the machine. ``nodes`` above
    one makes the replica a group of that many machines of ``gpu_count`` GPUs: vLLM
    gets ``--tensor-parallel-size GPUS --pipeline-parallel-size NODES
    --distributed-executor-backend ray`` (the leader runs the engine over the Ray
    cluster its workers joined); SGLang gets ``--tp GPUS*NODES --nnodes NODES
    --node-rank RANK --dist-init-addr ${GROUP_LEADER_ADDRESS}:20000``: every member runs
    the engine, the leader (``node_rank`` 0) serving; the leader's address is filled in
    where the member boots (:data:`GROUP_LEADER_ADDRESS`).
    """
    engine = engine_for(backend)
    user_args = _user_args(engine, model=model, command=command)
    if engine.backend == "ollama":
        return engine.program
    argv: list[str] = list(engine.program)
    if engine.model_positional:
        argv.append(model)
    else:
        argv += ["--model-path", model]
    argv += engine.fixed_args
    argv += ["--host", "0.0.0.0", "--port", str(engine.port)]
    argv += ["--api-key", secret_ref(ENGINE_KEY_SECRET)]
    argv += _task_args(engine, task_type=task_type, user_args=user_args, version=vllm_version)
    argv += _parallel_args(
        engine, gpu_count=gpu_count, nodes=nodes, node_rank=node_rank, user_args=user_args
    )
    if sleep_mode:
        chosen = {arg.split("=", 1)[0] for arg in user_args}
        argv += [flag for flag in _sleep_support(engine).boot_flags if flag not in chosen]
    return (*argv, *user_args)


def _sleep_support(engine: Engine) -> SleepSupport:
    if engine.sleep is None:
        can = sorted(name for name, e in ENGINES.items() if e.sleep is not None)
        raise CommandError(
            f"backend {engine.backend!r} cannot sleep; backends that can: {', '.join(can)}"
        )
    return engine.sleep


def boot_spec(
    *,
    backend: str,
    model: str,
    command: str | None = None,
    vllm_version: str | None = None,
    task_type: str = "text2text",
    cuda_version: str | None = None,
    startup_script: str | None = None,
    gpu_count: int = 1,
    nodes: int = 1,
    node_rank: int = 0,
    sleep_mode: bool = False,
) -> BootSpec:
    """How a replica of this workload boots (without a startup script unless given).

    ``sleep_mode`` boots it able to sleep: the backend's flags in the command and its
    environment (vLLM: ``VLLM_SERVER_DEV_MODE=1``, which exposes ``/sleep``).

    The engine's API key and the Hugging Face token are named in ``secret_env_names``
    and resolved where the engine starts; see the module docstring.

    A pure function of its arguments, and its answer immutable: the last
    :data:`BOOT_SPECS_KEPT` answers without a startup script are kept, so a controller
    that asks for the same workload's boot several times in a step (admission, the
    intent row, the provider's request) parses its command once; an invalid command
    raises each time. A startup script (it may carry a launch's own token) is never kept.
    """
    boot = _boot_spec(
        backend,
        model,
        command,
        vllm_version,
        task_type,
        cuda_version,
        gpu_count,
        nodes,
        node_rank,
        sleep_mode,
    )
    return (
        boot if startup_script is None else dataclasses.replace(boot, startup_script=startup_script)
    )


BOOT_SPECS_KEPT = 1024
"""Boot specs :func:`boot_spec` keeps (least recently used dropped first)."""


@functools.lru_cache(maxsize=BOOT_SPECS_KEPT)
def _boot_spec(
    backend: str,
    model: str,
    command: str | None,
    vllm_version: str | None,
    task_type: str,
    cuda_version: str | None,
    gpu_count: int,
    nodes: int,
    node_rank: int,
    sleep_mode: bool,
) -> BootSpec:
    engine = engine_for(backend)
    argv = engine_argv(
        backend=backend,
        model=model,
        command=command,
        task_type=task_type,
        vllm_version=vllm_version,
        gpu_count=gpu_count,
        nodes=nodes,
        node_rank=node_rank,
        sleep_mode=sleep_mode,
    )
    env = {"HF_HOME": MODEL_CACHE_DIR} if engine.cache_dir == MODEL_CACHE_DIR else {}
    if sleep_mode:
        env.update(_sleep_support(engine).boot_env)
    secrets = (ENGINE_KEY_SECRET, HF_TOKEN_SECRET) if engine.api_key else (HF_TOKEN_SECRET,)
    return BootSpec(
        image=image_for(backend=backend, vllm_version=vllm_version),
        command=argv,
        port=engine.port,
        health_path=engine.health_path,
        model_id=model,
        env=env,
        secret_env_names=secrets,
        cuda_version=cuda_version,
    )


# --- the user's command -------------------------------------------------------------


def _user_args(engine: Engine, *, model: str, command: str | None) -> list[str]:
    if command is None or not command.strip():
        return []
    try:
        tokens = shlex.split(command)
    except ValueError as exc:
        raise CommandError(f"command {command!r} cannot be parsed: {exc}") from None
    tokens = _strip_program(engine, tokens)
    if engine.model_positional and tokens and not tokens[0].startswith("-"):
        if tokens[0] != model:
            program = shlex.join(engine.program)
            raise CommandError(
                f"command serves model {tokens[0]!r} but the workload's model is {model!r} "
                f"(backend {engine.backend!r} starts as {program!r}); write "
                f"'{program} {model} [flags]' or give only the flags"
            )
        tokens = tokens[1:]
    if engine.backend == "ollama" and tokens:
        raise CommandError(
            f"ollama takes no command-line arguments, got {shlex.join(tokens)!r}; "
            "configure ollama through its model, not the command"
        )
    for token in tokens:
        _refuse_owned(engine, token)
        if secret_ref(ENGINE_KEY_SECRET) in token or secret_ref(HF_TOKEN_SECRET) in token:
            raise CommandError(f"command argument {token!r} refers to a secret the service owns")
    return tokens


def _strip_program(engine: Engine, tokens: list[str]) -> list[str]:
    for prefix in (engine.program, *engine.program_aliases):
        if tuple(tokens[: len(prefix)]) == prefix:
            return tokens[len(prefix) :]
    if tokens and not tokens[0].startswith("-") and tokens[0] in {p[0] for p in _programs()}:
        expected = shlex.join(engine.program)
        raise CommandError(
            f"command starts with {shlex.join(tokens[:3])!r}, which is not how backend "
            f"{engine.backend!r} starts; write {expected!r} or give only the arguments"
        )
    return tokens


def _programs() -> list[tuple[str, ...]]:
    return [p for e in ENGINES.values() for p in (e.program, *e.program_aliases)]


def _refuse_owned(engine: Engine, token: str) -> None:
    if not token.startswith("--"):
        return
    flag = token.split("=", 1)[0].replace("_", "-")
    if flag in engine.owned_flags:
        raise CommandError(
            f"command sets {flag}, which the service owns for backend {engine.backend!r} "
            f"(it sets {', '.join(sorted(engine.owned_flags))} itself); remove it"
        )


def _task_args(
    engine: Engine, *, task_type: str, user_args: list[str], version: str | None
) -> list[str]:
    if task_type not in _POOLING_TASKS:
        return []
    chosen = {arg.split("=", 1)[0] for arg in user_args}
    if engine.backend == "sglang":
        return [] if "--is-embedding" in chosen else ["--is-embedding"]
    if engine.backend != "vllm" or chosen & {"--task", "--runner", "--convert"}:
        return []
    if version is None or _version_tuple(version) >= _VLLM_RUNNER_SINCE:
        return ["--runner", "pooling"]
    return ["--task", _VLLM_TASK_FLAG[task_type]]


def _tag(version: str, *, backend: str) -> str:
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"vllm_version {version!r} for backend {backend!r} is not a version like 0.11.0"
        )
    return version if version.startswith("v") else f"v{version}"


def _version_tuple(version: str) -> tuple[int, ...]:
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise ValueError(f"vllm_version {version!r} is not a version like 0.11.0")
    return tuple(int(part) for part in match.groups()[:3] if part is not None)
