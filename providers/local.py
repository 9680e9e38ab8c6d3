"""This machine as a provider: each instance is a local engine process.

``autoscaler run`` uses it so a laptop serves workloads with no cloud account (the
engine is ``engine-sim`` by default), and the worker agent (:mod:`providers.agent`)
uses the same code to run the replicas a controller assigns to a private GPU box.

Every launch leaves a small JSON record in ``state_dir`` (pid, the process's start time,
launch id, tags, port), so a new provider object, after a restart of the service, still
lists, finds and terminates the processes it started. A pid counts as ours only while
the process with that pid has the start time we recorded: a pid reused by another
program is never signalled. Processes run in their own session, so terminating one
stops its whole process group (``docker run`` and what it started, or an engine's
workers): SIGTERM first, SIGKILL after a grace period.

Stop and start: ``stop`` ends the engine process as ``terminate`` does but keeps the
instance (its record, its port, its log, and whatever the engine keeps on this disk:
the model cache); it reads ``STOPPING`` until the process is gone, then ``STOPPED``.
``start`` runs the engine again from the launch request kept in the record, on the same
port (no launch takes a port a stopped instance keeps; if another program took it
meanwhile, on a new one, which the returned instance's address carries) and under the
same instance id, with its secrets resolved afresh
(``restart_command`` where the launcher has one, :class:`EngineRestarter`). A process
that exited by itself is gone, not stopped, and is not started again.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from catalog.model import Offer, ProviderName
from catalog.sizing import (
    command_adapters,
    command_batch_limits,
    command_context,
    command_flags,
)
from providers.base import (
    CLUSTER_TAG,
    BootSpec,
    Clock,
    Instance,
    InstanceState,
    LaunchRequest,
    NotFound,
    SystemClock,
    Terminal,
    Transient,
    pick_for_launch,
    utc,
)
from providers.engines import ENGINE_KEY_SECRET, expand_secrets

__all__ = [
    "DockerLauncher",
    "EngineLauncher",
    "EngineRestarter",
    "EngineSimLauncher",
    "HostProcessLauncher",
    "LaunchCommand",
    "LocalProvider",
    "SecretSource",
    "environment_secrets",
    "offer_for_this_machine",
    "with_flag",
]

SecretSource = Callable[[LaunchRequest], Awaitable[Mapping[str, str]]]
"""Resolves the values of ``request.boot.secret_env_names`` for one launch."""


async def environment_secrets(request: LaunchRequest) -> Mapping[str, str]:
    """Secrets from this process's environment (names absent there are left out)."""
    names = request.boot.secret_env_names
    return {name: os.environ[name] for name in names if name in os.environ}


@dataclass(frozen=True, slots=True)
class LaunchCommand:
    """A process to start: its argv and the environment it adds (secrets included)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    engine: str | None = None
    """What runs, when the launcher knows (``engine-sim``, ``vllm``)."""
    engine_reason: str | None = None
    """Why that engine, when it was chosen (``providers.local_engines``)."""


class EngineLauncher(Protocol):
    """Turns a BootSpec into a local process that serves on ``host:port``."""

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand: ...


@runtime_checkable
class EngineRestarter(Protocol):
    """A launcher that starts a stopped instance's engine differently from a fresh one
    (the simulated cloud: a shorter boot, as the machine's disk is kept)."""

    def restart_command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand: ...


@dataclass(frozen=True, slots=True)
class EngineSimLauncher:
    """Runs ``engine-sim`` for the BootSpec's model on the offer's GPU (or ``gpu``)."""

    time_scale: float = 1.0
    gpu: str | None = None
    startup_delay: float = 0.0
    python: str = sys.executable

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        argv = [
            self.python,
            "-m",
            "providers.engine_sim",
            "--host",
            host,
            "--port",
            str(port),
            "--model",
            boot.model_id,
            "--gpu",
            self.gpu or offer.gpu,
            "--gpu-count",
            str(max(1, offer.gpu_count)),
            "--time-scale",
            str(self.time_scale),
            "--startup-delay",
            str(self.startup_delay),
        ]
        adapters = command_adapters(boot.command)
        if adapters:  # engine-sim takes vLLM's adapter flags, whichever engine was asked
            argv += ["--enable-lora", "--lora-modules"]
            argv += [f"{name}={source}" for name, source in adapters]
        flags = command_flags(boot.command)
        context = command_context(flags)
        if context is not None:  # the window the command gives the real engine
            argv += ["--max-model-len", str(context[0])]
        limits = command_batch_limits(flags)  # the batch limits it gives the real engine
        if limits.max_batched_tokens is not None:
            argv += ["--max-num-batched-tokens", str(limits.max_batched_tokens)]
        if limits.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(limits.max_num_seqs)]
        if "--enable-sleep-mode" in boot.command:  # booted to sleep later: serve /sleep too
            argv.append("--enable-sleep-mode")
        # engine-sim reads its key from the environment, which keeps it out of `ps`.
        env = (
            {"ENGINE_SIM_API_KEY": secrets[ENGINE_KEY_SECRET]}
            if ENGINE_KEY_SECRET in secrets
            else {}
        )
        return LaunchCommand(tuple(argv), env, engine="engine-sim")


@dataclass(frozen=True, slots=True)
class HostProcessLauncher:
    """Runs the BootSpec's engine command directly on the host (engine installed there)."""

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        argv = with_flag(with_flag(list(boot.command), "--port", str(port)), "--host", host)
        argv = expand_secrets(argv, secrets=secrets, names=boot.secret_env_names)
        return LaunchCommand(tuple(argv), {**boot.env, **secrets})


@dataclass(frozen=True, slots=True)
class DockerLauncher:
    """Runs the BootSpec's image with ``docker run`` in the foreground (GPUs, host IPC).

    Secrets are passed as ``-e NAME`` so docker reads their values from its own
    environment instead of its command line.
    """

    cache_dir: str = str(Path.home() / ".cache" / "autoscaler" / "model-cache")
    cache_mount: str = "/root/.cache/huggingface"
    gpus: bool = True
    docker: str = "docker"

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        engine = expand_secrets(boot.command, secrets=secrets, names=boot.secret_env_names)
        argv = [self.docker, "run", "--rm", "--ipc=host"]
        argv += ["--gpus", "all"] if self.gpus else []
        argv += ["-p", f"{host}:{port}:{boot.port}", "-v", f"{self.cache_dir}:{self.cache_mount}"]
        for key, value in sorted(boot.env.items()):
            argv += ["-e", f"{key}={value}"]
        for name in sorted(secrets):
            argv += ["-e", name]
        argv += ["--entrypoint", engine[0], boot.image, *engine[1:]]
        return LaunchCommand(tuple(argv), dict(secrets))


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return [*argv[: i + 1], value, *argv[i + 2 :]]
        if arg.startswith(flag + "="):
            return [*argv[:i], f"{flag}={value}", *argv[i + 1 :]]
    return [*argv, flag, value]


# --- the records ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    instance_id: str
    launch_id: str
    pid: int
    start_ticks: int | None
    host: str
    port: int
    zone: str
    instance_type: str
    spot: bool
    launched_at: float
    tags: dict[str, str]
    log_path: str
    terminated_at: float | None = None
    exit_status: int | None = None
    engine: str | None = None
    engine_reason: str | None = None
    stopped_at: float | None = None
    """When a stop was asked; set while the instance is stopping or stopped."""
    request: dict[str, Any] | None = None
    """The launch request (no secrets in it), to start the engine again after a stop."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _Records:
    """One JSON file per instance in a directory; writes are atomic renames."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, instance_id: str) -> Path:
        return self.directory / f"{instance_id}.json"

    def save(self, record: _Record) -> None:
        tmp = self.directory / f".{record.instance_id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(record), sort_keys=True))
        tmp.replace(self.path(record.instance_id))

    def load(self, instance_id: str) -> _Record | None:
        if not _INSTANCE_ID_CHARS.issuperset(instance_id):
            return None
        try:
            return _Record(**json.loads(self.path(instance_id).read_text()))
        except FileNotFoundError:
            return None

    def all(self) -> builtins.list[_Record]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                found.append(_Record(**json.loads(path.read_text())))
        return found

    def delete(self, record: _Record) -> None:
        self.path(record.instance_id).unlink(missing_ok=True)
        Path(record.log_path).unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialises launches across provider objects and processes sharing the dir."""
        with (self.directory / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


_INSTANCE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


# --- processes --------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped: not running
        return None
    return int(fields[19])


def _reap(pid: int) -> int | None:
    """Collect an exited child of ours; its exit status, or None if running/not ours."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _is_ours(record: _Record) -> bool:
    """The recorded process still runs (and its pid was not reused by another)."""
    if Path("/proc").is_dir():
        return record.start_ticks is not None and _start_ticks(record.pid) == record.start_ticks
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _spawn(command: LaunchCommand, *, log_path: Path) -> int:
    program = command.argv[0]
    path = program if os.sep in program else shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"{program!r} is not on PATH")
    env = {**os.environ, **command.env}
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return os.posix_spawn(
        path,
        list(command.argv),
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), flags, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


def _free_port(host: str, *, avoid: Collection[int] = ()) -> int:
    """A port free on ``host`` now, none of ``avoid`` (those a stopped instance keeps)."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in avoid:
            return port
    raise OSError(f"no free port on {host} outside the {len(avoid)} kept by instances")


def _port_free(host: str, port: int) -> bool:
    """Whether an engine could listen on ``port`` now (binding as servers do, with
    ``SO_REUSEADDR``, so a just-closed listener's connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# --- the provider -----------------------------------------------------------------


class LocalProvider:
    """Launches engine processes on this machine; see the module docstring.

    ``launcher`` decides what runs (engine-sim by default); ``secrets`` resolves the
    BootSpec's secret names for each launch; ``host`` is the address engines bind and the
    instance's ``private_address`` host. Terminated records stay listed (as TERMINATED)
    for ``keep_terminated_seconds``, then are forgotten.
    """

    name = "local"

    def __init__(
        self,
        *,
        state_dir: Path,
        launcher: EngineLauncher | None = None,
        secrets: SecretSource = environment_secrets,
        host: str = "127.0.0.1",
        grace_seconds: float = 10.0,
        keep_terminated_seconds: float = 3600.0,
        clock: Clock | None = None,
        provider_name: ProviderName = ProviderName.LOCAL,
    ) -> None:
        self._records = _Records(Path(state_dir))
        self._launcher: EngineLauncher = launcher or EngineSimLauncher()
        self._secrets = secrets
        self._host = host
        self._grace = grace_seconds
        self._keep = keep_terminated_seconds
        self._clock: Clock = clock or SystemClock()
        self._provider_name = provider_name

    async def launch(self, request: LaunchRequest) -> Instance:
        secrets = await self._secrets(request)
        with self._records.locked():
            existing = self._find(request.cluster_id, request.launch_id)
            if existing is not None:
                return self._instance(existing)
            record = self._start(request, secrets)
        return self._instance(record)

    async def terminate(self, instance_id: str) -> None:
        record = self._records.load(instance_id)
        if record is None or record.terminated_at is not None:
            return
        await _stop(record.pid, alive=lambda: self._alive(record), grace=self._grace)
        with self._records.locked():
            current = self._records.load(instance_id) or record
            ended = current.terminated_at or self._clock.now()
            self._records.save(replace(current, terminated_at=ended))

    async def stop(self, instance_id: str) -> None:
        action = f"stopping local instance {instance_id}"
        record = self._records.load(instance_id)
        if record is None or record.terminated_at is not None:
            raise NotFound(action, "no such instance (or it is terminated)")
        if record.stopped_at is None:
            if not self._alive(record):
                raise NotFound(action, "the engine process has exited: nothing to stop")
            with self._records.locked():
                current = self._records.load(instance_id) or record
                record = replace(current, stopped_at=self._clock.now())
                self._records.save(record)
        stopping = record
        await _stop(stopping.pid, alive=lambda: self._alive(stopping), grace=self._grace)

    async def start(self, instance_id: str) -> Instance:
        action = f"starting local instance {instance_id}"
        record = self._records.load(instance_id)
        if record is None or record.terminated_at is not None:
            raise NotFound(action, "no such instance (or it is terminated)")
        if record.stopped_at is None:
            if self._alive(record):
                return self._instance(record)
            raise NotFound(action, "the engine process has exited: launch a new one")
        if self._alive(record):
            raise Transient(action, "the engine process is still stopping", retry_after=1.0)
        if record.request is None:
            raise Terminal(action, "its record keeps no launch request: terminate it instead")
        request = _request_from(record.request)
        secrets = await self._secrets(request)
        with self._records.locked():
            current = self._records.load(instance_id) or record
            if current.stopped_at is None or current.terminated_at is not None:
                return self._instance(current)  # started (or ended) by another caller
            started = self._respawn(current, request, secrets, action=action)
        return self._instance(started)

    async def list(self, cluster_id: str) -> builtins.list[Instance]:
        self._forget_old()
        return [
            self._instance(r) for r in self._records.all() if r.tags.get(CLUSTER_TAG) == cluster_id
        ]

    async def describe(self, instance_id: str) -> Instance:
        record = self._records.load(instance_id)
        if record is None:
            raise NotFound(f"describing local instance {instance_id}", "no such instance")
        return self._instance(record)

    async def find_by_launch_id(self, cluster_id: str, launch_id: str) -> Instance | None:
        record = self._find(cluster_id, launch_id)
        return None if record is None else self._instance(record)

    # -- beyond the protocol: what the agent reports ------------------------------

    def exit_status(self, instance_id: str) -> int | None:
        """How a gone process ended (exit code, or -N for signal N), if this process saw it
        end; None while it runs or when it was started by an earlier service process."""
        record = self._records.load(instance_id)
        if record is None or self._alive(record):
            return None
        reloaded = self._records.load(instance_id)
        return None if reloaded is None else reloaded.exit_status

    def log_path(self, instance_id: str) -> Path | None:
        record = self._records.load(instance_id)
        return None if record is None else Path(record.log_path)

    # -- internals ----------------------------------------------------------------

    def _kept_ports(self) -> set[int]:
        """Ports of instances not terminated: a stopped one starts there again."""
        return {r.port for r in self._records.all() if r.terminated_at is None}

    def _start(self, request: LaunchRequest, secrets: Mapping[str, str]) -> _Record:
        port = _free_port(self._host, avoid=self._kept_ports())
        instance_id = f"loc-{uuid.uuid4().hex[:16]}"
        log_path = self._records.directory / f"{instance_id}.log"
        try:
            command = self._launcher.command(
                request.boot, host=self._host, port=port, offer=request.offer, secrets=secrets
            )
            pid = _spawn(command, log_path=log_path)
        except (OSError, KeyError) as exc:
            raise Terminal(request.action, f"cannot start the engine process: {exc}") from exc
        record = _Record(
            instance_id=instance_id,
            launch_id=request.launch_id,
            pid=pid,
            start_ticks=_start_ticks(pid),
            host=self._host,
            port=port,
            zone=request.offer.zone,
            instance_type=request.offer.instance_type,
            spot=request.spot,
            launched_at=self._clock.now(),
            tags=dict(request.tags),
            log_path=str(log_path),
            engine=command.engine,
            engine_reason=command.engine_reason,
            request=_request_json(request),
        )
        self._records.save(record)
        return record

    def _respawn(
        self, record: _Record, request: LaunchRequest, secrets: Mapping[str, str], *, action: str
    ) -> _Record:
        launcher = self._launcher
        build = (
            launcher.restart_command if isinstance(launcher, EngineRestarter) else launcher.command
        )
        try:
            if not _port_free(record.host, record.port):  # another program took it meanwhile
                record = replace(record, port=_free_port(record.host, avoid=self._kept_ports()))
            command = build(
                request.boot,
                host=record.host,
                port=record.port,
                offer=request.offer,
                secrets=secrets,
            )
            pid = _spawn(command, log_path=Path(record.log_path))
        except (OSError, KeyError) as exc:
            raise Terminal(action, f"cannot start the engine process: {exc}") from exc
        started = replace(
            record,
            pid=pid,
            start_ticks=_start_ticks(pid),
            stopped_at=None,
            exit_status=None,
            engine=command.engine or record.engine,
            engine_reason=command.engine_reason or record.engine_reason,
        )
        self._records.save(started)
        return started

    def _find(self, cluster_id: str, launch_id: str) -> _Record | None:
        matches = [
            r
            for r in self._records.all()
            if r.launch_id == launch_id and r.tags.get(CLUSTER_TAG) == cluster_id
        ]
        chosen = pick_for_launch([self._instance(r) for r in matches])
        return None if chosen is None else self._records.load(chosen.instance_id)

    def _alive(self, record: _Record) -> bool:
        if record.terminated_at is not None:
            return False
        # A child of ours that exited is a zombie until reaped; keep how it ended.
        status = _reap(record.pid)
        if status is not None:
            self._records.save(replace(record, exit_status=status))
            return False
        return _is_ours(record)

    def _instance(self, record: _Record) -> Instance:
        alive = self._alive(record)
        state = InstanceState.RUNNING if alive else InstanceState.TERMINATED
        if record.stopped_at is not None and record.terminated_at is None:
            state = InstanceState.STOPPING if alive else InstanceState.STOPPED
        ended = None
        if state is InstanceState.TERMINATED and record.terminated_at is None:
            status = (self._records.load(record.instance_id) or record).exit_status
            how = "exited" if status is None else f"exited with status {status}"
            if status is not None and status < 0:
                how = f"was killed by signal {-status}"
            ended = f"the engine process {how}; its output is in {record.log_path}"
        return Instance(
            provider=self._provider_name,
            instance_id=record.instance_id,
            launch_id=record.launch_id,
            zone=record.zone,
            instance_type=record.instance_type,
            state=state,
            spot=record.spot,
            launched_at=utc(record.launched_at),
            tags=record.tags,
            private_address=record.address,
            engine=record.engine,
            engine_reason=record.engine_reason,
            ended_reason=ended,
        )

    def _forget_old(self) -> None:
        cutoff = self._clock.now() - self._keep
        for record in self._records.all():
            if record.terminated_at is not None and record.terminated_at < cutoff:
                self._records.delete(record)


def _request_json(request: LaunchRequest) -> dict[str, Any]:
    """A launch request as JSON for the record (it holds no secret values)."""
    boot = request.boot
    return {
        "offer": asdict(request.offer),
        "spot": request.spot,
        "boot": {
            "image": boot.image,
            "command": list(boot.command),
            "port": boot.port,
            "health_path": boot.health_path,
            "model_id": boot.model_id,
            "env": dict(boot.env),
            "secret_env_names": list(boot.secret_env_names),
            "cuda_version": boot.cuda_version,
            "startup_script": boot.startup_script,
        },
        "launch_id": request.launch_id,
        "tags": dict(request.tags),
    }


def _request_from(data: Mapping[str, Any]) -> LaunchRequest:
    offer = dict(data["offer"])
    offer["provider"] = ProviderName(offer["provider"])
    offer["labels"] = tuple((str(k), str(v)) for k, v in offer.get("labels", ()))
    boot = dict(data["boot"])
    boot["command"] = tuple(boot["command"])
    boot["secret_env_names"] = tuple(boot["secret_env_names"])
    return LaunchRequest(
        offer=Offer(**offer),
        spot=bool(data["spot"]),
        boot=BootSpec(**boot),
        launch_id=str(data["launch_id"]),
        tags=dict(data["tags"]),
    )


async def _stop(pid: int, *, alive: Callable[[], bool], grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
    if not alive():
        return
    _signal_group(pid, signal.SIGTERM)
    if not await _gone_within(alive, seconds=grace):
        _signal_group(pid, signal.SIGKILL)
        await _gone_within(alive, seconds=30.0)


async def _gone_within(alive: Callable[[], bool], *, seconds: float) -> bool:
    step = 0.05
    for _ in range(max(1, int(seconds / step))):
        if not alive():
            return True
        await asyncio.sleep(step)
    return not alive()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The process leads its own session (setsid), so its group id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def offer_for_this_machine(*, gpu: str, gpu_count: int, zone: str = "local") -> Offer:
    """An offer describing this machine, for launches that are not bought."""
    return Offer(
        provider=ProviderName.LOCAL,
        region="local",
        zone=zone,
        instance_type="local",
        gpu=gpu,
        gpu_count=gpu_count,
        vcpus=float(os.cpu_count() or 1),
        memory_gib=0.0,
        on_demand_usd_per_hour=0.0,
    )
