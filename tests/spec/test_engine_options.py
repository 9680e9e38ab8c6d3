"""``max_model_len`` and ``custom_chat_template``: fields the engine starts with and sizing
reads, checked against the backend and the command, and part of what a replica boots."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from autoscaler.decide.inputs import model_size
from autoscaler.reconcile.provisioner import workload_boot
from autoscaler.spec import WorkloadSpec
from catalog.sizing import estimate_model_memory

TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def _spec(**extra: Any) -> WorkloadSpec:
    return WorkloadSpec(name="chat", slug="chat", model="meta-llama/Llama-3.1-8B-Instruct", **extra)


def _argv(spec: WorkloadSpec) -> list[str]:
    return list(workload_boot(spec).command)


def test_vllm_starts_with_the_context_length_and_the_template() -> None:
    argv = _argv(
        _spec(command="--enable-prefix-caching", max_model_len=32768, custom_chat_template=TEMPLATE)
    )
    assert argv[argv.index("--max-model-len") + 1] == "32768"
    assert argv[argv.index("--chat-template") + 1] == TEMPLATE  # one argument, newlines kept
    assert "--enable-prefix-caching" in argv


def test_sglang_gets_its_own_context_flag() -> None:
    argv = _argv(_spec(backend="sglang", max_model_len=8192))
    assert argv[argv.index("--context-length") + 1] == "8192"
    assert "--max-model-len" not in argv


def test_sizing_reserves_kv_cache_for_the_field_as_for_the_flag() -> None:
    short, long = _spec(max_model_len=4096), _spec(max_model_len=131072)
    flagged = _spec(command="--max-model-len 131072")
    long_gib = estimate_model_memory(long.model, long.engine_command).gib
    assert estimate_model_memory(short.model, short.engine_command).gib < long_gib
    assert long_gib == estimate_model_memory(flagged.model, flagged.engine_command).gib
    assert model_size(long) == model_size(flagged)


def test_changing_either_rolls_the_replicas() -> None:
    base = _spec(max_model_len=4096).replica_identity()
    assert _spec(max_model_len=8192).replica_identity() != base
    assert _spec(max_model_len=4096, custom_chat_template=TEMPLATE).replica_identity() != base


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"backend": "ollama", "max_model_len": 4096}, "max_model_len", "ollama takes its context"),
        (
            {"command": "--max-model-len 2048", "max_model_len": 4096},
            "max_model_len",
            "give it once",
        ),
        (
            {"command": "--context-length=2048", "max_model_len": 4096},
            "max_model_len",
            "give it once",
        ),
        ({"custom_chat_template": "chatml"}, "custom_chat_template", "must be a Jinja template"),
        ({"custom_chat_template": "{" * 40000}, "custom_chat_template", "at most 32768"),
        ({"max_model_len": 8}, "max_model_len", "greater than or equal to 16"),
    ],
)
def test_refused_naming_the_field(extra: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(**extra)
    [error] = info.value.errors()
    assert error["loc"] == (field,)
    assert says in str(info.value)
