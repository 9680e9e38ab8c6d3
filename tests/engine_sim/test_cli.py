"""The command as users run it: ``python -m providers.engine_sim`` and ``autoscaler engine-sim``."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from click.testing import CliRunner

from autoscaler.cli import main

MODEL = "sim/cli-model"


@pytest.fixture
async def engine_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "providers.engine_sim",
        "--port", "0", "--model", MODEL, "--gpu", "NVIDIA L4", "--params-b", "3",
        "--time-scale", "100", "--api-key", "k1", "--fail-after", "2",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
        found = re.search(r"http://[\d.]+:\d+", line)
        assert found, f"no address announced: {line!r}"
        yield process, found.group(0)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_the_process_serves_then_dies_after_fail_after_requests(
    engine_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    process, url = engine_process
    headers = {"Authorization": "Bearer k1"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        assert (await client.get("/health")).status_code == 200
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == MODEL
        for _ in range(2):
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200
        code = await asyncio.wait_for(process.wait(), timeout=10)
        assert code != 0
        with pytest.raises(httpx.ConnectError):
            await client.get("/health")


def test_autoscaler_engine_sim_has_the_flags() -> None:
    result = CliRunner().invoke(main, ["engine-sim", "--help"])
    assert result.exit_code == 0, result.output
    for flag in (
        "--host", "--port", "--model", "--gpu", "--gpu-count", "--params-b", "--max-batch",
        "--api-key", "--time-scale", "--startup-delay", "--fail-after",
    ):  # fmt: skip
        assert flag in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "Quantum 9000"], "no performance figures for GPU 'Quantum 9000'"),
        (["--gpu", "NVIDIA L4", "--params-b", "70"], "does not fit on 1 x NVIDIA L4"),
        (["--time-scale", "0"], "--time-scale"),
    ],
)
def test_bad_settings_are_refused_before_serving(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["engine-sim", *args])
    assert result.exit_code == 2
    assert message in result.output
