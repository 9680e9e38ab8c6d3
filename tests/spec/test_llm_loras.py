"""``llm_loras``: LoRA adapters every replica loads at start, named for callers, checked
against the backend, the model and the command, and part of what a replica boots."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoscaler.reconcile.provisioner import workload_boot
from autoscaler.spec import WorkloadSpec, adapters_in_command
from providers.engines import masked_command

SQL = {"name": "sql", "source": "acme/llama-8b-sql-lora"}
LOCAL = {"name": "support-v2", "source": "/models/support-v2"}


def _spec(**extra: Any) -> WorkloadSpec:
    return WorkloadSpec(name="chat", slug="chat", model="meta-llama/Llama-3.1-8B-Instruct", **extra)


def _argv(spec: WorkloadSpec) -> list[str]:
    return list(workload_boot(spec).command)


def test_vllm_starts_with_the_adapters_enabled_loaded_and_counted() -> None:
    argv = _argv(_spec(command="--enable-prefix-caching", llm_loras=[SQL, LOCAL]))
    assert "--enable-lora" in argv and "--enable-prefix-caching" in argv
    assert argv[argv.index("--max-loras") + 1] == "2"
    start = argv.index("--lora-modules") + 1
    assert argv[start : start + 2] == [
        "sql=acme/llama-8b-sql-lora",
        "support-v2=/models/support-v2",
    ]
    assert "--lora-paths" not in argv
    assert adapters_in_command(argv) == {"sql", "support-v2"}


def test_sglang_gets_its_own_adapter_flags() -> None:
    argv = _argv(_spec(backend="sglang", llm_loras=[SQL]))
    assert "--enable-lora" in argv
    assert argv[argv.index("--lora-paths") + 1] == "sql=acme/llama-8b-sql-lora"
    assert argv[argv.index("--max-loras-per-batch") + 1] == "1"
    assert "--lora-modules" not in argv and "--max-loras" not in argv
    assert adapters_in_command(argv) == {"sql"}


def test_no_adapters_no_flags_and_describe_shows_them_readably() -> None:
    assert "--enable-lora" not in _argv(_spec())
    assert adapters_in_command(_argv(_spec())) == frozenset()
    shown = masked_command(_argv(_spec(llm_loras=[SQL])))
    assert "--lora-modules sql=acme/llama-8b-sql-lora" in shown


def test_adding_an_adapter_rolls_the_replicas() -> None:
    base = _spec(llm_loras=[SQL]).replica_identity()
    assert _spec(llm_loras=[SQL, LOCAL]).replica_identity() != base
    assert _spec().replica_identity() != base
    assert _spec(llm_loras=[SQL]).replica_identity() == base


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            {"backend": "ollama", "llm_loras": [SQL]},
            "llm_loras needs backend 'vllm' or 'sglang', not 'ollama': ollama takes an adapter",
        ),
        (
            {"backend": "vllm-omni", "task_type": "text2image", "llm_loras": [SQL]},
            "not 'vllm-omni'",
        ),
        ({"llm_loras": [SQL, {**LOCAL, "name": "sql"}]}, "llm_loras[1].name 'sql' is given twice"),
        (
            {"llm_loras": [{**SQL, "name": "meta-llama/Llama-3.1-8B-Instruct"}]},
            "adapter name 'meta-llama/Llama-3.1-8B-Instruct' is not allowed; allowed: 1-64",
        ),
        ({"llm_loras": [{**SQL, "name": "bad name"}]}, "adapter name 'bad name' is not allowed"),
        ({"llm_loras": [{**SQL, "name": "-x"}]}, "starting with a letter or digit"),
        (
            {"llm_loras": [{**SQL, "source": "a b; rm -rf /"}]},
            "adapter source 'a b; rm -rf /' is not allowed; allowed: a Hugging Face repo id",
        ),
        (
            {"llm_loras": [{**SQL, "source": "${HF_TOKEN}"}]},
            "adapter source '${HF_TOKEN}' is not allowed",
        ),
        ({"llm_loras": [{"name": "sql"}]}, "Field required"),
        ({"llm_loras": [{**SQL, "rank": 8}]}, "rank"),
        (
            {"command": "--lora-modules x=/a", "llm_loras": [SQL]},
            "the command's --lora-modules sets adapters too: give them once, in llm_loras",
        ),
        ({"command": "--max-loras=4", "llm_loras": [SQL]}, "the command's --max-loras"),
        (
            {"llm_loras": [{"name": f"a{i}", "source": "o/r"} for i in range(33)]},
            "at most 32",
        ),
    ],
)
def test_refused_naming_the_field_the_value_and_what_is_allowed(
    extra: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(**extra)
    [error] = info.value.errors()
    assert error["loc"][0] == "llm_loras"
    assert says in str(info.value)


def test_a_name_equal_to_the_base_model_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        WorkloadSpec(
            name="t", slug="t", model="tiny-chat", llm_loras=[{**SQL, "name": "tiny-chat"}]
        )
    assert "llm_loras[0].name 'tiny-chat' is the base model's name" in str(info.value)
