"""engine-sim takes vLLM's LoRA flags: lists the adapters in ``/v1/models`` as vLLM does,
answers a request naming one under its name, and refuses an unknown model with vLLM's 404."""

from __future__ import annotations

import httpx
import openai
import pytest
from click.testing import CliRunner

import providers.engine_sim.server as server_module
from autoscaler.cli import main
from providers.engine_sim.config import EngineSimConfig
from tests.engine_sim.conftest import MODEL, StartEngine

ADAPTERS = (("sql", "acme/llama-sql-lora"), ("support", "/models/support"))


async def test_adapters_are_listed_and_answer_under_their_name(
    start_engine: StartEngine,
) -> None:
    server = await start_engine(enable_lora=True, lora_modules=ADAPTERS)
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", max_retries=0
    ) as client:
        models = [m async for m in client.models.list()]
        chat = await client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        base = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="nope", prompt="x", max_tokens=2)
    cards = [(m.id, getattr(m, "root", None), getattr(m, "parent", None)) for m in models]
    assert cards == [
        (MODEL, MODEL, None),
        ("sql", "acme/llama-sql-lora", MODEL),
        ("support", "/models/support", MODEL),
    ]
    assert chat.model == "sql"
    assert base.model == MODEL
    assert missing.value.status_code == 404


async def test_an_unknown_model_is_refused_with_vllms_own_404(start_engine: StartEngine) -> None:
    server = await start_engine(enable_lora=True, lora_modules=ADAPTERS)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert response.status_code == 404
    # vLLM's create_error_response(..., err_type="NotFoundError", status_code=404, param="model")
    assert response.json() == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_the_command_line_takes_vllms_lora_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[EngineSimConfig] = []
    monkeypatch.setattr(server_module, "run", seen.append)
    args = ["--enable-lora", "--max-loras", "2", "--lora-modules", "sql=acme/sql", "b=/m/b"]
    result = CliRunner().invoke(main, ["engine-sim", "--model", "m", *args, "--port", "0"])
    assert result.exit_code == 0, result.output
    [config] = seen
    assert config.enable_lora
    assert config.lora_modules == (("sql", "acme/sql"), ("b", "/m/b"))
    assert config.port == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-modules", "sql=acme/sql"], "needs enable_lora"),
        (["--enable-lora", "--lora-modules", "sql"], "'sql' is not NAME=SOURCE"),
        (["--enable-lora", "--lora-modules", "m=acme/sql"], "the model's or given twice"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_lora_flags_are_refused(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["engine-sim", "--model", "m", *args])
    assert result.exit_code == 2
    assert message in result.output
