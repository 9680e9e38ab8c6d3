"""This machine as a provider: real engine-sim processes on 127.0.0.1, talked to over HTTP.

Every test's state directory is swept on teardown: any process a record names is killed
and the test fails if one was still running that the test did not mean to leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog.model import Offer, ProviderName
from providers.base import BootSpec, InstanceState, LaunchRequest, NotFound, Provider, Terminal
from providers.engines import ENGINE_KEY_SECRET, boot_spec
from providers.local import EngineSimLauncher, LaunchCommand, LocalProvider
from tests.helpers import kill_recorded, pid_running, recorded_pids
from tests.providers.contract import (
    Capability,
    ErrorKind,
    ProviderContract,
    ProviderHarness,
    make_request,
)

OFFER = Offer(
    provider=ProviderName.LOCAL,
    region="local",
    zone="local",
    instance_type="local",
    gpu="NVIDIA A10G",
    gpu_count=1,
    vcpus=2,
    memory_gib=8,
    on_demand_usd_per_hour=0.0,
    spot_usd_per_hour=0.0,
)
ENGINE_KEY = "ek-test-" + "e" * 24


async def fixed_secrets(_request: LaunchRequest) -> Mapping[str, str]:
    return {ENGINE_KEY_SECRET: ENGINE_KEY}


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "local"
    yield directory
    kill_recorded(directory)


def with_reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def rewrite_record(state_dir: Path, *, start_ticks_delta: int) -> dict[str, Any]:
    [record_path] = state_dir.glob("*.json")
    record: dict[str, Any] = json.loads(record_path.read_text())
    record["start_ticks"] += start_ticks_delta
    record_path.write_text(json.dumps(record))
    return record


class LocalHarness:
    offer = OFFER
    capabilities: frozenset[Capability] = frozenset({"stop_spot"})

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def new_provider(self) -> Provider:
        return LocalProvider(
            state_dir=self.state_dir,
            launcher=EngineSimLauncher(time_scale=50.0),
            secrets=fixed_secrets,
            grace_seconds=5.0,
        )

    async def fail_launches(self, kind: ErrorKind | None) -> None:
        raise AssertionError("this machine cannot run out of capacity")

    async def preempt(self, instance_id: str) -> None:
        raise AssertionError("this machine has no spot market")

    async def settle(self) -> None:
        return None


class TestLocalContract(ProviderContract):
    @pytest.fixture
    def harness(self, state_dir: Path) -> ProviderHarness:
        return LocalHarness(state_dir)


@dataclass(frozen=True)
class ShellLauncher:
    """Runs a bash snippet instead of an engine."""

    script: str

    def command(
        self, boot: BootSpec, *, host: str, port: int, offer: Offer, secrets: Mapping[str, str]
    ) -> LaunchCommand:
        return LaunchCommand(("bash", "-c", self.script))


def provider(state_dir: Path, **kwargs: object) -> LocalProvider:
    return LocalProvider(state_dir=state_dir, secrets=fixed_secrets, **kwargs)  # type: ignore[arg-type]


def request_for(model: str = "Qwen/Qwen2.5-0.5B-Instruct") -> LaunchRequest:
    request = make_request(LocalHarness(Path()), cluster_id="c-local")
    boot = boot_spec(backend="vllm", model=model)
    return LaunchRequest(
        offer=request.offer,
        spot=False,
        boot=boot,
        launch_id=request.launch_id,
        tags=request.tags,
    )


async def wait_healthy(base: str) -> None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        for _ in range(400):
            try:
                if (await client.get(f"{base}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{base} never answered /health")


async def test_a_launched_engine_serves_with_its_own_key_and_stops_on_terminate(
    state_dir: Path,
) -> None:
    local = provider(state_dir, launcher=EngineSimLauncher(time_scale=50.0))
    instance = await local.launch(request_for())
    base = f"http://{instance.private_address}"
    assert instance.private_address is not None
    assert instance.private_address.startswith("127.0.0.1:")

    await wait_healthy(base)
    async with httpx.AsyncClient(timeout=10.0) as client:
        body = {
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        denied = await client.post(f"{base}/v1/chat/completions", json=body)
        served = await client.post(
            f"{base}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {ENGINE_KEY}"},
        )
    assert denied.status_code == 401
    assert served.status_code == 200
    assert served.json()["choices"][0]["message"]["content"]

    [pid] = recorded_pids(state_dir)
    await local.terminate(instance.instance_id)
    assert not pid_running(pid)
    assert (await local.describe(instance.instance_id)).state is InstanceState.TERMINATED
    async with httpx.AsyncClient(timeout=1.0) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{base}/health")


async def test_an_engine_ignoring_sigterm_is_killed_after_the_grace_period(
    state_dir: Path,
) -> None:
    local = provider(
        state_dir, launcher=ShellLauncher("trap '' TERM; sleep 60 & wait"), grace_seconds=0.3
    )
    instance = await local.launch(request_for())
    [pid] = recorded_pids(state_dir)
    assert pid_running(pid)

    await local.terminate(instance.instance_id)

    assert not pid_running(pid)
    assert (await local.describe(instance.instance_id)).state is InstanceState.TERMINATED


async def test_a_process_that_exits_by_itself_is_gone_with_its_exit_status(
    state_dir: Path,
) -> None:
    local = provider(state_dir, launcher=ShellLauncher("exit 3"))
    instance = await local.launch(request_for())

    for _ in range(100):
        if (await local.describe(instance.instance_id)).state is InstanceState.TERMINATED:
            break
        await asyncio.sleep(0.02)

    assert (await local.describe(instance.instance_id)).state is InstanceState.TERMINATED
    assert local.exit_status(instance.instance_id) == 3


async def test_a_pid_that_is_no_longer_ours_is_never_signalled(state_dir: Path) -> None:
    local = provider(state_dir, launcher=ShellLauncher("sleep 60"))
    instance = await local.launch(request_for())
    # As if the engine died and the OS gave its pid to another program since.
    record = rewrite_record(state_dir, start_ticks_delta=-1)

    described = await provider(state_dir).describe(instance.instance_id)
    await provider(state_dir).terminate(instance.instance_id)

    assert described.state is InstanceState.TERMINATED
    assert pid_running(record["pid"])  # the stranger lives on; the fixture cleans it up


async def test_a_missing_engine_program_is_terminal_and_names_the_launch(
    state_dir: Path,
) -> None:
    local = provider(state_dir, launcher=EngineSimLauncher(python="/nonexistent/python"))
    request = request_for()

    with pytest.raises(Terminal, match=r"launching local .*support-bot: cannot start"):
        await local.launch(request)
    assert await local.list("c-local") == []


async def test_shutdown_stops_every_engine_even_those_that_hold_out_against_sigterm(
    state_dir: Path,
) -> None:
    """``autoscaler run``'s engine step has a fixed time (``STOP_STEP_SEC``); engines that
    each take the whole SIGTERM grace would, one after another, overrun it and be left
    running. All are signalled together, so all are gone when the step ends."""
    from types import SimpleNamespace
    from typing import cast

    from autoscaler.catalog_sync import LiveCatalog
    from autoscaler.controller import Controller
    from autoscaler.reconcile.deps import Deps, ProviderEntry, ProviderRegistry, Settings
    from autoscaler.service import _bounded

    stubborn = ShellLauncher("trap '' TERM; while :; do sleep 1; done")
    local = provider(state_dir, launcher=stubborn, grace_seconds=5.0)  # as the service's
    for _ in range(3):
        await local.launch(request_for())
    pids = recorded_pids(state_dir)
    assert len(pids) == 3 and all(pid_running(pid) for pid in pids)
    deps = SimpleNamespace(
        providers=ProviderRegistry({ProviderName.LOCAL.value: ProviderEntry(local)}),
        settings=Settings(cluster_id="c-local"),
    )
    controller = Controller(deps=cast(Deps, deps), live=cast(LiveCatalog, None))

    await _bounded(controller.stop_local_replicas(), what="stop_local_replicas")

    assert [pid for pid in pids if pid_running(pid)] == []
    assert {i.state for i in await local.list("c-local")} == {InstanceState.TERMINATED}


async def test_the_harness_kills_and_names_engines_a_killed_service_left(tmp_path: Path) -> None:
    """Engines run in sessions of their own, so a service killed with SIGKILL leaves them
    running; stopping a test's service kills what its data dir records and names them."""
    from tests.helpers import kill_surviving_engines

    data_dir = tmp_path / "data"
    local = provider(data_dir / "local-instances", launcher=ShellLauncher("sleep 300"))
    await local.launch(request_for())
    [pid] = recorded_pids(data_dir / "local-instances")
    assert pid_running(pid)

    assert kill_surviving_engines(data_dir) == [pid]
    with_reap(pid)  # this test's provider started it: its child
    assert not pid_running(pid)
    assert kill_surviving_engines(data_dir) == []


def test_engine_sim_serves_sleep_routes_when_the_replica_boots_to_sleep() -> None:
    launcher = EngineSimLauncher()
    sleepy = boot_spec(backend="vllm", model="m", sleep_mode=True)
    plain = boot_spec(backend="vllm", model="m")

    def argv(boot: BootSpec) -> tuple[str, ...]:
        return launcher.command(boot, host="127.0.0.1", port=1, offer=OFFER, secrets={}).argv

    assert "--enable-sleep-mode" in argv(sleepy)
    assert "--enable-sleep-mode" not in argv(plain)


async def test_a_stopped_engine_keeps_its_address_and_serves_there_again_after_start(
    state_dir: Path,
) -> None:
    local = provider(state_dir, launcher=EngineSimLauncher(time_scale=50.0))
    instance = await local.launch(request_for())
    base = f"http://{instance.private_address}"
    await wait_healthy(base)
    [pid] = recorded_pids(state_dir)

    await local.stop(instance.instance_id)

    assert not pid_running(pid)
    async with httpx.AsyncClient(timeout=1.0) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{base}/health")
    after_restart = provider(state_dir, launcher=EngineSimLauncher(time_scale=50.0))
    stopped = await after_restart.describe(instance.instance_id)
    assert (stopped.state, stopped.ended_reason) == (InstanceState.STOPPED, None)

    started = await after_restart.start(instance.instance_id)

    assert (started.instance_id, started.private_address) == (
        instance.instance_id,
        instance.private_address,
    )
    await wait_healthy(base)
    assert recorded_pids(state_dir) != [pid]
    await after_restart.terminate(instance.instance_id)
    assert (await local.describe(instance.instance_id)).state is InstanceState.TERMINATED


async def test_an_engine_that_exited_by_itself_is_gone_not_stopped(state_dir: Path) -> None:
    local = provider(state_dir, launcher=ShellLauncher("exit 3"))
    instance = await local.launch(request_for())
    for _ in range(100):
        if (await local.describe(instance.instance_id)).state is InstanceState.TERMINATED:
            break
        await asyncio.sleep(0.02)

    with pytest.raises(NotFound, match="exited"):
        await local.stop(instance.instance_id)
    with pytest.raises(NotFound, match="exited"):
        await local.start(instance.instance_id)


async def test_a_stopped_engine_whose_port_was_taken_starts_on_another_and_says_where(
    state_dir: Path,
) -> None:
    local = provider(state_dir, launcher=EngineSimLauncher(time_scale=50.0))
    instance = await local.launch(request_for())
    assert instance.private_address is not None
    await wait_healthy(f"http://{instance.private_address}")
    await local.stop(instance.instance_id)
    host, port = instance.private_address.rsplit(":", 1)

    with socket.socket() as squatter:  # another program listens there meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, int(port)))
        squatter.listen()
        started = await local.start(instance.instance_id)
        assert started.private_address is not None
        assert started.private_address != instance.private_address
        await wait_healthy(f"http://{started.private_address}")
        assert (await local.describe(instance.instance_id)).state is InstanceState.RUNNING
    await local.terminate(instance.instance_id)


def test_engine_sim_serves_the_context_window_the_command_gives() -> None:
    """A workload's ``--max-model-len`` reaches engine-sim, which then refuses a longer
    prompt as the real engine would; without one engine-sim keeps no window."""
    launcher = EngineSimLauncher()

    def argv(command: str | None) -> tuple[str, ...]:
        boot = boot_spec(backend="vllm", model="m", command=command)
        return launcher.command(boot, host="127.0.0.1", port=1, offer=OFFER, secrets={}).argv

    windowed = argv("--max-model-len 16384 --enable-prefix-caching")
    assert windowed[windowed.index("--max-model-len") + 1] == "16384"
    assert "--max-model-len" not in argv(None)


@pytest.mark.parametrize(
    "command",
    [
        "--max-num-batched-tokens 512 --max-num-seqs=64",
        "--chunked-prefill-size=512 --max-running-requests 64",
    ],
)
def test_engine_sim_gets_the_batch_limits_the_command_gives(command: str) -> None:
    """The step token budget and sequence cap of the command reach engine-sim in vLLM's
    spelling, whichever engine's spelling the command used; without them, no flag."""
    launcher = EngineSimLauncher()

    def argv(command: str | None) -> tuple[str, ...]:
        boot = boot_spec(backend="vllm", model="m", command=command)
        return launcher.command(boot, host="127.0.0.1", port=1, offer=OFFER, secrets={}).argv

    limited = argv(command)
    assert limited[limited.index("--max-num-batched-tokens") + 1] == "512"
    assert limited[limited.index("--max-num-seqs") + 1] == "64"
    assert not {"--max-num-batched-tokens", "--max-num-seqs"} & set(argv("--max-model-len 4096"))
