"""Backends become boot specs: images, ports, health paths, commands, secrets by name."""

from __future__ import annotations

import pytest

from providers.engines import (
    ENGINE_KEY_SECRET,
    CommandError,
    boot_spec,
    engine_argv,
    expand_secrets,
    image_for,
    secret_ref,
)

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("backend", "image", "port", "health"),
    [
        ("vllm", "vllm/vllm-openai:v0.11.0", 8000, "/health"),
        ("vllm-omni", "vllm/vllm-omni:v0.12.0rc1", 8000, "/health"),
        ("sglang", "lmsysorg/sglang:v0.5.5", 30000, "/health"),
        ("ollama", "ollama/ollama:0.13.5", 11434, "/api/version"),
    ],
)
def test_each_backend_has_its_image_port_and_health_path(
    backend: str, image: str, port: int, health: str
) -> None:
    boot = boot_spec(backend=backend, model=MODEL, cuda_version="12.4")

    assert (boot.image, boot.port, boot.health_path) == (image, port, health)
    assert boot.model_id == MODEL
    assert boot.cuda_version == "12.4"
    assert "HF_TOKEN" in boot.secret_env_names


def test_vllm_serves_the_model_with_the_replica_key_and_the_users_extra_args() -> None:
    boot = boot_spec(
        backend="vllm",
        model=MODEL,
        command=f"vllm serve {MODEL} --max-model-len 8192 --served-model-name 'qwen small'",
    )

    assert boot.command == (
        "vllm",
        "serve",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--api-key",
        "${ENGINE_API_KEY}",
        "--max-model-len",
        "8192",
        "--served-model-name",
        "qwen small",
    )
    assert ENGINE_KEY_SECRET in boot.secret_env_names
    assert all("sk-" not in value for value in boot.env.values())


def test_a_command_of_only_arguments_is_accepted() -> None:
    argv = engine_argv(backend="vllm", model=MODEL, command="--enforce-eager --dtype half")
    assert argv[-3:] == ("--enforce-eager", "--dtype", "half")


def test_vllm_version_pins_the_image_tag() -> None:
    assert image_for(backend="vllm", vllm_version="0.6.3") == "vllm/vllm-openai:v0.6.3"
    assert image_for(backend="vllm-omni", vllm_version="v0.14.0") == "vllm/vllm-omni:v0.14.0"
    with pytest.raises(ValueError, match="not a version"):
        image_for(backend="vllm", vllm_version="latest; rm -rf /")
    with pytest.raises(ValueError, match="vllm and vllm-omni only"):
        image_for(backend="sglang", vllm_version="0.6.3")


@pytest.mark.parametrize(
    ("backend", "command", "flag"),
    [
        ("vllm", "--port 9000", "--port"),
        ("vllm", "--api-key=abc", "--api-key"),
        ("vllm", "--api_key abc", "--api-key"),
        ("vllm", "--host 127.0.0.1", "--host"),
        ("vllm-omni", "--model other", "--model"),
        ("sglang", "--model-path other", "--model-path"),
        ("sglang", "python3 -m sglang.launch_server --port 1", "--port"),
    ],
)
def test_flags_the_service_owns_are_refused_naming_the_flag(
    backend: str, command: str, flag: str
) -> None:
    with pytest.raises(CommandError, match=f"command sets {flag}, which the service owns"):
        engine_argv(backend=backend, model=MODEL, command=command)


def test_a_command_serving_another_model_is_refused() -> None:
    with pytest.raises(CommandError, match="serves model 'other/model'"):
        engine_argv(backend="vllm", model=MODEL, command="vllm serve other/model")


def test_a_command_for_another_engine_is_refused() -> None:
    with pytest.raises(CommandError, match="not how backend 'vllm' starts"):
        engine_argv(backend="vllm", model=MODEL, command="python3 -m sglang.launch_server")


def test_an_unparseable_command_is_refused() -> None:
    with pytest.raises(CommandError, match="cannot be parsed"):
        engine_argv(backend="vllm", model=MODEL, command="--chat-template 'unclosed")


def test_ollama_takes_no_arguments_and_no_key() -> None:
    boot = boot_spec(backend="ollama", model="llama3.2:1b")
    assert boot.command == ("ollama", "serve")
    assert ENGINE_KEY_SECRET not in boot.secret_env_names
    with pytest.raises(CommandError, match="ollama takes no command-line arguments"):
        engine_argv(backend="ollama", model="llama3.2:1b", command="--verbose")


def test_sglang_gets_its_model_path_and_embedding_flag() -> None:
    argv = engine_argv(backend="sglang", model=MODEL, task_type="embedding")
    assert argv[:5] == ("python3", "-m", "sglang.launch_server", "--model-path", MODEL)
    assert "--is-embedding" in argv


def test_vllm_omni_serves_with_omni() -> None:
    argv = engine_argv(backend="vllm-omni", model="Qwen/Qwen-Image", task_type="text2image")
    assert argv[:4] == ("vllm", "serve", "Qwen/Qwen-Image", "--omni")


@pytest.mark.parametrize(
    ("version", "expected"),
    [(None, ("--runner", "pooling")), ("0.8.5", ("--task", "embed"))],
)
def test_vllm_pooling_tasks_follow_the_version(
    version: str | None, expected: tuple[str, str]
) -> None:
    argv = engine_argv(backend="vllm", model=MODEL, task_type="embedding", vllm_version=version)
    assert argv[-2:] == expected
    user_chose = engine_argv(
        backend="vllm", model=MODEL, task_type="embedding", command="--runner pooling"
    )
    assert user_chose.count("--runner") == 1


def test_an_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known backends are ollama, sglang, vllm, vllm-omni"):
        boot_spec(backend="tgi", model=MODEL)


def test_secrets_are_expanded_where_the_engine_starts_and_a_missing_one_is_named() -> None:
    argv = ["vllm", "--api-key", secret_ref(ENGINE_KEY_SECRET)]
    names = [ENGINE_KEY_SECRET]
    assert expand_secrets(argv, secrets={ENGINE_KEY_SECRET: "k1"}, names=names)[-1] == "k1"
    with pytest.raises(KeyError, match="ENGINE_API_KEY"):
        expand_secrets(argv, secrets={}, names=names)
    with pytest.raises(CommandError, match="refers to a secret"):
        engine_argv(backend="vllm", model=MODEL, command="--x ${ENGINE_API_KEY}")


def test_vllm_boots_able_to_sleep_only_when_asked() -> None:
    plain = boot_spec(backend="vllm", model=MODEL)
    sleepy = boot_spec(backend="vllm", model=MODEL, sleep_mode=True)

    assert "--enable-sleep-mode" not in plain.command
    assert "VLLM_SERVER_DEV_MODE" not in plain.env
    assert sleepy.command.count("--enable-sleep-mode") == 1
    # The routes exist only in vLLM's development mode.
    assert sleepy.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert sleepy.env["HF_HOME"] == plain.env["HF_HOME"]


def test_a_sleep_flag_the_user_gave_is_not_repeated() -> None:
    argv = engine_argv(backend="vllm", model=MODEL, command="--enable-sleep-mode", sleep_mode=True)

    assert argv.count("--enable-sleep-mode") == 1


@pytest.mark.parametrize("backend", ["ollama", "vllm-omni"])
def test_a_backend_that_cannot_sleep_is_refused_sleep_mode(backend: str) -> None:
    with pytest.raises(CommandError, match=f"backend '{backend}' cannot sleep.*vllm"):
        boot_spec(backend=backend, model=MODEL, sleep_mode=True)


def test_sglang_boots_with_its_memory_saver_when_asked() -> None:
    argv = engine_argv(backend="sglang", model=MODEL, sleep_mode=True)

    assert "--enable-memory-saver" in argv
    assert "--enable-weights-cpu-backup" in argv
