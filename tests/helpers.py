"""Test plumbing: PostgreSQL databases per test, a live API server, free ports, processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import asyncpg
import httpx
import uvicorn

from autoscaler.api.app import create_app
from autoscaler.api.deps import ApiState
from autoscaler.service import STOP_BOUND_SEC, ensure_admin_token, utc_now
from autoscaler.store.db import open_store, session_factory


async def pg_available(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(f"{dsn}/postgres", timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def pg_create_database(dsn: str, name: str, *, template: str | None = None) -> None:
    """Create database ``name``: empty, or a copy of database ``template`` (which must
    have no connections open)."""
    conn = await asyncpg.connect(f"{dsn}/postgres")
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()


async def pg_drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(f"{dsn}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], *, timeout: float = 20.0, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


_PROBE = httpx.Client(timeout=1.0, limits=httpx.Limits(max_keepalive_connections=0))
"""The one client every probe uses (each request on a new connection, as before): a client
made per request builds its SSL context each time, most of what a refused probe costs."""


def http_ok(url: str) -> bool:
    try:
        return _PROBE.get(url).status_code == 200
    except httpx.TransportError:
        return False


class ApiServer:
    """The management API on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread on exit
            self._error = exc

    async def _serve(self) -> None:
        async with open_store(self.database_url) as engine:
            sessions = session_factory(engine)
            await ensure_admin_token(sessions, announce=lambda _text: None)
            app = create_app(ApiState(sessions=sessions, now=utc_now))
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
            self._server = uvicorn.Server(config)
            await self._server.serve()

    def __enter__(self) -> ApiServer:
        self._thread.start()
        wait_until(
            lambda: http_ok(self.url + "/healthz") or not self._thread.is_alive(),
            what="the API server to start",
        )
        if not self._thread.is_alive():
            raise RuntimeError(f"the API server died: {self._error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=15)
        if self._error is not None:
            raise self._error


SERVICE_STOP_GRACE = STOP_BOUND_SEC + 5.0
"""How long a stopped child gets after SIGTERM: the service's stated shutdown bound
(its watchdog ends it by then) and a margin for a loaded machine. A wait on the process's
exit, so a child that stops at once costs nothing."""

ENGINE_STATE_DIRS = ("local-instances", "simulated-instances")
"""Where ``autoscaler run`` records the engine processes it starts, under its data dir."""


class Process:
    """A child process that is always stopped: SIGTERM, then SIGKILL after a grace period.

    With ``AUTOSCALER_DATA_DIR`` in its environment, stopping it also proves that no engine
    process it recorded there outlived it: a survivor (its engines run in sessions of their
    own, so they outlive a service that is killed) is killed and the stop fails loudly.
    """

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.output: str | None = None

    def __enter__(self) -> Process:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        return self

    def stop(self, grace: float = SERVICE_STOP_GRACE) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.output is None:
            assert self.proc.stdout is not None
            self.output = self.proc.stdout.read()
            self.proc.stdout.close()
        role = self._role()
        if role == "agent":
            # An agent leaves its replicas running when it stops, by design: a restarted
            # agent adopts them from its state dir. The test ends them here.
            kill_surviving_engines(self._flag("--state-dir"), under=("replicas",))
            return self.output
        survivors = kill_surviving_engines(
            self.env.get("AUTOSCALER_DATA_DIR") if role in ("run", "controller") else None
        )
        assert not survivors, (
            f"engine processes {survivors} outlived {' '.join(self.argv[-6:])} "
            f"(exit status {self.proc.returncode}); killed now. Its output:\n{self.output[-3000:]}"
        )
        return self.output

    def _role(self) -> str | None:
        """The ``autoscaler`` subcommand this process runs. Only ``run`` and ``controller``
        start the engines recorded under the data dir; another process given the same
        environment (an agent beside the service) does not own them."""
        if "autoscaler" not in self.argv[:-1]:
            return None
        return self.argv[self.argv.index("autoscaler") + 1]

    def _flag(self, name: str) -> str | None:
        if name not in self.argv[:-1]:
            return None
        return self.argv[self.argv.index(name) + 1]

    def __exit__(self, *exc: object) -> None:
        self.stop()


def autoscaler_cli(*args: str) -> list[str]:
    """The argv that runs this checkout's ``autoscaler`` command."""
    return [sys.executable, "-m", "autoscaler", *args]


def run_argv(
    *, api_port: int, gateway_port: int, config: Path, extra: Sequence[str] = ()
) -> list[str]:
    """``autoscaler run`` on the given ports with a controller config file."""
    return autoscaler_cli(
        "run",
        "--api-port",
        str(api_port),
        "--gateway-port",
        str(gateway_port),
        "--config",
        str(config),
        *extra,
    )


def pid_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False  # it ended (and was reaped) between the signal and the read
    return state != "Z"


def recorded_pids(directory: Path) -> list[int]:
    """The pids in a local provider's (or agent's) per-launch state files."""
    if not directory.exists():
        return []
    return [json.loads(p.read_text())["pid"] for p in directory.glob("*.json")]


def kill_recorded(directory: Path) -> None:
    """Teardown: kill and reap every recorded engine process, and prove none survived."""
    for pid in recorded_pids(directory):
        if pid_running(pid):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        assert not pid_running(pid), f"engine process {pid} survived the test"


def _recorded_engines(directory: Path) -> list[tuple[int, int | None]]:
    """(pid, start ticks) of each engine process recorded in ``directory``."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            found.append((int(record["pid"]), record.get("start_ticks")))
    return found


def _start_ticks(pid: int) -> int | None:
    """A running process's start time in clock ticks since boot; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def kill_surviving_engines(
    data_dir: str | Path | None, *, under: Sequence[str] = ENGINE_STATE_DIRS
) -> list[int]:
    """Kill (the process group of) every engine recorded in the ``under`` folders of a
    service's data dir that still runs; their pids. A recorded pid now used by another
    program (its start time differs) is left alone."""
    if not data_dir:
        return []
    survivors = []
    for name in under:
        for pid, ticks in _recorded_engines(Path(data_dir) / name):
            if ticks is not None and _start_ticks(pid) == ticks:
                survivors.append(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
    wait_until(
        lambda: all(_start_ticks(pid) is None for pid in survivors),
        timeout=30,
        what=f"engine processes {survivors} to end",
    )
    return survivors


class RunningService:
    """``autoscaler run`` as a child process, and its CLI bound to one project.

    ``with RunningService(argv, env=…, api_url=…, token=…, project=…) as service:``
    waits for ``/healthz``; ``service.cli(*args)`` runs a client command and
    ``service.ok(*args)`` runs one that must succeed, returning its stdout.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        api_url: str,
        token: str,
        project: str,
    ) -> None:
        self.process = Process(argv, env=env)
        self.url = api_url
        self.env = {
            **self.process.env,
            "AUTOSCALER_URL": api_url,
            "AUTOSCALER_SDK_TOKEN": token,
            "AUTOSCALER_PROJECT": project,
        }

    def __enter__(self) -> RunningService:
        self.process.__enter__()
        wait_until(lambda: http_ok(self.url + "/healthz"), timeout=60, what="autoscaler run")
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()

    def stop(self) -> str:
        """Stop the service (SIGTERM, then SIGKILL after its stated shutdown bound) and
        prove its engines stopped with it; its combined output."""
        return self.process.stop()

    def with_project(self, project: str) -> RunningService:
        """The same service, its CLI bound to another project."""
        other = object.__new__(RunningService)
        other.process, other.url = self.process, self.url
        other.env = {**self.env, "AUTOSCALER_PROJECT": project}
        return other

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            autoscaler_cli(*args), env=self.env, capture_output=True, text=True, timeout=60
        )

    def ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout
